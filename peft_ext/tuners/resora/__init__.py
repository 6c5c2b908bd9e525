"""ReSoRA: LoRA split into equivalent subspaces, trained with a de-redundancy regularizer (arXiv 2507.20745)."""

from ...registry import register_method
from .config import ReSoRAConfig
from .layer import ReSoRALayer, ReSoRALinear
from .model import ReSoRAModel
from .regularizer import feature_decorrelation, output_cosine_redundancy, redundancy_terms, weight_overlap


__all__ = [
    "ReSoRAConfig",
    "ReSoRALayer",
    "ReSoRALinear",
    "ReSoRAModel",
    "feature_decorrelation",
    "output_cosine_redundancy",
    "redundancy_terms",
    "weight_overlap",
]

register_method("resora", config_cls=ReSoRAConfig, model_cls=ReSoRAModel)
