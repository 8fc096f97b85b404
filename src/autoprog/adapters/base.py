"""What every elastic adapter shares: run a model as any sub-network ψ = (resolution, active blocks).

An adapter *applies* a :class:`~autoprog.space.SubNet`; it never decides which one. Inputs are resized to
ψ's resolution inside ``forward``, only the active blocks run, and inactive blocks have
``requires_grad=False`` so they get neither gradients nor optimizer state.

Fine-tuning a pre-trained classifier (``unfreezing``) reads ψ's depth as the number of *learnable* blocks instead:
every block runs, and only the last ψ.depth blocks and the head (the family's ``head_names``) learn; ψ = the full
model trains everything. Nothing below the first learnable block requires grad, so autograd keeps no activations
there and the backward pass stops at that block. Growth operators copy whole
blocks (``blocks[i]``) and may gate a new block's residual branches with ReZero (``set_gate``).

A new model family is one subclass in one file: say which models it ``fits``, how timm builds one from the
CLI's architecture options (``timm_kwargs``), where its growable ``blocks`` are, its geometry, the
residual branches a ReZero gate wraps (``gate_slots``) and its ``forward``. :func:`elastic` picks the
adapter for a model and refuses, naming the supported families, a model none fits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compute import CheckpointedBlocks
from ..errors import ConfigError
from ..space import GrowthSpace, Segments, SubNet, blocks_of

FAMILIES: list[type[ElasticModel]] = []  # every adapter class, in the order :func:`elastic` tries them


class ReZeroGate(nn.Module):
    """Scales a residual branch by a learnable scalar (ReZero); zero makes the block an identity map."""

    def __init__(self, inner: nn.Module, value: float = 0.0):
        super().__init__()
        self.inner = inner
        self.gate = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate * self.inner(x)


class ElasticModel(CheckpointedBlocks, nn.Module):
    """Base of the elastic adapters (see the module docstring). Subclasses set ``family`` and ``gate_slots``,
    and implement ``fits``, ``timm_kwargs``, ``_geometry``, ``blocks``, ``init_block`` and ``forward``."""

    family = "model"
    gate_slots: tuple[str, ...] = ()  # block attributes (residual branches) a ReZero gate wraps
    head_names: tuple[str, ...] = ()  # the model's modules (or parameters) after the blocks: they learn in every
    # unfreezing stage
    unfreezing = False  # fine-tuning: ψ's depth counts learnable blocks, every block runs (see the module docstring)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        FAMILIES.append(cls)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.patch_size, self.full_resolution, self.full_depth = self._geometry()
        self.subnet = self.full_subnet
        self.apply_subnet(self.subnet)

    # ------------------------------------------------------------------------- what a family supplies
    @classmethod
    def fits(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def timm_kwargs(cls, overrides) -> dict:
        """``timm.create_model`` keyword arguments for this family from a :class:`ModelOverrides`."""
        raise NotImplementedError

    def _geometry(self) -> tuple[int, int, int]:
        """(resolution step, full resolution, number of growable blocks)."""
        raise NotImplementedError

    @property
    def blocks(self):
        """The growable blocks, indexable in forward order."""
        raise NotImplementedError

    def init_block(self, block: nn.Module) -> None:
        raise NotImplementedError

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at each place of the final token grid, ``[B, rows, cols, classes]`` (a teacher's score maps
        for token labeling); families without a per-token head refuse."""
        raise ConfigError(f"{self.family} gives no per-token class logits: a teacher for token labeling must be a "
                          "ViT/DeiT or a VOLO")

    # ------------------------------------------------------------------------------- sub-networks
    @property
    def full_subnet(self) -> SubNet:
        return SubNet(self.full_resolution, self.full_depth)

    @property
    def segments(self) -> Segments | None:
        """The growable blocks' segments of one kind each (VOLO: outlookers, transformers), or None for one kind.
        Unfreezing counts learnable blocks from the output side across segments, so it has none."""
        return None

    def growth_space(self, num_stages: int = 4, start_ratio: float = 0.5) -> GrowthSpace:
        return GrowthSpace(self.full_resolution, self.patch_size, self.full_depth, num_stages, start_ratio,
                           None if self.unfreezing else self.segments)

    def blocks_of(self, subnet: SubNet) -> tuple[int, ...]:
        """``subnet``'s physical blocks in forward order (its own list, or each segment's first blocks)."""
        return blocks_of(subnet, None if self.unfreezing else self.segments)  # no GrowthSpace built per forward

    def set_unfreezing(self, on: bool = True) -> None:
        """Read sub-networks as learnable blocks (fine-tuning a pre-trained model) instead of running blocks."""
        if on and not self.head_names:
            raise ConfigError(f"{self.family} names no head modules: it cannot be unfrozen progressively")
        self.unfreezing = bool(on)
        self.apply_subnet(self.subnet)

    @property
    def running_blocks(self):
        """The blocks ``forward`` runs, in order: ψ's active blocks, or every block when unfreezing."""
        return range(self.full_depth) if self.unfreezing else self.blocks_of(self.subnet)

    def learnable_blocks(self, subnet: SubNet) -> tuple[int, ...]:
        """The blocks that learn under ``subnet``: its active blocks, or when unfreezing the last ``subnet.depth``."""
        if not self.unfreezing:
            return self.blocks_of(subnet)
        return tuple(range(self.full_depth - subnet.depth, self.full_depth))

    def apply_subnet(self, subnet: SubNet) -> None:
        """Run as ``subnet`` from now on; only its blocks (and the rest of the model) require grad. When
        unfreezing, only its learnable blocks and the head do, unless ``subnet`` is the whole depth."""
        self.growth_space(1, 1.0).validate(subnet)
        self.subnet = subnet
        if self.unfreezing and subnet.depth < self.full_depth:
            self.requires_grad_(False)
            for i in self.learnable_blocks(subnet):
                self.blocks[i].requires_grad_(True)
            for name in self.head_names:
                head = getattr(self.model, name, None)
                if isinstance(head, (nn.Module, nn.Parameter)):
                    head.requires_grad_(True)
            return
        active = set(self.learnable_blocks(subnet))
        for p in self.parameters():
            p.requires_grad_(True)
        for i, blk in enumerate(self.blocks):
            if i not in active:
                for p in blk.parameters():
                    p.requires_grad_(False)

    # ------------------------------------------------------------------------------ block surgery
    def reset_block(self, index: int) -> None:
        """Randomly re-initialise block ``index`` as the family initialises a fresh model."""
        self.init_block(self.blocks[index])

    def gated(self, index: int) -> bool:
        return isinstance(getattr(self.blocks[index], self.gate_slots[0]), ReZeroGate)

    def set_gate(self, index: int, value: float | None) -> None:
        """Install (value given) or remove (None) ReZero gates on block ``index``'s residual branches."""
        blk = self.blocks[index]
        for name in self.gate_slots:
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

    def set_gated_blocks(self, gated) -> None:
        """ReZero gates on exactly the blocks ``gated`` (a saved state's structure, before loading its weights)."""
        for i in range(self.full_depth):
            self.set_gate(i, 0.0 if i in gated else None)


def segment_sizes(model: ElasticModel) -> list[int] | None:
    """What a saved state records of ``model``'s block segments (None: one kind of block)."""
    return list(model.segments.sizes) if model.segments is not None else None


def check_segments(model: ElasticModel, saved, what: str) -> None:
    """Refuse a saved state whose sub-networks count ``model``'s blocks another way: a VOLO state from before
    2026-12-06, when its depth counted the transformer blocks only."""
    if saved != segment_sizes(model):
        raise ConfigError(f"{what} counts {model.family} blocks as {saved or 'one segment'}, this autoprog as "
                          f"{segment_sizes(model)} (outlookers, transformers): it was written before VOLO's depth "
                          "counted its outlookers and cannot be resumed; start it afresh")


def resize_input(x: torch.Tensor, r: int) -> torch.Tensor:
    """``x`` at ``r``×``r`` (antialiased when shrinking)."""
    import torch.nn.functional as F

    if x.shape[-2:] == (r, r):
        return x
    return F.interpolate(x, size=(r, r), mode="bilinear", antialias=x.shape[-1] > r, align_corners=False)


def elastic(model: nn.Module) -> ElasticModel:
    """The elastic adapter for ``model``; a one-line :class:`ConfigError` naming the supported families when
    none fits."""
    if isinstance(model, ElasticModel):
        return model
    for cls in FAMILIES:
        if cls.fits(model):
            return cls(model)
    raise ConfigError(f"{type(model).__name__} is not a model autoprog can grow; supported families: "
                      f"{', '.join(c.family for c in FAMILIES)}")


def family_of(model: nn.Module) -> type[ElasticModel] | None:
    return next((cls for cls in FAMILIES if cls.fits(model)), None)
