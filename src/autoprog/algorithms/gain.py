"""Our search criterion ``gain``: the predicted decrease of the *final* model's loss per second of training a
candidate.

The paper's rules judge a candidate by itself: its own loss (AutoProg-One) or proxies of its own trainability
and speed (AutoProg-Zero). Neither sees what training the candidate does for the model the run ends with,
so both favour the cheapest, lowest-resolution candidates. To first order, one step that trains candidate
``c`` with an Adam-like update (its gradient ``g_c`` scaled to unit RMS, as Adam's normalisation roughly
does) changes the loss of the full model at full resolution by ``-lr · <g_full, g_c> / rms(g_c)``. Per
second of training:

    gain(c) = <g_full, g_c> / (rms(g_c) · T_c)

``g_full`` is the gradient of the full model's loss at full resolution and ``g_c`` the candidate's, both on
the same fixed batches (the candidate's at its own resolution), over the parameters the candidate trains;
``T_c`` is its step time. The candidate with the largest gain wins; a non-finite gain never does.
"""

from __future__ import annotations

import math

import torch

from ..controllers import ProxyTask
from ..errors import DivergedError

CRITERIA = ("paper", "gain")


def gradients(task: ProxyTask) -> dict[str, torch.Tensor]:
    """The mean gradient of ``task.loss`` over ``task.batches`` for every learnable parameter, by name; every
    parameter's ``.grad`` is as before (gradients a caller is accumulating are kept)."""
    params = dict(task.model.named_parameters())
    kept = {n: p.grad for n, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        for batch in task.batches:
            (task.loss(task.model, batch) / len(task.batches)).backward()
        return {n: p.grad.detach().clone() for n, p in params.items() if p.requires_grad and p.grad is not None}
    finally:
        for n, p in params.items():
            p.grad = kept[n]


def predicted_gain(target: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> float:
    """``<target, g> / rms(g)`` over the parameters ``grads`` and ``target`` share (same name and shape): the
    first-order decrease of the target loss per unit learning rate of one Adam-like step along ``grads``."""
    shared = [n for n, g in grads.items() if n in target and target[n].shape == g.shape]
    if not shared:
        return 0.0
    dot = sum(float((target[n].double() * grads[n].double()).sum()) for n in shared)
    sq = sum(float(grads[n].double().pow(2).sum()) for n in shared)
    rms = math.sqrt(sq / sum(grads[n].numel() for n in shared))
    if not (math.isfinite(dot) and math.isfinite(rms)):
        return -math.inf  # a diverged candidate is never chosen
    return dot / rms if rms > 0 else 0.0


def gain_per_second(target: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], seconds: float) -> float:
    gain = predicted_gain(target, grads)
    return gain / seconds if seconds > 0 and math.isfinite(gain) else -math.inf


def choose_by_gain(gains: list[float]) -> int:
    """The index of the largest finite gain per second (the first on ties); none finite (every candidate, or
    the target, diverged) is a :class:`~autoprog.errors.DivergedError`."""
    finite = [i for i, g in enumerate(gains) if math.isfinite(g)]
    if not finite:
        raise DivergedError("every candidate's predicted gain is non-finite: the model diverged during the search")
    return max(finite, key=lambda i: (gains[i], -i))
