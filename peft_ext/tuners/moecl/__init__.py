"""MoE-CL: mixture-of-experts adapters for continual learning with the DDAS task selector (arXiv 2403.11549)."""

from ...registry import register_method
from .config import MoECLConfig
from .layer import MoECLLayer, TaskRouters
from .model import MOECL_TARGET_MODULES, MoECLModel


__all__ = ["MOECL_TARGET_MODULES", "MoECLConfig", "MoECLLayer", "MoECLModel", "TaskRouters"]


def describe(config: MoECLConfig) -> str:
    """``config``'s main settings in words (the preset catalogue, model cards)."""
    selector = f", {config.selector} task selector on {config.selector_features} features"
    return (
        f"{config.num_experts} experts of bottleneck {config.r}, top-{config.top_k}, {config.freeze_top_k} frozen per "
        f"task, scale {config.scaling:g}{selector}"
    )


register_method(
    "moecl",
    config_cls=MoECLConfig,
    model_cls=MoECLModel,
    display_name="MoE-CL",
    summary=(
        "mixture-of-experts adapters for continual learning (MoE-Adapters4CL, arXiv 2403.11549): a pool of "
        "bottleneck experts beside each adapted block, one router per task, activate-freeze of the most used experts "
        "after each task, and a task selector (DDAS) for task-agnostic inference"
    ),
    # the experts' output is scaled by 0.1 (the paper's scaling): Adam steps larger than LoRA's. Chosen on
    # validation rows (benchmarks/bench_continual.py --validation 40): 1e-2 learns every task of every sequence and
    # seed tried, 3e-2 left a task at chance; generation's single epoch per task needs 3e-2.
    default_learning_rate=1e-2,
    kind_learning_rates={"generation": 3e-2},
    describe=describe,
)
