"""Diffusion: base pre-training and efficient fine-tuning (AutoProg-Zero, Prog, AutoProg-One and baselines).

Entry points in :mod:`~autoprog.diffusion.runner` (``pretrain_base``, ``finetune``, ``compare_finetune``,
``compare_finetune_seeds``); the loop in :mod:`~autoprog.diffusion.trainer`; the static baselines in
:mod:`~autoprog.diffusion.methods`; data, latents, sampling, quality (FD/KID) and reports beside them. The
backbones are in :mod:`autoprog.models.dit` and :mod:`autoprog.models.text_unet` (text-to-image), the unfreezing adapter in :mod:`autoprog.adapters.unfreezer`.
"""

from .methods import export_backbone
from .runner import (
    BaseSpec,
    FinetuneSpec,
    TextBaseSpec,
    TextFinetuneSpec,
    compare_finetune,
    compare_finetune_seeds,
    finetune,
    pretrain_base,
)
from .trainer import DiffusionConfig, DiffusionTrainer

__all__ = [
    "BaseSpec", "DiffusionConfig", "DiffusionTrainer", "FinetuneSpec", "TextBaseSpec",
    "TextFinetuneSpec",
    "compare_finetune", "compare_finetune_seeds", "export_backbone", "finetune", "pretrain_base",
]
