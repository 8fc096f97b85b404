"""The baseline's time–quality front and time-to-quality speed-up.

A user with a budget can always train the baseline (the original model, or full fine-tuning) for that time
with its learning rate fully decayed. Those runs at several budgets draw the baseline's *front*: quality
against wall-clock. A method is worth using when it reaches its quality sooner than the front does:

    time-to-quality speed-up = time the front needs to reach the method's quality ÷ the method's time

The front is made monotone (a longer budget never counts as worse than a shorter one: the user would stop at
the shorter) and interpolated linearly between its budgets. Outside the front's range the figure is a bound:
``>`` when the method's quality is beyond the longest budget's, ``<`` when even the shortest budget reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError

FRONT_SEPARATOR = "@"  # a front run is named like ``original@0.5``
DEFAULT_FRONT = (0.25, 0.5, 0.75, 1.0)  # budgets of the baseline's front, as fractions of its steps


def parse_fractions(text: str, flag: str = "--front") -> list[float]:
    """``"0.25,0.5,0.75,1"`` → sorted unique fractions in (0, 1]; an empty string gives []."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            f = float(part)
        except ValueError:
            raise ConfigError(f"{flag} takes comma-separated fractions of the steps, got {part!r}") from None
        if not 0 < f <= 1 or not math.isfinite(f):
            raise ConfigError(f"{flag} fractions must be in (0, 1], got {part}")
        out.append(f)
    return sorted(set(out))


def front_name(baseline: str, fraction: float) -> str:
    """``original@0.5``; the whole run (fraction 1) is the baseline itself."""
    return baseline if fraction == 1 else f"{baseline}{FRONT_SEPARATOR}{fraction:g}"


@dataclass(frozen=True)
class Speedup:
    """A time-to-quality speed-up: ``value`` exactly (``bound`` "="), a lower (">") or upper ("<") bound, or a
    mean over seeds of which only some are bounds ("~")."""

    value: float | None
    bound: str = "="

    def __str__(self) -> str:
        if self.value is None:
            return "–"
        return f"{'' if self.bound == '=' else self.bound}{self.value:.2f}×"


class Front:
    """The baseline's time–quality front from ``(seconds, quality)`` points of runs at several budgets.

    ``higher_is_better``: True for top-1, False for FD. Non-finite or missing qualities are left out.
    """

    def __init__(self, points: Iterable[tuple[float, float | None]], higher_is_better: bool = True):
        self.higher = higher_is_better
        pts = sorted((float(t), float(q)) for t, q in points
                     if t is not None and q is not None and math.isfinite(q) and math.isfinite(t) and t > 0)
        if not pts:
            raise ConfigError("the baseline's front has no finished run with a finite quality")
        self.points = pts
        self.envelope: list[tuple[float, float]] = []  # monotone: best quality reached by each budget
        for t, q in pts:
            g = self._gain(q)
            if not self.envelope or g > self._gain(self.envelope[-1][1]):
                self.envelope.append((t, q))

    def _gain(self, q: float) -> float:
        return q if self.higher else -q

    def time_to(self, quality: float) -> tuple[float, str]:
        """Seconds the front needs to reach ``quality``, with "=" (interpolated), "<" (reached by the first
        budget already: at most that) or ">" (beyond the longest budget: more than it)."""
        g = self._gain(quality)
        env = self.envelope
        if g <= self._gain(env[0][1]):
            return env[0][0], "<"
        for (t0, q0), (t1, q1) in zip(env, env[1:]):
            g0, g1 = self._gain(q0), self._gain(q1)
            if g <= g1:
                return t0 + (g - g0) / (g1 - g0) * (t1 - t0), "="
        return env[-1][0], ">"

    def speedup(self, seconds: float | None, quality: float | None) -> Speedup:
        """Time-to-quality speed-up of a run that reached ``quality`` in ``seconds`` (None when it has none)."""
        if seconds is None or quality is None or not seconds > 0 or not math.isfinite(quality):
            return Speedup(None)
        t, bound = self.time_to(quality)
        return Speedup(round(t / seconds, 4), bound)


def mean_speedup(values: list[Speedup]) -> Speedup:
    """Mean over the seeds that have a figure; a bound when every seed's is the same kind of bound, "~" when
    only some are or some seed has none (diverged): the per-seed figures say which."""
    known = [v for v in values if v.value is not None]
    if not known:
        return Speedup(None)
    bounds = {v.bound for v in known}
    bound = bounds.pop() if len(bounds) == 1 and len(known) == len(values) else "~"
    return Speedup(round(sum(v.value for v in known) / len(known), 4), bound)
