"""Elastic ViT adapter: runs a ViT (built-in or timm) as any sub-network ψ = (resolution, active blocks).

The adapter *applies* a :class:`~autoprog.space.SubNet`; it never decides which one. Inputs are resized
to ψ's resolution inside ``forward`` (position embeddings are resampled by the model), only the active
blocks run, and inactive blocks have ``requires_grad=False`` so they get neither gradients nor
optimizer state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.vit import init_weights
from ..space import GrowthSpace, SubNet


class ReZeroGate(nn.Module):
    """Scales a residual branch by a learnable scalar (ReZero); zero makes the block an identity map."""

    def __init__(self, inner: nn.Module, value: float = 0.0):
        super().__init__()
        self.inner = inner
        self.gate = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate * self.inner(x)


_REQUIRED = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")


class ElasticViT(nn.Module):
    """Wraps a timm-style ViT so that it runs as a sub-network of itself.

    Works for :class:`autoprog.models.vit.VisionTransformer` and timm's ``VisionTransformer`` (DeiT, ViT)
    created with ``dynamic_img_size=True``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        missing = [a for a in _REQUIRED if not hasattr(model, a)]
        if missing:
            raise ConfigError(f"{type(model).__name__} is not a ViT this adapter can drive (missing {missing})")
        if hasattr(model, "dynamic_img_size") and not model.dynamic_img_size:
            raise ConfigError("timm ViTs must be created with dynamic_img_size=True to change resolution")
        self.model = model
        pe = model.patch_embed
        self.patch_size = int(pe.patch_size[0])
        self.full_resolution = int(pe.img_size[0])
        self.full_depth = len(model.blocks)
        self.subnet = self.full_subnet
        self.apply_subnet(self.subnet)

    # ----------------------------------------------------------------------------------- sub-networks
    @property
    def full_subnet(self) -> SubNet:
        return SubNet(self.full_resolution, self.full_depth)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def growth_space(self, num_stages: int = 4, start_ratio: float = 0.5) -> GrowthSpace:
        return GrowthSpace(self.full_resolution, self.patch_size, self.full_depth, num_stages, start_ratio)

    def apply_subnet(self, subnet: SubNet) -> None:
        """Run as ``subnet`` from now on; only its blocks (and the stem/head) require grad."""
        self.growth_space(1, 1.0).validate(subnet)
        self.subnet = subnet
        active = set(subnet.active_blocks)
        for p in self.parameters():
            p.requires_grad_(True)
        for i, blk in enumerate(self.blocks):
            if i not in active:
                for p in blk.parameters():
                    p.requires_grad_(False)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.subnet.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=x.shape[-1] > r, align_corners=False)
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for i in self.subnet.active_blocks:
            x = m.blocks[i](x)
        return m.forward_head(m.norm(x))

    # ------------------------------------------------------------------------------ block surgery
    def reset_block(self, index: int) -> None:
        """Randomly re-initialise block ``index`` with timm's ViT initialisation."""
        self.blocks[index].apply(init_weights)

    def gated(self, index: int) -> bool:
        return isinstance(self.blocks[index].ls1, ReZeroGate)

    def set_gate(self, index: int, value: float | None) -> None:
        """Install (value given) or remove (None) ReZero gates on block ``index``'s residual branches."""
        blk = self.blocks[index]
        for name in ("ls1", "ls2"):
            cur = getattr(blk, name)
            if value is None:
                if isinstance(cur, ReZeroGate):
                    setattr(blk, name, cur.inner)
            elif isinstance(cur, ReZeroGate):
                with torch.no_grad():
                    cur.gate.fill_(value)
            else:
                p = next(blk.parameters())
                setattr(blk, name, ReZeroGate(cur, value).to(device=p.device, dtype=p.dtype))

    def gated_blocks(self) -> list[int]:
        return [i for i in range(self.full_depth) if self.gated(i)]
