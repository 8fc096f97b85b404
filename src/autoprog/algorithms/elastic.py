"""The elastic supernet Φ with interpolation (Definition 3.1) and AutoProg-One's score (Eq. 9).

From the previous stage's chosen sub-network ψ*_{k-1} (its blocks compacted to physical positions
``0..l-1``) the supernet inserts copies of blocks in between them, starting from the final layers: the
first inserted block copies the last block and runs right after it, the second copies the one before,
and so on (a second round starts again from the end when the depth more than doubles). Inserted blocks
live at physical positions ``l, l+1, ...`` in insertion order, so a candidate of depth ``d`` uses the
original blocks plus the first ``d - l`` inserted ones. Every candidate's weights are therefore a
subset of every larger candidate's: the supernet is *weight-nesting*. The candidates Λ_k themselves are
:func:`autoprog.space.candidates`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError, DivergedError
from ..space import GrowthSpace, Segments


@dataclass(frozen=True)
class ElasticLayout:
    """Physical block layout of a supernet grown from ``base_depth`` blocks to at most ``max_depth``."""

    base_depth: int
    max_depth: int

    def __post_init__(self):
        if not 1 <= self.base_depth <= self.max_depth:
            raise ConfigError(f"elastic layout needs 1 <= base depth ({self.base_depth}) <= max depth ({self.max_depth})")

    def inserted(self) -> list[tuple[int, int]]:
        """``(physical position, source position)`` of each inserted block, in insertion order.

        Sources are counted in the lineage of ψ*_{k-1}: round one copies blocks l-1, l-2, ..., 0; round
        two copies those copies again, so a block never gets more than one copy per round.
        """
        out = []
        pos = self.base_depth
        # the newest block of each original lineage, so a second round copies the copy
        latest = list(range(self.base_depth))
        while pos < self.max_depth:
            new_latest = list(latest)
            for j in reversed(range(self.base_depth)):
                if pos >= self.max_depth:
                    break
                out.append((pos, latest[j]))
                new_latest[j] = pos
                pos += 1
            latest = new_latest
        return out

    def blocks(self, depth: int) -> tuple[int, ...]:
        """Physical blocks of the depth-``depth`` candidate, in forward order."""
        if not self.base_depth <= depth <= self.max_depth:
            raise ConfigError(f"candidate depth {depth} is outside [{self.base_depth}, {self.max_depth}]")
        chains = [[j] for j in range(self.base_depth)]
        lineage = {j: j for j in range(self.base_depth)}
        for pos, src in self.inserted()[: depth - self.base_depth]:
            root = lineage[src]
            lineage[pos] = root
            chains[root].append(pos)
        return tuple(b for chain in chains for b in chain)

    def source_map(self) -> dict[int, int]:
        """Inserted physical position → the block of ψ*_{k-1} whose weights initialise it.

        A second-round copy is a copy of a copy, so it takes its lineage's original block (the copies
        do not exist yet when the supernet is initialised).
        """
        root = {j: j for j in range(self.base_depth)}
        for pos, src in self.inserted():
            root[pos] = root[src]
        return {pos: root[pos] for pos, _ in self.inserted()}


@dataclass(frozen=True)
class SegmentedLayout:
    """An :class:`ElasticLayout` per block segment (:class:`autoprog.space.Segments`, VOLO's outlookers and
    transformers): a candidate of depth ``d`` runs, in each segment, that segment's layout at its share of ``d``.
    Copies stay inside their segment, so the supernet is weight-nesting segment by segment."""

    segments: Segments
    base_depth: int
    max_depth: int

    def __post_init__(self):
        self.segments.check_nested([self.base_depth, self.max_depth])

    def _parts(self) -> list[tuple[int, ElasticLayout]]:
        lo, hi = self.segments.split(self.base_depth), self.segments.split(self.max_depth)
        return [(a, ElasticLayout(b, m)) for a, b, m in zip(self.segments.starts(), lo, hi)]

    def inserted(self) -> list[tuple[int, int]]:
        return [(a + p, a + q) for a, lay in self._parts() for p, q in lay.inserted()]

    def blocks(self, depth: int) -> tuple[int, ...]:
        if not self.base_depth <= depth <= self.max_depth:
            raise ConfigError(f"candidate depth {depth} is outside [{self.base_depth}, {self.max_depth}]")
        self.segments.check_nested([self.base_depth, depth, self.max_depth])
        return tuple(a + b for (a, lay), k in zip(self._parts(), self.segments.split(depth)) for b in lay.blocks(k))

    def source_map(self) -> dict[int, int]:
        return {a + p: a + q for a, lay in self._parts() for p, q in lay.source_map().items()}


def elastic_layout(space: GrowthSpace, base_depth: int, max_depth: int) -> ElasticLayout | SegmentedLayout:
    """The supernet layout for ``space``'s model: one :class:`ElasticLayout`, or one per block segment."""
    if space.segments is None:
        return ElasticLayout(base_depth, max_depth)
    return SegmentedLayout(space.segments, base_depth, max_depth)


ALPHA_RULES = ("fit", "balanced")


def fit_alpha(losses: list[float], times: list[float]) -> float:
    """The official code's α: fit the power law L = a·T^b over the candidates, α = max(−b, 0).

    α is then the rate at which loss falls with step time among these candidates, so L·T^α ranks a candidate
    against that trend: one that buys more loss reduction per second than the trend wins. The fit is least
    squares on L itself, as ``scipy.optimize.curve_fit`` in the official code; it starts from the log–log
    line (the official code starts from a = b = 1), and falls back to that line's slope when the fit fails.
    """
    _check(losses, times)
    if len(losses) < 2 or max(times) - min(times) <= 1e-12 * max(times):
        return 0.0  # one candidate, or equal times: nothing to fit, pick by loss
    import numpy as np

    t, lo = np.asarray(times, dtype=float), np.asarray(losses, dtype=float)
    slope, intercept = np.polyfit(np.log(t), np.log(lo), 1)
    b = float(slope)
    try:
        import warnings

        from scipy.optimize import OptimizeWarning, curve_fit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (b_fit, _a), _ = curve_fit(lambda x, b_, a_: a_ * x ** b_, t, lo, p0=(slope, math.exp(intercept)),
                                       maxfev=10_000)
        if math.isfinite(b_fit):
            b = float(b_fit)
    except (RuntimeError, ValueError):
        pass
    return max(-b, 0.0)


def choose_alpha(losses: list[float], times: list[float]) -> float:
    """Our earlier rule (``--alpha-rule balanced``): α = range(log L) / range(log T).

    Loss and runtime then span the same range in the log-score log L + α·log T, which makes the two extreme
    candidates tie exactly (with two candidates, always); kept for comparison only. Falls back to 0 (pick by
    loss) when all times are equal, and to a small positive value when all losses are equal.
    """
    _check(losses, times)
    lr = math.log(max(losses)) - math.log(min(losses))
    tr = math.log(max(times)) - math.log(min(times))
    if tr < 1e-12:
        return 0.0
    if lr < 1e-12:
        return 1e-3
    return lr / tr


def _check(losses: list[float], times: list[float]) -> None:
    if len(losses) != len(times) or not losses:
        raise ValueError("need one loss and one time per candidate")
    if min(losses) <= 0 or min(times) <= 0:
        raise ValueError("losses and times must be positive")


def scores(losses: list[float], times: list[float], alpha: float) -> list[float]:
    """Eq. 9: L(ψ) · T(ψ)^α for each candidate."""
    _check(losses, times)
    return [loss * t ** alpha for loss, t in zip(losses, times)]


SCORE_TIE = 1e-9  # log-scores this close tie: rounding, not the candidates, would decide between them


def argmin_score(losses: list[float], times: list[float], alpha: float) -> int:
    """Index of the best candidate; ties (log-scores within :data:`SCORE_TIE`) go to the lower loss, then the
    earlier candidate, never to the faster one: a tie says the time saved is worth exactly the loss given up."""
    s = [math.log(v) for v in scores(losses, times, alpha)]
    best = min(s)
    return min((i for i in range(len(s)) if s[i] - best <= SCORE_TIE), key=lambda i: (losses[i], i))


def choose(losses: list[float], times: list[float], alpha: float | None = None,
           rule: str = "fit") -> tuple[int, float, list[float]]:
    """Eq. 9's winner among the candidates with a finite, positive loss and time: ``(index, α, scores)``, α by
    ``rule`` (:func:`fit_alpha`, the official one, or :func:`choose_alpha`) over those candidates unless given; a
    candidate that diverged scores NaN and never wins. :class:`DivergedError` when no candidate is usable."""
    if rule not in ALPHA_RULES:
        raise ConfigError(f"--alpha-rule must be one of {', '.join(ALPHA_RULES)}, got {rule!r}")
    ok = [i for i, (lo, t) in enumerate(zip(losses, times))
          if math.isfinite(lo) and math.isfinite(t) and lo > 0 and t > 0]
    if not ok:
        raise DivergedError(f"no candidate has a finite loss (losses {losses}): the supernet diverged")
    good_l, good_t = [losses[i] for i in ok], [times[i] for i in ok]
    if alpha is not None:
        a = alpha
    else:
        a = fit_alpha(good_l, good_t) if rule == "fit" else choose_alpha(good_l, good_t)
    best = ok[argmin_score(good_l, good_t, a)]
    return best, a, [lo * t ** a if i in ok else math.nan for i, (lo, t) in enumerate(zip(losses, times))]


def sample_index(seed: int, step: int, n: int) -> int:
    """Uniform candidate index for ``step``: a pure function of (seed, step), so every process agrees."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return int(torch.randint(0, n, (1,), generator=g))


def cycle_index(seed: int, step: int, n: int, start: int = 0) -> int:
    """Candidate index for ``step`` of a supernet phase that began at ``start``: every block of ``n`` steps is a
    fresh random permutation of the candidates, a pure function of (seed, start, block). Each step's candidate is
    still uniform, but every candidate gets ⌊steps/n⌋ updates or one more (i.i.d. sampling, the official code's,
    leaves some with far fewer in a short phase, and their losses and step times then rest on one or two steps)."""
    import torch

    block, pos = divmod(step - start, n)
    g = torch.Generator().manual_seed((seed * 1_000_003 + start * 7919 + block) % (2**63 - 1))
    return int(torch.randperm(n, generator=g)[pos])
