"""MoE-CL: mixture-of-experts adapters for continual learning with the DDAS task selector (arXiv 2403.11549)."""

from ...registry import register_method
from .config import MoECLConfig
from .layer import MoECLLayer, TaskRouters
from .model import MOECL_TARGET_MODULES, MoECLModel


__all__ = ["MOECL_TARGET_MODULES", "MoECLConfig", "MoECLLayer", "MoECLModel", "TaskRouters"]

register_method("moecl", config_cls=MoECLConfig, model_cls=MoECLModel)
