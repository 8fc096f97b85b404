"""The supernet-only baseline of the paper's Table 20 (``--method supernet-only``): the model trained as an elastic
supernet for the whole run, without progressive growth. Each step trains one sub-network of the growth space Ω
drawn uniformly at random, as AutoProg-One's supernet phase draws its candidates (``sample_index``: a pure
function of the seed and the step, so every process and a resumed run agree). Between steps, and so at every
evaluation and at the end, the model is its full sub-network: what the baseline reports is the full model's top-1
(the original architecture, the largest sub-network of the supernet)."""

from __future__ import annotations

from ..controllers import Controller
from ..schedules import Schedule, Stage
from ..space import GrowthSpace, SubNet
from .elastic import elastic_layout, sample_index


class SupernetOnly(Controller):
    """One stage: a uniformly sampled sub-network of Ω per step, the full model otherwise."""

    method = "supernet-only"

    def __init__(self, space: GrowthSpace, seed: int = 0):
        self.space, self.seed = space, seed
        depths = space.depths()
        layout = elastic_layout(space, min(depths), max(depths))
        self.cands = [SubNet(r, d, layout.blocks(d)) for r in space.resolutions() for d in depths]
        self.full = SubNet(space.full.resolution, space.full.depth, layout.blocks(space.full.depth))
        self.counts = [0] * len(self.cands)  # steps each sub-network trained (for the summary)

    def enter_stage(self, trainer, k: int) -> None:
        trainer.use_subnet(self.full)
        trainer.log_stage({"stage": 0, "supernet": self.full.to_dict(),
                           "candidates": [c.to_dict() for c in self.cands]})
        trainer.print(f"supernet-only: one of {len(self.cands)} sub-networks of Ω per step, the full model "
                      "evaluated")

    def step_subnet(self, trainer, step: int) -> SubNet:
        i = sample_index(self.seed, step, len(self.cands))
        self.counts[i] += 1
        return self.cands[i]

    def training_supernet(self) -> SubNet:
        """The whole run trains the supernet: the full model with every block."""
        return self.full

    def after_step(self, trainer, loss=None) -> None:
        if trainer.subnet != self.full:  # evaluations and checkpoints see the full model
            trainer.use_subnet(self.full)

    def decided(self, k: int) -> SubNet | None:
        return self.full

    def schedule(self) -> Schedule:
        return Schedule(self.method, (Stage(self.full, 1.0),))

    def summary(self) -> dict:
        return {"supernet_candidates": [str(c) for c in self.cands], "supernet_steps": list(self.counts)}

    def state_dict(self) -> dict:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.counts = list(state.get("counts", self.counts))
