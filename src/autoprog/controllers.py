"""Controllers decide which sub-network ψ trains when; trainers run the steps. This module is the written
protocol between the two rooms.

A trainer calls its controller at well-named moments (the :class:`Controller` hooks); the stage calls before a
step are made in one place, :func:`autoprog.engine.enter_due_stage`, for every trainer and your own loop:

``setup(trainer, total_steps)``
    once, before training; returns the number of optimizer steps to run (a search may add some).
``stage_at(step)``
    the stage that ``step`` belongs to; when it changes the trainer calls ``enter_stage``.
``enter_stage(trainer, k)``
    at the first step of stage ``k``: the controller chooses ψ_k and asks the trainer to enter it.
``step_subnet(trainer, step)``
    a per-step override (a supernet phase samples one candidate per step), or None.
``training_supernet()``
    the supernet a search phase trains now (its deepest candidate at the largest side), or None: AdaReg's
    official rule regularizes it as one model at the final strengths.
``after_step(trainer, loss)``
    after every optimizer step, once ``trainer.step`` counts it, with that step's loss: a detached 0-d tensor
    (or a float); read its value (a host-device sync) only when a decision needs it.
``plan(space)``
    budget mode only, before ``setup``: the schedule to size the budget by (a search: Prog's, as a guess).
``resize(step, old_total, new_total)``
    budget mode only: the trainer moved the run's end; the stages not yet begun move with it.
``schedule()``, ``summary()``, ``state_dict()`` / ``load_state_dict()``
    the schedule as run so far, extra summary fields, and the controller's part of a checkpoint.

In return a controller may use only the services of :class:`TrainerServices` (and, for the searches that
need them, :class:`GrowthServices` / :class:`ZeroShotServices`). The pre-training trainer and
:class:`autoprog.loop.ProgressiveLoop` built with ``growing`` (your own loop) implement all three; the diffusion
trainer and ``ProgressiveLoop.unfreezing`` implement :class:`TrainerServices` and :class:`ZeroShotServices`; the
tests' fake implements :class:`GrowthServices`. A
controller never touches an optimizer or a model's weights itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError
from .schedules import Schedule, Stage, keep_last_stage, original, prog, stage_index
from .space import GrowthSpace, SubNet, candidates


@runtime_checkable
class TrainerServices(Protocol):
    """What every trainer offers a controller."""

    step: int  # optimizer steps done so far
    stage: int  # the current stage (-1 before the first)
    steps_per_epoch: int  # optimizer steps in one pass over the training data

    def growth_space(self) -> GrowthSpace:
        """The model's Ω at its full size (resolution, patch size, depth): what a schedule is checked against."""

    def use_subnet(self, subnet: SubNet) -> None:
        """Apply ``subnet`` now without changing any weight (a supernet phase switches candidates this way)."""

    def enter_subnet(self, subnet: SubNet) -> dict:
        """Move to ``subnet`` at a stage start: pre-training grows into it (growth operator), fine-tuning
        unfreezes it. Returns the record to log for the stage (``growth`` / ``learnable_blocks``)."""

    def describe(self, subnet: SubNet) -> str:
        """One line saying what ``subnet`` means on this trainer, for the stage message."""

    def measure_step_time(self, subnet: SubNet) -> float:
        """Seconds of one training step of ``subnet`` (median of repeats; cached per sub-network)."""

    def elapsed(self) -> float:
        """Training seconds so far (evaluation excluded)."""

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process: every decision goes through this."""

    def log_stage(self, info: dict) -> None:
        """Append a record to the run's stage log (``results.json``'s ``stages``)."""

    def print(self, *args) -> None:
        """Print once (on the main process)."""


@runtime_checkable
class GrowthServices(TrainerServices, Protocol):
    """What AutoProg-One's elastic supernet needs besides :class:`TrainerServices` (pre-training).

    Optional: ``step_marks``, a :class:`~autoprog.steptime.StepMarks` on the training clock (CUDA events on a GPU),
    by which the supernet phase times each candidate's steps without a synchronisation per step; without it the
    controller marks ``elapsed()``, which on a GPU counts only the host's share of a step."""

    def grow_to(self, dst: SubNet, block_map: dict[int, int | None] | None = None,
                inserted: list[int] | None = None) -> dict | None:
        """Grow to ``dst`` with the growth operator (or by ``block_map``), optimizer state following weights."""

    def relayout(self, block_map: dict[int, int], dst: SubNet) -> None:
        """Move blocks by ``block_map`` (weights, momentum weights, optimizer state) and apply ``dst``."""

    def snapshot(self) -> dict:
        """Everything :meth:`restore` needs to undo what happens after it."""

    def restore(self, snap: dict) -> None: ...

    def candidate_loss(self, subnet: SubNet, samples: int, part: int = 0, parts: int = 1,
                       momentum: bool = False) -> float:
        """Mean plain loss of ``subnet`` (of the momentum network with ``momentum``) on part ``part`` of ``parts`` of
        a fixed, non-augmented subset of the training data."""


@runtime_checkable
class GainServices(TrainerServices, Protocol):
    """What AutoProg-One's ``gain`` criterion needs besides :class:`GrowthServices`."""

    def candidate_gradients(self, subnet: SubNet, samples: int, folds: int = 2):
        """:class:`~autoprog.algorithms.gain.Gradients`: the mean gradients (by parameter name, one dict per
        fold) and mean loss of ``subnet``'s training loss on the first ``samples`` of the fixed subset
        :meth:`GrowthServices.candidate_loss` uses, with the current weights (nothing changes)."""


@dataclass
class ProxyTask:
    """What the zero-shot proxies need for one candidate: the model with exactly the candidate's parameters
    learnable, fixed batches (the same data for every candidate), the network output on a batch (NTK) and the
    training loss on a batch (ZiCo)."""

    model: Any
    batches: list
    forward: Callable[[Any, Any], Any]
    loss: Callable[[Any, Any], Any]


@runtime_checkable
class ZeroShotServices(TrainerServices, Protocol):
    """What AutoProg-Zero needs besides :class:`TrainerServices`."""

    def try_candidate(self, subnet: SubNet) -> contextlib.AbstractContextManager[ProxyTask]:
        """A context in which the model is the candidate ``subnet`` as it would start training (fine-tuning:
        unfrozen; pre-training: grown), undone on exit."""


class Controller:
    """Base of every controller: the hooks a fixed schedule needs no code for (see the module docstring)."""

    num_stages: int = 1

    def setup(self, trainer: TrainerServices, total_steps: int) -> int:
        return total_steps

    def plan(self, space: GrowthSpace) -> Schedule:
        """The schedule a budget is sized by before training (see :mod:`autoprog.budget`): a fixed schedule
        itself, a search Prog's schedule of its space (its choices are not known yet), otherwise the full model."""
        return original(space)

    def resize(self, step: int, old_total: int, new_total: int) -> None:
        """The trainer moved the run's end from ``old_total`` to ``new_total`` at ``step`` (budget mode re-plans
        as it goes): the stages not yet begun move with the rest of the run, stretched uniformly
        (:func:`moved_starts`)."""

    def resize_floor(self) -> int:
        """The earliest step a stage not yet begun may move to: a running supernet phase keeps its steps."""
        return 0

    def stage_starts(self) -> list[int]:
        """The first step of each stage, as planned now."""
        return getattr(self, "starts", None) or [0]

    def decided(self, k: int) -> SubNet | None:
        """The sub-network stage ``k`` trains, once it is decided (a search decides at its stage's start or
        after a supernet phase); None before, or for a controller without sub-networks."""
        return None

    def stage_at(self, step: int) -> int:
        return 0

    def enter_stage(self, trainer: TrainerServices, k: int) -> None:
        pass

    def step_subnet(self, trainer: TrainerServices, step: int) -> SubNet | None:
        return None

    def training_supernet(self) -> SubNet | None:
        """The supernet a search phase is training now, or None (see the module docstring)."""
        return None

    def after_step(self, trainer: TrainerServices, loss=None) -> None:
        pass

    def schedule(self) -> Schedule | None:
        return None

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def enter(trainer: TrainerServices, k: int, num_stages: int, subnet: SubNet, extra: dict | None = None) -> None:
    """Enter ``subnet`` as stage ``k``'s sub-network: apply it, log it, say it."""
    record = trainer.enter_subnet(subnet)
    trainer.log_stage({"stage": k, "subnet": subnet.to_dict(), **record, **(extra or {})})
    growth = record.get("growth")
    trainer.print(f"stage {k + 1}/{num_stages}: {trainer.describe(subnet)}"
                  + (f" (grown by {growth['operator']})" if growth else ""))


class StaticController(Controller):
    """One stage, one parameter set throughout (full fine-tuning, BitFit, DiffFit, LoRA)."""

    def __init__(self, method: str):
        self.method = method

    def enter_stage(self, trainer: TrainerServices, k: int) -> None:
        trainer.log_stage({"stage": 0, "method": self.method})


class ScheduleController(Controller):
    """Runs a fixed :class:`Schedule`: enter each stage's sub-network at its first step (grow or unfreeze)."""

    def __init__(self, schedule: Schedule):
        self._schedule = schedule
        self.method = schedule.method
        self.starts: list[int] = []
        self._total: int | None = None  # the run's end when the trainer moved it (budget mode)

    @property
    def num_stages(self) -> int:
        return len(self._schedule.stages)

    def setup(self, trainer: TrainerServices, total_steps: int) -> int:
        self._schedule.validate_for(trainer.growth_space())
        self.starts = self._schedule.boundaries(total_steps)
        return total_steps

    def stage_at(self, step: int) -> int:
        return stage_index(self.starts, step)

    def enter_stage(self, trainer: TrainerServices, k: int) -> None:
        enter(trainer, k, self.num_stages, self._schedule.stages[k].subnet)

    def plan(self, space: GrowthSpace) -> Schedule:
        return self._schedule

    def decided(self, k: int) -> SubNet | None:
        return self._schedule.stages[k].subnet if 0 <= k < len(self._schedule.stages) else None

    def resize(self, step: int, old_total: int, new_total: int) -> None:
        self.starts = moved_starts(self.starts, step, old_total, new_total)
        self._total = new_total

    def state_dict(self) -> dict:
        return {"starts": self.starts, "total": self._total}

    def load_state_dict(self, state: dict) -> None:
        self.starts = list(state.get("starts", self.starts))  # budget mode moves them
        self._total = state.get("total", self._total)

    def schedule(self) -> Schedule | None:
        """The schedule run: the fixed one, with the stage fractions as run when the end moved."""
        if self._total is None:
            return self._schedule
        return realised(self._schedule.method, [s.subnet for s in self._schedule.stages], self.starts, self._total,
                        self._schedule.default_growth)


class SearchingController(Controller):
    """Timeline of a schedule chosen stage by stage: equal stages, the last one the full model. Subclasses
    decide ψ_k in ``enter_stage`` (or later, after a supernet phase) and call :meth:`choose`."""

    def __init__(self, space: GrowthSpace, method: str):
        self.space, self.method = space, method
        self.chosen: list[SubNet] = []
        self.search_log: list[dict] = []
        self.starts: list[int] = []
        self._total_steps = 0

    @property
    def num_stages(self) -> int:
        return self.space.num_stages

    def setup(self, trainer: TrainerServices, total_steps: int) -> int:
        k = self.num_stages
        self._total_steps = total_steps
        self.starts = keep_last_stage([round(i * total_steps / k) for i in range(k)], total_steps)
        return total_steps

    def stage_at(self, step: int) -> int:
        return stage_index(self.starts, step)

    def plan(self, space: GrowthSpace) -> Schedule:
        return prog(self.space)

    def resize(self, step: int, old_total: int, new_total: int) -> None:
        self.starts = moved_starts(self.starts, step, old_total, new_total, self.resize_floor())
        self._total_steps = new_total

    def decided(self, k: int) -> SubNet | None:
        return self.chosen[k] if len(self.chosen) == k + 1 else None

    def candidates(self, k: int) -> list[SubNet]:
        """Λ_k: the candidates of stage ``k``, never smaller than the previous choice."""
        return candidates(self.space, self.chosen[-1] if self.chosen else None)

    def choose(self, trainer: TrainerServices, k: int, sub: SubNet, extra: dict | None = None) -> None:
        self.chosen.append(sub)
        enter(trainer, k, self.num_stages, sub, extra)

    def schedule(self) -> Schedule | None:
        return realised(self.method, self.chosen, self.starts, self._total_steps) if self.chosen else None

    def summary(self) -> dict:
        return {"search": self.search_log}

    def state_dict(self) -> dict:
        return {"chosen": [s.to_dict() for s in self.chosen], "search_log": self.search_log,
                "starts": self.starts, "total_steps": self._total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.chosen = [SubNet.from_dict(d) for d in state["chosen"]]
        self.search_log = state["search_log"]
        self.starts = list(state.get("starts", self.starts))  # budget mode moves them
        self._total_steps = state.get("total_steps", self._total_steps)


def moved_starts(starts: list[int], step: int, old_total: int, new_total: int, floor: int = 0) -> list[int]:
    """Stage starts after the run's end moved from ``old_total`` to ``new_total`` at ``step``: a stage already
    begun keeps its start, one not yet begun moves with the rest of the run, stretched uniformly (never before
    ``step`` or ``floor``), the last stage keeping a step."""
    scale = (new_total - step) / (old_total - step) if old_total > step else 1.0
    out = [s if s <= step else max(step + round((s - step) * scale), floor) for s in starts]
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1])
    return keep_last_stage(out, new_total) if out[-1] > step else out


def realised(method: str, subnets: list[SubNet], starts: list[int], total_steps: int,
             default_growth: str = "mogrow") -> Schedule | None:
    """The schedule of ``subnets`` entered at steps ``starts`` of a run of ``total_steps``, as fractions of it
    (empty stages left out); None while none of them has a step (a run of fewer steps than stages, whose first
    stages are empty, at its first checkpoint)."""
    stages = []
    for i, sub in enumerate(subnets):
        end = starts[i + 1] if i + 1 < len(starts) else total_steps
        if end > starts[i]:
            stages.append(Stage(sub, (end - starts[i]) / max(1, total_steps)))
    return Schedule(method, tuple(stages), default_growth=default_growth) if stages else None


def print_table(trainer: TrainerServices, k: int, rows: list[dict], cols: list[str], winner: int) -> None:
    """The candidates of stage ``k`` with the columns ``cols``, the winner marked."""
    head = "  ".join(f"{c:>10}" for c in ["res", "blocks", *cols])
    lines = [f"stage {k + 1} candidates:", f"  {head}"]
    for i, r in enumerate(rows):
        vals = "  ".join(f"{r[c]:>10.4g}" if isinstance(r[c], float) else f"{r[c]!s:>10}" for c in cols)
        lines.append(f"  {r['resolution']:>10}  {r['depth']:>10}  {vals}{'  <- chosen' if i == winner else ''}")
    trainer.print("\n".join(lines))


def check_services(trainer: Any, *protocols: type) -> None:
    """Raise :class:`ConfigError` naming the services ``trainer`` lacks for a controller that needs ``protocols``."""
    missing = sorted({name for proto in protocols for name in _members(proto) if not hasattr(trainer, name)})
    if missing:
        raise ConfigError(f"{type(trainer).__name__} does not offer {', '.join(missing)}, which this method needs")


def _members(proto: type) -> Iterator[str]:
    for klass in proto.__mro__:
        if klass in (Protocol, object, Any):
            continue
        yield from (n for n in vars(klass) if not n.startswith("_"))
        yield from getattr(klass, "__annotations__", {})
