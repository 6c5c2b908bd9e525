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


def describe(config: ReSoRAConfig) -> str:
    """``config``'s main settings in words (the preset catalogue, model cards)."""
    return f"r={config.r}, {config.num_subspaces} subspaces, {config.regularizer} regularizer x {config.reg_weight:g}"


register_method(
    "resora",
    config_cls=ReSoRAConfig,
    model_cls=ReSoRAModel,
    display_name="ReSoRA",
    summary=(
        "LoRA split into equivalent rank subspaces, trained with a de-redundancy regularizer (arXiv 2507.20745); "
        "merges like LoRA"
    ),
    describe=describe,
)
