"""autoprog: automated progressive learning for efficient training of large vision models.

Pre-training grows a ViT in resolution and depth (Prog, ProgStack, AutoProg-One, AutoProg-Zero, with MoGrow);
fine-tuning unfreezes a diffusion model progressively (Prog, AutoProg-Zero, AutoProg-One) next to the usual
baselines. The layout shows the design:

* shared rooms: :mod:`~autoprog.space` (ψ, Ω), :mod:`~autoprog.schedules` (Ψ), :mod:`~autoprog.controllers`
  (the protocol between a controller and a trainer), :mod:`~autoprog.engine`, :mod:`~autoprog.experiment`;
* :mod:`autoprog.algorithms`: the paper's pieces (growth operators and MoGrow, elastic supernet,
  AutoProg-One, AutoProg-Zero, zero-shot proxies), task-agnostic;
* :mod:`autoprog.adapters`: apply a ψ to a model (elastic ViT, unfreezer); :mod:`autoprog.models`: the models;
* tasks side by side: :mod:`autoprog.classification` (``pretrain``, ``compare``) and :mod:`autoprog.diffusion`
  (``finetune``, ``compare_finetune``, ``pretrain_base``); :mod:`autoprog.loop` puts autoprog inside your own
  training loop.

The names below load their module on first use, so ``import autoprog`` imports no task.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "AutoprogError": "errors", "ConfigError": "errors", "DataError": "errors",
    "SubNet": "space", "GrowthSpace": "space",
    "Schedule": "schedules", "Stage": "schedules", "build_schedule": "schedules",
    "Controller": "controllers", "ScheduleController": "controllers", "TrainerServices": "controllers",
    "GrowthServices": "controllers", "ZeroShotServices": "controllers",
    "ElasticViT": "adapters.vit", "Unfreezer": "adapters.unfreezer",
    "AutoProgOne": "algorithms.autoprog_one", "AutoProgOneConfig": "algorithms.autoprog_one",
    "AutoProgZero": "algorithms.autoprog_zero",
    "GROWTH_OPERATORS": "algorithms.growth", "GrowthOperator": "algorithms.growth",
    "MomentumNetwork": "algorithms.growth", "depth_mapping": "algorithms.growth",
    "get_growth_operator": "algorithms.growth",
    "RunSpec": "classification.runner", "pretrain": "classification.runner", "compare": "classification.runner",
    "compare_seeds": "classification.runner", "TrainConfig": "classification.trainer",
    "Trainer": "classification.trainer",
    "ProgressiveLoop": "loop", "ProxyData": "loop",
    "FinetuneSpec": "diffusion.runner", "finetune": "diffusion.runner", "compare_finetune": "diffusion.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autoprog' has no attribute {name!r}")
