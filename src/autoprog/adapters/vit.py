"""Elastic ViT adapter: a ViT (built-in or timm ViT/DeiT) as any sub-network ψ = (resolution, active blocks).

Position embeddings are resampled by the model (``dynamic_img_size``); the growable blocks are ``blocks``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models.vit import init_weights
from .base import ElasticModel, ReZeroGate, resize_input

__all__ = ["ElasticViT", "ReZeroGate"]

_REQUIRED = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")


class ElasticViT(ElasticModel):
    """A timm-style ViT run as a sub-network of itself.

    Works for :class:`autoprog.models.vit.VisionTransformer` and timm's ``VisionTransformer`` (ViT, DeiT, DeiT III)
    created with ``dynamic_img_size=True``; timm's ``Eva`` has its own adapter (:mod:`autoprog.adapters.eva`).
    """

    family = "ViT/DeiT/DeiT III (timm VisionTransformer, built-in vit)"
    gate_slots = ("ls1", "ls2")
    head_names = ("norm", "fc_norm", "attn_pool", "head")

    def __init__(self, model: nn.Module):
        missing = [a for a in _REQUIRED if not hasattr(model, a)]
        if missing:
            raise ConfigError(f"{type(model).__name__} is not a ViT this adapter can drive (missing {missing})")
        if hasattr(model, "dynamic_img_size") and not model.dynamic_img_size:
            raise ConfigError("timm ViTs must be created with dynamic_img_size=True to change resolution")
        super().__init__(model)

    @classmethod
    def fits(cls, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in _REQUIRED) and not any(c.__name__ == "Eva" for c in type(model).__mro__)

    @classmethod
    def timm_kwargs(cls, o) -> dict:
        kw = {"dynamic_img_size": True}
        for k in ("img_size", "patch_size", "depth", "embed_dim", "num_heads"):
            if getattr(o, k) is not None:
                kw[k] = getattr(o, k)
        if o.embed_dim is not None and o.num_heads is None:
            kw["num_heads"] = max(1, o.embed_dim // 32)
        return kw

    def _geometry(self) -> tuple[int, int, int]:
        pe = self.model.patch_embed
        return int(pe.patch_size[0]), int(pe.img_size[0]), len(self.model.blocks)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def init_block(self, block: nn.Module) -> None:
        block.apply(init_weights)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_input(x, self.subnet.resolution)
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for i in self.running_blocks:
            x = self.run_block(m.blocks[i], x)
        return m.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self._features(x))

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head on each patch token (after ``fc_norm`` where the model pools that way)."""
        m = self.model
        if getattr(m, "attn_pool", None) is not None:
            raise ConfigError("a ViT pooled by attention gives no per-token class logits")
        tokens = self._features(x)[:, getattr(m, "num_prefix_tokens", 1):]
        logits = m.head(getattr(m, "fc_norm", nn.Identity())(tokens))
        side = self.subnet.resolution // self.patch_size
        return logits.reshape(logits.shape[0], side, side, -1)
