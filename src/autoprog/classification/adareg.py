"""Adaptive regularization (AdaReg, Appendix C, Table 14): regularize small sub-networks less.

RandAugment magnitude, random-erasing probability and the stochastic-depth rate grow linearly from their minimum
to their maximum (:class:`AdaRegRanges`), by one of two rules:

* ``stage`` (the default; the official code's ``progressive_schedule``): by stage index, ``linspace(min, max,
  num_stages)[k]`` at stage ``k`` whatever sub-network it trains (a one-stage run, the original model, at the
  maximum), RandAugment's magnitude rounded to an integer and its policy timm's ``rand-mM-mstd0.5-inc1`` with the
  normalisation mean as fill; an AutoProg-One supernet phase trains at the final (maximum) strengths, its candidates
  at the supernet's drop-path rates (``auto_grow`` builds the supernet with the last stage's settings).
* ``size`` (autoprog's rule until 2026-12-07, the paper's "regarding the model size"): by the sub-network's size,
  patches times depth relative to the full model, from the growth space's smallest sub-network to the full model,
  every sub-network its own strengths (a supernet's candidates too); magnitude continuous, policy
  ``rand-m9-n2-mstd0.5`` with a grey fill.

The augmentations are timm's (``RandAugment``, ``RandomErasing``); drop path is timm's ``DropPath`` in each
block, with the rate rising linearly over the active blocks as in timm's ViT (and the official models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.layers import DropPath

from ..data import randaugment_images
from ..space import GrowthSpace, SubNet

RULES = ("stage", "size")  # how the strengths follow training: by stage index (official) or sub-network size
STAGE_POLICY = "rand-m9-mstd0.5-inc1"  # the official stages' RandAugment (main_prog.py's --aa), magnitude per stage
SIZE_POLICY = "rand-m9-n2-mstd0.5"  # the size rule's


@dataclass(frozen=True)
class AdaRegRanges:
    """(min, max) of each regularizer; the defaults are Table 14's for the smaller model (D0), which the official
    VOLO-D1 script sets (``--aa-scale 0.5 --dp-scale 0 --re-scale 0`` of ``--drop-path 0.1 --reprob 0.25``)."""

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


def stage_value(lo: float, hi: float, k: int, num_stages: int) -> float:
    """The official ``linspace(scale, 1, num_stages)[k] * hi`` with ``scale = lo / hi`` (floored at 0), computed
    as it is there (numpy's linspace: its rounding decides which half-integer magnitudes round down)."""
    if hi == 0:
        return 0.0
    return max(0.0, float(np.linspace(lo / hi, 1.0, num_stages)[k] * hi))


class AdaptiveRegularization:
    """Maps the training point (stage or sub-network, by ``rule``) to regularization strengths, and applies them
    to batches and blocks. ``mean``: the data's normalisation mean, RandAugment's fill under the stage rule (as
    timm's ``create_transform`` fills); ``image_size`` its ``translate_const`` (unused by RandAugment's relative
    translations; default the full resolution)."""

    def __init__(self, space: GrowthSpace, ranges: AdaRegRanges | None = None, rule: str = "stage",
                 mean: tuple[float, ...] | None = None, image_size: int | None = None):
        if rule not in RULES:
            raise ValueError(f"AdaReg rule {rule!r}: one of {', '.join(RULES)}")
        self.space, self.ranges, self.rule = space, ranges or AdaRegRanges(), rule
        if rule == "stage" and round(stage_value(*self.ranges.randaug_magnitude, 0, 2)) < 1:
            raise ValueError("AdaReg's stage rule rounds RandAugment's magnitude as the official code, which switches "
                             "RandAugment off at 0; give a minimum magnitude of at least 0.5 (or the size rule)")
        p = space.patch_size
        self._lo = _size(space.subnet(space.start_ratio), p)
        self._hi = _size(space.full, p)
        self._mean, self._image_size = mean, image_size or space.full_resolution
        from timm.data.random_erasing import RandomErasing

        self._randaug = {}  # one per channel count (the fill colour's length must match)
        self.erasing = RandomErasing(probability=0.0, mode="pixel", device="cpu")
        self.settings = self.values(space.full) if rule == "size" else self.stage_values(0, 1)

    def _make_ra(self, channels: int, interpolation: str = "random"):
        """The rule's RandAugment for images of ``channels`` channels, at the current magnitude."""
        from ..data import rand_augment, randaugment_transform

        if self.rule == "size":
            ra = rand_augment(SIZE_POLICY, {"img_mean": (128,) * channels,
                                            "translate_const": max(1, self.space.full_resolution // 7)},
                              interpolation)
        else:
            mean = self._mean if self._mean is not None and len(self._mean) == channels else (0.5,) * channels
            ra = randaugment_transform(STAGE_POLICY, self._image_size, mean, interpolation)
        for op in ra.ops:
            op.magnitude = self.settings.randaug_magnitude
        return ra

    def fraction(self, subnet: SubNet) -> float:
        """The size rule's position: 0 at the growth space's smallest sub-network, 1 at the full model."""
        if self._hi == self._lo:
            return 1.0
        f = (_size(subnet, self.space.patch_size) - self._lo) / (self._hi - self._lo)
        return min(1.0, max(0.0, f))

    def values(self, subnet: SubNet) -> RegSettings:
        """The size rule's strengths for ``subnet``."""
        f = self.fraction(subnet)
        lerp = lambda r: r[0] + f * (r[1] - r[0])  # noqa: E731
        r = self.ranges
        return RegSettings(lerp(r.randaug_magnitude), lerp(r.erase_prob), lerp(r.drop_path))

    def stage_values(self, k: int, num_stages: int) -> RegSettings:
        """The stage rule's strengths at stage ``k`` of ``num_stages`` (one stage: the maximum): the official
        ``progressive_schedule``'s, RandAugment's magnitude rounded to an integer."""
        if num_stages <= 1:
            k, num_stages = 1, 2
        r = self.ranges
        return RegSettings(float(round(stage_value(*r.randaug_magnitude, k, num_stages))),
                           stage_value(*r.erase_prob, k, num_stages), stage_value(*r.drop_path, k, num_stages))

    def set_subnet(self, net, subnet: SubNet, stage: int = 0, num_stages: int = 1,
                   supernet: SubNet | None = None) -> None:
        """Adopt the strengths for training ``subnet`` at stage ``stage`` of ``num_stages``, inside the
        supernet ``supernet`` if a supernet phase is training: augmentation settings here, drop-path rates in
        ``net``'s blocks. The size rule reads ``subnet`` alone; the stage rule the stage, and in a supernet phase
        takes the final strengths with rates over the supernet's blocks (unchanged from candidate to candidate)."""
        if self.rule == "size":
            self._adopt(net, self.values(subnet), subnet)
        elif supernet is not None:
            self._adopt(net, self.stage_values(num_stages - 1, num_stages), supernet)
        else:
            self._adopt(net, self.stage_values(stage, num_stages), subnet)

    def _adopt(self, net, s: RegSettings, rated: SubNet) -> None:
        self.settings = s
        for ra in self._randaug.values():
            for op in ra.ops:
                op.magnitude = s.randaug_magnitude
        self.erasing.probability = s.erase_prob
        active = net.blocks_of(rated)  # VOLO: each block segment's first blocks
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
        return self._make_ra(channels, interpolation)

    def randaugment(self, x: torch.Tensor) -> torch.Tensor:
        """RandAugment each image of a uint8 batch (N, C, H, W)."""
        c = x.shape[1]
        if c not in self._randaug:
            self._randaug[c] = self._make_ra(c)
        return randaugment_images(x, self._randaug[c])

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """Random erasing on a normalised float batch."""
        if self.erasing.probability <= 0:
            return x
        self.erasing.device = x.device
        return self.erasing(x)
