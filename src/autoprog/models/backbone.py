"""What every diffusion backbone offers the trainer and the fine-tuning methods (:class:`DiffusionBackbone`).

The Unique Stage Identifier they share is :class:`autoprog.models.sid.StageIdentifier` (Sec. 4.1.2).

The class-conditional DiTs are in :mod:`autoprog.models.dit`, the text-to-image UNet in
:mod:`autoprog.models.text_unet`.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from ..compute import CheckpointedBlocks
from ..errors import ConfigError
from .sid import StageIdentifier

# what an exported model's settings file holds beside its architecture (autoprog's config.json, a pipeline's
# autoprog.json), with the types autoprog.formats.check_fields checks
SAVED_META_FIELDS = {"sid_stages": int, "method": (str, None), "steps": int, "classes": ([int], None),
                     "captions": ([str], None), "class_names": ([str], None), "vae": (str, None),
                     "image_channels": (int, None), "extras": (dict, None)}


def _forward_without_autograd(block: nn.Module, *args, **kwargs):
    """``block``'s own class forward under ``torch.no_grad`` (installed as a bound method, so that a deep copy of
    the model, a momentum network, runs its own weights)."""
    with torch.no_grad():
        return type(block).forward(block, *args, **kwargs)


class DiffusionBackbone(CheckpointedBlocks, nn.Module):
    """Interface shared by the built-in and the diffusers DiT (see the module docstring)."""

    kind: str
    config: dict
    sid: StageIdentifier | None
    learned_sigma = False  # whether the model also predicts a variance (DiT's learned sigma)
    variance_output = False  # set while the hybrid loss runs: forward returns ε and the variance values (2C channels)
    train_variance = False  # whether the variance head learns (the hybrid loss); else its gradient is zero

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def block_prefix(self) -> str:
        """Parameter-name prefix of the blocks, e.g. ``blocks`` (names are ``{prefix}.{i}.…``)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def in_chans(self) -> int:
        return self.config["in_chans"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def patch_size(self) -> int:
        return self.config["patch_size"]

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """The residual branches of block ``i`` (``attn``, ``mlp``) whose outputs DiffFit scales."""
        raise NotImplementedError

    lora_targets: tuple[str, ...] = ()

    def class_embedding_modules(self) -> list[nn.Embedding]:
        raise NotImplementedError

    def condition_parameters(self) -> list[nn.Parameter]:
        params = [m.weight for m in self.class_embedding_modules()]
        if self.sid is not None:
            params.append(self.sid.embedding.weight)
        return params

    def block_index(self, param_name: str) -> int | None:
        """The block a parameter belongs to, matched on whole name components (``blocks.1`` ≠ ``blocks.10``)."""
        prefix = self.block_prefix.split(".")
        parts = param_name.split(".")
        for start in range(len(parts) - len(prefix)):
            if parts[start:start + len(prefix)] == prefix and parts[start + len(prefix)].isdigit():
                return int(parts[start + len(prefix)])
        return None

    def null_condition(self, y: torch.Tensor) -> torch.Tensor:
        """The condition of classifier-free guidance's unconditional branch, shaped like ``y``."""
        return torch.full_like(y, self.null_class)

    def expect_conditions(self, conditions: torch.Tensor | None) -> None:
        """Declare the conditions every training step draws from (a model with prompts may then skip work; here
        nothing)."""

    def unexpected_conditions(self) -> torch.Tensor | None:
        """A device count of training conditions outside the declared ones (None: not counted)."""
        return None

    def freeze_fixed(self) -> None:
        """Freeze what no fine-tuning method trains (nothing here; a text-to-image model's text encoder)."""

    @property
    def no_grad_prefix(self) -> int:
        """How many leading blocks run without autograd (:meth:`set_no_grad_prefix`)."""
        return getattr(self, "_no_grad_prefix", 0)

    def set_no_grad_prefix(self, n: int) -> None:
        """Run blocks ``0 .. n-1`` without autograd: none of their activations are kept and no gradient flows into
        or through them (what they compute is unchanged). For a frozen prefix below the first learnable block;
        ``0`` records every block again."""
        if not 0 <= n <= self.depth:
            raise ConfigError(f"a no-grad prefix of {n} blocks in a model of {self.depth}")
        for i, block in enumerate(self.blocks):
            if i < n and "forward" not in vars(block):
                block.forward = types.MethodType(_forward_without_autograd, block)
            elif i >= n and "forward" in vars(block):
                del block.forward  # the class's forward again
        self._no_grad_prefix = n

    def add_stage_identifier(self, num_stages: int, init: str = "normal", dropout: float = 0.0,
                             null_row: bool | None = None) -> StageIdentifier:
        """A :class:`StageIdentifier` of ``num_stages`` rows (and a null-stage row with ``dropout``)."""
        ref = self.class_embedding_modules()[0].weight
        self.sid = StageIdentifier(num_stages, self.hidden_size, init, dropout, null_row).to(ref.device)
        return self.sid

    def set_stage(self, k: int) -> None:
        if self.sid is not None:
            self.sid.set_stage(k)

    def resize_classes(self, num_classes: int, rows: list[int | None] | None = None) -> None:
        """Give the class table ``num_classes`` rows (plus the null class): row ``i`` the present table's row
        ``rows[i]`` (None: a new random one); by default the rows that exist kept where they are."""
        if rows is None:
            if num_classes == self.num_classes:
                return
            rows = [i if i < self.num_classes else None for i in range(num_classes)]
        if len(rows) != num_classes or any(r is not None and not 0 <= r < self.num_classes for r in rows):
            raise ValueError(f"rows {rows} for {num_classes} classes of a table of {self.num_classes}")
        for emb in self.class_embedding_modules():
            old = emb.weight.data
            new = torch.randn(num_classes + 1, old.shape[1], device=old.device, dtype=old.dtype) * 0.02
            for i, r in enumerate(rows):
                if r is not None:
                    new[i] = old[r]
            new[num_classes] = old[self.num_classes]  # the null class keeps its embedding
            emb.weight = nn.Parameter(new, requires_grad=emb.weight.requires_grad)
            emb.num_embeddings = num_classes + 1
        self.config["num_classes"] = num_classes
        self._on_resize_classes(num_classes)

    def _on_resize_classes(self, num_classes: int) -> None:
        pass

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
