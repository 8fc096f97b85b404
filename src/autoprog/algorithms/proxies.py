"""Zero-shot proxies of AutoProg-Zero (Sec. 4.2.2, Eq. 16-19), for any ``torch.nn.Module``.

They score a candidate unfreezing schedule at the start of a stage, from the current weights and gradients
only, without training it. Only the *learnable* parameters count (``requires_grad=True``, or an explicit
``params`` list); the forward pass is the model's own, in whatever train/eval mode it is in.

* ``ntk_condition_number`` -- H_kappa (Eq. 16), trainability: lambda_max / lambda_min of the empirical
  neural tangent kernel over the learnable parameters. A large condition number means the slowest
  eigendirection converges slowly at the largest stable learning rate.
* ``zico`` -- H_ZiCo (Eq. 17), convergence rate and generalisation: minus the sum over layers of the log of
  the summed mean(|grad|)/std(grad) of the layer's learnable parameters, across batches (ZiCo, Li et al.,
  ICLR 2023, with the sign flipped).
* ``ranked_vote`` / ``autoprog_zero_vote`` -- Eq. 19: the weighted sum of each candidate's rank on every
  ballot; the smallest total wins.

Sign convention: for every proxy, **smaller is better**. Degenerate cases (no learnable parameters, a
singular kernel, non-finite values) give ``math.inf`` so they rank worst, never a spuriously good score.
Gradients are taken with ``torch.autograd.grad``; nothing is accumulated into ``.grad``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

PAPER_WEIGHTS = {"ntk": 0.5, "zico": 0.5, "time": 1.0}
# Step times closer than TIME_RTOL (relative) tie on the time ballot. The default, 0, is the paper's and the official
# code's exact ranking. NOISE_RTOL is ours (``--time-tolerance 0.05``): repeated timings of one candidate on a shared
# CPU spread by a few per cent, and that spread alone decided between otherwise equal candidates.
TIME_RTOL = 0.0
NOISE_RTOL = 0.05


def learnable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters of ``model`` with ``requires_grad=True``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _named(model: nn.Module, params: Sequence | None) -> list[tuple[str, Tensor]]:
    """``params`` (tensors or (name, tensor) pairs; default: the learnable ones) as (name, tensor) pairs."""
    if params is None:
        return learnable_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [p if isinstance(p, tuple) else (names.get(id(p), f"<param {i}>"), p)
            for i, p in enumerate(params)]


def _stack(grads: Sequence[Tensor | None], p: Tensor) -> Tensor:
    """Stack gradients of ``p``; ``None`` (the output does not depend on ``p``) is a zero gradient."""
    return torch.stack([torch.zeros_like(p) if g is None else g for g in grads])


@contextmanager
def _differentiable(params: Sequence[Tensor]) -> Iterator[None]:
    """Enable autograd and make ``params`` require grad for the duration; their flags are restored after."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def ntk_condition_number(
    model: nn.Module,
    inputs: Sequence,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    max_samples: int = 16,
    params: Sequence | None = None,
    eps: float = 1e-12,
) -> float:
    """H_kappa (Eq. 16): condition number lambda_max / lambda_min of the empirical NTK Theta = G G^T.

    Row i of G is the gradient, over the learnable parameters, of ``output_i.sum()`` for sample i (as in
    TE-NAS), so Theta is N x N for N samples. ``inputs`` is a sequence of batches; ``forward(model, batch)``
    (default ``model(batch)``) must return a tensor whose first dimension indexes samples. Batches are
    forwarded in order until ``max_samples`` samples are collected. ``params`` (tensors or (name, tensor)
    pairs) overrides the learnable set; they are made to require grad during the measurement only.
    Memory: N copies of the learnable parameters' gradients.

    Returns ``math.inf`` when there is nothing learnable, when Theta or its eigenvalues are not finite, or
    when Theta is numerically singular: lambda_min <= eps * lambda_max (a relative threshold, so the guard
    does not depend on the scale of the outputs).
    """
    if max_samples < 1:
        raise ConfigError(f"max_samples must be at least 1, got {max_samples}")
    ps = [p for _, p in _named(model, params)]
    if not ps:
        return math.inf
    forward = forward or (lambda m, batch: m(batch))
    rows: list[tuple[Tensor | None, ...]] = []  # per-sample gradients, one entry per parameter
    with _differentiable(ps):
        for batch in inputs:
            out = forward(model, batch)
            out = out.unsqueeze(0) if out.dim() == 0 else out
            for i in range(min(len(out), max_samples - len(rows))):
                rows.append(torch.autograd.grad(out[i].sum(), ps, retain_graph=True, allow_unused=True))
            del out
            if len(rows) == max_samples:
                break
    if not rows:
        raise ConfigError("ntk_condition_number needs at least one sample in `inputs`")
    theta = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=ps[0].device)
    for j, p in enumerate(ps):
        g = _stack([r[j] for r in rows], p).flatten(1).to(theta)
        theta += g @ g.T
    if not torch.isfinite(theta).all():
        return math.inf
    try:
        eig = torch.linalg.eigvalsh(theta)
    except torch.linalg.LinAlgError:
        return math.inf
    lo, hi = eig[0].item(), eig[-1].item()
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= 0 or lo <= eps * hi:
        return math.inf
    return hi / lo


def zico(
    model: nn.Module,
    batches: Sequence,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    params: Sequence | None = None,
    eps: float = 1e-12,
) -> float:
    """H_ZiCo (Eq. 17) over the learnable parameters: ``-sum_layers log(sum_elements mean|g| / std(g))``.

    One gradient g of the scalar ``loss_fn(model, batch)`` per batch (at least 2 batches). Per parameter
    element, mean|g| and the population std (``correction=0``, as ZiCo's ``np.std``) are taken across the
    batches. Elements whose std is numerically zero (std <= eps * mean|g|, which includes all-zero gradients)
    are masked, as in ZiCo. A layer is the module owning the parameters directly (the parameter name
    without its last component); a layer whose sum is 0 is skipped. ``params`` as in
    ``ntk_condition_number``.

    Returns ``math.inf`` when no layer contributes or a gradient is not finite.
    """
    batches = list(batches)
    if len(batches) < 2:
        raise ConfigError(f"zico needs at least 2 batches to take a std across them, got {len(batches)}")
    named = _named(model, params)
    ps = [p for _, p in named]
    if not ps:
        return math.inf
    with _differentiable(ps):
        grads = [torch.autograd.grad(loss_fn(model, b), ps, allow_unused=True) for b in batches]
    layers: dict[str, float] = defaultdict(float)
    for j, (name, p) in enumerate(named):
        g = _stack([gs[j] for gs in grads], p).double()
        if not torch.isfinite(g).all():
            return math.inf
        mean_abs, std = g.abs().mean(0), g.std(0, correction=0)
        keep = std > eps * mean_abs
        layers[name.rpartition(".")[0]] += (mean_abs[keep] / std[keep]).sum().item()
    logs = [math.log(s) for s in layers.values() if s > 0]
    return -math.fsum(logs) if logs else math.inf


def _rank_key(v: float) -> tuple[bool, float]:
    """Sort key: ascending value, NaN after everything (including inf)."""
    return (True, 0.0) if math.isnan(v) else (False, v)


def ranked_vote(
    candidates: Sequence, ballots: dict[str, tuple[Sequence[float], float]]
) -> tuple[int, list[dict]]:
    """Eq. 19 ranked voting: the winner minimises R = sum over ballots of weight * rank.

    ``ballots`` maps a metric name to (one value per candidate, weight). Each ballot ranks the candidates by
    ascending value with scores 1, 2, 3, ...; equal values share the smallest rank of their group ("min"
    ranking); inf ranks after every finite value and NaN after inf. Ties in R go to the earliest candidate,
    so callers should order candidates from cheapest to most expensive.

    Returns (index of the winner, table): one dict per candidate with ``candidate``, each metric's value,
    ``<metric>_rank`` and ``total``.
    """
    n = len(candidates)
    if n == 0:
        raise ConfigError("ranked_vote needs at least one candidate")
    table = [{"candidate": c, "total": 0.0} for c in candidates]
    for name, (values, weight) in ballots.items():
        values = [float(v) for v in values]
        if len(values) != n:
            raise ConfigError(f"ballot {name!r} has {len(values)} values for {n} candidates")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"ballot {name!r} has weight {weight}; it must be finite and non-negative")
        keys = [_rank_key(v) for v in values]
        for row, v, k in zip(table, values, keys):
            rank = 1 + sum(other < k for other in keys)
            row[name], row[f"{name}_rank"] = v, rank
            row["total"] += weight * rank
    winner = min(range(n), key=lambda i: table[i]["total"])  # min keeps the first of equal totals
    return winner, table


def autoprog_zero_vote(
    ntk: Sequence[float], zico: Sequence[float], time: Sequence[float], candidates: Sequence | None = None,
    time_rtol: float = TIME_RTOL,
) -> tuple[int, list[dict]]:
    """Eq. 19 with the paper's weights: R = 1/2 R(H_kappa) + 1/2 R(H_ZiCo) + R(T).

    ``candidates`` (default ``range(len(ntk))``) label the table rows; order them cheapest first. Step times
    within ``time_rtol`` of each other tie on the time ballot (see :func:`tie_within`; the default 0 is the
    paper's exact ranking, :data:`NOISE_RTOL` keeps timing noise from deciding between candidates of equal
    cost); the table keeps the measured times.
    """
    candidates = list(range(len(ntk))) if candidates is None else candidates
    winner, table = ranked_vote(candidates, {k: (v, PAPER_WEIGHTS[k]) for k, v in
                                             (("ntk", ntk), ("zico", zico), ("time", tie_within(time, time_rtol)))})
    for row, t in zip(table, time):
        row["time"] = float(t)
    return winner, table


def tie_within(values: Sequence[float], rtol: float) -> list[float]:
    """``values`` with each one replaced by the smallest of its group, for ranking with a noise tolerance.

    Walking the finite values in ascending order, a value joins the current group when it exceeds the
    group's first (smallest) value by at most ``rtol`` times that value's magnitude, and starts a new group
    otherwise. Non-finite values are kept. ``rtol = 0`` changes nothing.
    """
    if not (math.isfinite(rtol) and rtol >= 0):
        raise ConfigError(f"rtol must be finite and non-negative, got {rtol}")
    out = [float(v) for v in values]
    order = sorted((i for i, v in enumerate(out) if math.isfinite(v)), key=lambda i: out[i])
    head = None
    for i in order:
        v = out[i]
        if head is None or v - head > rtol * abs(head):
            head = v
        out[i] = head
    return out
