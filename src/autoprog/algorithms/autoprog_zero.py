"""AutoProg-Zero (Sec. 4.2, Algorithm 2): the schedule chosen zero-shot at every stage start.

At the first step of each stage but the last, every candidate learnable sub-network ψ of Λ_k (never smaller
than ψ*_{k-1}) is scored on the inherited weights, without training:

* H_κ, the condition number of the empirical NTK over ψ's learnable parameters (Eq. 16),
* H_ZiCo, minus the log gradient signal-to-noise summed over ψ's learnable layers (Eq. 17),
* T, ψ's measured training step time,

and the winner of the ranked vote R = ½R(H_κ) + ½R(H_ZiCo) + R(T) (Eq. 19) is unfrozen. Step times are ranked
exactly, as the paper and the official code do; with ``time_rtol`` (ours, e.g. 0.05) times within that relative
difference tie on the time ballot, so measurement noise does not pick the winner. The last stage trains the whole model. Search time is part of the method's runtime and is also
reported on its own.

It runs on any trainer that offers :class:`~autoprog.controllers.ZeroShotServices`: fine-tuning scores
unfrozen candidates (the paper's use), pre-training scores grown candidates (Table 5: ViT growth with 0.5Ω
and no SID), each through ``trainer.try_candidate``.

Λ_k (``candidate_space``): ``"neighbours"`` is the official AutoProg-Zero code's rule
(:func:`~autoprog.space.neighbour_candidates`: the two smallest n × l of Ω at stage 1, then ψ*_{k-1}'s n and l and
the next of each); ``"autoprog-one"`` is AutoProg-One's Appendix B rule (:func:`~autoprog.space.candidates`, up
to 3 × 3 then 2 × 4). Left as None, it follows the task: neighbours when the trainer unfreezes (fine-tuning,
what the official code does), autoprog-one when it grows (pre-training, Table 5: the official code has no
pre-training search, and autoprog's pre-training AutoProg-Zero has always searched AutoProg-One's Λ_k).

``criterion="gain"`` replaces the vote by our criterion (:mod:`autoprog.algorithms.gain`): the predicted
decrease of the full model's full-resolution loss per second of training each candidate.
"""

from __future__ import annotations

import time

from ..controllers import SearchingController, ZeroShotServices, check_services, print_table
from ..errors import ConfigError
from ..options import option
from ..space import GrowthSpace, SubNet, candidates, neighbour_candidates
from .gain import CRITERIA, choose_by_gain, gain_per_second, gradients
from .proxies import TIME_RTOL, autoprog_zero_vote, ntk_condition_number, zico

CANDIDATE_SPACES = ("neighbours", "autoprog-one")


def time_tolerance_option(group: str):
    """The ``time_tolerance`` spec field of every task's AutoProg-Zero, declared once."""
    return option(TIME_RTOL, "AutoProg-Zero: step times within this relative difference tie on the time ballot. 0 "
                             "(default): the paper's and the official code's exact ranking; 0.05 (ours): timing "
                             "noise on a shared machine does not decide between candidates of equal cost",
                  minimum=0, below=1, group=group)


class AutoProgZero(SearchingController):
    """The zero-shot search as a controller (needs :class:`~autoprog.controllers.ZeroShotServices`)."""

    def __init__(self, space: GrowthSpace, ntk_samples: int = 16, time_rtol: float = TIME_RTOL,
                 criterion: str = "paper", gain_folds: int = 2, candidate_space: str | None = None):
        super().__init__(space, "autoprog-zero")
        if criterion not in CRITERIA:
            raise ConfigError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        if candidate_space is not None and candidate_space not in CANDIDATE_SPACES:
            raise ConfigError(f"--candidate-space must be one of {', '.join(CANDIDATE_SPACES)}, "
                              f"got {candidate_space!r}")
        self.candidate_space = candidate_space
        self.ntk_samples = ntk_samples
        self.time_rtol = time_rtol
        self.criterion = criterion
        if gain_folds < 1:
            raise ConfigError(f"--gain-folds must be positive, got {gain_folds}")
        self.gain_folds = gain_folds

    def setup(self, trainer: ZeroShotServices, total_steps: int) -> int:
        check_services(trainer, ZeroShotServices)
        if self.candidate_space is None:  # by task: see the module docstring
            self.candidate_space = "neighbours" if getattr(trainer, "unfreezes", False) else "autoprog-one"
        return super().setup(trainer, total_steps)

    def candidates(self, k: int) -> list[SubNet]:
        """Λ_k by ``candidate_space``, never smaller than the previous choice."""
        previous = self.chosen[-1] if self.chosen else None
        if self.candidate_space == "neighbours":
            return neighbour_candidates(self.space, previous)
        return candidates(self.space, previous)

    def enter_stage(self, trainer: ZeroShotServices, k: int) -> None:
        if k == self.num_stages - 1:
            self.choose(trainer, k, self.space.full)
            return
        t0 = time.perf_counter()
        cands = self.candidates(k)
        if self.criterion == "gain":
            best, rows, shown = self._by_gain(trainer, cands)
        else:
            best, rows, shown = self._by_vote(trainer, cands)
        best = trainer.broadcast(best)
        print_table(trainer, k, rows, shown, best)
        self.search_log.append({"stage": k + 1, "criterion": self.criterion, "candidate_space": self.candidate_space,
                                "candidates": rows, "chosen": best,
                                "search_s": round(time.perf_counter() - t0, 3)})
        self.choose(trainer, k, cands[best])

    def _by_gain(self, trainer: ZeroShotServices, cands: list) -> tuple[int, list[dict], list[str]]:
        with trainer.try_candidate(self.space.full) as task:
            target = gradients(task, self.gain_folds)
        gains, times = [], []
        for sub in cands:
            with trainer.try_candidate(sub) as task:
                grads = gradients(task, self.gain_folds)
            times.append(trainer.measure_step_time(sub))
            gains.append(gain_per_second(target, grads, times[-1]))
        rows = [{**sub.to_dict(), "time_s": t, "gain_per_s": g} for sub, t, g in zip(cands, times, gains)]
        return choose_by_gain(gains), rows, ["time_s", "gain_per_s"]

    def _by_vote(self, trainer: ZeroShotServices, cands: list) -> tuple[int, list[dict], list[str]]:
        ntk, zc, times = [], [], []
        for sub in cands:
            with trainer.try_candidate(sub) as task:
                ntk.append(ntk_condition_number(task.model, task.batches, forward=task.forward,
                                                max_samples=self.ntk_samples))
                zc.append(zico(task.model, task.batches, task.loss))
            times.append(trainer.measure_step_time(sub))
        best, table = autoprog_zero_vote(ntk, zc, times, time_rtol=self.time_rtol)
        rows = [{**sub.to_dict(), "ntk_cond": row["ntk"], "zico": row["zico"], "time_s": row["time"],
                 "R_ntk": row["ntk_rank"], "R_zico": row["zico_rank"], "R_time": row["time_rank"], "R": row["total"]}
                for sub, row in zip(cands, table)]
        return best, rows, ["ntk_cond", "zico", "time_s", "R"]
