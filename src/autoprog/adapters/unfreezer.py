"""The unfreezing adapter: applies a learnable sub-network ψ to a diffusion backbone (it applies, never decides).

ψ = (input resolution, how many blocks are learnable). All blocks still run forward; the learnable ones are
spread evenly over the depth, the output-side block always among them; frozen parameters get
``requires_grad=False`` and therefore neither gradients nor optimizer state. The condition embeddings always
train (a transfer task brings classes the base model has never seen). The full ψ makes everything learnable.
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import ConfigError
from ..models.dit import DiffusionBackbone
from ..space import GrowthSpace, SubNet


def freeze_all(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter: no gradients, no optimizer state."""
    for p in model.parameters():
        p.requires_grad_(False)


def train_conditions(model: DiffusionBackbone) -> None:
    """Make the condition embeddings learnable (class table, and the SID when there is one)."""
    for p in model.condition_parameters():
        p.requires_grad_(True)


def spread_blocks(depth: int, learnable: int) -> tuple[int, ...]:
    """``learnable`` block indices spread evenly over ``depth`` blocks, the output-side block always included."""
    if not 1 <= learnable <= depth:
        raise ConfigError(f"cannot make {learnable} of {depth} blocks learnable")
    return tuple(sorted({depth - 1 - math.floor(i * depth / learnable) for i in range(learnable)}))


class Unfreezer:
    """Applies learnable sub-networks ψ to a backbone (the unfreezing adapter)."""

    def __init__(self, model: DiffusionBackbone):
        self.model = model
        self.subnet: SubNet | None = None

    def space(self, num_stages: int = 4, start_ratio: float = 0.25) -> GrowthSpace:
        """Ω for fine-tuning: input patches per side × number of learnable blocks (Sec. 5.1.2: 0.25Ω)."""
        return GrowthSpace(self.model.image_size, self.model.patch_size, self.model.depth, num_stages, start_ratio)

    def blocks_for(self, subnet: SubNet) -> tuple[int, ...]:
        return subnet.blocks if subnet.blocks is not None else spread_blocks(self.model.depth, subnet.depth)

    def is_full(self, subnet: SubNet) -> bool:
        return subnet.depth >= self.model.depth and subnet.resolution >= self.model.image_size

    def apply(self, subnet: SubNet) -> None:
        if self.is_full(subnet):
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.model.freeze_fixed()
            train_conditions(self.model)
        else:
            freeze_all(self.model)
            for i in self.blocks_for(subnet):
                self.model.blocks[i].requires_grad_(True)
            train_conditions(self.model)
        self.subnet = subnet
