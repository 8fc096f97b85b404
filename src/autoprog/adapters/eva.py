"""Elastic Eva adapter: timm's ``Eva`` (EVA-02, and the ViTs timm builds on it) as any sub-network ψ =
(resolution, active blocks). Its position embedding and rotary embedding are resampled by the model
(``dynamic_img_size``); each block takes the rotary embedding of the grid it runs at."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import resize_input
from .vit import ElasticViT


def _is_eva(model: nn.Module) -> bool:
    return any(c.__name__ == "Eva" and c.__module__.startswith("timm.") for c in type(model).__mro__)


class ElasticEva(ElasticViT):
    """A timm ``Eva`` run as a sub-network of itself; new blocks' residual branches are gated at ``drop_path1`` and
    ``drop_path2`` (Eva's layer scale is a bare parameter, not a module)."""

    family = "Eva (timm Eva: eva02_*)"
    gate_slots = ("drop_path1", "drop_path2")

    def __init__(self, model: nn.Module):
        if getattr(model, "rope_mixed", False):
            raise ConfigError(f"{type(model).__name__} with depth-mixed rotary embeddings cannot change depth")
        if getattr(model, "patch_drop", None) is not None:
            raise ConfigError("Eva with patch dropout is not supported by the elastic adapter (patch_drop_rate 0)")
        super().__init__(model)

    @classmethod
    def fits(cls, model: nn.Module) -> bool:
        return _is_eva(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_input(x, self.subnet.resolution)
        m = self.model
        x, rope = m._pos_embed(m.patch_embed(x))
        x = m.norm_pre(x)
        for i in self.running_blocks:
            x = self.run_block(m.blocks[i], x, rope)
        return m.forward_head(m.norm(x))
