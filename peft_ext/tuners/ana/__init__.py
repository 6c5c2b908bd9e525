"""AnA: Adapter-in-Adapter with an MoE gate (PathWeave, NeurIPS 2024, arXiv 2410.20178), task by task.

Each task ``t`` trains a linear rank-``r`` adapter ``A_t`` per targeted layer; earlier adapters ``A_i`` become
experts of task ``t`` through trainable ``r x r`` in-adapters ``F_i^t`` set between their frozen projections, and a
per-token noisy softmax gate (zero-initialized) mixes ``[A_0^t, ..., A_{t-1}^t, A_t]``. Tasks live inside one PEFT
adapter (:mod:`peft_ext.routing.tasks`); earlier tasks are frozen, so their outputs never change.

Choice of the in-adapter init (``AnAConfig.in_adapter_init``), measured by ``benchmarks/bench_ana.py --init-study``:
``"linear"`` (the reference's) is the default; ``"zero"`` is within noise of it and ``"identity"`` is worse (figures in
the ``AnAConfig`` docstring).
"""

from ...registry import register_method
from .config import QFORMER_TARGET_MODULES, AnAConfig
from .layer import AnALayer, AnALinear, AnATask, ana_task_parameter_count
from .model import TRANSFORMERS_MODELS_TO_ANA_TARGET_MODULES_MAPPING, AnAModel


__all__ = [
    "QFORMER_TARGET_MODULES",
    "TRANSFORMERS_MODELS_TO_ANA_TARGET_MODULES_MAPPING",
    "AnAConfig",
    "AnALayer",
    "AnALinear",
    "AnAModel",
    "AnATask",
    "ana_task_parameter_count",
]


def describe(config: AnAConfig) -> str:
    """``config``'s main settings in words (the preset catalogue, model cards)."""
    if config.gate_top_k is not None:
        gate = f"top-{config.gate_top_k} gate computing only the chosen paths"
    elif config.top_k is not None:
        gate = f"top-{config.top_k} gate"
    else:
        gate = "dense gate"
    noisy = "noisy " if config.noisy_gating else ""
    summed = config.summed_target_modules
    if isinstance(summed, (set, list)):
        summed = ", ".join(sorted(summed))
    tail = f"; plain per-task adapters summed on {summed}" if summed else ""
    return f"r={config.r}, {noisy}{gate}, {config.in_adapter_init} in-adapters{tail}"


register_method(
    "ana",
    config_cls=AnAConfig,
    model_cls=AnAModel,
    display_name="AnA",
    summary=(
        "Adapter-in-Adapter with an MoE gate (PathWeave, arXiv 2410.20178): one linear adapter per task, earlier "
        "tasks' adapters reused as experts through small in-adapters, mixed by a per-token gate"
    ),
    describe=describe,
)
