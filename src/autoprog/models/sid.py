"""The Unique Stage Identifier (SID, Sec. 4.1.2): one learnable embedding per stage, added to the condition so
that one set of weights can tell the stages of progressive fine-tuning apart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import ConfigError


class StageIdentifier(nn.Module):
    """One learnable embedding per stage (Sec. 4.1.2), as the official AutoProg-Zero code's ``StageEmbedder``.

    ``init``: ``"normal"`` draws the rows from N(0, 0.02) (the official code); ``"zero"`` starts them at zero,
    so adding the SID leaves the pre-trained function unchanged at the first step. ``dropout`` > 0 adds a last
    learnable *null-stage* row (``null_row``, default: whether ``dropout`` > 0) and, in training, replaces each
    sample's stage row by it with that probability (the official code uses the class-dropout probability).
    The draw is the caller's: :meth:`dropout_mask` from a seeded generator, applied within :meth:`dropping`,
    so a run is reproducible and resumes bit-identically; outside it (sampling, proxies, a plain forward) every
    sample gets its stage's own row.
    """

    def __init__(self, num_stages: int, dim: int, init: str = "normal", dropout: float = 0.0,
                 null_row: bool | None = None):
        super().__init__()
        if num_stages < 1:
            raise ConfigError(f"a stage identifier needs at least one stage, got {num_stages}")
        if init not in ("normal", "zero"):
            raise ConfigError(f"a stage identifier starts 'normal' or 'zero', got {init!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"stage-identifier dropout must be in [0, 1), got {dropout}")
        null_row = dropout > 0 if null_row is None else null_row
        if dropout > 0 and not null_row:
            raise ConfigError("stage-identifier dropout needs the null-stage row")
        self.stages = num_stages
        self.dropout = dropout
        self.embedding = nn.Embedding(num_stages + int(null_row), dim)
        if init == "zero":
            nn.init.zeros_(self.embedding.weight)
        else:
            nn.init.normal_(self.embedding.weight, std=0.02)
        self.stage = num_stages - 1  # sampling uses the last stage's SID unless told otherwise
        self._drop: torch.Tensor | None = None

    @property
    def num_stages(self) -> int:
        return self.stages

    @property
    def null_row(self) -> bool:
        return self.embedding.num_embeddings > self.stages

    def set_stage(self, k: int) -> None:
        if not 0 <= k < self.num_stages:
            raise ConfigError(f"stage {k + 1} does not exist: the model has {self.num_stages} stage identifiers")
        self.stage = k

    def dropout_mask(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Which of ``n`` samples get the null stage this step (None without dropout), drawn from ``generator``."""
        if self.dropout <= 0:
            return None
        return torch.rand(n, generator=generator) < self.dropout

    @contextmanager
    def dropping(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Forward passes in training mode inside give the samples of ``mask`` the null-stage row."""
        self._drop = mask
        try:
            yield
        finally:
            self._drop = None

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        row = self.embedding.weight[self.stage].to(like.dtype)
        if self._drop is None or not self.training or not self.null_row:
            return row.expand_as(like)
        drop = self._drop.to(like.device).view(-1, *([1] * (like.ndim - 1)))
        null = self.embedding.weight[self.stages].to(like.dtype)
        return torch.where(drop, null, row).expand_as(like)
