"""Fine-tuning controllers: the *schedule* side (they decide; the trainer applies and measures).

Interface (:class:`autoprog.schedules.Controller`): ``setup`` (returns the steps to run),
``stage_at``, ``enter_stage``, ``step_subnet``, ``after_step(trainer, loss)``, ``schedule``, ``summary``
and ``state_dict``/``load_state_dict``.

* :class:`StaticController`: one stage, a fixed parameter set (full, BitFit, DiffFit, LoRA).
* :class:`UnfreezeController`: a fixed unfreezing schedule (``prog``: uniform linear; ``fixed``: replay).
* :class:`AutoProgOneFinetune`: AutoProg-One adapted to fine-tuning as the paper did: a supernet phase
  samples one candidate learnable sub-network per step, candidates are ranked by their mean loss in it
  (times T^α, as Eq. 9), and the phase's steps are training steps (weight recycling).
"""

from __future__ import annotations

import time

from ..elastic import argmin_score, candidates, choose_alpha, sample_index, scores
from ..errors import ConfigError
from ..schedules import Controller, Schedule, Stage, keep_last_stage, stage_index
from ..space import GrowthSpace, SubNet


class StaticController(Controller):
    """Fine-tuning with one parameter set throughout (the trainer never changes what is learnable)."""

    num_stages = 1

    def __init__(self, method: str):
        self.method = method

    def setup(self, trainer, total_steps: int) -> int:
        return total_steps

    def stage_at(self, step: int) -> int:
        return 0

    def enter_stage(self, trainer, k: int) -> None:
        trainer.log_stage({"stage": 0, "method": self.method})

    def schedule(self) -> Schedule | None:
        return None


class UnfreezeController(StaticController):
    """Unfreeze along a fixed :class:`Schedule` of learnable sub-networks, equal or given stage lengths."""

    def __init__(self, schedule: Schedule):
        super().__init__(schedule.method)
        self._schedule = schedule
        self.starts: list[int] = []

    @property
    def num_stages(self) -> int:
        return len(self._schedule.stages)

    def setup(self, trainer, total_steps: int) -> int:
        self._schedule.validate_for(trainer.unfreezer.space(self.num_stages))
        self.starts = self._schedule.boundaries(total_steps)
        return total_steps

    def stage_at(self, step: int) -> int:
        return stage_index(self.starts, step)

    def enter_stage(self, trainer, k: int) -> None:
        dst = self._schedule.stages[k].subnet
        trainer.use_subnet(dst)
        blocks = trainer.unfreezer.blocks_for(dst)
        trainer.log_stage({"stage": k, "subnet": dst.to_dict(), "learnable_blocks": list(blocks)})
        trainer.print(f"stage {k + 1}/{self.num_stages}: {dst.resolution}px, learnable blocks {list(blocks)}")

    def schedule(self) -> Schedule:
        return self._schedule


def prog_unfreeze(space: GrowthSpace) -> Schedule:
    """Uniform linear unfreezing: resolution and learnable depth scaled by the same ratio each stage."""
    return Schedule("prog", tuple(Stage(space.subnet(r), 1.0 / len(space.ratios())) for r in space.ratios()))


class _Searching(StaticController):
    """Shared timeline of the searched schedules: equal stages, the last one the full model."""

    def __init__(self, space: GrowthSpace, method: str):
        super().__init__(method)
        self.space = space
        self.chosen: list[SubNet] = []
        self.search_log: list[dict] = []
        self.starts: list[int] = []

    @property
    def num_stages(self) -> int:
        return self.space.num_stages

    def setup(self, trainer, total_steps: int) -> int:
        k = self.num_stages
        self._total_steps = total_steps
        self.starts = keep_last_stage([round(i * total_steps / k) for i in range(k)], total_steps)
        return total_steps

    def stage_at(self, step: int) -> int:
        return stage_index(self.starts, step)

    def candidates(self, k: int) -> list[SubNet]:
        return candidates(self.space, self.chosen[-1] if self.chosen else None)

    def _choose(self, trainer, k: int, sub: SubNet, extra: dict | None = None) -> None:
        self.chosen.append(sub)
        trainer.use_subnet(sub)
        blocks = trainer.unfreezer.blocks_for(sub)
        trainer.log_stage({"stage": k, "subnet": sub.to_dict(), "learnable_blocks": list(blocks), **(extra or {})})
        trainer.print(f"stage {k + 1}/{self.num_stages}: {sub.resolution}px, learnable blocks {list(blocks)}")

    def schedule(self) -> Schedule:
        stages = []
        for i, sub in enumerate(self.chosen):
            end = self.starts[i + 1] if i + 1 < len(self.starts) else None
            frac = ((end if end is not None else self._total_steps) - self.starts[i]) / max(1, self._total_steps)
            stages.append(Stage(sub, frac))
        return Schedule(self.method, tuple(stages)) if stages else None

    def summary(self) -> dict:
        return {"search": self.search_log}

    def state_dict(self) -> dict:
        return {"chosen": [s.to_dict() for s in self.chosen], "search_log": self.search_log}

    def load_state_dict(self, state: dict) -> None:
        self.chosen = [SubNet.from_dict(d) for d in state["chosen"]]
        self.search_log = state["search_log"]


def _print_table(trainer, k: int, rows: list[dict], cols: list[str], winner: int) -> None:
    head = "  ".join(f"{c:>10}" for c in ["res", "blocks", *cols])
    trainer.print(f"stage {k + 1} candidates:\n  {head}")
    for i, r in enumerate(rows):
        vals = "  ".join(f"{r[c]:>10.4g}" if isinstance(r[c], float) else f"{r[c]!s:>10}" for c in cols)
        mark = "  <- chosen" if i == winner else ""
        trainer.print(f"  {r['resolution']:>10}  {r['depth']:>10}  {vals}{mark}")


class AutoProgOneFinetune(_Searching):
    """AutoProg-One as a fine-tuning baseline (Sec. 5.1.2): supernet phase, then rank by mean loss × T^α."""

    def __init__(self, space: GrowthSpace, search_fraction: float = 0.25, alpha: float | None = None,
                 seed: int = 0):
        super().__init__(space, "autoprog-one")
        if not 0 < search_fraction < 1:
            raise ConfigError(f"--search-fraction must be in (0, 1), got {search_fraction}")
        self.search_fraction, self.alpha, self.seed = search_fraction, alpha, seed
        self.cands: list[SubNet] = []
        self.losses: dict[int, list[float]] = {}
        self.search_end = -1
        self._current = None

    def enter_stage(self, trainer, k: int) -> None:
        if k == self.num_stages - 1:
            self._choose(trainer, k, self.space.full)
            return
        self.cands = self.candidates(k)
        self.losses = {i: [] for i in range(len(self.cands))}
        stage_len = self.starts[k + 1] - self.starts[k]
        self.search_end = self.starts[k] + max(len(self.cands), round(self.search_fraction * stage_len))
        self.search_end = min(self.search_end, self.starts[k + 1] - 1)
        self._stage = k
        trainer.print(f"stage {k + 1}: supernet phase over {len(self.cands)} candidates until step {self.search_end}")

    def step_subnet(self, trainer, step: int) -> SubNet | None:
        if not self.cands or step >= self.search_end:
            return None
        self._current = sample_index(self.seed, step, len(self.cands))
        return self.cands[self._current]

    def after_step(self, trainer, loss: float) -> None:
        if not self.cands or self._current is None:
            return
        self.losses[self._current].append(loss)
        self._current = None
        if trainer.step + 1 >= self.search_end:
            self._finish_search(trainer)

    def _finish_search(self, trainer) -> None:
        t0 = time.perf_counter()
        seen = [i for i in range(len(self.cands)) if self.losses[i]]
        losses = [sum(self.losses[i]) / len(self.losses[i]) for i in seen]
        times = [trainer.measure_step_time(self.cands[i]) for i in seen]
        alpha = self.alpha if self.alpha is not None else choose_alpha(losses, times)
        best = trainer.broadcast(argmin_score(losses, times, alpha))
        sc = scores(losses, times, alpha)
        rows = [{**self.cands[i].to_dict(), "loss": losses[j], "time_s": times[j], "score": sc[j]}
                for j, i in enumerate(seen)]
        _print_table(trainer, self._stage, rows, ["loss", "time_s", "score"], best)
        self.search_log.append({"stage": self._stage + 1, "alpha": alpha, "candidates": rows, "chosen": best,
                                "scoring_s": round(time.perf_counter() - t0, 3)})
        self._choose(trainer, self._stage, self.cands[seen[best]])
        self.cands = []

    def state_dict(self) -> dict:
        return {**super().state_dict(), "cands": [c.to_dict() for c in self.cands],
                "losses": {str(i): v for i, v in self.losses.items()}, "search_end": self.search_end,
                "stage": getattr(self, "_stage", -1)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.cands = [SubNet.from_dict(d) for d in state["cands"]]
        self.losses = {int(i): v for i, v in state["losses"].items()}
        self.search_end, self._stage = state["search_end"], state["stage"]
