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

**Cross-fitting** (default). The dot product of two mean gradients taken on the *same* samples also holds
their sampling noise's covariance, ``tr Cov(g_full, g_c) / n``, which is largest for the candidates most like
the full model (for the full model itself it is its whole gradient variance). That bias favours growing to
the full model early, the more so the fewer samples. So the batches are split into two folds (even and odd
batches) and the dot product is taken across folds only, ``½(<g_full^A, g_c^B> + <g_full^B, g_c^A>)``: an
unbiased estimate of ``<E g_full, E g_c>`` at the cost of no extra gradient. ``folds=1`` is the plain
same-sample estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..controllers import ProxyTask
from ..errors import DivergedError

CRITERIA = ("paper", "gain")


@dataclass
class Gradients:
    """Mean gradients by parameter name, one dict per fold of the batches, and the mean loss over them."""

    folds: list[dict[str, torch.Tensor]]
    loss: float = math.nan
    _mean: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        """The gradient over all batches (the folds hold equal numbers of batches, or differ by one)."""
        if self._mean is None:
            self._mean = {n: sum(f[n] for f in self.folds) / len(self.folds) for n in self.folds[0]}
        return self._mean


def gradients(task: ProxyTask, folds: int = 2) -> Gradients:
    """The mean gradient of ``task.loss`` over ``task.batches`` for every learnable parameter, by name, for each
    of ``folds`` folds (batch ``i`` is in fold ``i % folds``; fewer batches than folds make one fold), and the
    mean loss; every parameter's ``.grad`` is as before (gradients a caller is accumulating are kept)."""
    batches = list(task.batches)
    folds = max(1, min(folds, len(batches)))
    params = dict(task.model.named_parameters())
    kept = {n: p.grad for n, p in params.items()}
    out, loss_sum = [], 0.0
    try:
        for f in range(folds):
            mine = batches[f::folds]
            for p in params.values():
                p.grad = None
            for batch in mine:
                loss = task.loss(task.model, batch)
                (loss / len(mine)).backward()
                loss_sum += float(loss.detach())
            out.append({n: p.grad.detach().clone() for n, p in params.items()
                        if p.requires_grad and p.grad is not None})
        names = set.intersection(*(set(g) for g in out))  # a parameter no batch reached in one fold is left out
        return Gradients([{n: g[n] for n in g if n in names} for g in out], loss_sum / max(1, len(batches)))
    finally:
        for n, p in params.items():
            p.grad = kept[n]


def _as_gradients(g) -> Gradients:
    return g if isinstance(g, Gradients) else Gradients([g])


def predicted_gain(target, grads) -> float:
    """``<target, g> / rms(g)`` over the parameters ``grads`` and ``target`` share (same name and shape): the
    first-order decrease of the target loss per unit learning rate of one Adam-like step along ``grads``.

    With :class:`Gradients` of two or more folds on both sides, the dot product pairs different folds only
    (cross-fitting, see the module docstring); plain dicts are one fold."""
    target, grads = _as_gradients(target), _as_gradients(grads)
    g_mean, t0 = grads.mean, target.folds[0]
    shared = [n for n, g in g_mean.items() if n in t0 and t0[n].shape == g.shape]
    if not shared:
        return 0.0
    if 1 < len(target.folds) == len(grads.folds):
        pairs = [(t, g) for i, t in enumerate(target.folds) for j, g in enumerate(grads.folds) if i != j]
    else:
        pairs = [(target.mean, g_mean)]
    dot = sum(float((t[n].double() * g[n].double()).sum()) for t, g in pairs for n in shared) / len(pairs)
    sq = sum(float(g_mean[n].double().pow(2).sum()) for n in shared)
    rms = math.sqrt(sq / sum(g_mean[n].numel() for n in shared))
    if not (math.isfinite(dot) and math.isfinite(rms)):
        return -math.inf  # a diverged candidate is never chosen
    return dot / rms if rms > 0 else 0.0


def gain_per_second(target, grads, seconds: float) -> float:
    gain = predicted_gain(target, grads)
    return gain / seconds if seconds > 0 and math.isfinite(gain) else -math.inf


def choose_by_gain(gains: list[float]) -> int:
    """The index of the largest finite gain per second (the first on ties); none finite (every candidate, or
    the target, diverged) is a :class:`~autoprog.errors.DivergedError`."""
    finite = [i for i, g in enumerate(gains) if math.isfinite(g)]
    if not finite:
        raise DivergedError("every candidate's predicted gain is non-finite: the model diverged during the search")
    return max(finite, key=lambda i: (gains[i], -i))
