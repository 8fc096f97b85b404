"""Elastic VOLO adapter (timm's ``volo_d1_224`` …, the paper's main pre-training model).

VOLO runs outlooker blocks on a fine token grid, downsamples once, then transformer blocks on the coarse grid. The
sub-network grows the input resolution (a multiple of 16, so both grids stay whole: the coarse grid is the image /
16) and the depth, which counts both kinds of block (the paper: "the number of Transformer blocks or its variants
(e.g., Outlooker blocks)"). As in the official code (``models/volo.py: set_sample_config``), a depth ``l`` runs
``make_divisible(0.23·l, 2)`` outlookers and ``l`` minus that many transformers (VOLO-D1's 18 = 4 + 14; 9 = 2 + 7),
each segment grown in its own blocks (:class:`~autoprog.space.Segments`). The class-attention blocks and the
heads always run. The position embedding of the coarse grid is resampled to each resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..space import Segments
from .base import ElasticModel, resize_input

GRID = 16  # input pixels per coarse token: VOLO's patch embedding (8) times its downsampling (2)
OUTLOOKER_SHARE = 0.23  # the official code's share of a depth that runs outlookers (make_divisible(0.23·l, 2))


def _is_volo(model: nn.Module) -> bool:
    try:
        from timm.models.volo import VOLO
    except ImportError:  # pragma: no cover - timm always ships VOLO
        return False
    return isinstance(model, VOLO)


class ElasticVOLO(ElasticModel):
    """A timm ``VOLO`` run as a sub-network of itself (see the module docstring)."""

    family = "VOLO (timm volo_*)"
    gate_slots = ("attn", "mlp")
    head_names = ("cls_token", "post_network", "norm", "head", "aux_head")  # the class token feeds post_network

    def __init__(self, model: nn.Module):
        if not _is_volo(model):
            raise ConfigError(f"{type(model).__name__} is not a timm VOLO")
        from timm.models.volo import Outlooker, Transformer

        network = list(model.network)
        first, stages = network[0], network[2:]
        if not (isinstance(first, nn.Sequential) and len(first) and all(isinstance(b, Outlooker) for b in first)):
            raise ConfigError("this VOLO does not start with outlooker blocks before its single downsampling")
        if not stages or not all(isinstance(s, nn.Sequential) and all(isinstance(b, Transformer) for b in s)
                                 for s in stages) or not any(len(s) for s in stages):
            raise ConfigError("this VOLO has no transformer blocks after its single downsampling to grow")
        widths = {b.norm1.normalized_shape[0] for s in stages for b in s}
        if len(widths) != 1:
            raise ConfigError(f"VOLO transformer blocks of different widths ({sorted(widths)}) cannot be grown")
        if model.pos_embed is None:
            raise ConfigError("this VOLO has no position embedding to resample")
        self._outlookers = len(first)
        self._blocks = [*first, *(b for s in stages for b in s)]  # plain list: the modules stay registered in model
        self._segments = Segments((self._outlookers, len(self._blocks) - self._outlookers),
                                  first_share=OUTLOOKER_SHARE)
        super().__init__(model)

    @property
    def segments(self) -> Segments:
        return self._segments

    @classmethod
    def fits(cls, model: nn.Module) -> bool:
        return _is_volo(model)

    @classmethod
    def timm_kwargs(cls, o) -> dict:
        bad = [k for k in ("patch_size", "depth", "embed_dim", "num_heads") if getattr(o, k) is not None]
        if bad:
            raise ConfigError(f"VOLO models take their architecture from the model name; drop "
                              f"{', '.join('--' + k.replace('_', '-') for k in bad)}")
        return {"img_size": o.img_size} if o.img_size is not None else {}

    def _geometry(self) -> tuple[int, int, int]:
        grid = self.model.pos_embed.shape[1]
        return GRID, grid * GRID, len(self._blocks)

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def init_block(self, block: nn.Module) -> None:
        block.apply(self.model._init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.subnet.resolution
        x = resize_input(x, r)
        m = self.model
        x = m.patch_embed(x).permute(0, 2, 3, 1)  # B, H, W, C on the fine grid
        run = list(self.running_blocks)
        for i in run:
            if i < self._outlookers:
                x = self.run_block(self._blocks[i], x)
        x = m.network[1](x)  # the downsampling to the coarse grid
        pos = m.pos_embed
        if pos.shape[1:3] != x.shape[1:3]:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        x = m.pos_drop(x + pos)
        for i in run:
            if i >= self._outlookers:
                x = self.run_block(self._blocks[i], x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if m.post_network is not None:
            x = m.forward_cls(x)
        return m.forward_head(m.norm(x))
