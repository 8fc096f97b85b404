"""Optimizer helpers: AdamW parameter groups, and keeping optimizer state right when the model grows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .options import option

SEED_MIN, SEED_MAX = -(2 ** 31), 2 ** 32 - 1  # 32 bits, signed or not: derived seeds (seed * 1000003 + step) stay
# within 64 bits, and numpy takes seed % 2^32


@dataclass
class OptimConfig:
    """The optimisation settings every task shares (AdamW, a warm-up then a cosine or constant learning rate,
    gradient clipping, the seed), declared once: each task's config extends this class and picks its own
    defaults with :func:`autoprog.options.default`."""

    batch_size: int = option(64, "batch size per process", minimum=1, group="optimisation")
    lr: float = option(2e-4, "peak AdamW learning rate (after the warm-up)", above=0, group="optimisation")
    min_lr: float = option(0.0, "final learning rate of the cosine schedule", minimum=0, group="optimisation")
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0, group="optimisation")
    grad_clip: float | None = option(None, "max gradient norm (default: off, as the paper's official code; autoprog "
                                           "clipped at 1 before 2026-12-08, which three seeds of prog did not find "
                                           "better); 0 = off", minimum=0, zero_is_none=True, show_default=False,
                                     group="optimisation")
    seed: int = option(0, "random seed, a 32-bit integer (-2^31 to 2^32-1)", minimum=SEED_MIN, maximum=SEED_MAX,
                       group="optimisation")
    checkpoint_minutes: float = option(10.0, "also checkpoint inside an epoch or evaluation interval once this many "
                                             "minutes of training passed since the last checkpoint (0 = off); the "
                                             "seconds checkpoints take are reported as checkpoint_time_s",
                                       minimum=0, group="optimisation")
    gradient_checkpointing: bool = option(False, "recompute each block's activations in the backward pass instead "
                                                 "of keeping them: less memory (a larger batch fits), about a third "
                                                 "more compute per step", group="optimisation")
    compile: bool = option(False, "torch.compile each block (static shapes: one graph per input resolution the "
                                  "run meets, the compile cache sized to the growth space); the first step at each "
                                  "new resolution pays for compiling", group="optimisation")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; no decay for biases, norms, tokens, position embeddings and ReZero gates (1-D/0-D)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameter groups: fused (one kernel for every parameter) when they are all on a CUDA
    device or ``fused`` says so, else the multi-tensor ``foreach`` implementation (the CPU's, bit for bit as
    before)."""
    if fused is None:
        fused = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999),
                             **({"fused": True} if fused else {"foreach": True}))


def sync_params(optimizer: torch.optim.Optimizer, model: nn.Module, weight_decay: float) -> None:
    """Point the optimizer's groups at the model's current parameters (after gates were added/removed).

    State of parameters that still exist is kept; state of removed parameters is dropped.
    """
    groups = param_groups(model, weight_decay)
    live = {id(p) for g in groups for p in g["params"]}
    for p in list(optimizer.state):
        if id(p) not in live:
            del optimizer.state[p]
    for old, new in zip(optimizer.param_groups, groups):
        old["params"] = new["params"]


OPTIMIZER_AT_GROWTH = ("carry", "reset")  # --optimizer-at-growth: what AdamW's state does when a growth moves blocks


def follow_growth(optimizer: torch.optim.Optimizer, model: nn.Module, block_map: dict[int, int | None],
                  rule: str = "carry") -> None:
    """The optimizer's side of a growth by ``block_map``: ``carry`` moves each block's moments with its weights
    (:func:`remap_block_state`); ``reset`` clears every parameter's state when the growth adds or moves blocks, as
    the official code builds a new optimizer for each grown model."""
    if rule not in OPTIMIZER_AT_GROWTH:
        raise ConfigError(f"optimizer_at_growth must be one of {', '.join(OPTIMIZER_AT_GROWTH)}, got {rule!r}")
    if rule == "reset" and any(s != d for d, s in block_map.items()):
        optimizer.state.clear()
    else:
        remap_block_state(optimizer, model, block_map)


def remap_block_state(optimizer: torch.optim.Optimizer, model: nn.Module, block_map: dict[int, int | None]) -> None:
    """Move optimizer state along with the weights a growth copied: block ``dst`` gets ``src``'s moments.

    Re-initialised blocks (source ``None``) start with no state, as a fresh parameter would.
    """
    def block_state(i):
        return {n: {k: v.clone() for k, v in optimizer.state[p].items()}
                for n, p in model.blocks[i].named_parameters() if p in optimizer.state}

    snap = {s: block_state(s) for s in set(block_map.values()) if s is not None}
    for d, s in block_map.items():
        if s == d:
            continue
        src = snap.get(s, {}) if s is not None else {}
        for n, p in model.blocks[d].named_parameters():
            optimizer.state.pop(p, None)
            if n in src:
                optimizer.state[p] = {k: v.clone() for k, v in src[n].items()}


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, model: nn.Module,
                            host: bool = True) -> dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name: copies on the host, for safetensors; with ``host=False`` copies
    where the state is (a snapshot to restore within the run: no copy through the host, no wait for the GPU)."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        if p not in names:
            continue
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            out[f"{names[p]}::{k}"] = t.detach().cpu().contiguous() if host else t.detach().clone()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Optimizer state from :func:`optimizer_state_tensors`: moments on their parameters' devices; the step count
    where torch's own ``load_state_dict`` puts it (on the parameter's device, float32, for a fused or capturable
    group, whose kernels read it there; else a host tensor)."""
    params = dict(model.named_parameters())
    on_device = {id(q) for g in optimizer.param_groups if g.get("fused") or g.get("capturable") for q in g["params"]}
    kinds: dict[str, set[str]] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("::", 1)
        kinds.setdefault(name, set()).add(k)
        if name in params and k != "step" and v.shape != params[name].shape:
            raise ValueError(f"the optimizer state {key} has shape {tuple(v.shape)}, its parameter "
                             f"{tuple(params[name].shape)}")
    if len({frozenset(v) for v in kinds.values()}) > 1:  # every parameter with a state has the same kinds
        name = min(kinds, key=lambda n: len(kinds[n]))
        lacks = sorted(set.union(*kinds.values()) - kinds[name])
        raise ValueError(f"the optimizer state of {name} lacks {', '.join(lacks)}")
    optimizer.state.clear()
    for key, v in tensors.items():
        name, k = key.rsplit("::", 1)
        p = params.get(name)
        if p is None:
            continue
        if k != "step":  # (copies: a snapshot stays as it was, whatever the optimizer does next)
            v = v.to(p.device, copy=True)
        elif id(p) in on_device:
            v = v.to(device=p.device, dtype=torch.float32, copy=True)
        else:
            v = v.clone()
        optimizer.state.setdefault(p, {})[k] = v


def cosine_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup: int, peak: float, floor: float):
    """timm's per-step cosine from ``peak`` to ``floor`` over ``steps``, after a linear ``warmup`` from 1 % of the
    peak. timm's warning that a one-step cosine has no effect (a run of two steps) is not printed: the schedule is
    the one asked for."""
    import logging

    from timm.scheduler import CosineLRScheduler

    log = logging.getLogger("timm.scheduler.cosine_lr")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, steps - warmup), lr_min=floor, warmup_t=warmup,
                                 warmup_lr_init=peak * 0.01, warmup_prefix=True, t_in_epochs=False)
    finally:
        log.setLevel(level)


def warn_long_warmup(flag: str, warmup: float, default: float, length: float, unit: str) -> None:
    """A warm-up set (not the ``default``) over half the run is cut to its first half, the schedule's rule: a
    warning says so (the default's cut in a short run is what its help says)."""
    from .errors import warn

    if warmup != default and warmup > length / 2:
        warn(f"{flag} {warmup:g} is over half the run ({length:g} {unit}): the learning rate warms up over its "
             f"first half", once=True)


def check_lr_floor(cfg) -> None:
    """A cosine schedule's floor ``min_lr`` above its peak ``lr`` would raise the learning rate as it 'decays'."""
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}: the schedule would raise the learning "
                          "rate instead of decaying it")
