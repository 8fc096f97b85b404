"""Sub-networks ψ and the growth space Ω they are drawn from.

A :class:`SubNet` says *what* runs: the input resolution (which fixes the number of patches) and
which physical blocks of the full model are active, in forward order. Adapters apply it; schedules
choose it; neither needs to know how the other works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError
from .formats import check_fields

MAX_CANDIDATES = 9  # |Λ_k| at most (Appendix B)


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves upward (Python's ``round`` rounds halves to even)."""
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class SubNet:
    """A sub-network ψ: input resolution plus the active blocks.

    ``blocks`` lists physical block indices of the full model in forward order. When omitted the
    first ``depth`` blocks are active, which is the layout manual schedules keep after each growth.
    """

    resolution: int
    depth: int
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.resolution < 1:
            raise ConfigError(f"sub-network resolution must be positive, got {self.resolution}")
        if self.depth < 1:
            raise ConfigError(f"sub-network depth must be at least 1, got {self.depth}")
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
            if len(self.blocks) != self.depth:
                raise ConfigError(f"sub-network lists {len(self.blocks)} blocks but depth is {self.depth}")
            if len(set(self.blocks)) != len(self.blocks):
                raise ConfigError(f"sub-network lists a block twice: {self.blocks}")

    @property
    def active_blocks(self) -> tuple[int, ...]:
        return self.blocks if self.blocks is not None else tuple(range(self.depth))

    def num_patches(self, patch_size: int) -> int:
        return (self.resolution // patch_size) ** 2

    def to_dict(self) -> dict:
        d = {"resolution": self.resolution, "depth": self.depth}
        if self.blocks is not None:
            d["blocks"] = list(self.blocks)
        return d

    FIELDS = {"resolution": int, "depth": int, "blocks": ([int], None)}  # the saved form's types

    @classmethod
    def from_dict(cls, d: dict) -> SubNet:
        check_fields(d, cls.FIELDS, "sub-network", required=("resolution", "depth"))
        try:
            blocks = d.get("blocks")
            return cls(int(d["resolution"]), int(d["depth"]), tuple(blocks) if blocks is not None else None)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed sub-network entry {d!r}: needs integer 'resolution' and 'depth'") from e

    def __str__(self) -> str:
        return f"{self.resolution}px/{self.depth}blk"


@dataclass(frozen=True)
class Segments:
    """The growable blocks of a model in consecutive segments of one block kind each (VOLO: outlookers on the fine
    grid, then transformers on the coarse one), and how a sub-network's depth is shared among them.

    A block never moves or is copied across segments: growth maps depth inside each segment, and a sub-network of
    depth ``d`` without explicit blocks runs the first ``split(d)[s]`` blocks of each segment ``s``. ``first_share``
    is the official code's rule (``models/volo.py: set_sample_config``): the first segment gets
    ``make_divisible(first_share · d, 2)`` blocks (at most its size, and never so many that another segment would be
    empty or overfull), the second the rest. Without it the model is one segment and the split is ``(d,)``.
    """

    sizes: tuple[int, ...]
    first_share: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(n) for n in self.sizes))
        if not self.sizes or min(self.sizes) < 1:
            raise ConfigError(f"every block segment needs at least one block, got {self.sizes}")
        if self.first_share is not None and len(self.sizes) != 2:
            raise ConfigError("a first-segment share splits exactly two segments")
        if self.first_share is None and len(self.sizes) != 1:
            raise ConfigError(f"{len(self.sizes)} block segments need a rule that splits a depth among them")

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def min_depth(self) -> int:
        return len(self.sizes)

    def starts(self) -> list[int]:
        """Physical index of each segment's first block."""
        out, acc = [], 0
        for n in self.sizes:
            out.append(acc)
            acc += n
        return out

    def split(self, depth: int) -> tuple[int, ...]:
        """Blocks of each segment in a sub-network of ``depth`` blocks."""
        if not self.min_depth <= depth <= self.total:
            raise ConfigError(f"depth {depth} does not fit block segments of sizes {list(self.sizes)} (from "
                              f"{self.min_depth} to {self.total} blocks)")
        if self.first_share is None:
            return (depth,)
        from timm.layers import (
            make_divisible,  # the official code's rounding (prog/progressive.py), the same function
        )

        first = min(make_divisible(self.first_share * depth, 2), self.sizes[0], depth - 1)
        first = max(first, depth - self.sizes[1])
        return first, depth - first

    def segment_of(self, block: int) -> int:
        for s, (a, n) in enumerate(zip(self.starts(), self.sizes)):
            if a <= block < a + n:
                return s
        raise ConfigError(f"block {block} is outside the model's {self.total} blocks")

    def partition(self, blocks) -> list[list[int]]:
        """``blocks`` (forward order) by segment; refuses a list that runs a segment after a later one."""
        out: list[list[int]] = [[] for _ in self.sizes]
        last = 0
        for b in blocks:
            s = self.segment_of(b)
            if s < last:
                raise ConfigError(f"blocks {list(blocks)} run block {b} after a later segment's block")
            last = s
            out[s].append(b)
        return out

    def default_blocks(self, depth: int) -> tuple[int, ...]:
        """The first ``split(depth)[s]`` blocks of each segment, in forward order."""
        return tuple(a + j for a, k in zip(self.starts(), self.split(depth)) for j in range(k))

    def compaction(self, blocks) -> dict[int, int]:
        """Destination → source that moves ``blocks`` to each segment's first positions (weight recycling)."""
        return {a + j: b for a, part in zip(self.starts(), self.partition(blocks)) for j, b in enumerate(part)}

    def check_nested(self, depths) -> None:
        """Refuse depths whose splits are not nested: growing from one to the next would remove a segment's blocks."""
        ds = sorted(set(depths))
        for a, b in zip(ds, ds[1:]):
            sa, sb = self.split(a), self.split(b)
            if any(y < x for x, y in zip(sa, sb)):
                raise ConfigError(f"depths {a} and {b} split into {'+'.join(map(str, sa))} and "
                                  f"{'+'.join(map(str, sb))} blocks per segment: growing from one to the other would "
                                  "remove blocks; use fewer --num-stages or another --start-ratio")


def blocks_of(subnet: SubNet, segments: Segments | None) -> tuple[int, ...]:
    """``subnet``'s physical blocks in forward order: its own list, or the first ``depth`` blocks of the model (with
    ``segments``: each segment's first blocks)."""
    if subnet.blocks is not None or segments is None:
        return subnet.active_blocks
    return segments.default_blocks(subnet.depth)


@dataclass(frozen=True)
class GrowthSpace:
    """The growth space Ω of a ViT: number of patches × depth, scaled by equispaced ratios.

    Ratios run linearly from ``start_ratio`` to 1 over ``num_stages`` values (0.5 → {0.5, 0.67, 0.83, 1}).
    The number of patches per side ``n`` and the depth ``l`` are each scaled and rounded to valid values:
    resolution a multiple of the patch size, depth at least 1.
    """

    full_resolution: int
    patch_size: int
    full_depth: int
    num_stages: int = 4
    start_ratio: float = 0.5
    segments: Segments | None = None  # several kinds of growable block (VOLO); None: one segment of full_depth

    def __post_init__(self):
        if self.patch_size < 1 or self.full_resolution % self.patch_size:
            raise ConfigError(
                f"image size {self.full_resolution} is not divisible by patch size {self.patch_size}"
            )
        if self.full_depth < 1:
            raise ConfigError(f"model depth must be at least 1, got {self.full_depth}")
        if self.num_stages < 1:
            raise ConfigError(f"num_stages must be at least 1, got {self.num_stages}")
        if not 0.0 < self.start_ratio <= 1.0:
            raise ConfigError(f"start_ratio must be in (0, 1], got {self.start_ratio}")
        if self.segments is not None:
            if self.segments.total != self.full_depth:
                raise ConfigError(f"block segments {list(self.segments.sizes)} do not add up to the model's "
                                  f"{self.full_depth} blocks")
            self.segments.check_nested(self.depths())

    @property
    def full_patches_per_side(self) -> int:
        return self.full_resolution // self.patch_size

    def ratios(self) -> list[float]:
        if self.num_stages == 1:
            return [1.0]
        step = (1.0 - self.start_ratio) / (self.num_stages - 1)
        return [self.start_ratio + i * step for i in range(self.num_stages)]

    def resolution_for(self, ratio: float) -> int:
        n = max(1, round_half_up(ratio * self.full_patches_per_side))
        return min(n, self.full_patches_per_side) * self.patch_size

    @property
    def min_depth(self) -> int:
        return self.segments.min_depth if self.segments is not None else 1

    def depth_for(self, ratio: float) -> int:
        return min(self.full_depth, max(self.min_depth, round_half_up(ratio * self.full_depth)))

    @property
    def block_segments(self) -> Segments:
        """The block segments, or the whole depth as one segment."""
        return self.segments if self.segments is not None else Segments((self.full_depth,))

    def blocks_of(self, subnet: SubNet) -> tuple[int, ...]:
        """``subnet``'s physical blocks in forward order: its own list, or each segment's first blocks."""
        return blocks_of(subnet, self.segments)

    def resolutions(self) -> list[int]:
        return sorted({self.resolution_for(r) for r in self.ratios()})

    def depths(self) -> list[int]:
        return sorted({self.depth_for(r) for r in self.ratios()})

    def distinct_subnets(self) -> int:
        """How many different sub-networks the stage ratios give (fewer than ``num_stages`` when they round alike)."""
        return len({self.subnet(r) for r in self.ratios()})

    def repeated_stages_note(self) -> str | None:
        """A warning when a ladder schedule (prog) over this space would repeat a sub-network, else None."""
        distinct = self.distinct_subnets()
        if distinct >= self.num_stages:
            return None
        return (f"--num-stages {self.num_stages}: the growth space has {distinct} distinct sub-networks at these "
                f"ratios, so {self.num_stages - distinct} of the stages train the same sub-network as the stage "
                "before")

    def subnet(self, ratio: float) -> SubNet:
        return SubNet(self.resolution_for(ratio), self.depth_for(ratio))

    @property
    def full(self) -> SubNet:
        return SubNet(self.full_resolution, self.full_depth)

    def validate(self, subnet: SubNet) -> None:
        """Raise :class:`ConfigError` if ``subnet`` cannot run on the full model."""
        if subnet.resolution % self.patch_size:
            raise ConfigError(
                f"sub-network resolution {subnet.resolution} is not a multiple of patch size {self.patch_size}"
            )
        if subnet.resolution > self.full_resolution:
            raise ConfigError(
                f"sub-network resolution {subnet.resolution} exceeds the model's {self.full_resolution}"
            )
        if subnet.depth > self.full_depth or any(not 0 <= b < self.full_depth for b in subnet.active_blocks):
            raise ConfigError(f"sub-network {subnet.to_dict()} does not fit a {self.full_depth}-block model")
        if self.segments is not None:
            if subnet.depth < self.segments.min_depth:
                raise ConfigError(f"sub-network {subnet} has fewer blocks than the model has block segments "
                                  f"({list(self.segments.sizes)}): each segment runs at least one")
            self.segments.partition(self.blocks_of(subnet))


def _pick(values: list[int], idx: list[int]) -> list[int]:
    return sorted({values[i] for i in idx})


def candidates(space: GrowthSpace, previous: SubNet | None, forced_growth: bool = False) -> list[SubNet]:
    """Λ_k of AutoProg-One (Appendix B). The first stage takes the smallest, medium and largest n and l of Ω
    (at most 9). Each later stage takes ψ*_{k-1}'s n and the next larger one of Ω, times ψ*_{k-1}'s l and
    the next 3 depths of Ω (2 × 4 = 8), so a stage may also keep its depth. ``forced_growth`` is the official
    code's variant: the next 3 depths of Ω only (ψ*_{k-1}'s own depth only once it is the full depth).
    Candidates are never smaller than ψ*_{k-1}. Depth-only candidates list no blocks; the supernet assigns them
    (:class:`autoprog.algorithms.elastic.ElasticLayout`).
    """
    res, dep = space.resolutions(), space.depths()
    if previous is None:
        mid = lambda v: len(v) // 2  # noqa: E731 - the upper median of Ω's values
        rs = _pick(res, [0, mid(res), len(res) - 1])
        ds = _pick(dep, [0, mid(dep), len(dep) - 1])
    else:
        larger_r = [r for r in res if r > previous.resolution]
        rs = [previous.resolution] + larger_r[:1]
        larger_d = [d for d in dep if d > previous.depth]
        if forced_growth and larger_d:
            ds = larger_d[:3]
        else:
            ds = [previous.depth] + larger_d[:3]
    out = [SubNet(r, d) for r in rs for d in ds]
    if len(out) > MAX_CANDIDATES:
        raise AssertionError("growth space exceeds 9 candidates")  # cannot happen with the rules above
    return out


def neighbour_candidates(space: GrowthSpace, previous: SubNet | None) -> list[SubNet]:
    """Λ_k of the official AutoProg-Zero code (``train_apz.py``, fine-tuning): the first stage takes the two
    smallest n and the two smallest l of Ω (2 × 2; for the paper's four-value 0.25Ω these are the official
    ``[v[0], v[len(v) // 2 - 1]]``), each later stage ψ*_{k-1}'s n and l and the next larger one of each
    (at most 2 × 2): neighbours only, never smaller than ψ*_{k-1}, and no forced growth (ψ*_{k-1} itself is a
    candidate). Depth-only candidates list no blocks; the unfreezer spreads them.
    """
    res, dep = space.resolutions(), space.depths()
    if previous is None:
        rs, ds = res[:2], dep[:2]
    else:
        rs = [previous.resolution] + [r for r in res if r > previous.resolution][:1]
        ds = [previous.depth] + [d for d in dep if d > previous.depth][:1]
    return [SubNet(r, d) for r in rs for d in ds]
