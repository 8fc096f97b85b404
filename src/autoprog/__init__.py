"""autoprog: automated progressive learning for efficient training of large vision models.

Pre-training grows a ViT along patches and depth (Prog, ProgStack, and automated schedules to come);
growth operators include MoGrow. See ``autoprog.runner`` for the library entry points.
"""

from .adapters.vit import ElasticViT
from .errors import AutoprogError, ConfigError, DataError
from .growth import GROWTH_OPERATORS, GrowthOperator, MomentumNetwork, depth_mapping, get_growth_operator
from .runner import RunSpec, compare, pretrain
from .schedules import Schedule, Stage, build_schedule
from .space import GrowthSpace, SubNet
from .train import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "AutoprogError", "ConfigError", "DataError", "ElasticViT", "GROWTH_OPERATORS", "GrowthOperator", "GrowthSpace",
    "MomentumNetwork", "RunSpec", "Schedule", "Stage", "SubNet", "TrainConfig", "Trainer", "build_schedule",
    "compare", "depth_mapping", "get_growth_operator", "pretrain",
]
