"""AutoProg-One (Sec. 3.2, Algorithm 1): the growth schedule found during training by a one-shot search.

At the start of every stage but the last, the previous stage's chosen sub-network ψ*_{k-1} grows (by
the growth operator, MoGrow by default) into an elastic supernet Φ_k holding every candidate of Λ_k.
For ``search_epochs`` (or a ``search_fraction`` of the stage) the supernet trains, one uniformly sampled
candidate per step. Then every candidate is scored by its loss on a fixed subset of the training data
times its measured step time to the power α (Eq. 9), and the best one is kept (``criterion="gain"``: the
largest predicted decrease per second of the deepest candidate's loss at full resolution instead, see
:mod:`autoprog.algorithms.gain`). With weight recycling (default) the chosen sub-network simply inherits
the supernet's weights and trains on: the search epochs are training epochs. Without it
(``recycle=False``, Table 11's ablation) the stage restarts from its starting weights with the chosen
sub-network, so the search epochs are extra cost. The last stage is always the full model.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from ..controllers import (
    Controller,
    GainServices,
    SearchingController,
    check_services,
    moved_starts,
    print_table,
)
from ..errors import ConfigError
from ..options import check_bounds, option
from ..schedules import Schedule, Stage, keep_last_stage, prog, stage_index
from ..space import GrowthSpace, SubNet, candidates
from ..steptime import REPEATS, StepMarks
from .elastic import ALPHA_RULES, choose, cycle_index, elastic_layout, sample_index
from .gain import CRITERIA, choose_by_gain, gain_per_second
from .growth import GrowthResult

SAMPLINGS = ("cycle", "random")  # which candidate each supernet step trains
STEP_TIMES = ("supernet", "probe")  # where a candidate's step time T comes from


@dataclass
class AutoProgOneConfig:
    """AutoProg-One's settings, declared once: the pre-training run spec (:class:`~autoprog.classification.runner.
    RunSpec`) extends this class, so each is also a flag and a ``config.json`` key. The defaults are the paper's and
    its official code's rules (``docs/design.md``); ours are options."""

    search_fraction: float = option(0.08, "the supernet's share of each searched stage (the paper's 2 search epochs of "
                                           "a 25-epoch stage), raised to --search-min-updates per candidate",
                                    above=0, below=1, group="AutoProg-One search")
    search_epochs: float | None = option(None, "train the supernet for this many epochs instead of --search-fraction "
                                               "(the paper's 2 fill a whole stage of a short run)", above=0,
                                         show_default=False, group="AutoProg-One search")
    search_min_updates: int = option(4, "the floor of supernet updates per candidate: the search is lengthened to "
                                        "reach it, and where it does not fit in the stage fewer candidates are "
                                        "searched (a notice says which); 0 = no floor", minimum=0,
                                     group="AutoProg-One search")
    alpha: float | None = option(None, "runtime exponent in the score L*T^alpha (default: by --alpha-rule over each "
                                       "stage's candidates)", minimum=0, show_default=False,
                                 group="AutoProg-One search")
    alpha_rule: str = option("fit", "how alpha is chosen: fit (the official code: fit L = a*T^b over the candidates, "
                                    "alpha = max(-b, 0)) or balanced (ours before: range(log L) / range(log T), which "
                                    "makes the two extreme candidates tie)", choices=ALPHA_RULES,
                             group="AutoProg-One search")
    forced_growth: bool = option(False, "the official code's candidates after stage 1: the next 3 depths of the growth "
                                        "space only (the paper's rule, the default, also keeps the current depth)",
                                 group="AutoProg-One search")
    search_samples: int = option(256, "training images (fixed, not augmented) each candidate's loss is measured on "
                                      "at each scoring point, other images at each (the paper scores on a 50K "
                                      "subset: the *-paper presets take 10K at each of 5 points; 256 suits a CPU)",
                                 minimum=1, group="AutoProg-One search")
    score_points: int = option(5, "the candidates' losses are averaged over this many points spread over the second "
                                  "half of the supernet phase (the official code: 5, the start and quarters of its "
                                  "last search epoch; 1 = at its end only)", minimum=1, group="AutoProg-One search")
    score_momentum: bool = option(True, "score the online network instead of the momentum (EMA) network the "
                                        "official code scores", group="AutoProg-One search")
    supernet_sampling: str = option("cycle", "which candidate each supernet step trains: cycle (ours: a fresh random "
                                             "permutation of the candidates every |Lambda| steps, so each gets its "
                                             "share of updates in a short phase) or random (the official code's "
                                             "independent uniform draw)", choices=SAMPLINGS,
                                    group="AutoProg-One search")
    search_step_time: str = option("supernet", "each candidate's step time T: supernet (ours: the median of its own "
                                               "whole supernet training steps, which costs nothing) or probe (timed "
                                               "forward+backward passes of a full batch after the supernet phase, "
                                               "as the official code times them); --time-source flops uses FLOPs",
                                   choices=STEP_TIMES, group="AutoProg-One search")
    first_supernet: str = option("copies", "the first stage's supernet: copies (its inserted blocks are copies of "
                                           "the smallest candidate's, grown as every later supernet is, as the "
                                           "official code grows its first, smallest model) or random (the full "
                                           "model's own initial blocks; autoprog's rule before 2026-12-08)",
                                 choices=("copies", "random"), group="AutoProg-One search")
    gain_samples: int = option(512, "--criterion gain: training images (the first of the search subset) on which "
                                    "every candidate's gradient and loss are taken", minimum=2,
                               group="AutoProg-One search")
    gain_folds: int = option(2, "--criterion gain: folds of those images; the gain's dot product pairs different "
                                "folds only, so the gradients' sampling noise does not favour the candidates most "
                                "like the full model (1: the plain same-sample estimate)", minimum=1,
                             group="AutoProg-One search")
    recycle: bool = option(True, "retrain the chosen sub-network from the stage's starting weights instead of "
                                 "inheriting the supernet's (the ablation of Table 11; the search epochs become "
                                 "extra cost)", group="AutoProg-One search")
    criterion: str = option("paper", "the searches' criterion: paper (AutoProg-One: loss x step time^alpha, Eq. 9; "
                                     "AutoProg-Zero: the ranked vote of NTK, ZiCo and step time, Eq. 19) or gain "
                                     "(ours: the predicted decrease of the full-resolution loss of the full model "
                                     "(AutoProg-One: of the deepest candidate) per second of training the candidate). "
                                     "Measured over 3 seeds: gain is better near the original's plateau (30 epochs), "
                                     "paper in short runs (8 epochs), so paper stays the default",
                            choices=CRITERIA, group="AutoProg-One search")
    time_repeats: int = option(REPEATS, "timed repeats per candidate (--search-step-time probe)", minimum=1, cli=False)

    def validate(self) -> None:
        check_bounds(self)


def score_steps(start: int, length: int, points: int) -> list[int]:
    """The steps after which the candidates are scored: ``points`` spread evenly over the second half of a supernet
    phase of ``length`` steps from ``start``, the last at its end (the official code scores at the start and four
    quarters of its last search epoch); points that fall on one step count once."""
    if points == 1:
        return [start + length]
    return sorted({start + max(1, round(length * (0.5 + 0.5 * i / (points - 1)))) for i in range(points)})


def thin(cands: list[SubNet], keep: int, first_stage: bool) -> list[SubNet]:
    """At most ``keep`` (≥ 1) of ``cands`` (a grid of resolutions × depths), dropping whole values of the axis with
    more of them: the medium one at the first stage (the smallest and largest stay reachable), the largest growth
    later (the nearest growth stays)."""
    rs = sorted({c.resolution for c in cands})
    ds = sorted({c.depth for c in cands})
    while len(rs) * len(ds) > max(1, keep) and (len(rs) > 1 or len(ds) > 1):
        axis = ds if len(ds) >= len(rs) else rs
        axis.pop(len(axis) // 2 if first_stage and len(axis) > 2 else -1)
    return [c for c in cands if c.resolution in rs and c.depth in ds]


class AutoProgOne(Controller):
    """The pre-training search (needs :class:`~autoprog.controllers.GrowthServices`; protocol in :mod:`autoprog.controllers`)."""

    method = "autoprog-one"

    def __init__(self, space: GrowthSpace, cfg: AutoProgOneConfig | None = None, seed: int = 0):
        self.space, self.cfg, self.seed = space, cfg or AutoProgOneConfig(), seed
        self.cfg.validate()
        self.chosen: list[SubNet] = []  # ψ*_k, compacted to blocks 0..l-1
        self.cands: list[SubNet] = []
        self._extra, self._total = 0, None  # a --no-recycle search's redone steps; the end budget mode moved
        self.searching = False
        self.search_end = 0
        self.search_log: list[dict] = []
        self.search_time = 0.0  # scoring the candidates
        self.supernet_time = 0.0  # training the supernet (the search epochs)
        self._t_stage = 0.0
        self._snapshot = None
        self.score_at: list[int] = []  # the running search's scoring steps
        self.partial: list[list[float]] = []  # its candidates' losses at the points scored so far
        self._stage_scoring = 0.0  # seconds of the running search's scoring points
        self.search_start = 0  # the running search's first step
        self.step_times: list[list[float]] = []  # seconds of each candidate's supernet steps so far
        self._marked: list[tuple] = []  # steps timed by marks not read yet: (candidate, start mark, end mark)
        self._current, self._t_last = None, None  # the candidate of the running step; the mark it began at
        self.time_source = "probe"

    @property
    def num_stages(self) -> int:
        return self.space.num_stages

    @property
    def resumable(self) -> bool:
        """Whether a checkpoint now can be resumed: not inside a search whose starting weights (--no-recycle)
        are not checkpointed; a stop asked there waits for the search to end."""
        return not (self.searching and not self.cfg.recycle)

    # ------------------------------------------------------------------------------- timeline
    def setup(self, trainer, total_steps: int) -> int:
        if self.cfg.criterion == "gain":
            check_services(trainer, GainServices)
        k = self.num_stages
        self.stage_len = total_steps / k
        self.spe = trainer.steps_per_epoch
        # the first stage's supernet length (its Λ is the largest); every --no-recycle search takes it
        _, self.search_steps, _ = self._fit_search(candidates(self.space, None, self.cfg.forced_growth), True)
        extra = 0 if self.cfg.recycle else self.search_steps
        total = total_steps + (k - 1) * extra
        self.starts = keep_last_stage([round(i * self.stage_len) + i * extra for i in range(k)], total)
        self._extra, self._total = extra, None
        return total

    def plan(self, space: GrowthSpace) -> Schedule:
        if not self.cfg.recycle:
            raise ConfigError("budget mode is not built for AutoProg-One --no-recycle (its redone search steps "
                              "would move the learning-rate schedule); use recycling, or --epochs")
        return prog(self.space)

    def resize(self, step: int, old_total: int, new_total: int) -> None:
        self.starts = moved_starts(self.starts, step, old_total, new_total, self.resize_floor())
        self._total = new_total

    def resize_floor(self) -> int:
        return self.search_end + 1 if self.searching else 0

    def decided(self, k: int) -> SubNet | None:
        return self.chosen[k] if len(self.chosen) == k + 1 else None

    def stage_at(self, step: int) -> int:
        return stage_index(self.starts, step)

    # ---------------------------------------------------------------------------------- stages
    def enter_stage(self, trainer, k: int) -> None:
        self._t_stage = trainer.elapsed()
        prev = self.chosen[-1] if self.chosen else None
        if k == self.num_stages - 1:
            full = self.space.full
            growth = trainer.grow_to(full) if prev is not None else trainer.use_subnet(full)
            self.chosen.append(full)
            trainer.log_stage({"stage": k, "subnet": full.to_dict(), "growth": growth})
            trainer.print(f"stage {k + 1}/{self.num_stages}: full model {full}")
            return
        cands = candidates(self.space, prev, self.cfg.forced_growth)
        # the stage as the timeline has it now (budget mode may have moved its end since setup)
        here = self.starts[k + 1] - self.starts[k] if k + 1 < len(self.starts) else self.stage_len
        cands, length, notice = self._fit_search(cands, first_stage=prev is None, stage_len=here)
        if not self.cfg.recycle:  # the timeline holds --no-recycle's redone steps, sized in setup
            length = self.search_steps
        if notice:
            trainer.print(f"stage {k + 1}: {notice}")
        base = prev.depth if prev is not None else min(c.depth for c in cands)
        layout = elastic_layout(self.space, base, max(c.depth for c in cands))
        self.cands = [SubNet(c.resolution, c.depth, layout.blocks(c.depth)) for c in cands]
        top = SubNet(max(c.resolution for c in cands), layout.max_depth, layout.blocks(layout.max_depth))
        if not self.cfg.recycle:
            self._snapshot = trainer.snapshot()
        block_map = layout.source_map()
        if prev is None and (self.cfg.first_supernet == "random" or not block_map):
            growth = trainer.use_subnet(top)  # the full model's initial blocks
        elif prev is None:  # copies of the smallest candidate's initial blocks, in the model and its momentum copy
            trainer.relayout(block_map, top)  # (nothing trained yet to take momentum from; no ReZero gates either)
            growth = GrowthResult(block_map).record("copy")
        else:
            growth = trainer.grow_to(top, block_map=block_map, inserted=list(block_map))
        self.searching = True
        self.search_end = trainer.step + length
        self.score_at = score_steps(trainer.step, length, self.cfg.score_points)
        self.partial = [[] for _ in self.cands]  # each candidate's losses at the scoring points so far
        self._stage_scoring = 0.0
        self.search_start = trainer.step
        self.step_times = [[] for _ in self.cands]  # seconds of each candidate's supernet steps
        self._marked = []
        self._current, self._t_last = None, self._marks(trainer).mark()
        trainer.log_stage({"stage": k, "supernet": top.to_dict(), "candidates": [c.to_dict() for c in self.cands],
                           "growth": growth})
        n = len(self.cands)
        trainer.print(f"stage {k + 1}/{self.num_stages}: supernet {top} with {n} candidate{'s' * (n != 1)}, "
                      f"searching for {length} steps, scored at steps {self.score_at}")

    def step_subnet(self, trainer, step: int) -> SubNet | None:
        if not self.searching:
            return None
        n = len(self.cands)
        self._current = (cycle_index(self.seed, step, n, self.search_start) if self.cfg.supernet_sampling == "cycle"
                         else sample_index(self.seed, step, n))
        return self.cands[self._current]

    def training_supernet(self) -> SubNet | None:
        """While the supernet trains: its deepest candidate's blocks at the largest candidate side (the elastic
        layout's supernet). A phase of one candidate (the previous choice already the largest there is) is no
        supernet: the official code skips its search."""
        if not self.searching or len(self.cands) < 2:
            return None
        deepest = max(self.cands, key=lambda c: c.depth)
        return SubNet(max(c.resolution for c in self.cands), deepest.depth, deepest.blocks)

    def _fit_search(self, cands: list[SubNet], first_stage: bool,
                    stage_len: float | None = None) -> tuple[list[SubNet], int, str | None]:
        """The candidates and supernet length for a stage of ``stage_len`` steps, and a notice when the rules moved
        either: the length raised to the floor of updates per candidate, or, where that does not fit in the stage,
        fewer candidates (:func:`thin`)."""
        stage_len = self.stage_len if stage_len is None else stage_len
        cap, floor = int(stage_len) - 1, self.cfg.search_min_updates
        if self.cfg.search_epochs is not None:
            wanted = round(self.cfg.search_epochs * self.spe)
        else:
            wanted = round(self.cfg.search_fraction * stage_len)
        notes = []
        if floor and floor * len(cands) > cap:
            kept = thin(cands, cap // floor, first_stage)
            notes.append(f"{len(cands)} candidates × {floor} updates do not fit in a stage of {cap + 1} steps: "
                         f"searching {len(kept)} of them ({', '.join(map(str, kept))}); more --epochs or fewer "
                         "--search-min-updates keep them all")
            cands = kept
        length = max(wanted, floor * len(cands))
        if length > cap:
            notes.append(f"the supernet's {length} steps are cut to {max(1, cap)}, the stage less one step")
        elif length > wanted:
            notes.append(f"the supernet trains {length} steps instead of {wanted}, so each of {len(cands)} "
                         f"candidates gets about {floor} updates (--search-min-updates)")
        return cands, max(1, min(length, cap)), "; ".join(notes) or None

    def after_step(self, trainer, loss=None) -> None:
        if not self.searching:
            return
        marks = self._marks(trainer)
        now = marks.mark()  # on a GPU an event after the step's queued work: no synchronisation
        if self._current is not None and self._t_last is not None:  # the whole step of the candidate just trained
            self._marked.append((self._current, self._t_last, now))
            self._current = None
        scored = self.cfg.criterion == "paper" and trainer.step in self.score_at and trainer.step < self.search_end
        if scored:
            self._score(trainer)
        if trainer.step >= self.search_end:
            self._search(trainer)
        self._t_last = marks.mark() if scored else now  # the scoring is not the next step's time

    @staticmethod
    def _marks(trainer) -> StepMarks:
        """The trainer's step marks (CUDA events on a GPU), or marks on its training clock."""
        marks = getattr(trainer, "step_marks", None)
        return marks if marks is not None else StepMarks(trainer.elapsed)

    def _read_marks(self) -> None:
        """Add the steps timed by marks so far to :attr:`step_times` (on a GPU, one synchronisation)."""
        for i, start, end in self._marked:
            seconds = start.seconds_to(end)
            if seconds is not None:  # an evaluation or a measurement came between its marks
                self.step_times[i].append(seconds)
        self._marked = []

    def _score(self, trainer) -> float:
        """Every candidate's loss at one scoring point, on its own part of the scoring subset; its seconds (from
        when the supernet steps queued before it are done: a GPU's wait for them is training time)."""
        _sync(trainer)
        t0 = time.perf_counter()
        part = len(self.partial[0])
        for i, c in enumerate(self.cands):
            self.partial[i].append(trainer.candidate_loss(c, self.cfg.search_samples, part, len(self.score_at),
                                                          momentum=self.cfg.score_momentum))
        dt = time.perf_counter() - t0
        self.search_time += dt
        self._stage_scoring += dt
        return dt

    def _search(self, trainer) -> None:
        k = trainer.stage
        self._read_marks()  # (on a GPU: waits for the supernet's queued steps, which are the supernet's time)
        # the supernet's training steps; the scoring points inside the phase are scoring time
        self.supernet_time += trainer.elapsed() - self._t_stage - self._stage_scoring
        t0 = time.perf_counter()
        times = self._step_times(trainer)
        if self.cfg.criterion == "gain":  # the losses come with the gradients, on gain's own subset
            idx, alpha, score, losses = self._by_gain(trainer, times)
        else:
            t0 += self._score(trainer)  # which counts its own time
            losses = [sum(v) / len(v) for v in self.partial]
            idx, alpha, score = choose(losses, times, self.cfg.alpha, self.cfg.alpha_rule)
        idx, alpha = trainer.broadcast((idx, alpha))  # every process takes the main process's choice
        best = self.cands[idx]
        table = [{"resolution": c.resolution, "depth": c.depth, "loss": round(lo, 5), "step_time_s": round(t, 6),
                  "score": round(sc, 6), "chosen": i == idx}
                 for i, (c, lo, t, sc) in enumerate(zip(self.cands, losses, times, score))]
        chosen = SubNet(best.resolution, best.depth)
        self.searching = False  # (before the choice is applied: the trainer regularizes it as the stage's own)
        if self.cfg.recycle:  # weight recycling: keep the supernet's weights, compact to blocks 0..l-1 (per segment)
            trainer.relayout(self.space.block_segments.compaction(best.active_blocks), chosen)
        else:
            trainer.restore(self._snapshot)
            self._snapshot = None
            if self.chosen:
                trainer.grow_to(chosen)
            else:
                trainer.use_subnet(chosen)
        self.chosen.append(chosen)
        dt = time.perf_counter() - t0
        self.search_time += dt
        self.search_log.append({"stage": k + 1, "criterion": self.cfg.criterion, "alpha": round(alpha, 6),
                                "alpha_rule": self.cfg.alpha_rule if self.cfg.alpha is None else "given",
                                "search_s": round(dt + self._stage_scoring, 3), "scored_at": self.score_at,
                                "step_time_from": self.time_source,
                                "candidates": table, "chosen": chosen.to_dict()})
        trainer.log_stage({"stage": k, "chosen": chosen.to_dict(), "alpha": alpha, "candidates": table})
        how = "criterion gain, score = predicted gain per second" if self.cfg.criterion == "gain" else f"alpha={alpha:.3f}"
        lines = [f"stage {k + 1} search ({how}):", "  res depth    loss  step_ms    score"]
        lines += [f"  {r['resolution']:>3} {r['depth']:>5} {r['loss']:7.4f} {1000 * r['step_time_s']:8.2f} "
                  f"{r['score']:8.4f}{'  <- chosen' if r['chosen'] else ''}" for r in table]  # nan: diverged
        trainer.print("\n".join(lines))

    def _step_times(self, trainer) -> list[float]:
        """T per candidate: the median of its own supernet steps (whole steps: forward, backward, optimizer, EMA),
        or, with ``search_step_time="probe"`` or where a candidate trained fewer than 2 steps, timed passes for all."""
        if (self.cfg.search_step_time == "supernet" and len(self.step_times) == len(self.cands)
                and all(len(t) >= 2 for t in self.step_times)):
            self.time_source = "supernet steps"
            return [statistics.median(t) for t in self.step_times]
        self.time_source = "probe"
        return [trainer.measure_step_time(c, self.cfg.time_repeats) for c in self.cands]

    def _by_gain(self, trainer, times: list[float]) -> tuple[int, float, list[float], list[float]]:
        """Our criterion: predicted decrease per second of the deepest supernet's loss at full resolution
        (cross-fitted over ``gain_folds``); also each candidate's loss on the same subset."""
        deepest = max(self.cands, key=lambda c: (c.depth, c.resolution))
        n, folds = self.cfg.gain_samples, self.cfg.gain_folds
        target = trainer.candidate_gradients(SubNet(self.space.full_resolution, deepest.depth, deepest.blocks),
                                             n, folds)
        grads = [trainer.candidate_gradients(c, n, folds) for c in self.cands]
        gains = [gain_per_second(target, g, t) for g, t in zip(grads, times)]
        return choose_by_gain(gains), 0.0, gains, [g.loss for g in grads]

    # --------------------------------------------------------------------------------- outputs
    def schedule(self) -> Schedule | None:
        if not self.chosen:
            return None
        if self._total is None:
            frac = 1.0 / self.num_stages
            return Schedule(self.method, tuple(Stage(s, frac) for s in self.chosen), default_growth="mogrow")
        ends = [*self.starts[1:len(self.chosen)], self._total][:len(self.chosen)]
        kept = [e - s - (self._extra if i < self.num_stages - 1 else 0)  # a --no-recycle search's steps are redone
                for i, (s, e) in enumerate(zip(self.starts, ends))]
        return Schedule(self.method, tuple(Stage(c, n) for c, n in zip(self.chosen, kept) if n > 0),
                        default_growth="mogrow")

    def summary(self) -> dict:
        return {"search_epoch_s": round(self.supernet_time, 3), "search_scoring_s": round(self.search_time, 3),
                "search": self.search_log, "recycle": self.cfg.recycle}

    def state_dict(self) -> dict:
        self._read_marks()  # (a checkpoint synchronises anyway)
        return {"chosen": [c.to_dict() for c in self.chosen], "cands": [c.to_dict() for c in self.cands],
                "searching": self.searching, "search_end": self.search_end, "search_log": self.search_log,
                "search_time": self.search_time, "supernet_time": self.supernet_time, "t_stage": self._t_stage,
                "starts": self.starts, "total": self._total,
                "score_at": self.score_at, "partial": self.partial, "stage_scoring": self._stage_scoring,
                "search_start": self.search_start, "step_times": self.step_times}

    def load_state_dict(self, state: dict) -> None:
        if state["searching"] and not self.cfg.recycle:
            raise ConfigError("this AutoProg-One run (--no-recycle) stopped in the middle of a search, whose "
                              "starting weights are not checkpointed; start it again")
        self.chosen = [SubNet.from_dict(c) for c in state["chosen"]]
        self.cands = [SubNet.from_dict(c) for c in state["cands"]]
        self.searching, self.search_end = state["searching"], state["search_end"]
        self.search_log, self.search_time = state["search_log"], state["search_time"]
        self.supernet_time, self._t_stage = state["supernet_time"], state["t_stage"]
        self.starts = list(state.get("starts", self.starts))  # budget mode moves them
        self._total = state.get("total", self._total)
        n = len(self.cands)  # a checkpoint from before 2026-12-05 has none of these: one point, at the end
        self.score_at = state.get("score_at", [self.search_end] if self.searching else [])
        self.partial = [[math.nan if v is None else v for v in vs]  # a NaN loss was written as null
                        for vs in state.get("partial", [[] for _ in range(n)])]
        self._stage_scoring = state.get("stage_scoring", 0.0)
        self.search_start = state.get("search_start", 0)
        self.step_times = state.get("step_times", [[] for _ in range(n)])
        self._marked = []
        self._current, self._t_last = None, None  # the first step after a resume is not timed (the clock restarts)


class AutoProgOneFinetune(SearchingController):
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
            self.choose(trainer, k, self.space.full)
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

    def after_step(self, trainer, loss) -> None:
        if not self.cands or self._current is None:
            return
        self.losses[self._current].append(loss.detach() if torch.is_tensor(loss) else float(loss))  # read at the end
        self._current = None
        if trainer.step >= self.search_end:  # the steps finished so far
            self._finish_search(trainer)

    def _finish_search(self, trainer) -> None:
        t0 = time.perf_counter()
        seen = [i for i in range(len(self.cands)) if self.losses[i]]
        losses = [sum(_floats(self.losses[i])) / len(self.losses[i]) for i in seen]
        times = [trainer.measure_step_time(self.cands[i]) for i in seen]
        best, alpha, sc = choose(losses, times, self.alpha)
        best = trainer.broadcast(best)
        rows = [{**self.cands[i].to_dict(), "loss": losses[j], "time_s": times[j], "score": sc[j]}
                for j, i in enumerate(seen)]
        print_table(trainer, self._stage, rows, ["loss", "time_s", "score"], best)
        self.search_log.append({"stage": self._stage + 1, "alpha": alpha, "candidates": rows, "chosen": best,
                                "scoring_s": round(time.perf_counter() - t0, 3)})
        self.choose(trainer, self._stage, self.cands[seen[best]])
        self.cands = []

    def state_dict(self) -> dict:
        return {**super().state_dict(), "cands": [c.to_dict() for c in self.cands],
                "losses": {str(i): _floats(v) for i, v in self.losses.items()}, "search_end": self.search_end,
                "stage": getattr(self, "_stage", -1)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.cands = [SubNet.from_dict(d) for d in state["cands"]]
        self.losses = {int(i): v for i, v in state["losses"].items()}
        self.search_end, self._stage = state["search_end"], state["stage"]

    def resize_floor(self) -> int:
        return self.search_end + 1 if self.cands and self.search_end >= 0 else 0


def _floats(values: list) -> list[float]:
    """Step losses kept as device tensors (and floats, after a resume) as floats, in one read from the device."""
    at = [i for i, v in enumerate(values) if torch.is_tensor(v)]
    out = [None if torch.is_tensor(v) else float(v) for v in values]
    if at:
        for i, f in zip(at, torch.stack([values[i].reshape(()).float() for i in at]).tolist()):
            out[i] = f
    return out


def _sync(trainer) -> None:
    """Wait for the trainer's queued device work, where it can say (a no-op on the CPU)."""
    sync = getattr(trainer, "sync", None)
    if callable(sync):
        sync()
