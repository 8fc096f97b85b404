"""The global random streams around work that must not touch them (scoring, FLOP counts, seeded set-ups)."""

from __future__ import annotations

import torch


def forked_rng(device: torch.device | str | None = None):
    """``torch.random.fork_rng`` over the host's generator and, for a CUDA ``device``, that device's: what runs
    inside (a search's scoring, a FLOP count, a ``torch.manual_seed``) leaves both streams as they were, so the
    training draws (drop path, dropout on the device) do not depend on it. Elsewhere the host's alone, as on the
    CPU every draw is the host's."""
    device = torch.device(device) if device is not None else None
    return torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else [])
