"""MoE-CL layer: a pool of experts beside an arbitrary module, routed per sample by the sample's task router."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...routing.core import WHOLE_MODEL_SCOPE, RoutingState, pool_tokens
from ...routing.experts import ExpertPool, ParameterCacheMixin, share_version_counter
from ...routing.gating import GateOutput, load_balancing_loss, noisy_top_k_gating
from ..regularization import RegularizedLayerMixin


MERGE_ERROR = (
    "MoE-CL cannot be merged: each sample's output is a mixture of experts chosen by a router from that sample's "
    "own features (and its task), so no fixed weight update equals it. Keep the adapter unmerged (or use unload())."
)


def _linear_sizes(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    # transformers' Conv1D stores its weight as (in, out)
    return module.weight.shape[0], module.weight.shape[1]


def infer_feature_sizes(module: nn.Module, attach_mode: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of the expert pool beside ``module``.

    An ``nn.Linear``/``Conv1D`` gives its own sizes. A block (MLP, ``BertOutput``) gives the input size of its first
    linear layer and the output size of its last one; in ``"residual"`` mode both are the residual width (the
    output size of the last linear).
    """
    if isinstance(module, (nn.Linear, Conv1D)):
        d_in, d_out = _linear_sizes(module)
    else:
        linears = [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
        if not linears:
            raise TypeError(
                f"MoE-CL cannot infer the hidden size of {type(module).__name__}: target a block that contains "
                "nn.Linear layers (e.g. a transformer MLP) or an nn.Linear."
            )
        d_in, d_out = _linear_sizes(linears[0])[0], _linear_sizes(linears[-1])[1]
    if attach_mode == "residual":
        return d_out, d_out
    return d_in, d_out


def resolve_attach_mode(module: nn.Module, attach_mode: str) -> str:
    if attach_mode != "auto":
        return attach_mode
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "parallel"
    return "residual" if "input_tensor" in params else "parallel"


class TaskRouters(ParameterCacheMixin, nn.Module):
    """Per-task routers of one adapter in one layer, plus the activation counts behind activate-freeze.

    Parameters: ``w_gate[t]``, ``w_noise[t]`` ``(d, E)`` for task ``t`` (zero init, as in the paper).
    Buffer: ``counts`` ``(T, E)`` long -- how many training samples of task ``t`` selected expert ``e``.

    Every router but the last belongs to a finished task and is frozen (only the last task's router trains): their
    stack is cached (:meth:`stacked`), cleared on ``.to()``, loading and :meth:`add_task`.
    """

    def __init__(self, in_features: int, num_experts: int, num_tasks: int, random_init: bool = False) -> None:
        super().__init__()
        self.in_features, self.num_experts = in_features, num_experts
        self.w_gate = nn.ParameterList()
        self.w_noise = nn.ParameterList()
        self.register_buffer("counts", torch.zeros(0, num_experts, dtype=torch.long))
        for _ in range(num_tasks):
            self.add_task(random_init)

    def __len__(self) -> int:
        return len(self.w_gate)

    def add_task(self, random_init: bool = False) -> None:
        ref = self.counts
        device = self.w_gate[0].device if len(self.w_gate) else ref.device
        dtype = self.w_gate[0].dtype if len(self.w_gate) else torch.float32
        gate = torch.zeros(self.in_features, self.num_experts, device=device, dtype=dtype)
        if random_init:
            gate.normal_(0.0, 1.0)
        self.w_gate.append(nn.Parameter(gate))
        self.w_noise.append(nn.Parameter(torch.zeros_like(gate)))
        self.counts = torch.cat([ref, ref.new_zeros(1, self.num_experts)], dim=0)
        self.param_cache().clear()  # the last router, the only live one, is a new one

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_gate (T, d, E), W_noise (T, d, E))``.

        Without gradients a cached stack of all routers; with them, the cached stack of the frozen routers
        ``0..T-2`` and the last router appended afresh (so that it gets its gradient). The frozen routers are
        checked through one shared version counter, the last one by pointer and version
        (:class:`~peft_ext.routing.experts.ParameterCache`): no per-router Python work per forward.
        """
        cache = self.param_cache()
        frozen, live = cache.groups("params", self._router_params)
        if not torch.is_grad_enabled():
            return cache.get("all", live, lambda: self._stack(len(self)), frozen=frozen)
        if len(self) == 1:
            return self._stack(1)
        w_gate, w_noise = cache.get("frozen", (), lambda: self._stack(len(self) - 1), frozen=frozen)
        return torch.cat([w_gate, self.w_gate[-1].unsqueeze(0)]), torch.cat([w_noise, self.w_noise[-1].unsqueeze(0)])

    def _stack(self, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``num`` routers stacked: ``(W_gate (num, d, E), W_noise (num, d, E))``."""
        return torch.stack(list(self.w_gate)[:num]), torch.stack(list(self.w_noise)[:num])

    def _router_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(frozen, live)``: the tensors whose version sum covers the routers of the finished tasks ``0..T-2``
        (made to share one counter, :func:`~peft_ext.routing.experts.share_version_counter`), and the last router's
        two tensors."""
        gates, noises = list(self.w_gate), list(self.w_noise)
        return share_version_counter(gates[:-1] + noises[:-1]), gates[-1:] + noises[-1:]


class MoECLLayer(nn.Module, BaseTunerLayer, RegularizedLayerMixin):
    """Wraps ``base_layer`` (an MLP block, a ``*Output`` module or an ``nn.Linear``) and adds the routed experts.

    Per adapter: ``moecl_experts[adapter]`` (:class:`~peft_ext.routing.experts.ExpertPool`, with the frozen mask)
    and ``moecl_router[adapter]`` (:class:`TaskRouters`). ``moecl_config[adapter]`` is the adapter's live config
    (task names, ended tasks, hyper-parameters). ``routing`` is the tuner's shared :class:`RoutingState`,
    ``routing_scope`` the routed scope (tower) the layer is in, set by the tuner.
    """

    adapter_layer_names = ("moecl_experts", "moecl_router")
    other_param_names = ("moecl_config",)
    follows_previous_scope = False  # a routed layer decides within its own scope, see routing.core.assign_scopes

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, routing: RoutingState, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.moecl_experts = nn.ModuleDict()
        self.moecl_router = nn.ModuleDict()
        self.moecl_config: dict[str, Any] = {}
        self._allowed_cache: dict[str, tuple] = {}  # adapter -> (key, (T, E) bool), see _allowed_experts
        self._disable_adapters = False
        self.merged_adapters = []
        self.routing = routing
        self.routing_scope = WHOLE_MODEL_SCOPE
        self.recounting = False  # True while MoECLModel recounts a task's routes: count them in eval mode too
        self.attach_mode = resolve_attach_mode(base_layer, config.attach_mode)
        self.in_features, self.out_features = infer_feature_sizes(base_layer, self.attach_mode)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        # a new wrapper must not switch a model in eval mode to training behaviour (noise, dropout, counting)
        self.train(base_layer.training)
        # loading restores frozen masks and ended tasks after injection set requires_grad: re-apply the schedule
        self.register_load_state_dict_post_hook(self._reapply_schedule_after_load)

    def _reapply_schedule_after_load(self, module: nn.Module, incompatible_keys) -> None:
        self._freeze_non_trainable_peft_weights()

    # -- construction -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config) -> None:
        mode = resolve_attach_mode(self.get_base_layer(), config.attach_mode)
        if mode != self.attach_mode:
            raise ValueError(
                f"Adapter {adapter_name!r} uses attach_mode={mode!r} but this module already has {self.attach_mode!r}."
            )
        num_tasks = max(1, len(config.task_names))
        self.moecl_experts[adapter_name] = ExpertPool(
            config.num_experts,
            self.in_features,
            config.r,
            self.out_features,
            dropout=config.expert_dropout,
            init_up_zero=config.init_weights,
        )
        self.moecl_router[adapter_name] = TaskRouters(
            self.in_features, config.num_experts, num_tasks, random_init=not config.init_weights
        )
        self.moecl_config[adapter_name] = config
        self.moecl_experts[adapter_name].train(self.training)
        self.moecl_router[adapter_name].train(self.training)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # The wrapped module may have no `weight` (an MLP block): take device/dtype from its first parameter.
        param = next(self.get_base_layer().parameters(), None)
        if param is None:
            return
        device = device if device is not None else param.device
        dtype = param.dtype if param.dtype.is_floating_point else None
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name not in container:
                continue
            if any(p.device.type == "meta" for p in container[adapter_name].parameters()):
                continue  # low_cpu_mem_usage: weights are materialized when the state dict is loaded
            container[adapter_name] = container[adapter_name].to(device=device, dtype=dtype)

    def add_task(self, adapter_name: str, task_name: str) -> None:
        """Append a zero-initialized router for ``task_name`` (the experts are shared; nothing else grows)."""
        router = self.moecl_router[adapter_name]
        router.add_task()
        router.w_gate[-1].requires_grad_(False)
        router.w_noise[-1].requires_grad_(False)

    def end_task(self, adapter_name: str, task_index: int, freeze_top_k: int) -> list[int]:
        """Activate-freeze: freeze the ``freeze_top_k`` experts most often selected by task ``task_index``'s
        training samples (ties: lower index first). Returns the newly frozen experts."""
        counts = self.moecl_router[adapter_name].counts[task_index]
        if freeze_top_k <= 0 or int(counts.sum()) == 0:
            return []
        order = torch.sort(counts, descending=True, stable=True).indices[:freeze_top_k]
        return self.moecl_experts[adapter_name].freeze(order, task_index)

    # -- trainability ---------------------------------------------------------------------------------------
    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """PEFT calls this after anything that switched adapter weights to trainable (``set_adapter``,
        ``set_requires_grad``, injection): switch off what the task schedule keeps frozen -- experts frozen by
        activate-freeze, and every router except the last task's while that task is not ended."""
        if adapter_names is None:
            adapter_names = list(self.moecl_experts.keys())
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for name in adapter_names:
            if name not in self.moecl_experts:
                continue
            config = self.moecl_config[name]
            last = len(self.moecl_router[name]) - 1
            # no task name yet: the tuner is about to register the adapter's first task, which is open
            last_open = not config.task_names or config.task_names[-1] not in config.ended_tasks
            self.moecl_experts[name].restrict_requires_grad(trainable=last_open)
            router = self.moecl_router[name]
            for t in range(len(router)):
                if t != last or not last_open:
                    router.w_gate[t].requires_grad_(False)
                    router.w_noise[t].requires_grad_(False)
                elif not config.noisy_gating:
                    router.w_noise[t].requires_grad_(False)

    # -- merging ----------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        return  # nothing can be merged

    # -- forward ------------------------------------------------------------------------------------------------
    def routing_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The tensor the experts read (and routing decides on): the residual stream in residual mode, else the
        block's input."""
        if self.attach_mode == "residual":
            if len(args) > 1:
                return args[1]
            if "input_tensor" in kwargs:
                return kwargs["input_tensor"]
            raise ValueError(f"{type(self.get_base_layer()).__name__} was called without `input_tensor`.")
        if args:
            return args[0]
        for key in ("hidden_states", "input", "x"):
            if key in kwargs:
                return kwargs[key]
        for value in kwargs.values():
            if isinstance(value, torch.Tensor):
                return value
        raise ValueError(f"Cannot find the input tensor of {type(self.get_base_layer()).__name__}.")

    def _allowed_experts(self, name: str, config, num_tasks: int) -> Optional[torch.Tensor]:
        """``(T, E)`` bool: experts each task's router may use (only with ``isolate_finished_tasks``).

        An ended task may use the experts frozen by its end; an open task may use all. Cached until a task ends or
        an expert is frozen (or loaded: ``frozen_at``'s version moves).
        """
        if not config.isolate_finished_tasks or not config.ended_tasks:
            return None
        frozen_at = self.moecl_experts[name].frozen_at
        key = (tuple(config.ended_tasks), num_tasks, frozen_at._version, frozen_at.data_ptr(), frozen_at.device)
        cached = self._allowed_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        ended = torch.tensor(
            [t in config.ended_tasks for t in config.task_names[:num_tasks]], dtype=torch.bool, device=frozen_at.device
        )
        task_ids = torch.arange(num_tasks, device=frozen_at.device).unsqueeze(1)
        frozen_by_end = (frozen_at.unsqueeze(0) >= 0) & (frozen_at.unsqueeze(0) <= task_ids)
        allowed = frozen_by_end | ~ended.unsqueeze(1)
        self._allowed_cache[name] = (key, allowed)
        return allowed

    def route(self, name: str, x: torch.Tensor, tasks: torch.Tensor, uniform: Optional[int] = None) -> GateOutput:
        """Top-k routing of adapter ``name`` for input ``x`` ``(B, ..., d)`` and per-sample task indices ``tasks``
        ``(B,)`` (``-1``: base model, gates all zero). ``uniform``: the one task index of the whole batch when the
        caller knows it (one router, no per-sample mask). Returns ``GateOutput`` with ``top_gates`` ``(B, k)``."""
        config = self.moecl_config[name]
        router = self.moecl_router[name]
        pooled = pool_tokens(x, config.routing_token, self.routing.attention_mask(self.routing_scope))  # (B, d)
        allowed = self._allowed_experts(name, config, len(router))
        if uniform is not None or len(router) == 1:
            task = max(uniform, 0) if uniform is not None else 0
            w_gate, w_noise, router_index = router.w_gate[task], router.w_noise[task], None
            mask = None if allowed is None else allowed[task]
        else:  # a mixed batch: each sample its own task's router
            router_index = tasks.clamp_min(0)
            w_gate, w_noise = router.stacked()
            mask = None if allowed is None else allowed.index_select(0, router_index)
        out = noisy_top_k_gating(
            pooled,
            w_gate,
            w_noise if config.noisy_gating else None,
            config.top_k,
            training=self.training,
            noise_epsilon=config.noise_epsilon,
            expert_mask=mask,
            router_index=router_index,
        )
        if uniform is None:  # the batch may hold base-model samples: no expert output for them
            out = out._replace(top_gates=out.top_gates * (tasks >= 0).unsqueeze(1).to(out.top_gates.dtype))
        return out

    def _mixture(self, name: str, x: torch.Tensor, tasks: torch.Tensor, uniform: Optional[int] = None) -> torch.Tensor:
        config = self.moecl_config[name]
        pool = self.moecl_experts[name]
        x = self._cast_input_dtype(x, pool.down_weight[0].dtype)
        gate = self.route(name, x, tasks, uniform)
        if self.training:
            self._record_training_stats(name, config, gate.gates, tasks)
        elif self.recounting:
            self._count_selected(name, config, gate.gates, tasks)
        return pool(x, gate.top_gates, gate.top_indices, dispatch=config.dispatch, scale=config.scaling)

    def _open_task_rows(self, config, tasks: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: samples routed to a task that is not ended (only those count and regularize)."""
        valid = tasks >= 0
        ended = {config.task_names.index(t) for t in config.ended_tasks if t in config.task_names}
        if ended:
            valid = valid & ~torch.isin(tasks, torch.tensor(sorted(ended), device=tasks.device))
        return valid

    def _record_training_stats(self, name: str, config, gates: torch.Tensor, tasks: torch.Tensor) -> None:
        valid = self._open_task_rows(config, tasks)
        if config.balance_loss_weight > 0 and bool(valid.any()):
            self.record_regularization(config.balance_loss_weight * load_balancing_loss(gates[valid]))
        self._count_selected(name, config, gates, tasks, valid)

    @torch.no_grad()
    def _count_selected(
        self, name: str, config, gates: torch.Tensor, tasks: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> None:
        """Add each open-task sample's selected experts to its task's activation counts."""
        if valid is None:
            valid = self._open_task_rows(config, tasks)
        counts = self.moecl_router[name].counts
        selected = (gates.detach() > 0).long() * valid.unsqueeze(1).long()
        counts.index_add_(0, tasks.clamp_min(0), selected)

    def reset_counts(self, adapter_name: str, task_index: int) -> None:
        self.moecl_router[adapter_name].counts[task_index].zero_()

    def regularization_enabled(self) -> bool:
        return any(self.moecl_config[a].balance_loss_weight > 0 for a in self.active_adapters if a in self.moecl_config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapters = [a for a in self.active_adapters if a in self.moecl_experts]
        if self.disable_adapters or not adapters or self.merged:
            return self.base_layer(*args, **kwargs)

        x = self.routing_input(args, kwargs)
        delta = None
        for name in adapters:
            decision = self.routing.decide(name, self.routing_scope, x)
            if decision.uniform == -1:
                continue  # the whole batch asked for the base model: skip the experts entirely
            y = self._mixture(name, x, decision.tasks, decision.uniform)
            delta = y if delta is None else delta + y
        if delta is None:
            return self.base_layer(*args, **kwargs)

        if self.attach_mode == "residual":
            residual = x + delta.to(x.dtype)
            if len(args) > 1:
                args = (args[0], residual, *args[2:])
            else:
                kwargs = {**kwargs, "input_tensor": residual}
            return self.base_layer(*args, **kwargs)
        result = self.base_layer(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            return result + delta.to(result.dtype)
        if isinstance(result, tuple) and result and isinstance(result[0], torch.Tensor):
            return (result[0] + delta.to(result[0].dtype), *result[1:])
        raise TypeError(f"MoE-CL cannot add to the output of type {type(result).__name__} of the adapted module.")

    def __repr__(self) -> str:
        return "moecl." + super().__repr__()
