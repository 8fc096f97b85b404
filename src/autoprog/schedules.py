"""Growth schedules Ψ = (ψ_k): which sub-network trains in which part of training.

A schedule only *decides*; the trainer asks it which stage a step belongs to and the adapter applies the
stage's sub-network. Stage lengths are fractions of the total number of optimizer steps, so the same
schedule works for any number of epochs. ``schedule.json`` (written by every run, and by AutoProg-One)
is the format ``--method fixed`` replays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ConfigError
from .formats import check_fields, read_json
from .space import GrowthSpace, SubNet, round_half_up

SCHEDULE_FORMAT = "autoprog-schedule/1"
INLINE_STAGE = re.compile(r"\d+[xX]\d+(@(\d+(\.\d*)?|\.\d+))?")
INLINE_SCHEDULE_HINT = re.compile(r"[\dxX@.,\s]+")  # only digits, x, @, dots and commas: meant as inline


def keep_last_stage(starts: list[int], total_steps: int) -> list[int]:
    """Stage start steps, moved so that the last stage (the full model) gets at least one step."""
    out = list(starts)
    if total_steps >= 1:
        out[-1] = min(out[-1], total_steps - 1)
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1])
    return out


def stage_index(starts: list[int], step: int) -> int:
    """The stage that ``step`` falls in, given each stage's first step (later stages win ties)."""
    return max(i for i, start in enumerate(starts) if step >= start or i == 0)


@dataclass(frozen=True)
class Stage:
    subnet: SubNet
    fraction: float


@dataclass(frozen=True)
class Schedule:
    """A sequence of stages whose fractions sum to 1; the last stage is the full model."""

    method: str
    stages: tuple[Stage, ...]
    default_growth: str = "mogrow"

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("a schedule needs at least one stage")
        if any(s.fraction <= 0 for s in self.stages):
            raise ConfigError("every stage fraction must be positive")
        total = sum(s.fraction for s in self.stages)
        if abs(total - 1.0) > 1e-6:
            object.__setattr__(self, "stages", tuple(Stage(s.subnet, s.fraction / total) for s in self.stages))
        for a, b in zip(self.stages, self.stages[1:]):
            if b.subnet.resolution < a.subnet.resolution or b.subnet.depth < a.subnet.depth:
                raise ConfigError(f"schedule goes from {a.subnet} to {b.subnet}: stages must never shrink, and the "
                                  "last one is the full model (does a stage ask for more blocks than the model has?)")

    def validate_for(self, space: GrowthSpace) -> None:
        for s in self.stages:
            space.validate(s.subnet)
        if space.segments is not None:  # each block segment grows too (VOLO: outlookers and transformers)
            space.segments.check_nested([s.subnet.depth for s in self.stages if s.subnet.blocks is None])
        last = self.stages[-1].subnet
        if last.resolution != space.full_resolution or last.depth != space.full_depth:
            raise ConfigError(
                f"the last stage must be the full model ({space.full}), got {last}"
            )

    def boundaries(self, total_steps: int) -> list[int]:
        """First optimizer step of each stage (a stage may be empty when there are very few steps)."""
        out, acc = [], 0.0
        for s in self.stages:
            out.append(min(total_steps, round_half_up(acc * total_steps)))
            acc += s.fraction
        return keep_last_stage(out, total_steps)

    def stage_at(self, step: int, total_steps: int) -> int:
        return stage_index(self.boundaries(total_steps), step)

    def to_dict(self) -> dict:
        return {
            "format": SCHEDULE_FORMAT,
            "method": self.method,
            "growth": self.default_growth,
            "stages": [{**s.subnet.to_dict(), "fraction": round(s.fraction, 6)} for s in self.stages],
        }

    def save(self, path: str | Path) -> None:
        from .checkpoint import write_json

        write_json(Path(path), self.to_dict())  # atomic: a crash leaves the old or the new file

    @classmethod
    def from_dict(cls, d: dict, method: str = "fixed", where: str = "a schedule file") -> Schedule:
        """A schedule saved as ``d`` (``schedule.json``): ``stages``, a non-empty list of ``{resolution, depth,
        fraction, blocks}`` (integers, a number, a list of integers or null), and the ``growth`` operator."""
        check_fields(d, {"stages": [dict], "growth": str, "method": str}, where, required=("stages",))
        if not d["stages"]:
            raise ConfigError(f"{where}: 'stages' is empty")
        stages = []
        for i, entry in enumerate(d["stages"]):
            check_fields(entry, {"fraction": float, **SubNet.FIELDS}, f"{where}: stages[{i}]",
                         required=("resolution", "depth"))
            frac = float(entry.get("fraction", 1.0 / len(d["stages"])))
            stages.append(Stage(SubNet.from_dict(entry), frac))
        return cls(method, tuple(stages), str(d.get("growth", "mogrow")))

    @classmethod
    def parse(cls, text: str, method: str = "fixed") -> Schedule:
        """An inline schedule: ``"16x4,20x5,24x7,28x8"`` is four equal stages of RESOLUTIONxDEPTH;
        ``"16x8@0.5,20x8@0.25,28x8@0.25"`` gives each stage its share of the steps (normalised to 1)."""
        parts = [p.strip() for p in str(text).split(",")]
        if not all(INLINE_STAGE.fullmatch(p) for p in parts):  # split always gives one part or more
            raise ConfigError(f"malformed inline schedule {text!r}: expected comma-separated RESxDEPTH[@FRACTION], "
                              "e.g. 16x4,20x5,24x7,28x8 or 16x8@0.5,28x8@0.5")
        fracs = [p.partition("@")[2] for p in parts]
        if any(fracs) and not all(fracs):
            raise ConfigError(f"inline schedule {text!r}: give a @FRACTION for every stage or for none")
        stages = []
        for part, frac in zip(parts, fracs):
            res, _, depth = part.partition("@")[0].lower().partition("x")
            stages.append(Stage(SubNet(int(res), int(depth)), float(frac) if frac else 1.0 / len(parts)))
        return cls(method, tuple(stages))

    @classmethod
    def from_arg(cls, value: str, method: str = "fixed") -> Schedule:
        """``--schedule``'s value: a schedule.json path, or an inline schedule (:meth:`parse`)."""
        if Path(value).is_file() or not INLINE_SCHEDULE_HINT.fullmatch(str(value)):
            sched = cls.load(value)
            return sched if method == "fixed" else replace(sched, method=method)
        return cls.parse(value, method)

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"schedule file {p} does not exist (an inline schedule looks like 16x4,20x5,28x8)")
        return cls.from_dict(read_json(p, "schedule file"), where=f"schedule file {p}")


def original(space: GrowthSpace) -> Schedule:
    """The full model throughout."""
    return Schedule("original", (Stage(space.full, 1.0),))


def prog(space: GrowthSpace) -> Schedule:
    """The paper's uniform linear growth: n and l scaled by the same ratio, rising linearly to 1."""
    ratios = space.ratios()
    return Schedule("prog", tuple(Stage(space.subnet(r), 1.0 / len(ratios)) for r in ratios))


def progstack(space: GrowthSpace) -> Schedule:
    """Progressive stacking (Appendix C): 1/4 depth, stacked twice, steps in ratio 1:2:5, full resolution."""
    full = space.full_depth
    depths = [max(1, round_half_up(full / 4)), max(1, round_half_up(full / 2)), full]
    r = space.full_resolution
    return Schedule(
        "progstack",
        tuple(Stage(SubNet(r, d), f) for d, f in zip(depths, (1 / 8, 2 / 8, 5 / 8))),
        default_growth="stacking",
    )


MANUAL_METHODS = {"original": original, "prog": prog, "progstack": progstack}


def build_schedule(method: str, space: GrowthSpace, schedule_path: str | None = None) -> Schedule:
    if method == "fixed":
        if not schedule_path:
            raise ConfigError("--method fixed needs --schedule: a schedule.json written by a run, or inline like 16x4,20x5,24x7,28x8")
        sched = Schedule.from_arg(schedule_path)
    elif method in MANUAL_METHODS:
        sched = MANUAL_METHODS[method](space)
    else:
        raise ConfigError(f"{method!r} has no schedule fixed in advance; choose from fixed, {', '.join(MANUAL_METHODS)}"
                          " (a search finds its schedule while training)")
    sched.validate_for(space)
    return sched
