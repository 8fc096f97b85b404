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


def choose_alpha(losses: list[float], times: list[float]) -> float:
    """α that balances the two factors of L·T^α across the candidates.

    Rule: α = range(log L) / range(log T), so that over the candidates the loss term and the runtime
    term span the same range in the log-score log L + α·log T; neither factor can dominate the choice
    merely because of its units or scale. Falls back to 0 (pick by loss) when all times are equal, and
    to a small positive value when all losses are equal (pick the fastest).
    """
    if len(losses) != len(times) or not losses:
        raise ValueError("need one loss and one time per candidate")
    if min(losses) <= 0 or min(times) <= 0:
        raise ValueError("losses and times must be positive")
    lr = math.log(max(losses)) - math.log(min(losses))
    tr = math.log(max(times)) - math.log(min(times))
    if tr < 1e-12:
        return 0.0
    if lr < 1e-12:
        return 1e-3
    return lr / tr


def scores(losses: list[float], times: list[float], alpha: float) -> list[float]:
    """Eq. 9: L(ψ) · T(ψ)^α for each candidate."""
    if len(losses) != len(times) or not losses:
        raise ValueError("need one loss and one time per candidate")
    if min(losses) <= 0 or min(times) <= 0:
        raise ValueError("losses and times must be positive")
    return [loss * t ** alpha for loss, t in zip(losses, times)]


SCORE_TIE = 1e-9  # log-scores this close tie: rounding, not the candidates, would decide between them


def argmin_score(losses: list[float], times: list[float], alpha: float) -> int:
    """Index of the best candidate; ties (log-scores within :data:`SCORE_TIE`) go to the faster, then the
    earlier candidate. The balanced α makes the two extreme candidates tie exactly (with two candidates, always),
    so without the tolerance floating-point rounding of the time scale would pick the winner."""
    s = [math.log(v) for v in scores(losses, times, alpha)]
    best = min(s)
    return min((i for i in range(len(s)) if s[i] - best <= SCORE_TIE), key=lambda i: (times[i], i))


def choose(losses: list[float], times: list[float], alpha: float | None = None) -> tuple[int, float, list[float]]:
    """Eq. 9's winner among the candidates with a finite, positive loss and time: ``(index, α, scores)``, α
    balanced over those candidates unless given; a candidate that diverged scores NaN and never wins.
    :class:`DivergedError` when no candidate is usable."""
    ok = [i for i, (lo, t) in enumerate(zip(losses, times))
          if math.isfinite(lo) and math.isfinite(t) and lo > 0 and t > 0]
    if not ok:
        raise DivergedError(f"no candidate has a finite loss (losses {losses}): the supernet diverged")
    good_l, good_t = [losses[i] for i in ok], [times[i] for i in ok]
    a = alpha if alpha is not None else choose_alpha(good_l, good_t)
    best = ok[argmin_score(good_l, good_t, a)]
    return best, a, [lo * t ** a if i in ok else math.nan for i, (lo, t) in enumerate(zip(losses, times))]


def sample_index(seed: int, step: int, n: int) -> int:
    """Uniform candidate index for ``step``: a pure function of (seed, step), so every process agrees."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return int(torch.randint(0, n, (1,), generator=g))
