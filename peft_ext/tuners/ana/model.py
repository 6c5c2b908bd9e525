"""AnAModel: the tuner that injects AnA layers and runs the continual task protocol."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _ExcludedModule,
    check_target_module_exists,
    match_target_against_key,
)
from torch import nn

from ...routing.selector import TaskSelectorMixin
from ...routing.tasks import ContinualTunerMixin, EndTaskReport, check_task_name
from ..checkpoint import CheckedCheckpointMixin, remove_nested_adapter_name
from ..targets import linear_fan_in_fan_out
from .config import AnAConfig
from .layer import AnALayer, AnALinear, ana_task_parameter_count, stack_legacy_in_adapters


# Default targets per model type when `target_modules` is None: the paper's placement (attention query/key/value and
# the attention output projection). Entries are module-name suffixes.
TRANSFORMERS_MODELS_TO_ANA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "blip_2_qformer": ["query", "key", "value", "attention.output.dense", "crossattention.output.dense"],
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
}


def is_summed_target(config: AnAConfig, key: str) -> bool:
    """Whether module ``key`` is one of ``config.summed_target_modules`` (a regex: full match; names: the key or a
    ``.``-suffix of it, as PEFT matches ``target_modules``). Configs written before the option existed have none."""
    spec = getattr(config, "summed_target_modules", None)
    if not spec:
        return False
    if isinstance(spec, str):
        return bool(match_target_against_key(spec, key))
    return key in spec or any(key.endswith(f".{name}") for name in spec)


class AnAModel(CheckedCheckpointMixin, TaskSelectorMixin, ContinualTunerMixin, BaseTuner):
    """Creates an AnA model (PathWeave's Adapter-in-Adapter with an MoE gate); use it through ``get_peft_model``.

    One PEFT adapter is one continual learner; its tasks are named inside it (``config.task_names``, see
    :mod:`peft_ext.routing.tasks`). ``add_task(name)`` grows every adapted layer by a task adapter, one in-adapter
    per earlier task and a gate, and makes exactly those trainable; ``end_task()`` freezes the task (the continual
    contract of :class:`~peft_ext.routing.tasks.ContinualTunerMixin`, shared with MoE-CL); forwards use
    the active task, or ``task_ids=`` / ``route(...)`` per sample. One ``save_pretrained`` writes all tasks.
    Task-agnostic inference: ``fit_task_selector(task, batches)`` fits the shared DDAS selector
    (:mod:`peft_ext.routing.selector`), after which ``task_ids="auto"`` picks the task (or the base model) per sample.

    Trainable parameters of task ``t`` (0-based), summed over the adapted layers ``(d_in, d_out)``::

        P(t) = sum_layers [ r*(d_in + d_out) + r + d_out + 1  +  t*(r*r + r)  +  [t > 0]*G*d_in*(t + 1) ]

    with ``G = 2`` for noisy gating (gate and noise weights), else 1 (:meth:`task_parameter_count`). The forward
    cost of task ``t`` grows linearly in ``t``: ``t + 1`` rank-``r`` experts per adapted layer, computed with
    one stacked matmul per projection, so the slope per task is about one rank-``r`` LoRA.

    Summed layers (``config.summed_target_modules``, PathWeave's LLM-projection adapters): plain per-task adapters
    summed over tasks ``<= t``, no in-adapters and no gate (:class:`~peft_ext.tuners.ana.config.AnAConfig`).

    Merging: a multi-task adapter's output is an input-dependent gated mixture, so ``merge``/``merge_and_unload``
    raise ``ValueError``. A single-task adapter is a plain linear adapter and merges exactly
    (``W += s*up.W@down.W``, ``b += s*(up.W@down.b + up.b)``; refused if that bias term is non-zero and the base
    layer has no bias). A merged model behaves as that task for every input.

    Args:
        model ([`torch.nn.Module`]): The model to adapt.
        config ([`AnAConfig`]): The AnA configuration.
        adapter_name (`str`): Name of the adapter, default `"default"`.
        low_cpu_mem_usage (`bool`): Create the adapter weights on the meta device (faster loading).

    Example:
        ```py
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_ext.AnAConfig(r=8, target_modules=["query", "value"]), "task0")
        >>> ...  # train task0
        >>> model.add_task("task1")  # task0 frozen; task1's adapter, in-adapters and gate trainable
        >>> ...  # train task1
        >>> out = model(**batch, task_ids="task0")  # task0's outputs, bit-identical to before task1
        ```
    """

    prefix: str = "ana_"
    tuner_layer_cls = AnALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_ANA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._init_routing()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- injection ------------------------------------------------------------------------------------------------
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        # Also reached directly by PeftModel.add_adapter / load_adapter, which skip BaseTuner's injection hooks.
        config = self.peft_config[adapter_name]
        if not config.task_names:
            check_task_name(adapter_name)
            config.task_names.append(adapter_name)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        self._register_adapter_tasks(adapter_name)
        self._init_task_selector(adapter_name)
        self._install_routing_hook()

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"Please specify `target_modules` in the AnA config: no default for model type {model_type!r}."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        """PEFT's matching of ``target_modules`` (and ``exclude_modules``), plus ``summed_target_modules``."""
        found = check_target_module_exists(peft_config, key)
        if found or isinstance(found, _ExcludedModule):  # an excluded module stays excluded
            return found
        return is_summed_target(peft_config, key)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        summed = is_summed_target(config, current_key)
        if isinstance(target, AnALayer):
            target.update_layer(adapter_name, config, summed=summed)
            return
        new_module = self._create_new_module(config, adapter_name, target, summed=summed)
        new_module.routing = self.routing
        if adapter_name not in self.active_adapters:
            # an added adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: AnAConfig, adapter_name: str, target: nn.Module, summed: bool = False) -> AnALinear:
        fan_in_fan_out = linear_fan_in_fan_out(config, target, "AnA")
        return AnALinear(target, adapter_name, config=config, fan_in_fan_out=fan_in_fan_out, summed=summed)

    # -- routing ----------------------------------------------------------------------------------------------------
    # -- checkpoint keys ------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # a checkpoint of the layout with one module per in-adapter loads too (before the checks of its tensors)
        state_dict = stack_legacy_in_adapters(dict(state_dict))
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Drop the adapter name that follows the ``ana_tasks`` container, wherever it sits in the key.

        ``...query.ana_tasks.<adapter>.2.in_weight`` -> ``...query.ana_tasks.2.in_weight`` (PEFT's default only
        looks at the last two components; AnA nests tasks below the adapter).
        """
        stripped = remove_nested_adapter_name(key, adapter_name, ("ana_tasks",))
        return stripped if stripped is not None else super()._remove_adapter_name_from_key(key, adapter_name)

    # -- merging --------------------------------------------------------------------------------------------------
    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if config is not None and len(config.task_names) > 1:
                raise ValueError(
                    f"AnA adapter {name!r} has {len(config.task_names)} tasks: its per-token gated mixture of experts "
                    "depends on the input and cannot be merged into the base weights (only a single-task AnA "
                    "adapter merges exactly). Keep the adapter unmerged."
                )

    # -- continual protocol ---------------------------------------------------------------------------------------
    def _layers(self, adapter_name: str) -> list[AnALayer]:
        return [m for m in self.model.modules() if isinstance(m, AnALayer) and adapter_name in m.ana_tasks]

    def _on_task_added(self, adapter_name: str, task_name: str) -> None:
        # every earlier task is finished now (the layers froze them in add_task)
        config = self.peft_config[adapter_name]
        for name in config.task_names[:-1]:
            if name not in config.ended_tasks:
                config.ended_tasks.append(name)

    def add_task(self, task_name: str, adapter_name: Optional[str] = None) -> None:
        """Grow the adapter by task ``task_name`` and make it active.

        In every adapted layer: a new task adapter ``A_t``, one ``r x r`` in-adapter ``F_i^t`` per earlier task and
        a gate over the ``t + 1`` experts. Afterwards exactly those are trainable (when the adapter is active);
        all earlier tasks are frozen.
        """
        name = self._continual_adapter(adapter_name)
        if any(layer.merged for layer in self._layers(name)):
            raise ValueError("Cannot add a task while the adapter is merged; unmerge it first.")
        super().add_task(task_name, adapter_name=name)

    def end_task(
        self,
        task_name: Optional[str] = None,
        adapter_name: Optional[str] = None,
        *,
        batches: Optional[Iterable[Mapping[str, Any]]] = None,
    ) -> EndTaskReport:
        """Finish task ``task_name`` (default: the last task): freeze its parameters. Earlier tasks are frozen
        already, so only the last task can be ended; ending it twice is a no-op.

        The continual contract's ``end_task`` (:class:`~peft_ext.routing.tasks.ContinualTunerMixin`): ``batches``
        is accepted and ignored (AnA freezes the whole task; nothing depends on its inputs), and the report is
        always ``{}`` (AnA has no activate-freeze of experts)."""
        name = self._continual_adapter(adapter_name)
        config = self.peft_config[name]
        last = config.task_names[-1]
        task_name = task_name or last
        self.routing.task_index(name, task_name)  # validates the name
        if task_name != last:
            return {}  # earlier tasks have been frozen since the next task was added
        for layer in self._layers(name):
            layer.end_task(name)
        if task_name not in config.ended_tasks:
            config.ended_tasks.append(task_name)
        return {}

    def delete_task(self, task_name: str, adapter_name: Optional[str] = None) -> None:
        """Delete task ``task_name``; only the last task can go, because every later task uses each earlier task's
        adapter as an expert. The task that becomes last stays frozen."""
        name = self._continual_adapter(adapter_name)
        config = self.peft_config[name]
        self.routing.task_index(name, task_name)
        position = config.task_names.index(task_name)
        dependents = config.task_names[position + 1 :]
        if dependents:
            raise ValueError(
                f"Cannot delete task {task_name!r}: later tasks {dependents} use its adapter as an expert; delete "
                "them first (last task first) or delete the whole adapter."
            )
        if len(config.task_names) == 1:
            raise ValueError(f"Task {task_name!r} is the only task of adapter {name!r}; use delete_adapter instead.")
        if any(layer.merged for layer in self._layers(name)):
            raise ValueError("Cannot delete a task while the adapter is merged; unmerge it first.")
        for layer in self._layers(name):
            layer.remove_last_task(name)
        config.task_names.pop()
        if task_name in config.ended_tasks:
            config.ended_tasks.remove(task_name)
        if config.task_names[-1] not in config.ended_tasks:
            config.ended_tasks.append(config.task_names[-1])
        if self.routing.active_task.get(name) == task_name:
            self.routing.active_task[name] = config.task_names[-1]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._delete_task_selector(adapter_name)
        self._forget_adapter_tasks(adapter_name)

    def task_parameter_count(self, task_name: str, adapter_name: Optional[str] = None) -> int:
        """The documented formula ``P(t)`` for task ``task_name``, summed over this adapter's layers."""
        name = self._continual_adapter(adapter_name)
        config = self.peft_config[name]
        index = self.routing.task_index(name, task_name)
        return sum(
            ana_task_parameter_count(
                layer.in_features,
                layer.out_features,
                config.r,
                index,
                config.noisy_gating,
                summed=layer.ana_settings[name].get("summed", False),
            )
            for layer in self._layers(name)
        )
