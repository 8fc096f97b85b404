"""The unfreezing adapter: applies a learnable sub-network ψ to a diffusion backbone (it applies, never decides).

ψ = (input resolution, how many blocks are learnable). All blocks still run forward; frozen parameters get
``requires_grad=False`` and therefore neither gradients nor optimizer state. The full ψ makes everything learnable.
Which parameters a smaller ψ trains is the ``layout``:

* ``"spread"`` (autoprog's): the learnable blocks spread evenly over the depth, the output-side block always
  among them (:func:`spread_blocks`); besides them only the condition embeddings train (a transfer task brings
  classes the base model has never seen), so the frozen input side needs no weight gradients.
* ``"tail"`` (ours): the last ``learnable`` blocks, contiguous from the output side (:func:`tail_blocks`), and the
  condition embeddings; everything below the first learnable block is a frozen prefix.
* ``"official"`` (the official AutoProg-Zero code's ``set_model_config``): the blocks interleaved from the input
  side in ``groups`` groups, group g holding blocks g, g + groups, … (:func:`interleaved_blocks`), and every
  parameter outside the blocks (patch, timestep and condition embedders, the output layer) always trains. The
  official code matches block names by substring, so its l = 2 and 3 also train blocks 10–19 / 20–27 of
  DiT-XL/2; autoprog builds the groups it intends.

``frozen_prefix`` says how the blocks below the first learnable one run: ``"backprop"`` (the paper's: autograd
records them, so the learnable condition embeddings get gradients through them too, and their activations are
kept for the backward pass) or ``"no-grad"`` (ours: they run without autograd, so none of their activations are
kept and the backward pass stops at the first learnable block; the condition embeddings then learn through the
learnable blocks only, and a condition table inside a prefix block, as diffusers' DiT keeps one per block, stays
as it is). ``"no-grad"`` needs a layout that trains nothing else below that block (not ``official``).
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


def tail_blocks(depth: int, learnable: int) -> tuple[int, ...]:
    """The last ``learnable`` of ``depth`` block indices (contiguous from the output side)."""
    if not 1 <= learnable <= depth:
        raise ConfigError(f"cannot make {learnable} of {depth} blocks learnable")
    return tuple(range(depth - learnable, depth))


def interleaved_blocks(depth: int, learnable: int, groups: int) -> tuple[int, ...]:
    """``learnable`` of ``depth`` block indices taken group by group from the input side, group g holding blocks
    g, g + ``groups``, … (the official code's layout: 1 of 4 groups of 28 blocks is 0, 4, …, 24)."""
    if not 1 <= learnable <= depth:
        raise ConfigError(f"cannot make {learnable} of {depth} blocks learnable")
    if groups < 1:
        raise ConfigError(f"need at least one block group, got {groups}")
    return tuple(sorted(sorted(range(depth), key=lambda i: (i % groups, i))[:learnable]))


LAYOUTS = ("spread", "tail", "official")
FROZEN_PREFIX = ("backprop", "no-grad")


class Unfreezer:
    """Applies learnable sub-networks ψ to a backbone (the unfreezing adapter), in one of :data:`LAYOUTS`."""

    def __init__(self, model: DiffusionBackbone, layout: str = "spread", groups: int = 4,
                 frozen_prefix: str = "backprop"):
        if layout not in LAYOUTS:
            raise ConfigError(f"--learnable-layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if frozen_prefix not in FROZEN_PREFIX:
            raise ConfigError(f"--frozen-prefix must be one of {', '.join(FROZEN_PREFIX)}, got {frozen_prefix!r}")
        if frozen_prefix == "no-grad" and layout == "official":
            raise ConfigError("--frozen-prefix no-grad needs --learnable-layout spread or tail: the official layout "
                              "trains the input embedding, which a prefix without autograd would leave untrained")
        if groups < 1:
            raise ConfigError(f"need at least one block group, got {groups}")
        self.model = model
        self.layout = layout
        self.groups = groups
        self.frozen_prefix = frozen_prefix
        self.subnet: SubNet | None = None

    def space(self, num_stages: int = 4, start_ratio: float = 0.25) -> GrowthSpace:
        """Ω for fine-tuning: input patches per side × number of learnable blocks (Sec. 5.1.2: 0.25Ω)."""
        return GrowthSpace(self.model.image_size, self.model.patch_size, self.model.depth, num_stages, start_ratio)

    def blocks_for(self, subnet: SubNet) -> tuple[int, ...]:
        """The learnable block indices of ``subnet`` (its own ``blocks`` where a schedule names them)."""
        if subnet.blocks is not None:
            return subnet.blocks
        if self.layout == "official":
            return interleaved_blocks(self.model.depth, subnet.depth, self.groups)
        if self.layout == "tail":
            return tail_blocks(self.model.depth, subnet.depth)
        return spread_blocks(self.model.depth, subnet.depth)

    def is_full(self, subnet: SubNet) -> bool:
        return subnet.depth >= self.model.depth and subnet.resolution >= self.model.image_size

    def apply(self, subnet: SubNet) -> None:
        if self.is_full(subnet):
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.model.freeze_fixed()
            train_conditions(self.model)
        else:
            learnable = set(self.blocks_for(subnet))
            if self.layout == "official":  # everything outside the blocks trains
                for p in self.model.parameters():
                    p.requires_grad_(True)
                for i, block in enumerate(self.model.blocks):
                    if i not in learnable:
                        block.requires_grad_(False)
                self.model.freeze_fixed()
            else:
                freeze_all(self.model)
                for i in learnable:
                    self.model.blocks[i].requires_grad_(True)
            train_conditions(self.model)
        prefix = 0
        if self.frozen_prefix == "no-grad" and not self.is_full(subnet):
            prefix = min(self.blocks_for(subnet))
            for block in self.model.blocks[:prefix]:  # a block's own condition table (diffusers' DiT) gets no
                block.requires_grad_(False)             # gradient there: it stays as it is
        self.model.set_no_grad_prefix(prefix)
        self.subnet = subnet
