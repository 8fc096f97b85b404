"""What the per-step speed benchmarks share: the closing line and the JSON they write."""

from __future__ import annotations

import json

import torch


def report(a, device, what: str, full: dict, stages: list[dict], total: dict, extra: str = "") -> None:
    """Print the schedule's realised and FLOPs speed-up per step; write everything to ``a.out`` if given."""
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{what} on {dev} (batch {a.batch_size}, amp {a.amp}): {total['speedup']:.2f}x realised per step, "
          f"{total['flops_speedup']:.2f}x in FLOPs ({total['speedup'] / total['flops_speedup']:.0%} realised){extra}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": dev, "args": vars(a), "full": full, "stages": stages, "schedule": total}, f, indent=2)
