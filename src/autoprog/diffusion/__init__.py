"""Diffusion models: base pre-training and efficient fine-tuning (AutoProg-Zero and baselines).

Entry points are in ``autoprog.diffusion.runner`` (``pretrain_base``, ``finetune``, ``compare_finetune``,
``compare_finetune_seeds``); the backbones in ``backbone``; what each method trains in ``methods``; the
controllers (schedule side) in ``schedules`` and ``autoprog_zero``; the loop in ``trainer``.
"""

from .autoprog_zero import AutoProgZero
from .backbone import (
    DiffusersDiT,
    DiffusionBackbone,
    DiT,
    StageIdentifier,
    build_backbone,
    load_backbone,
    save_backbone,
)
from .methods import FINETUNE_METHODS, Unfreezer, export_backbone, parse_method
from .prompts import StagePrompts
from .runner import BaseSpec, FinetuneSpec, compare_finetune, compare_finetune_seeds, finetune, pretrain_base
from .trainer import DiffusionConfig, DiffusionTrainer

__all__ = [
    "AutoProgZero", "BaseSpec", "DiT", "DiffusersDiT", "DiffusionBackbone", "DiffusionConfig", "DiffusionTrainer",
    "FINETUNE_METHODS", "FinetuneSpec", "StageIdentifier", "StagePrompts", "Unfreezer", "build_backbone",
    "compare_finetune", "compare_finetune_seeds", "export_backbone", "finetune", "load_backbone", "parse_method",
    "pretrain_base", "save_backbone",
]
