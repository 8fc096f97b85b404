"""autoprog: automated progressive learning for efficient training of large vision models.

Pre-training grows a ViT along patches and depth, on a manual schedule (Prog, ProgStack) or one found
during training (AutoProg-One), with growth operators including MoGrow. See ``autoprog.runner`` for the
library entry points (``pretrain``, ``compare``, ``compare_seeds``). Fine-tuning of diffusion models by
progressive unfreezing (Prog, AutoProg-Zero) and its baselines is in ``autoprog.diffusion``; the zero-shot
proxies, usable on any ``nn.Module``, in ``autoprog.proxies``.
"""

from .adapters.vit import ElasticViT
from .autoprog_one import AutoProgOne, AutoProgOneConfig
from .errors import AutoprogError, ConfigError, DataError
from .growth import GROWTH_OPERATORS, GrowthOperator, MomentumNetwork, depth_mapping, get_growth_operator
from .runner import RunSpec, compare, compare_seeds, pretrain
from .schedules import Schedule, Stage, build_schedule
from .space import GrowthSpace, SubNet
from .train import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "AutoProgOne", "AutoProgOneConfig", "AutoprogError", "ConfigError", "DataError", "ElasticViT", "GROWTH_OPERATORS", "GrowthOperator", "GrowthSpace",
    "MomentumNetwork", "RunSpec", "Schedule", "Stage", "SubNet", "TrainConfig", "Trainer", "build_schedule",
    "compare", "compare_seeds", "depth_mapping", "get_growth_operator", "pretrain",
]
