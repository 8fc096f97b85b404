"""Elastic VOLO adapter (timm's ``volo_d1_224`` …, the paper's main pre-training model).

VOLO runs outlooker blocks on a fine token grid, downsamples once, then transformer blocks on the coarse grid. The
sub-network grows the input resolution (a multiple of 16, so both grids stay whole: the coarse grid is the image /
16) and the depth, which counts both kinds of block (the paper: "the number of Transformer blocks or its variants
(e.g., Outlooker blocks)"). As in the official code (``models/volo.py: set_sample_config``), a depth ``l`` runs
``make_divisible(0.23·l, 2)`` outlookers and ``l`` minus that many transformers (VOLO-D1's 18 = 4 + 14; 9 = 2 + 7),
each segment grown in its own blocks (:class:`~autoprog.space.Segments`). The class-attention blocks and the
heads always run. The position embedding of the coarse grid is resampled to each resolution.

With :attr:`ElasticVOLO.token_labelling` on (token labeling, :mod:`autoprog.classification.token_labels`), a training
forward runs MixToken as the official model does and returns the class token's logits, each coarse token's
(the auxiliary head's, their swap undone) and MixToken's box; otherwise the logits as timm's VOLO gives them (the
class token's plus half the auxiliary head's maximum).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..space import Segments
from .base import ElasticModel, resize_input

GRID = 16  # input pixels per coarse token: VOLO's patch embedding (8) times its downsampling (2)
OUTLOOKER_SHARE = 0.23  # the official code's share of a depth that runs outlookers (make_divisible(0.23·l, 2))
MIX_TOKEN_BETA = 1.0  # MixToken's kept share λ ~ Beta(1, 1), as the official VOLO model


def mix_token_box(fine: tuple[int, int], pooling: int) -> tuple[int, int, int, int]:
    """MixToken's box on the coarse token grid (``fine``: the patch grid's rows and columns, ``pooling`` fine
    tokens per coarse one), drawn with numpy as the official VOLO model draws it: an area about ``1 − λ``, ``λ ~
    Beta(1, 1)``, about a uniform centre, clipped. Returns ``(row0, col0, row1, col1)``, empty when ``λ`` is 1."""
    lam = np.random.beta(MIX_TOKEN_BETA, MIX_TOKEN_BETA)
    rows, cols = fine[0] // pooling, fine[1] // pooling
    cut = math.sqrt(1.0 - lam)
    cut_r, cut_c = int(rows * cut), int(cols * cut)
    cr, cc = np.random.randint(rows), np.random.randint(cols)
    return (int(np.clip(cr - cut_r // 2, 0, rows)), int(np.clip(cc - cut_c // 2, 0, cols)),
            int(np.clip(cr + cut_r // 2, 0, rows)), int(np.clip(cc + cut_c // 2, 0, cols)))


def swap_box(x: torch.Tensor, box: tuple[int, int, int, int], scale: int = 1) -> torch.Tensor:
    """``x`` ``[B, rows, cols, ...]`` with the box (coarse cells of ``scale`` × ``scale``) taken from the batch's
    reverse: MixToken's mixing, and its undoing."""
    r0, c0, r1, c1 = (v * scale for v in box)
    if r1 <= r0 or c1 <= c0:
        return x
    out = x.clone()
    out[:, r0:r1, c0:c1] = x.flip(0)[:, r0:r1, c0:c1]
    return out


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
        self.token_labelling = False  # see the module docstring
        self._token_logits = False  # within token_logits: the forward returns the auxiliary head's grid
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

    def check_token_labels(self) -> None:
        """Refuse a VOLO that token labeling cannot train (no auxiliary head, or no class token)."""
        if self.model.aux_head is None or self.model.global_pool != "token" or self.model.post_network is None:
            raise ConfigError("token labeling trains VOLO's class token and auxiliary head: this VOLO lacks one")

    def token_grid(self) -> int:
        """The coarse token grid's side at the running resolution: one token label per coarse token."""
        return self.subnet.resolution // GRID

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The auxiliary head on each coarse token, ``[B, rows, cols, classes]``."""
        if self.model.aux_head is None or self.model.post_network is None:
            raise ConfigError("this VOLO has no auxiliary head or no class token: it gives no per-token class logits")
        self._token_logits = True
        try:
            return self(x)
        finally:
            self._token_logits = False

    @contextlib.contextmanager
    def token_labelled(self):
        """Within: a training forward runs MixToken and returns ``(class logits, token logits, box)``."""
        before, self.token_labelling = self.token_labelling, True
        try:
            yield
        finally:
            self.token_labelling = before

    def forward(self, x: torch.Tensor):
        r = self.subnet.resolution
        x = resize_input(x, r)
        m = self.model
        x = m.patch_embed(x).permute(0, 2, 3, 1)  # B, H, W, C on the fine grid
        dense = self.token_labelling and self.training
        if dense:
            box = mix_token_box(x.shape[1:3], m.pooling_scale)
            x = swap_box(x, box, m.pooling_scale)
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
        grid = x.shape[1:3]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if m.post_network is not None:
            x = m.forward_cls(x)
        x = m.norm(x)
        if self._token_logits:
            return m.aux_head(x[:, 1:]).reshape(x.shape[0], *grid, -1)
        if not dense:
            return m.forward_head(x)
        cls = m.head(m.head_drop(x[:, 0]))
        tokens = m.aux_head(m.head_drop(x[:, 1:]))
        tokens = swap_box(tokens.reshape(x.shape[0], *grid, -1), box).reshape(x.shape[0], grid[0] * grid[1], -1)
        return cls, tokens, box
