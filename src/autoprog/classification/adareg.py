"""Adaptive regularization (AdaReg, Appendix C, Table 14): regularize small sub-networks less.

RandAugment magnitude, random-erasing probability and the stochastic-depth rate grow linearly with the
sub-network's size, from their minimum at the smallest sub-network of the growth space to their maximum
at the full model. Size is the number of patches times the depth, relative to the full model. The
augmentations are timm's (``RandAugment``, ``RandomErasing``); drop path is timm's ``DropPath`` in each
block, with the rate rising linearly over the active blocks as in timm's ViT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import DropPath

from ..data import randaugment_images
from ..space import GrowthSpace, SubNet


@dataclass(frozen=True)
class AdaRegRanges:
    """(min, max) of each regularizer; the defaults are Table 14's for the smaller model (D0)."""

    randaug_magnitude: tuple[float, float] = (4.5, 9.0)
    erase_prob: tuple[float, float] = (0.0, 0.25)
    drop_path: tuple[float, float] = (0.0, 0.1)


@dataclass(frozen=True)
class RegSettings:
    randaug_magnitude: float
    erase_prob: float
    drop_path: float


def _size(subnet: SubNet, patch: int) -> int:
    return subnet.num_patches(patch) * subnet.depth


class AdaptiveRegularization:
    """Maps a sub-network to regularization strengths, and applies them to batches and blocks."""

    def __init__(self, space: GrowthSpace, ranges: AdaRegRanges | None = None, seed: int = 0):
        self.space, self.ranges = space, ranges or AdaRegRanges()
        p = space.patch_size
        self._lo = _size(space.subnet(space.start_ratio), p)
        self._hi = _size(space.full, p)
        from timm.data.random_erasing import RandomErasing

        from ..data import rand_augment

        self._make_ra = lambda c, interpolation="random": rand_augment(
            "rand-m9-n2-mstd0.5", {"img_mean": (128,) * c, "translate_const": max(1, space.full_resolution // 7)},
            interpolation)
        self._randaug = {}  # one per channel count (the fill colour's length must match)
        self.erasing = RandomErasing(probability=0.0, mode="pixel", device="cpu")
        self.settings = self.values(space.full)

    def fraction(self, subnet: SubNet) -> float:
        """0 at the growth space's smallest sub-network, 1 at the full model."""
        if self._hi == self._lo:
            return 1.0
        f = (_size(subnet, self.space.patch_size) - self._lo) / (self._hi - self._lo)
        return min(1.0, max(0.0, f))

    def values(self, subnet: SubNet) -> RegSettings:
        f = self.fraction(subnet)
        lerp = lambda r: r[0] + f * (r[1] - r[0])  # noqa: E731
        r = self.ranges
        return RegSettings(lerp(r.randaug_magnitude), lerp(r.erase_prob), lerp(r.drop_path))

    def set_subnet(self, net, subnet: SubNet) -> None:
        """Adopt ``subnet``'s strengths: augmentation settings here, drop-path rates in ``net``'s blocks."""
        self.settings = s = self.values(subnet)
        for ra in self._randaug.values():
            for op in ra.ops:
                op.magnitude = s.randaug_magnitude
        self.erasing.probability = s.erase_prob
        active = net.blocks_of(subnet)  # VOLO: each block segment's first blocks
        for j, i in enumerate(active):
            rate = s.drop_path * j / max(1, len(active) - 1)
            blk = net.blocks[i]
            for name in ("drop_path1", "drop_path2"):
                mod = getattr(blk, name, None)
                if isinstance(mod, DropPath):
                    mod.drop_prob = rate
                elif mod is not None and rate > 0:
                    setattr(blk, name, DropPath(rate))

    def pil_randaugment(self, channels: int, interpolation: str = "random"):
        """A RandAugment transform of its own for PIL images with ``channels`` channels (decoded data's loader
        workers), at the current magnitude; the trainer sends each epoch's magnitude with the samples.
        ``interpolation``: its resampling (``random``: drawn per operation; else the training crop's, as the
        official stage loaders pass ``--train-interpolation`` on)."""
        ra = self._make_ra(channels, interpolation)
        for op in ra.ops:
            op.magnitude = self.settings.randaug_magnitude
        return ra

    def randaugment(self, x: torch.Tensor) -> torch.Tensor:
        """RandAugment each image of a uint8 batch (N, C, H, W)."""
        c = x.shape[1]
        if c not in self._randaug:
            self._randaug[c] = self._make_ra(c)
            for op in self._randaug[c].ops:
                op.magnitude = self.settings.randaug_magnitude
        return randaugment_images(x, self._randaug[c])

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """Random erasing on a normalised float batch."""
        if self.erasing.probability <= 0:
            return x
        self.erasing.device = x.device
        return self.erasing(x)
