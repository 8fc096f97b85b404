"""The paper's training recipe for DeiT (Appendix B) through timm: RandAugment, Mixup/CutMix, random erasing,
label smoothing and repeated augmentation, each an option (off by default, as autoprog's short CPU runs train
without them).

* RandAugment (``--randaugment rand-m9-mstd0.5-inc1``, timm's config string) runs where the images are decoded:
  in the loader workers for ImageFolder data (:func:`autoprog.data.load_image_folder`), on the host per image for
  the small in-memory datasets.
* Mixup/CutMix (``--mixup 0.8 --cutmix 1.0``) mix each batch on the device with timm's ``Mixup`` (per batch, as
  DeiT does); the loss is then the soft-target cross-entropy, label smoothing folded into the targets.
* Random erasing (``--random-erasing 0.25``) erases on the normalised batch on the device (timm's
  ``RandomErasing``, pixel mode).
* Repeated augmentation (``--aug-repeats 3``, DeiT's ``RASampler``) is the training order's
  (:class:`autoprog.data.EpochSampler`): an epoch draws a third of the images, each three times in a row, each
  copy augmented on its own. The official AutoProg code, built on timm's VOLO script, has none.

:class:`TrainingRecipe` offers the same ``randaugment``/``erase``/``set_subnet`` calls as AdaReg
(:mod:`.adareg`), which varies RandAugment and random erasing over training instead (by stage, or by the
sub-network's size); the two do not combine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import randaugment_images, randaugment_transform
from ..errors import ConfigError, warn
from .token_labels import DENSE_WEIGHT

# the paper's DeiT recipe (Appendix B), what the deit-s-paper preset sets
DEIT_RECIPE = {"randaugment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25,
               "aug_repeats": 3}


def check_recipe(cfg, adareg: bool) -> None:
    """Refuse what cannot run, before anything trains."""
    if adareg and (cfg.randaugment or cfg.random_erasing):
        raise ConfigError("--adareg sets RandAugment and random erasing itself (by stage or sub-network size): give "
                          "--randaugment/--random-erasing without it, or neither")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size % 2:
        raise ConfigError(f"--mixup/--cutmix need an even --batch-size (timm mixes a batch with its reverse), got "
                          f"{cfg.batch_size}")
    if cfg.randaugment:
        randaugment_transform(cfg.randaugment, 32, (0.5,))
    if cfg.token_label_ground_truth and cfg.token_labels is None:
        raise ConfigError("--token-label-ground-truth mixes the true class into token labeling's targets: it needs "
                          "--token-labels")
    if cfg.token_label_map_frame != "whole" and cfg.token_labels is None:
        raise ConfigError("--token-label-map-frame says what part of an image a score map covers: it needs "
                          "--token-labels")
    unread = [flag for flag, name, default in (("--dense-weight", "dense_weight", DENSE_WEIGHT),
                                               ("--token-label-geometry", "token_label_geometry", "official"))
              if getattr(cfg, name) != default]
    if unread and cfg.token_labels is None:  # (a warning: configs saved with them must still run)
        warn(f"{' and '.join(unread)} set without --token-labels: unread (they shape token labeling only)")
    if cfg.token_labels is not None and (cfg.mixup or cfg.cutmix):
        raise ConfigError("--token-labels with --mixup/--cutmix is not built (the official TokenLabelMixup mixes the "
                          "score maps too); the paper's VOLO recipe uses neither")


class TrainingRecipe:
    """Applies the options of the module docstring to training batches (see there)."""

    def __init__(self, cfg, num_classes: int, in_memory: bool, image_size: int, mean: tuple[float, ...]):
        self.cfg = cfg
        self._ra = None
        if cfg.randaugment and in_memory:  # decoded data gets it in the loader workers
            self._ra = randaugment_transform(cfg.randaugment, image_size, mean)
        self._erase = None
        if cfg.random_erasing:
            from timm.data.random_erasing import RandomErasing

            self._erase = RandomErasing(probability=cfg.random_erasing, mode="pixel", device="cpu")
        self.mixup = None
        if cfg.mixup or cfg.cutmix:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch",
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    @property
    def randaugments(self) -> bool:
        """Whether :meth:`randaugment` changes batches (in-memory data with ``--randaugment``)."""
        return self._ra is not None

    @property
    def active(self) -> bool:
        return self._ra is not None or self._erase is not None or self.mixup is not None

    def set_subnet(self, net, subnet) -> None:
        """Fixed strengths: nothing changes with the sub-network."""

    def randaugment(self, x: torch.Tensor) -> torch.Tensor:
        """RandAugment each image of an in-memory uint8 batch (N, C, H, W), on the host."""
        return x if self._ra is None else randaugment_images(x, self._ra)

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """Random erasing on a normalised float batch, on its device."""
        if self._erase is None:
            return x
        self._erase.device = x.device
        return self._erase(x)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix of a batch: mixed images and soft targets (smoothing included), or the batch as it is."""
        if self.mixup is None:
            return x, y
        return self.mixup(x, y)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against soft targets (mixed), or with label smoothing against class labels."""
        if target.ndim == 2:
            return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.cfg.label_smoothing)
