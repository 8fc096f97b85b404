"""Model adapters: apply a sub-network ψ to a model. :func:`elastic` wraps a model in its family's elastic
adapter (ViT/DeiT, VOLO) for growth; :class:`~autoprog.adapters.unfreezer.Unfreezer` unfreezes a diffusion
backbone for fine-tuning. A new family is one file with an :class:`~autoprog.adapters.base.ElasticModel`
subclass, imported here."""

from . import eva as _eva  # noqa: F401 - registers the family (the ViT check leaves Eva to it)
from . import vit as _vit  # noqa: F401 - registers the family
from . import volo as _volo  # noqa: F401 - registers the family
from .base import FAMILIES, ElasticModel, elastic, family_of

__all__ = ["FAMILIES", "ElasticModel", "elastic", "family_of"]
