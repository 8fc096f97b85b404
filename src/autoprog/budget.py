"""Budget mode: size a run so that it ends at a training budget with its learning rate fully decayed.

A budget is seconds of training (``--budget 20m``; evaluation excluded, like every run's ``wall_time_s``) or
the cost of N full-model steps (``--budget-steps N``): a step of a sub-network costs its training FLOPs ÷ the
full model's, so such a plan never turns on timing noise.

Planning keeps the schedule's stage fractions (fractions of the steps) and solves Σ_k f_k·N·c_k = budget for
the number of steps N, c_k being the predicted cost of one step of stage k's sub-network (:func:`plan_steps`).
A search does not know its later sub-networks in advance; its controller costs them as Prog's schedule of the
same space (``Controller.plan``). At every stage start and after every epoch (fine-tuning: every evaluation)
the trainer re-plans (:meth:`BudgetPlan.replan`): what is left of the run stretches or shrinks uniformly to fit
what is left of the budget, at what steps have really cost so far; the stages not yet begun move with it
(``Controller.resize``) and the learning rate decays from where it is to its floor over the new length
(:class:`LRRemap`), continuous and fully decayed at the end. A budget in full-model steps is predicted exactly
for a fixed schedule, so it is never re-planned away from its fractions; one in seconds is, by as much as the
first prediction (a forward and backward pass) missed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError

_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)h)?(?:(\d+(?:\.\d*)?|\.\d+)m)?(?:(\d+(?:\.\d*)?|\.\d+)s?)?")


MAX_STEPS = 2 ** 53  # optimizer steps a run may take: counted exactly in floats, far beyond any real run
MAX_SECONDS = 10 ** 8  # about three years of training


def parse_duration(text: str, flag: str = "--budget") -> float:
    """Seconds in ``text``: ``90``, ``90s``, ``20m``, ``1.5h``, ``1h30m``, ``2m30s``; a one-line
    :class:`ConfigError` for anything else, or for zero."""
    t = str(text).strip().lower().replace(" ", "")
    m = _DURATION.fullmatch(t)
    ambiguous = m is not None and t and t[-1].isdigit() and (m.group(1) or m.group(2))  # 1h30: minutes or seconds?
    if not t or m is None or not any(m.groups()) or ambiguous:
        raise ConfigError(f"{flag} must be a duration such as 90s, 20m or 1h30m, got {text!r}")
    h, mins, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mins * 60 + s
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"{flag} must be a positive duration, got {text!r}")
    if seconds > MAX_SECONDS:
        raise ConfigError(f"{flag} {text!r} is longer than any run (at most {MAX_SECONDS / 3600:g}h)")
    return seconds


@dataclass(frozen=True)
class Budget:
    """What a run may spend: ``amount`` seconds of training, or ``amount`` full-model steps (``unit`` says which)."""

    amount: float
    unit: str  # "s" or "full-model steps"

    @property
    def in_steps(self) -> bool:
        return self.unit != "s"

    def describe(self) -> str:
        return f"{self.amount:g} s" if self.unit == "s" else f"{self.amount:g} full-model steps"

    def scaled(self, fraction: float) -> dict:
        """The ``budget`` / ``budget_steps`` settings of ``fraction`` of this budget (a front point's)."""
        if self.in_steps:
            return {"budget": None, "budget_steps": self.amount * fraction}
        return {"budget": f"{self.amount * fraction:g}s", "budget_steps": None}

    @classmethod
    def from_options(cls, budget: str | None, budget_steps: float | None) -> Budget | None:
        """The budget ``--budget`` / ``--budget-steps`` ask for (None without either; both is an error)."""
        if budget is not None and budget_steps is not None:
            raise ConfigError("give --budget (a duration) or --budget-steps (full-model steps), not both")
        if budget is not None:
            return cls(parse_duration(budget), "s")
        if budget_steps is not None:
            if not budget_steps > 0 or not math.isfinite(budget_steps):
                raise ConfigError(f"--budget-steps must be a positive number, got {budget_steps}")
            return cls(float(budget_steps), "full-model steps")
        return None


def plan_steps(amount: float, fractions: Sequence[float], costs: Sequence[float]) -> int:
    """The number of optimizer steps N with Σ_k fractions[k]·N·costs[k] = ``amount`` (at least 1)."""
    if len(fractions) != len(costs) or not fractions:
        raise ValueError("plan_steps needs one cost per stage")
    if any(not c > 0 or not math.isfinite(c) for c in costs):
        raise ConfigError(f"cannot size a budget from step costs {list(costs)}: every step must cost something")
    per_step = sum(f * c for f, c in zip(fractions, costs)) / sum(fractions)
    return max(1, math.floor(amount / per_step))


class LRRemap:
    """Maps a run's learning-rate position onto a schedule of fixed ``nominal`` length after the end moved.

    Until the first :meth:`retarget` the map is the identity. ``retarget(now, end)`` keeps position ``now``
    where it is and stretches (or squeezes) what is left of the nominal schedule over ``now … end``, so the
    learning rate is continuous and reaches the nominal end's value exactly at ``end``."""

    def __init__(self, nominal: int):
        self.nominal = nominal
        self.start, self.virtual_start, self.end = 0, 0.0, nominal

    def __call__(self, position: float) -> float:
        if position <= self.start:
            return float(position) if self.start == 0 else self.virtual_start - (self.start - position)
        if self.end <= self.start:
            return float(self.nominal)
        done = (position - self.start) / (self.end - self.start)
        return min(float(self.nominal), self.virtual_start + done * (self.nominal - self.virtual_start))

    def retarget(self, now: int, end: int) -> None:
        v = self(now)
        self.start, self.virtual_start, self.end = now, v, max(now, end)

    def state_dict(self) -> dict:
        return {"nominal": self.nominal, "start": self.start, "virtual_start": self.virtual_start, "end": self.end}

    def load_state_dict(self, state: dict) -> None:
        self.nominal, self.start = state["nominal"], state["start"]
        self.virtual_start, self.end = state["virtual_start"], state["end"]


class BudgetPlan:
    """One run's budget as it goes: the plan made before training and the re-plans after it.

    ``trainer`` offers ``controller`` (with :meth:`~autoprog.controllers.Controller.plan`), ``growth_space()``,
    ``broadcast(obj)``, ``elapsed()`` and ``budget_cost(subnet)``: the predicted cost of one training step of
    ``subnet`` (seconds of a forward and backward pass, or its FLOPs ÷ the full model's). With a budget in
    seconds, a re-plan scales the predicted costs by what steps have really cost so far (of the running stage
    once it has run ``MIN_STAGE_STEPS`` steps, else of the whole run), so the overheads a prediction leaves out
    (the optimizer, the momentum copy, data, a search) are paid for."""

    MIN_STAGE_STEPS = 5

    def __init__(self, trainer, budget: Budget):
        self.trainer, self.budget = trainer, budget
        self.schedule = trainer.controller.plan(trainer.growth_space())
        self._costs: dict = {}
        fractions = [s.fraction for s in self.schedule.stages]
        costs = trainer.broadcast([self.cost(s.subnet) for s in self.schedule.stages])
        self._costs = {_key(s.subnet): c for s, c in zip(self.schedule.stages, costs)}  # every process alike
        self.steps = plan_steps(budget.amount, fractions, costs)
        self.done = 0.0  # predicted cost of the steps run so far
        self._mark = (0.0, 0.0, 0)  # spent, done and step when the running stage began
        self.replans: list[dict] = []

    def cost(self, subnet) -> float:
        """Predicted cost of one step of ``subnet`` (by resolution and depth), measured once for the run."""
        key = _key(subnet)
        if key not in self._costs:
            self._costs[key] = float(self.trainer.budget_cost(key))
        return self._costs[key]

    def spent(self) -> float:
        return self.done if self.budget.in_steps else self.trainer.elapsed()

    def after_step(self, subnet=None) -> None:
        """Count a step of ``subnet`` (None: of the plan's last stage, the full model or a fixed-set method)."""
        self.done += self.cost(subnet if subnet is not None else self.schedule.stages[-1].subnet)

    def stage_started(self, step: int) -> None:
        self._mark = (self.spent(), self.done, step)

    def ratio(self, step: int) -> float:
        """What a step really costs ÷ its prediction (1 for a budget in full-model steps)."""
        if self.budget.in_steps:
            return 1.0
        spent = self.spent()
        mark_spent, mark_done, mark_step = self._mark
        if step - mark_step >= self.MIN_STAGE_STEPS and self.done > mark_done:
            return (spent - mark_spent) / (self.done - mark_done)
        return spent / self.done if self.done > 0 else 1.0

    def replan(self, step: int, stage: int, starts: Sequence[int], total_steps: int, current=None,
               floor: int = 0, entering: bool = False) -> int:
        """The step the run should end at, seen from ``step`` in ``stage`` (0-based), the stages starting at
        ``starts`` of a run planned to end at ``total_steps``. What is left of the run stretches (or shrinks)
        uniformly to fit what is left of the budget, so the stages not yet run keep their shares of it.
        ``current``: the running stage's sub-network once decided (None: the plan's guess stands; later stages
        never cost less). The last stage (the full model) keeps at least one step (``entering``: it is
        ``stage`` and begins now), and no stage begins before ``floor`` (a running supernet phase)."""
        stages = self.schedule.stages
        k = min(max(stage, 0), len(stages) - 1)
        costs = [self.cost(s.subnet) for s in stages]
        if current is not None:
            cur = self.cost(current)
            costs = [cur if j == k else max(c, cur) if j > k else c for j, c in enumerate(costs)]
        left = max(0.0, self.budget.amount - self.spent()) / max(self.ratio(step), 1e-12)
        ends = [*starts[1:], total_steps]
        planned = sum(c * max(0, e - max(s, step)) for c, s, e in zip(costs, starts, ends))  # left as planned
        if planned > 0:
            end = step + math.floor(left / planned * (total_steps - step) + 1e-9)
        else:  # the plan has ended: only full-model steps are left to buy
            end = step + math.floor(left / costs[-1] + 1e-9)
        at_least = 1 if k < len(stages) - 1 or entering else 0
        end = max(end, step + at_least, floor + at_least if floor else 0)
        end = self.trainer.broadcast(end)
        self.replans.append({"step": step, "end": end, "spent": round(self.spent(), 4),
                             "ratio": round(self.ratio(step), 4)})
        return end

    def record(self, total_steps: int) -> dict:
        """The budget's part of a run's summary."""
        return {"amount": self.budget.amount, "unit": self.budget.unit, "planned_steps": self.steps,
                "steps": total_steps, "spent": round(self.spent(), 4),
                "used": round(self.spent() / self.budget.amount, 4), "replans": len(self.replans),
                "planned_as": self.schedule.method}

    def state_dict(self) -> dict:
        return {"amount": self.budget.amount, "unit": self.budget.unit, "steps": self.steps, "done": self.done,
                "mark": list(self._mark), "replans": self.replans,
                "costs": [[s.to_dict(), c] for s, c in self._costs.items()]}

    def load_state_dict(self, state: dict, subnet_from_dict) -> None:
        if (state["amount"], state["unit"]) != (self.budget.amount, self.budget.unit):
            raise ConfigError(f"this checkpoint was made with a budget of {state['amount']:g} {state['unit']}, "
                              f"not {self.budget.describe()}")
        self.steps, self.done = state["steps"], state["done"]
        self._mark = tuple(state["mark"])
        self.replans = state["replans"]
        self._costs = {subnet_from_dict(d): c for d, c in state["costs"]}


def _key(subnet):
    """``subnet`` by what its step costs: resolution and depth (which blocks does not matter)."""
    return type(subnet)(subnet.resolution, subnet.depth)


def warn_unread_length(train, default_train, field: str) -> None:
    """With ``--budget``/``--budget-steps`` the budget sizes the run: the length option ``field`` set other than
    its default (``default_train``'s) is not read, which a warning says (a preset's length with a budget is a
    sensible command, so not an error)."""
    from .errors import warn

    if Budget.from_options(train.budget, train.budget_steps) is None:
        return
    value = getattr(train, field)
    if value != getattr(default_train, field):
        flag = "--budget" if train.budget else "--budget-steps"
        warn(f"--{field} {value:g} is not read: {flag} sizes the run", once=True)


def budget_option(instead_of: str, replanned: str):
    """The ``--budget`` field of a trainer's config (``instead_of``: the length option it replaces)."""
    from .options import option

    return option(None, f"train for this long instead of {instead_of} (90s, 20m, 1h30m; training time, evaluation "
                        "excluded): the steps are sized from the schedule's step times so the run ends at the "
                        f"budget with its learning rate fully decayed, re-planned {replanned}",
                  show_default=False, group="budget")


def budget_steps_option(instead_of: str, full: str):
    """The ``--budget-steps`` field of a trainer's config (``full``: what a full step is)."""
    from .options import option

    return option(None, f"train for the cost of this many {full} steps instead of {instead_of} (a step costs its "
                        f"FLOPs / a {full} step's): the budget mode that no timing noise moves", above=0,
                  maximum=MAX_STEPS, show_default=False, group="budget")
