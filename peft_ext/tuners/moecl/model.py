"""MoE-CL tuner: expert pools beside the blocks' MLPs, a router per task, activate-freeze and the DDAS selector."""

from __future__ import annotations

import re
import warnings
from typing import Any, Iterable, Mapping, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ...routing.selector import TaskSelectorMixin
from ...routing.tasks import ContinualTunerMixin, EndTaskReport, check_task_name, eval_mode
from ..checkpoint import AdapterCheckpointError, CheckedCheckpointMixin, remove_nested_adapter_name
from ..regularization import RegularizedTunerMixin
from .config import MoECLConfig
from .layer import MERGE_ERROR, MoECLLayer


# Where the paper's experts go for each family: beside the block's MLP, reading the post-attention residual stream
# and adding to the block output.
# * BERT-style encoders split the MLP into `intermediate` and `output`; `output` (BertOutput) receives the residual
#   (`input_tensor`) and does the residual sum + LayerNorm, so wrapping it in residual mode is exact: the experts
#   read the post-attention stream and their output joins the residual sum next to the MLP's.
# * ViT/DeiT (transformers >= 5), CLIP, SigLIP, Llama-style decoders and GPT-2 have one `mlp` module per block
#   (parallel mode): the output addition is exact (it lands in the residual stream next to the MLP's output); the
#   experts read the MLP's input, i.e. the pre-MLP-LayerNorm'ed stream, where the paper feeds the un-normed one.
# Regexes (PEFT full-matches a string) keep pooling heads' MLPs (e.g. SigLIP's `head.mlp`) and attention outputs
# (`attention.output`) out.
_ENCODER_OUTPUT = r"(.*\.)?layer\.\d+\.output"
_BLOCK_MLP = r"(.*\.)?(layers|layer|h)\.\d+\.mlp"
MOECL_TARGET_MODULES: dict[str, object] = {
    "bert": _ENCODER_OUTPUT,
    "roberta": _ENCODER_OUTPUT,
    "xlm-roberta": _ENCODER_OUTPUT,
    "electra": _ENCODER_OUTPUT,
    "distilbert": ["ffn"],
    **{
        model_type: _BLOCK_MLP
        for model_type in (
            "vit",
            "deit",
            "clip",
            "clip_vision_model",
            "clip_text_model",
            "siglip",
            "siglip_vision_model",
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gpt2",
        )
    },
}
# decoder-only families, where the first token (BOS) is the same for every sample
_DECODER_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2"}


class _UnwrapBlocksMixin:
    """``BaseTuner._replace_module`` for tuner layers that wrap whole blocks (``BertOutput``, ``LlamaMLP``).

    Unloading puts every tuner layer's wrapped module back through ``_replace_module(parent, name, wrapped, layer)``,
    whose default then re-binds ``wrapped.weight = wrapped.weight`` (it expects a layer without ``base_layer``): a
    no-op for an ``nn.Linear``, an ``AttributeError`` for a block, which has no ``weight`` of its own. The wrapped
    module is put back as it is instead (PEFT's ShadowPEFT, which wraps decoder blocks, does the same). Sits just
    before ``BaseTuner`` in the bases, so the other mixins' ``_replace_module`` (the regularization cache) still run.
    """

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, BaseTunerLayer) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)


class MoECLModel(
    CheckedCheckpointMixin,
    TaskSelectorMixin,
    ContinualTunerMixin,
    RegularizedTunerMixin,
    _UnwrapBlocksMixin,
    BaseTuner,
):
    """MoE-CL ("Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts Adapters", CVPR 2024).

    Design: one PEFT adapter is a whole continual learner. It holds, per adapted module, one shared
    :class:`~peft_ext.routing.experts.ExpertPool` and one router per task (tasks named inside the adapter, see
    :mod:`peft_ext.routing.tasks`), plus the DDAS task selector on the tuner (``moecl_selector``). A single
    ``save_pretrained`` writes experts, routers, frozen masks, activation counts and selector; the config
    (``task_names``, ``ended_tasks``, ``selector_tasks``) rebuilds the structure on load.

    Task schedule (``requires_grad``): while the last task is open (not ended), its router and every expert not
    frozen by activate-freeze train; all other routers and frozen experts are frozen. After ``end_task`` of the
    last task nothing trains until ``add_task``.

    Merging is refused (``ValueError``): the mixture depends on each sample's features. ``unload()`` gives the base
    model back, every wrapped block in its place.

    Example:
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_ext.MoECLConfig(num_experts=8, r=16), adapter_name="task0")
        >>> ...  # train task0
        >>> model.end_task()  # freeze the 2 most used experts of each layer
        >>> model.fit_task_selector("task0", train_batches)
        >>> model.add_task("task1")  # new router; unfrozen experts keep training
        >>> model(**batch, task_ids="auto")  # DDAS picks the task per sample (or the base model)
    """

    prefix: str = "moecl_"
    tuner_layer_cls = MoECLLayer
    target_module_mapping = MOECL_TARGET_MODULES

    def __init__(self, model, config, adapter_name, *args, **kwargs) -> None:
        self._init_routing()
        super().__init__(model, config, adapter_name, *args, **kwargs)

    # -- injection ------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._register_adapter_tasks(adapter_name)
        self._check_layers_match_config(adapter_name)
        self._init_task_selector(adapter_name)
        self._install_routing_hook()
        self._install_regularization_hook()

    def _check_layers_match_config(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        for layer in self._layers(adapter_name):
            if len(layer.moecl_router[adapter_name]) != len(config.task_names):
                raise ValueError(
                    f"Adapter {adapter_name!r} has {len(config.task_names)} tasks but its layers were built with "
                    f"{len(layer.moecl_router[adapter_name])} routers."
                )

    def _prepare_adapter_config(self, peft_config: MoECLConfig, model_config: dict) -> MoECLConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            if model_type not in MOECL_TARGET_MODULES:
                raise ValueError(
                    f"MoE-CL has no default target modules for model type {model_type!r}; set target_modules to the "
                    "block MLP modules (or nn.Linear layers) to run the experts beside."
                )
            targets = MOECL_TARGET_MODULES[model_type]
            peft_config.target_modules = targets if isinstance(targets, str) else set(targets)
        if model_type in _DECODER_TYPES and peft_config.routing_token == "first":
            warnings.warn(
                f"routing_token='first' on a decoder-only model ({model_type}) routes every sample by its first "
                "token; use routing_token='last' (the paper's CLS role falls to the last token)."
            )
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, MoECLLayer):
            target.update_layer(adapter_name, config)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"Module {current_key!r} is already adapted by another PEFT method.")
        new_module = MoECLLayer(target, adapter_name, config, self.routing)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _layers(self, adapter_name: Optional[str] = None) -> list[MoECLLayer]:
        return [
            m
            for m in self.model.modules()
            if isinstance(m, MoECLLayer) and (adapter_name is None or adapter_name in m.moecl_experts)
        ]

    # -- merging --------------------------------------------------------------------------------------------
    def _check_merge_allowed(self):
        raise ValueError(MERGE_ERROR)

    # -- continual protocol ---------------------------------------------------------------------------------
    def add_task(self, task_name: str, adapter_name: Optional[str] = None) -> None:
        """Add task ``task_name``: a new zero-initialized router in every adapted module, made active.

        If the previous task was not ended yet, it is ended first (activate-freeze of its most used experts, as the
        paper does after every task). Afterwards exactly the new router and the unfrozen experts are trainable.
        """
        name = self._continual_adapter(adapter_name)
        check_task_name(task_name)
        config = self.peft_config[name]
        if task_name in config.task_names:
            raise ValueError(f"Task {task_name!r} already exists in adapter {name!r}.")
        if config.task_names and config.task_names[-1] not in config.ended_tasks:
            self.end_task(config.task_names[-1], adapter_name=name)
        super().add_task(task_name, adapter_name=name)

    def _on_task_added(self, adapter_name: str, task_name: str) -> None:
        for layer in self._layers(adapter_name):
            layer.set_adapter(layer.active_adapters)  # enables the active adapters, then applies the schedule

    def end_task(
        self,
        task_name: Optional[str] = None,
        adapter_name: Optional[str] = None,
        *,
        batches: Optional[Iterable[Mapping[str, Any]]] = None,
        freeze_top_k: Optional[int] = None,
    ) -> EndTaskReport:
        """Finish ``task_name`` (default: the last task): activate-freeze and freeze its router.

        The continual contract's ``end_task`` (:class:`~peft_ext.routing.tasks.ContinualTunerMixin`), plus the
        keyword-only ``freeze_top_k``. In every adapted module the ``freeze_top_k`` (default: the config's) experts
        most often selected by the task are frozen for good. Returns ``{module name: newly frozen expert
        indices}``. Ending a task twice is a no-op (and returns ``{}``).

        The counts are those of the task's training forwards (the paper), unless ``batches`` (dicts of model
        inputs, e.g. the task's training data) are given: then they are taken afresh from those inputs with the
        trained router in eval mode -- the routes the task keeps using from now on, without the noisy, still
        untrained routes of early training. With ``isolate_finished_tasks`` this freezes the experts the task
        really uses, so restricting its router to them changes its outputs as little as possible.
        """
        name = self._continual_adapter(adapter_name)
        config = self.peft_config[name]
        task_name = task_name or config.task_names[-1]
        index = self.routing.task_index(name, task_name)
        if task_name in config.ended_tasks:
            return {}
        k = config.freeze_top_k if freeze_top_k is None else freeze_top_k
        if batches is not None and k > 0:
            self._recount_routes(name, task_name, index, batches)
        frozen: dict[str, list[int]] = {}
        seen_any = False
        for key, module in self.model.named_modules():
            if isinstance(module, MoECLLayer) and name in module.moecl_experts:
                seen_any = seen_any or bool(module.moecl_router[name].counts[index].sum() > 0)
                frozen[key] = module.end_task(name, index, k)
        if k > 0 and not seen_any:
            warnings.warn(f"Task {task_name!r} ended without any training forward being counted; no expert was frozen.")
        config.ended_tasks.append(task_name)
        for layer in self._layers(name):
            layer._freeze_non_trainable_peft_weights(name)
        return frozen

    @torch.no_grad()
    def _recount_routes(self, name: str, task_name: str, index: int, batches: Iterable[Mapping[str, Any]]) -> None:
        """Replace task ``index``'s activation counts by its eval-mode routes on ``batches``."""
        for layer in self._layers(name):
            layer.reset_counts(name, index)
        layers = self._layers(name)
        for layer in layers:
            layer.recounting = True
        try:
            with eval_mode(self.model), self.route(task_name):
                for batch in batches:
                    if not isinstance(batch, Mapping):
                        raise ValueError(f"end_task batches must be dicts of model inputs, got {type(batch).__name__}.")
                    self.run_inputs(batch)
        finally:
            for layer in layers:
                layer.recounting = False

    def frozen_experts(self, adapter_name: Optional[str] = None) -> dict[str, list[int]]:
        """``{module name: indices of frozen experts}`` of ``adapter_name``."""
        name = self._continual_adapter(adapter_name)
        return {
            key: torch.nonzero(m.moecl_experts[name].frozen_mask).flatten().tolist()
            for key, m in self.model.named_modules()
            if isinstance(m, MoECLLayer) and name in m.moecl_experts
        }

    def parameter_report(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Parameter counts of the adapter: ``experts`` (all pools), ``frozen_experts``, ``router_per_task``,
        ``routers`` (all tasks), ``trainable_now`` (requires_grad) and ``total``."""
        name = self._continual_adapter(adapter_name)
        report = {"experts": 0, "frozen_experts": 0, "router_per_task": 0, "routers": 0, "trainable_now": 0}
        for layer in self._layers(name):
            pool, router = layer.moecl_experts[name], layer.moecl_router[name]
            for e in range(pool.num_experts):
                n = sum(p.numel() for p in pool.expert_parameters(e))
                report["experts"] += n
                if bool(pool.frozen_mask[e]):
                    report["frozen_experts"] += n
            per_task = router.w_gate[0].numel() * (2 if self.peft_config[name].noisy_gating else 1)
            report["router_per_task"] += per_task
            report["routers"] += per_task * len(router)
            report["trainable_now"] += sum(
                p.numel() for p in [*pool.parameters(), *router.parameters()] if p.requires_grad
            )
        report["total"] = report["experts"] + report["routers"]
        return report

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._delete_task_selector(adapter_name)
        self._forget_adapter_tasks(adapter_name)

    # -- checkpoint keys --------------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Drop the adapter name after the per-adapter containers, wherever it sits in the key:
        ``...output.moecl_experts.<adapter>.down_weight.3`` -> ``...output.moecl_experts.down_weight.3``."""
        stripped = remove_nested_adapter_name(key, adapter_name, ("moecl_experts", "moecl_router"))
        return stripped if stripped is not None else super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # count on the checkpoint's own keys: experts the model lacks are not remapped
        pattern = re.compile(rf"^(.*)\.moecl_experts\.(?:{re.escape(adapter_name)}\.)?down_weight\.(\d+)$")
        experts: dict[str, set[int]] = {}
        for key in state_dict:
            match = pattern.match(key)
            if match:
                experts.setdefault(match.group(1), set()).add(int(match.group(2)))
        for module, indices in experts.items():
            if len(indices) != config.num_experts:
                raise AdapterCheckpointError(
                    f"Checkpoint has {len(indices)} experts per module (e.g. {module}) but the config sets "
                    f"num_experts={config.num_experts}; use the adapter_config.json saved with the checkpoint."
                )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
