"""Growth operators ζ (Appendix A) and the momentum network MoGrow copies from (Eq. 3-4).

A growth operator maps the weights of the smaller sub-network ψ_s onto the blocks of the larger ψ_ℓ.
Following the paper, layer index *i* is counted from the classifier side: i = 0 is the last block.

* ``randinit``:      ω_ℓ^i = ω_s^i for i < l_s, new blocks randomly initialised        (Eq. 20)
* ``stacking``:      ω_ℓ^i = ω_s^(i mod l_s)                                          (Eq. 21)
* ``interpolation``: each new block is a copy of its nearest neighbour, inserted in between   (Eq. 22)
                     the original blocks starting from the final layers: by default (``copies="last"``)
                     each of the last l_ℓ mod l_s blocks gets one more copy than the others, as the
                     official code (``new_idx``) and the elastic supernet's layout; ``copies="spread"`` reads
                     Eq. 22 as ω_ℓ^i = ω_s^⌊i·l_s/l_ℓ⌋ (i from the classifier side), which spreads the copies
                     evenly (autoprog's rule before 2026-12-08; the same when one block is added, for multiples, and l_s ≤ 3)
* ``identity``:      interpolation, with every inserted copy gated by a zero-initialised learnable
                     scalar (ReZero), so the network function is unchanged at the moment of growth
* ``mogrow``:        interpolation from the momentum (EMA) network: ω_k = ζ_Interp(ω̃_{k-1})   (Eq. 4)

Operators change weights only; the trainer remaps optimizer state with the returned block map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.base import ElasticModel
from ..errors import ConfigError
from ..space import SubNet

MAPPINGS = ("randinit", "stacking", "interpolation")
COPIES = ("last", "spread")  # which blocks an interpolating growth copies (see the module docstring)


def _check_copies(copies: str) -> None:
    if copies not in COPIES:
        raise ConfigError(f"unknown copy order {copies!r}; choose from {', '.join(COPIES)}")


def depth_mapping(kind: str, n_src: int, n_dst: int, copies: str = "last") -> list[int | None]:
    """Source block (forward position in ψ_s) for each forward position of ψ_ℓ; ``None`` = random init.
    ``copies`` (interpolation only): ``last`` gives the last ``n_dst mod n_src`` blocks one more copy each (the
    official code's), ``spread`` spreads the copies evenly (Eq. 22 taken literally)."""
    if kind not in MAPPINGS:
        raise ConfigError(f"unknown depth mapping {kind!r}; choose from {', '.join(MAPPINGS)}")
    _check_copies(copies)
    if n_dst < n_src:
        raise ConfigError(f"cannot grow from depth {n_src} to a smaller depth {n_dst}")
    if kind == "interpolation" and copies == "last":
        q, r = divmod(n_dst, n_src)
        return [b for b in range(n_src) for _ in range(q + (b >= n_src - r))]
    out: list[int | None] = []
    for j in range(n_dst):
        i = n_dst - 1 - j  # index from the classifier side
        if kind == "randinit":
            src_i = i if i < n_src else None
        elif kind == "stacking":
            src_i = i % n_src
        else:
            src_i = (i * n_src) // n_dst
        out.append(None if src_i is None else n_src - 1 - src_i)
    return out


def inserted_positions(mapping: list[int | None]) -> list[int]:
    """Positions of ψ_ℓ that are new copies (for a monotone interpolation map: repeats of the previous)."""
    return [j for j in range(1, len(mapping)) if mapping[j] is not None and mapping[j] == mapping[j - 1]]


@dataclass
class GrowthResult:
    """What a growth did. ``block_map`` maps destination block → source block (``None``: re-initialised)."""

    block_map: dict[int, int | None]
    gated: list[int] = field(default_factory=list)
    from_momentum: bool = False

    def changed(self) -> bool:
        return any(src != dst for dst, src in self.block_map.items()) or bool(self.gated)

    def record(self, operator: str) -> dict:
        """What a stage log keeps of this growth."""
        return {"operator": operator, "block_map": {str(d): s for d, s in self.block_map.items()},
                "gated": self.gated}


class GrowthOperator:
    """Initialise a larger sub-network from a smaller one. Subclasses pick the depth mapping."""

    name = "base"
    mapping = "interpolation"
    from_momentum = False
    rezero = False

    def __init__(self, copies: str = "last"):
        _check_copies(copies)
        self.copies = copies  # which blocks an interpolating growth copies (:func:`depth_mapping`)

    def grow(self, model: ElasticModel, ema: ElasticModel | None, src: SubNet, dst: SubNet) -> GrowthResult:
        """Write ψ_ℓ=``dst``'s block weights into ``model`` (and ``ema`` if given) from ψ_s=``src``."""
        if dst.depth < src.depth or dst.resolution < src.resolution:
            raise ConfigError(f"growth must not shrink the network: {src} -> {dst}")
        segments = model.growth_space(1, 1.0).block_segments
        block_map: dict[int, int | None] = {}
        inserted: list[int] = []
        for s, (src_phys, dst_phys) in enumerate(zip(segments.partition(model.blocks_of(src)),
                                                     segments.partition(model.blocks_of(dst)))):
            if len(dst_phys) < len(src_phys):
                raise ConfigError(f"growth from {src} to {dst} would remove blocks of block segment {s} "
                                  f"({len(src_phys)} -> {len(dst_phys)})")
            mapping = depth_mapping(self.mapping, len(src_phys), len(dst_phys), self.copies)
            block_map.update({dst_phys[j]: (None if m is None else src_phys[m]) for j, m in enumerate(mapping)})
            inserted += [dst_phys[j] for j in inserted_positions(mapping)]
        return self.apply(model, ema, block_map, inserted=inserted)

    def grow_into(self, model: ElasticModel, ema: ElasticModel | None, dst: SubNet,
                  block_map: dict[int, int | None] | None = None, inserted: list[int] | None = None) -> GrowthResult:
        """Grow from ``model``'s current sub-network to ``dst``: by this operator's depth mapping, or by an
        explicit ``block_map`` (destination block → source block) with its ``inserted`` copies."""
        if block_map is None:
            return self.grow(model, ema, model.subnet, dst)
        return self.apply(model, ema, block_map, inserted or [])

    def apply(self, model: ElasticModel, ema: ElasticModel | None, block_map: dict[int, int | None],
              inserted: list[int]) -> GrowthResult:
        """Grow by an explicit map (destination block → source block); ``inserted`` are the new copies.

        Used directly by the elastic supernet, whose inserted blocks are not a depth-mapping's.
        """
        if self.from_momentum and ema is None:
            raise ConfigError(f"growth operator {self.name!r} needs the momentum (EMA) network")
        if self.from_momentum:
            model.load_state_dict(ema.state_dict())
        copy_blocks(model, ema, block_map)
        gated = list(inserted) if self.rezero else []
        for net in (model, ema) if ema is not None else (model,):
            for d in gated:
                net.set_gate(d, 0.0)
        return GrowthResult(block_map, gated, self.from_momentum)


def copy_blocks(model: ElasticModel, ema: ElasticModel | None, block_map: dict[int, int | None]) -> None:
    """Copy block weights by ``block_map`` in the model and its momentum copy; ``None`` re-initialises
    (with the same fresh weights in both)."""
    _copy_blocks(model, block_map)
    if ema is not None:
        _copy_blocks(ema, block_map)
        for d, s in block_map.items():
            if s is None:
                ema.blocks[d].load_state_dict(model.blocks[d].state_dict())


def _copy_blocks(model: ElasticModel, block_map: dict[int, int | None]) -> None:
    """Copy block weights by ``block_map`` (snapshotting sources first, so maps may overlap)."""
    sources = {s for s in block_map.values() if s is not None}
    snap = {s: ({k: v.detach().clone() for k, v in model.blocks[s].state_dict().items()}, model.gated(s))
            for s in sources}
    with torch.no_grad():
        for d, s in block_map.items():
            if s is None:
                model.set_gate(d, None)
                model.reset_block(d)
                continue
            if s == d:
                continue
            state, gated = snap[s]
            model.set_gate(d, 0.0 if gated else None)  # match the source's structure before loading
            model.blocks[d].load_state_dict(state)


class RandInit(GrowthOperator):
    name, mapping = "randinit", "randinit"


class Stacking(GrowthOperator):
    name, mapping = "stacking", "stacking"


class Interpolation(GrowthOperator):
    name, mapping = "interpolation", "interpolation"


class Identity(GrowthOperator):
    name, mapping, rezero = "identity", "interpolation", True


class MoGrow(GrowthOperator):
    name, mapping, from_momentum = "mogrow", "interpolation", True


class KeepWeights(GrowthOperator):
    """Fine-tuning a pre-trained model: a stage start changes which blocks learn, never a weight (not a user's
    ``--growth``)."""

    name = "none"

    def grow_into(self, model: ElasticModel, ema: ElasticModel | None, dst: SubNet,
                  block_map: dict[int, int | None] | None = None, inserted: list[int] | None = None) -> GrowthResult:
        if block_map:
            raise ConfigError("a fine-tuning run does not move blocks")
        return GrowthResult({})


GROWTH_OPERATORS: dict[str, type[GrowthOperator]] = {
    cls.name: cls for cls in (RandInit, Stacking, Interpolation, Identity, MoGrow)
}


def get_growth_operator(name: str, copies: str = "last") -> GrowthOperator:
    """The growth operator ``name``; ``copies``: which blocks its interpolation copies (:func:`depth_mapping`)."""
    try:
        cls = GROWTH_OPERATORS[name]
    except KeyError:
        raise ConfigError(f"unknown growth operator {name!r}; choose from {', '.join(GROWTH_OPERATORS)}") from None
    return cls(copies)


PAPER_EMA_DECAY = 0.998
PAPER_STEPS_PER_EPOCH = 1251  # ImageNet-1k (1,281,167 images) at the paper's batch size of 1024


def auto_ema_decay(steps_per_epoch: int, decay: float = PAPER_EMA_DECAY) -> float:
    """A per-step momentum (the paper's m = 0.998) rescaled so the EMA spans the same fraction of an epoch.

    At ImageNet scale m = 0.998 averages over ~500 steps, 0.4 epochs; on a 10k-image set with 78 steps per
    epoch the same m would average over 6 epochs, and MoGrow would copy a stale network.
    """
    m = decay ** (PAPER_STEPS_PER_EPOCH / max(1, steps_per_epoch))
    return min(0.9999, max(0.9, m))


class MomentumNetwork:
    """The momentum network ω̃ ← m·ω̃ + (1-m)·ω, updated after every optimizer step (Eq. 3).

    A thin wrapper over timm's ``ModelEmaV3`` that also serves as the evaluation (EMA) model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.998):
        from timm.utils import ModelEmaV3

        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {decay}")
        self._ema = ModelEmaV3(model, decay=decay)
        for p in self._ema.module.parameters():
            p.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self._ema.module

    def update(self, model: nn.Module) -> None:
        self._ema.update(model)


class GrowthCalls:
    """``grow_to`` and ``relayout`` of :class:`~autoprog.controllers.GrowthServices`, for any owner of an elastic
    model (``growable``), its momentum copy (``ema``), a growth operator (``growth``), ``use_subnet`` and
    ``_after_block_copy(block_map)`` (the optimizer's side). ``_growth_rng()`` is the context fresh weights are
    drawn in."""

    def _growth_rng(self):
        import contextlib

        return contextlib.nullcontext()

    def grow_to(self, dst: SubNet, block_map: dict[int, int | None] | None = None,
                inserted: list[int] | None = None) -> dict | None:
        """Grow from the current sub-network to ``dst`` with the growth operator (or by ``block_map``,
        destination block → source block: the elastic supernet's layout), then apply ``dst``; optimizer moments
        follow the weights. Returns the record a stage log keeps (None when nothing grew)."""
        if block_map is None and dst == self.growable.subnet:
            self.use_subnet(dst)
            return None
        with self._growth_rng():
            result = self.growth.grow_into(self.growable, self.ema.module, dst, block_map, inserted)
        self._after_block_copy(result.block_map)
        self.use_subnet(dst)
        return result.record(self.growth.name)

    def _set_gates(self, gated) -> None:
        """ReZero gates on exactly the blocks ``gated``, in the model and its momentum copy."""
        for net in (self.growable, self.ema.module):
            net.set_gated_blocks(gated)

    def relayout(self, block_map: dict[int, int], dst: SubNet) -> None:
        """Move blocks (weights, momentum weights, optimizer moments) by ``block_map`` and apply ``dst``."""
        copy_blocks(self.growable, self.ema.module, block_map)
        self._after_block_copy(block_map)
        self.use_subnet(dst)
