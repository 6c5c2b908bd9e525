"""AnA layers: per-task linear adapters, adapter-in-adapter experts and a per-task noisy MoE gate.

A layer targeted through ``summed_target_modules`` keeps only the per-task adapters and sums them (no in-adapters,
no gate): PathWeave's adapters on BLIP-2's LLM projection. Its checkpoint keys are the same minus the in-adapters
and gates (``language_projection.ana_tasks.1.up.weight``).

State layout (PEFT's shape): ``ana_tasks[adapter_name]`` is an ``nn.ModuleList`` of :class:`AnATask`, one per task in
``config.task_names`` order, so PEFT's device/dtype/delete/save machinery handles every task at once. Checkpoint keys
carry task *indices*, never task names (``...query.ana_tasks.2.in_weight``), so renaming tasks or adapters cannot
collide with PEFT's adapter-name stripping. A task's ``t`` in-adapters are two stacked tensors, not ``t`` modules:
at 100 tasks the modules would number ~5,000 per layer (quadratic in T), and every ``model.train()`` -- which
``transformers.Trainer`` calls each step -- walks them all.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from operator import attrgetter
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...routing.core import WHOLE_MODEL_SCOPE
from ...routing.experts import ParameterCacheMixin, share_version_counter
from ...routing.gating import GateOutput, noisy_top_k_gating
from .config import AnAConfig


# Rows per block of the sparse gate's batched-matmul down-projection (_block_down): each selected (token, path) pair
# is a row; rows are grouped by path and padded to a multiple of this, so that one batched matmul over blocks
# evaluates every path on its own tokens.
SPARSE_BLOCK_ROWS = 16
# Tasks whose stacked paths a layer keeps cached (mixed batches use several tasks); least recently used dropped.
STACK_CACHE_TASKS = 4
_REQUIRES_GRAD = attrgetter("requires_grad")
_GROUPED_MM = getattr(F, "grouped_mm", None)


def ana_task_parameter_count(
    in_features: int, out_features: int, r: int, task_index: int, noisy_gating: bool, summed: bool = False
) -> int:
    """Trainable parameters of task ``task_index`` (0-based) in one adapted ``in_features -> out_features`` layer.

    ``r*(d_in + d_out) + r + d_out + 1`` (own adapter with biases and scale) ``+ t*(r*r + r)`` (in-adapters)
    ``+ [t > 0] * G * d_in * (t + 1)`` (gate; ``G = 2`` with noisy gating). A ``summed`` layer has the first
    term only.
    """
    t = task_index
    own = r * (in_features + out_features) + r + out_features + 1
    if summed:
        return own
    in_adapters = t * (r * r + r)
    gate = (2 if noisy_gating else 1) * in_features * (t + 1) if t > 0 else 0
    return own + in_adapters + gate


_LEGACY_IN_ADAPTER = re.compile(r"^(?P<task>.*\.)in_adapters\.(?P<index>\d+)\.(?P<name>weight|bias)$")


def stack_legacy_in_adapters(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Turn, in place, the in-adapter tensors of checkpoints written before they were stacked into stacked keys:
    ``<task>.in_adapters.<i>.weight`` ``(r, r)`` and ``.bias`` ``(r,)``, one ``nn.Linear`` each, become
    ``<task>.in_weight`` ``(t, r, r)`` and ``<task>.in_bias`` ``(t, r)`` in index order; only keys starting with
    ``prefix``. Returns ``state_dict``."""
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for key in state_dict:
        match = _LEGACY_IN_ADAPTER.match(key) if key.startswith(prefix) else None
        if match:
            groups.setdefault((match["task"], match["name"]), {})[int(match["index"])] = key
    for (task, name), keys in groups.items():
        if sorted(keys) != list(range(len(keys))):
            continue  # not a whole set of in-adapters: left for the completeness check to name
        state_dict[f"{task}in_{name}"] = torch.stack([state_dict.pop(keys[i]) for i in range(len(keys))])
    return state_dict


class AnATask(nn.Module):
    """State of one task in one adapted layer.

    Attributes:
        down (`nn.Linear`): ``d_in -> r`` with bias. up (`nn.Linear`): ``r -> d_out`` with bias.
        scale (`nn.Parameter`): shape ``(1,)``, the learnable scalar ``s_t``.
        in_weight, in_bias (`nn.Parameter` or None): ``(t, r, r)`` and ``(t, r)``, the ``t`` in-adapters stacked:
            ``F_i^t(h) = h @ in_weight[i]^T + in_bias[i]`` (:meth:`in_adapter`), the linear ``r -> r`` applied to
            earlier task ``i``'s features (None for task 0 and in a summed layer).
        gate, gate_noise (`nn.Parameter` or None): ``(d_in, t + 1)`` gate and noise weights (None for task 0 and
            in a summed layer; ``gate_noise`` also None without noisy gating).
    """

    def __init__(
        self, index: int, in_features: int, out_features: int, r: int, noisy_gating: bool, summed: bool = False
    ) -> None:
        super().__init__()
        self.index = index
        self.down = nn.Linear(in_features, r)
        self.up = nn.Linear(r, out_features)
        self.scale = nn.Parameter(torch.ones(1))
        if index > 0 and not summed:
            self.in_weight = nn.Parameter(torch.empty(index, r, r))
            self.in_bias = nn.Parameter(torch.zeros(index, r))
            self.gate = nn.Parameter(torch.zeros(in_features, index + 1))
            self.gate_noise = nn.Parameter(torch.zeros(in_features, index + 1)) if noisy_gating else None
        else:
            for name in ("in_weight", "in_bias", "gate", "gate_noise"):
                self.register_parameter(name, None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if f"{prefix}in_adapters.0.weight" in state_dict:  # a state dict of the earlier layout, loaded by torch
            stack_legacy_in_adapters(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_in_adapters(self) -> int:
        return 0 if self.in_weight is None else self.in_weight.shape[0]

    def in_adapter(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """``F_i^t(h)``: in-adapter ``i`` (of earlier task ``i``) on features ``h`` ``(..., r)`` -> ``(..., r)``."""
        return F.linear(h, self.in_weight[i], self.in_bias[i])

    @torch.no_grad()
    def reset(self, init_weights: bool, in_adapter_init: str, scale_init: float) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        self.scale.fill_(scale_init)
        for i in range(self.num_in_adapters):
            weight, bias = self.in_weight[i], self.in_bias[i]
            if in_adapter_init == "identity":
                nn.init.eye_(weight)
                bias.zero_()
            elif in_adapter_init == "zero":
                weight.zero_()
                bias.zero_()
            else:  # "linear": each in-adapter as nn.Linear(r, r) initializes itself, as in the reference
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                bound = 1 / math.sqrt(weight.shape[1])
                nn.init.uniform_(bias, -bound, bound)
        if init_weights:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            if self.gate is not None:
                nn.init.zeros_(self.gate)
            if self.gate_noise is not None:
                nn.init.zeros_(self.gate_noise)
        else:
            # random and clearly non-identity (PEFT's tests need adapters that change the outputs)
            nn.init.normal_(self.down.bias, std=0.1)
            nn.init.normal_(self.up.weight, std=0.3)
            nn.init.normal_(self.up.bias, std=0.1)
            if self.gate is not None:
                nn.init.normal_(self.gate, std=0.3)
            if self.gate_noise is not None:
                nn.init.normal_(self.gate_noise, std=0.1)


class AnALayer(BaseTunerLayer):
    """Tuner-layer mixin holding the AnA state of every adapter on one base layer."""

    adapter_layer_names = ("ana_tasks",)
    other_param_names = ("ana_r", "ana_settings", "ana_num_frozen")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.ana_tasks = nn.ModuleDict({})
        self.ana_r: dict[str, int] = {}
        self.ana_settings: dict[str, dict[str, Any]] = {}
        # number of leading tasks that are frozen (every task but the last; all of them after end_task)
        self.ana_num_frozen: dict[str, int] = {}
        self.routing = None  # the tuner's RoutingState (plain reference, set by AnAModel)
        self.routing_scope = WHOLE_MODEL_SCOPE  # the routed scope (tower) the layer is in, set by AnAModel
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = (
                base.weight.ds_shape if hasattr(base.weight, "ds_shape") else base.weight.shape
            )
        else:
            raise TypeError(f"AnA only adapts torch.nn.Linear and transformers' Conv1D, got {type(base).__name__}.")

    # -- construction -----------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: AnAConfig, summed: bool = False, **kwargs) -> None:
        """Create the adapter ``adapter_name`` with one :class:`AnATask` per entry of ``config.task_names``;
        ``summed``: the layer is one of ``config.summed_target_modules`` (plain adapters, summed over tasks)."""
        r = config.r
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}.")
        self.ana_r[adapter_name] = r
        self.ana_settings[adapter_name] = {
            "in_adapter_init": config.in_adapter_init,
            "scale_init": config.scale_init,
            "init_weights": config.init_weights,
            "noisy_gating": config.noisy_gating,
            "top_k": config.top_k,
            "gate_top_k": getattr(config, "gate_top_k", None),
            "summed": summed,
        }
        num_tasks = max(1, len(config.task_names))
        tasks = nn.ModuleList()
        for index in range(num_tasks):
            tasks.append(self._new_task(adapter_name, index))
        if config.init_weights and num_tasks > 1 and not summed:
            # (a summed layer has no in-adapters to feed: its zero-init tasks already leave the model unchanged)
            self._init_placeholder_tasks(tasks)
        self.ana_tasks[adapter_name] = tasks
        last_ended = bool(config.task_names) and config.task_names[-1] in config.ended_tasks
        self.ana_num_frozen[adapter_name] = num_tasks if last_ended else num_tasks - 1
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.param_cache().clear()  # an adapter of the same name may have been deleted: its lists are stale
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @staticmethod
    @torch.no_grad()
    def _init_placeholder_tasks(tasks: nn.ModuleList) -> None:
        """Init of a config that lists several tasks at once (``init_weights=True``; loading overwrites it).

        The earlier, frozen tasks get a random up-projection (zero bias) so that they are live experts, and every
        in-adapter starts at zero: each expert ``A_i^t`` then outputs ``s_i * up_i.bias = 0`` and the last task's
        own ``up`` is zero, so the model is still unchanged at start while every trainable tensor of the last task
        (its in-adapters included) receives a gradient.
        """
        for task in list(tasks)[:-1]:
            nn.init.kaiming_uniform_(task.up.weight, a=math.sqrt(5))
        for task in tasks:
            if task.in_weight is not None:
                task.in_weight.zero_()
                task.in_bias.zero_()

    def _new_task(self, adapter_name: str, index: int) -> AnATask:
        settings = self.ana_settings[adapter_name]
        task = AnATask(
            index,
            self.in_features,
            self.out_features,
            self.ana_r[adapter_name],
            settings["noisy_gating"],
            summed=settings.get("summed", False),
        )
        task.reset(settings["init_weights"], settings["in_adapter_init"], settings["scale_init"])
        return task

    @property
    def summed_only(self) -> bool:
        """True when every adapter of this layer is a summed one (``summed_target_modules``)."""
        return bool(self.ana_settings) and all(s.get("summed", False) for s in self.ana_settings.values())

    @property
    def follows_previous_scope(self) -> bool:
        """A summed-only layer outside every tower (PathWeave's LLM projection) reads the decision of the tower
        before it, see :func:`~peft_ext.routing.core.assign_scopes`."""
        return self.summed_only

    def add_task(self, adapter_name: str, task_name: str) -> None:
        """Append a task: its adapter, one in-adapter per earlier task and its gate (a summed layer: the adapter
        only); freeze all earlier tasks."""
        tasks = self.ana_tasks[adapter_name]
        reference = tasks[0].down.weight
        task = self._new_task(adapter_name, len(tasks))
        if reference.device.type != "meta":
            task.to(device=reference.device, dtype=reference.dtype)
        tasks.append(task)
        self.ana_num_frozen[adapter_name] = len(tasks) - 1
        self.param_cache().clear()  # the frozen / live split of the cached paths moved
        trainable = adapter_name in self.active_adapters and not self.disable_adapters
        task.requires_grad_(trainable)
        self._freeze_non_trainable_peft_weights([adapter_name])

    def end_task(self, adapter_name: str) -> None:
        """Freeze the last task too (no task of this adapter is trainable afterwards)."""
        self.ana_num_frozen[adapter_name] = len(self.ana_tasks[adapter_name])
        self.param_cache().clear()  # the frozen / live split of the cached paths moved
        self._freeze_non_trainable_peft_weights([adapter_name])

    def remove_last_task(self, adapter_name: str) -> None:
        tasks = self.ana_tasks[adapter_name]
        if len(tasks) <= 1:
            raise ValueError("Cannot remove the only task of an adapter; delete the adapter instead.")
        del tasks[len(tasks) - 1]
        # the task that becomes last had been frozen when the removed one was added: it stays frozen
        self.ana_num_frozen[adapter_name] = len(tasks)
        self.param_cache().clear()

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """Keep finished tasks frozen whatever PEFT's set_adapter / set_requires_grad just enabled."""
        super()._freeze_non_trainable_peft_weights(adapter_names)
        if adapter_names is None:
            adapter_names = list(self.ana_tasks.keys())
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for name in adapter_names:
            if name not in self.ana_tasks:
                continue
            for task in list(self.ana_tasks[name])[: self.ana_num_frozen.get(name, 0)]:
                task.requires_grad_(False)

    # -- math ---------------------------------------------------------------------------------------------------
    def _gate(self, adapter_name: str, task_index: int, x: torch.Tensor, k: int) -> GateOutput:
        """Top-``k`` noisy gate of task ``t`` (``t >= 1``) over its ``t + 1`` paths for tokens ``x`` ``(N, d_in)``."""
        task = self.ana_tasks[adapter_name][task_index]
        return noisy_top_k_gating(x, task.gate, task.gate_noise, k, training=self.training)

    def task_gates(self, adapter_name: str, task_index: int, x: torch.Tensor) -> torch.Tensor:
        """Gate values ``(N, t + 1)`` (float32) of task ``t`` for tokens ``x`` ``(N, d_in)``: all ones for task 0 and
        in a summed layer (no gate: every path counts fully)."""
        task = self.ana_tasks[adapter_name][task_index]
        if task.gate is None:
            return x.new_ones(x.shape[0], task_index + 1, dtype=torch.float32)
        settings = self.ana_settings[adapter_name]
        top_k = settings["top_k"] if settings.get("gate_top_k") is None else settings["gate_top_k"]
        num_experts = task_index + 1
        k = num_experts if top_k is None else min(top_k, num_experts)
        return self._gate(adapter_name, task_index, x, k).gates

    @staticmethod
    def _stack_paths(experts: list[AnATask]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(D (E, r, d_in), a (E, r), U (E, r + 1, d_out))`` of experts' own projections, ``U_e`` being
        ``s_e * [up_e.weight^T; up_e.bias]`` (the scale and the up bias folded into one matrix per path)."""
        down = torch.stack([e.down.weight for e in experts])
        down_b = torch.stack([e.down.bias for e in experts])
        up = torch.stack([torch.cat([e.up.weight.t(), e.up.bias.unsqueeze(0)]) for e in experts])
        scale = torch.cat([e.scale for e in experts])
        return down, down_b, up * scale.view(-1, 1, 1).to(up.dtype)

    @staticmethod
    def _compose_paths(
        stack: tuple[torch.Tensor, torch.Tensor, torch.Tensor], task: AnATask
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fold ``task``'s in-adapters into the earlier paths' down-projections: ``F_e^t(down_e(x)) = (W_F D_e) x +
        (W_F a_e + b_F)``. Returns ``(W (E*r, d_in), b (E*r,), U (E, r + 1, d_out))``."""
        down, down_b, up = stack
        num_paths, r, d_in = down.shape
        t = task.num_in_adapters
        if t:
            w_in, b_in = task.in_weight, task.in_bias  # (t, r, r): out x in, (t, r)
            down = torch.cat([torch.bmm(w_in, down[:t]), down[t:]])
            composed_b = torch.baddbmm(b_in.unsqueeze(-1), w_in, down_b[:t].unsqueeze(-1)).squeeze(-1)
            down_b = torch.cat([composed_b, down_b[t:]])
        return down.reshape(num_paths * r, d_in), down_b.reshape(num_paths * r), up

    def _task_paths(self, adapter_name: str, task_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Task ``t``'s ``E = t + 1`` paths as stacked tensors ``(W (E*r, d_in), b (E*r,), U (E, r + 1, d_out))``:
        path ``e`` is ``x -> [g_e * (W_e x + b_e), g_e] @ U_e`` for gate ``g_e``.

        Built from the per-task parameters, cached in the layer's
        :class:`~peft_ext.routing.experts.ParameterCache`. The first ``ana_num_frozen`` tasks are frozen by the
        schedule: their tensors share one version counter (:meth:`_frozen_probe`), read once per forward; the open
        task's (its adapter, its in-adapters) are checked by pointer and version sum. Without gradients, or with
        nothing live requiring one (a frozen task), the whole result is cached. While the open task trains, only the
        frozen tasks' stack is cached; the open task's tensors are stacked and composed afresh each forward, so they
        get their gradients (and never come from a stale copy) and the frozen ones none.
        """
        num_frozen = min(self.ana_num_frozen.get(adapter_name, 0), task_index + 1)
        cache = self.param_cache()
        # the parameter lists, collected once per task structure (len and num_frozen move with add/end/remove task)
        structure = (adapter_name, task_index, len(self.ana_tasks[adapter_name]), num_frozen)
        experts, live = cache.groups(structure, lambda: self._path_params(adapter_name, task_index, num_frozen))
        frozen = self._frozen_probe(adapter_name)
        # (live is empty for a frozen task; nothing live trains e.g. while another adapter is active)
        if not torch.is_grad_enabled() or not any(map(_REQUIRES_GRAD, live)):
            return cache.get(
                structure,
                live,
                lambda: self._compose_paths(self._stack_paths(experts), experts[-1]),
                frozen=frozen,
            )
        parts = []
        if num_frozen:
            parts.append(
                cache.get((*structure, "frozen"), (), lambda: self._stack_paths(experts[:num_frozen]), frozen=frozen)
            )
        parts.append(self._stack_paths(experts[num_frozen:]))
        stack = parts[0] if len(parts) == 1 else tuple(torch.cat(pair) for pair in zip(*parts))
        return self._compose_paths(stack, experts[-1])

    def _path_params(
        self, adapter_name: str, task_index: int, num_frozen: int
    ) -> tuple[list[AnATask], list[nn.Parameter]]:
        """``(tasks 0..t, live tensors)`` behind task ``t``'s paths: the own projections of tasks ``>= num_frozen``,
        and ``t``'s in-adapters unless ``t`` itself is frozen (the frozen ones: :meth:`_frozen_probe`)."""
        experts = list(self.ana_tasks[adapter_name])[: task_index + 1]
        live = []
        for task in experts[num_frozen:]:
            live.extend(_own_tensors(task))
        if task_index >= num_frozen:
            live.extend(_in_adapter_tensors(experts[-1]))
        return experts, live

    def _frozen_probe(self, adapter_name: str) -> list[torch.Tensor]:
        """The tensors whose version sum covers every frozen tensor of ``adapter_name`` (the projections, scales and
        in-adapters of its first ``ana_num_frozen`` tasks), which
        :func:`~peft_ext.routing.experts.share_version_counter` turns into views of one buffer once per task
        structure: one version read per forward instead of five to seven per frozen task (at 30 tasks, 150 reads per
        layer cost 3-7 % of a 64-token forward)."""
        tasks = self.ana_tasks[adapter_name]
        num_frozen = self.ana_num_frozen.get(adapter_name, 0)

        def collect() -> list[torch.Tensor]:
            frozen = []
            for task in list(tasks)[:num_frozen]:
                frozen.extend(_own_tensors(task) + _in_adapter_tensors(task))
            return share_version_counter(frozen)

        return self.param_cache().groups((adapter_name, "frozen", len(tasks), num_frozen), collect)

    def task_output(self, adapter_name: str, task_index: int, x: torch.Tensor) -> torch.Tensor:
        """Adapter output of task ``t`` for tokens ``x`` ``(N, d_in)`` -> ``(N, d_out)`` (dtype of the adapter).

        ``sum_e g_e(x) * s_e * up_e(h_e)`` with ``h_e = F_e^t(down_e(x))`` for ``e < t`` and ``h_t = down_t(x)``,
        as one computation over the ``E = t + 1`` paths (no loop over tasks): the in-adapters are folded into the
        stacked down-projections ``(E*r, d_in)`` (one matmul for all paths), and the gate-weighted features times
        the stacked, scale-folded up-projections (with their biases) ``(E*(r + 1), d_out)`` are a second matmul --
        the cost of a LoRA of rank ``E*r`` plus the gate. With ``gate_top_k = k < E`` only the ``k`` selected paths
        of each token are computed (:meth:`_sparse_paths`). A summed layer: ``sum_{e<=t} s_e * up_e(down_e(x))``
        (every gate 1, no in-adapters), the same two matmuls.
        """
        tasks = self.ana_tasks[adapter_name]
        task = tasks[task_index]
        if task_index == 0:
            return task.scale * task.up(task.down(x))
        num_paths = task_index + 1
        settings = self.ana_settings[adapter_name]
        gate_top_k = settings.get("gate_top_k")
        w_down, b_down, up = self._task_paths(adapter_name, task_index)
        if settings.get("summed", False):
            h = F.linear(x, w_down, b_down).view(x.shape[0], num_paths, -1)  # (N, E, r)
            h = torch.cat([h, h.new_ones(*h.shape[:2], 1)], dim=-1)  # (N, E, r + 1): the 1 carries the up bias
            return h.flatten(1) @ up.flatten(0, 1)
        if gate_top_k is not None and gate_top_k < num_paths:
            gate = self._gate(adapter_name, task_index, x, gate_top_k)
            return self._sparse_paths(x, w_down, b_down, up, gate.top_gates.to(x.dtype), gate.top_indices)
        top_k = settings["top_k"]
        k = num_paths if top_k is None else min(top_k, num_paths)
        gates = self._gate(adapter_name, task_index, x, k).gates.to(x.dtype).unsqueeze(-1)  # (N, E, 1)
        h = F.linear(x, w_down, b_down).view(x.shape[0], num_paths, -1)  # (N, E, r)
        h = torch.cat([h * gates, gates], dim=-1)  # (N, E, r + 1): gated features and the gate (up bias)
        return h.flatten(1) @ up.flatten(0, 1)

    @staticmethod
    def _sparse_paths(
        x: torch.Tensor,
        w_down: torch.Tensor,
        b_down: torch.Tensor,
        up: torch.Tensor,
        top_gates: torch.Tensor,
        top_indices: torch.Tensor,
    ) -> torch.Tensor:
        """``sum_j top_gates[n, j] * path_{top_indices[n, j]}(x_n)`` for tokens ``x`` ``(N, d_in)`` -> ``(N, d_out)``.

        Each selected (token, path) pair is a row. Down-projection: the rows, sorted by path, each path's weights
        applied to its own rows -- by a grouped GEMM where ``grouped_mm`` runs (:func:`_grouped_mm_fits`: the CPU),
        elsewhere by batched matmuls over padded blocks (:func:`_block_down`; CUDA's grouped GEMM takes bf16 only).
        Up-projection, gates and the sum over a token's ``k`` paths: one ``embedding_bag`` whose table is the stacked
        ``U`` rows ``(E*(r + 1), d_out)``, token ``n``'s bag the ``k*(r + 1)`` rows of its paths, weighted by
        ``g * [h + b, 1]``. Cost: ``N*k`` rank-``r`` rows, whatever the number of paths.
        """
        num_tokens, k = top_indices.shape
        num_paths, r1, d_out = up.shape
        pair_path = top_indices.reshape(-1)
        order = torch.argsort(pair_path, stable=True)
        counts = torch.bincount(pair_path, minlength=num_paths)
        row_token = order // k
        down = _grouped_down if _grouped_mm_fits(x, r1 - 1) else _block_down
        h = down(x, w_down.view(num_paths, r1 - 1, -1), counts, row_token)  # (N*k, r), sorted by path
        # back to pair order, plus each path's down bias, with the 1 that carries its up bias row, gated
        features = torch.empty_like(h).index_copy_(0, order, h).view(num_tokens, k, r1 - 1)
        features = F.pad(features + b_down.view(num_paths, -1)[top_indices], (0, 1), value=1.0)
        features = features * top_gates.unsqueeze(-1)
        rows = top_indices.unsqueeze(-1) * r1 + torch.arange(r1, device=x.device)  # (N, k, r + 1) rows of U
        return F.embedding_bag(
            rows.view(num_tokens, k * r1),
            up.view(-1, d_out),
            per_sample_weights=features.view(num_tokens, k * r1).to(up.dtype),
            mode="sum",
        )

    def adapter_output(
        self, adapter_name: str, x: torch.Tensor, sample_tasks: torch.Tensor, uniform: Optional[int] = None
    ) -> Optional[torch.Tensor]:
        """Output of adapter ``adapter_name`` for ``x`` ``(batch, ..., d_in)`` with per-sample task indices
        ``sample_tasks`` ``(batch,)`` (``-1``: no adapter output for that sample). None if no sample uses a task.

        ``uniform``: the one task index of the whole batch, when the caller knows it (skips reading
        ``sample_tasks`` on the host)."""
        num_tasks = len(self.ana_tasks[adapter_name])
        lead_shape = x.shape[:-1]
        if uniform is not None:
            first = uniform
        else:
            first = int(sample_tasks[0]) if sample_tasks.numel() else -1
        if uniform is not None or (sample_tasks.numel() and bool((sample_tasks == first).all())):
            if first < 0:
                return None
            if first >= num_tasks:
                raise ValueError(f"Task index {first} out of range: adapter {adapter_name!r} has {num_tasks} tasks.")
            out = self.task_output(adapter_name, first, x.reshape(-1, x.shape[-1]))
            return out.view(*lead_shape, self.out_features)
        # mixed batch: each sample goes through its own task's adapter
        out = x.new_zeros(*lead_shape, self.out_features)
        for task_index in torch.unique(sample_tasks).tolist():
            if task_index < 0:
                continue
            if task_index >= num_tasks:
                raise ValueError(
                    f"Task index {task_index} out of range: adapter {adapter_name!r} has {num_tasks} tasks."
                )
            rows = (sample_tasks == task_index).nonzero(as_tuple=True)[0]
            x_rows = x.index_select(0, rows)
            y = self.task_output(adapter_name, task_index, x_rows.reshape(-1, x.shape[-1]))
            # index_put needs one dtype, and under autocast a task's output has the autocast dtype (task 0's is
            # float32: its float32 scale promotes it) while `out` has the adapter's (float32 then: the cast is exact,
            # each sample keeps its task's own output).
            out = out.index_put((rows,), y.view(*x_rows.shape[:-1], self.out_features).to(out.dtype))
        return out

    def _sample_tasks(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, Optional[int]]:
        """``(task index per sample (batch,), the batch's one task index if known)``, see
        :class:`~peft_ext.routing.core.RoutingDecision`."""
        routing = self.routing
        if routing is None or adapter_name not in routing.task_names:
            # injected without an AnAModel (inject_adapter_in_model): use the last task
            last = len(self.ana_tasks[adapter_name]) - 1
            return torch.full((x.shape[0],), last, dtype=torch.long, device=x.device), last
        decision = routing.decide(adapter_name, self.routing_scope, x)
        return decision.tasks, decision.uniform

    @staticmethod
    def routing_input(args: tuple, kwargs: dict) -> torch.Tensor:
        """The tensor routing decides on: the layer's input."""
        return args[0] if args else kwargs["x"]

    # -- merging (exact only for a single task) -------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(delta_W (d_out, d_in), delta_b (d_out,))`` of a single-task adapter: ``s*up.W@down.W`` and
        ``s*(up.W@down.b + up.b)``. Multi-task adapters are input-dependent mixtures and have no weight delta."""
        tasks = self.ana_tasks[adapter_name]
        if len(tasks) != 1:
            raise ValueError(
                f"AnA adapter {adapter_name!r} has {len(tasks)} tasks: its output is a per-token gated mixture of "
                "experts that depends on the input and cannot be merged into the weights (only a single-task AnA "
                "adapter merges exactly)."
            )
        task = tasks[0]
        up_w, down_w = task.up.weight, task.down.weight
        # half-precision adapters (autocast off) are merged in float32, then cast to the base weight's dtype
        compute_dtype = torch.float32 if up_w.dtype in (torch.float16, torch.bfloat16) else up_w.dtype
        up_w, down_w = up_w.to(compute_dtype), down_w.to(compute_dtype)
        scale = task.scale.to(compute_dtype)
        delta_w = scale * (up_w @ down_w)
        delta_b = scale * (up_w @ task.down.bias.to(compute_dtype) + task.up.bias.to(compute_dtype))
        return delta_w, delta_b


class AnALinear(ParameterCacheMixin, nn.Module, AnALayer):
    """AnA on a ``torch.nn.Linear`` (or transformers ``Conv1D``) base layer.

    Its stacked task paths live in the mixin's :class:`~peft_ext.routing.experts.ParameterCache` (see
    :meth:`AnALayer._task_paths`): cleared on ``.to()``, loading and every task added, ended or removed.
    """

    param_cache_entries = 2 * STACK_CACHE_TASKS  # a task's full paths and, while it trains, its frozen part

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: AnAConfig,
        fan_in_fan_out: bool = False,
        summed: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        AnALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, summed=summed)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge single-task adapters exactly (``W += s*up.W@down.W``, ``b += s*(up.W@down.b + up.b)``).

        Raises:
            ValueError: an adapter has several tasks (input-dependent gating), or has a non-zero bias delta while
                the base layer has no bias.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        names = [n for n in adapter_names if n in self.ana_tasks]
        deltas = {n: self.get_delta_weight(n) for n in names}  # raises for multi-task adapters before any change
        base = self.get_base_layer()
        for name in names:
            delta_w, delta_b = deltas[name]
            if base.bias is None and bool(delta_b.abs().max() > 0):
                raise ValueError(
                    f"Cannot merge AnA adapter {name!r}: its bias term is non-zero but the base layer has no bias."
                )
        for name in names:
            delta_w, delta_b = deltas[name]
            weight = base.weight
            new_w = weight.data + transpose(delta_w, self.fan_in_fan_out).to(weight.dtype)
            new_b = None if base.bias is None else base.bias.data + delta_b.to(base.bias.dtype)
            finite = torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all())
            if safe_merge and not finite:
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data = new_w
            if new_b is not None:
                base.bias.data = new_b
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.ana_tasks:
                continue
            delta_w, delta_b = self.get_delta_weight(name)
            base.weight.data -= transpose(delta_w, self.fan_in_fan_out).to(base.weight.dtype)
            if base.bias is not None:
                base.bias.data -= delta_b.to(base.bias.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name not in self.ana_tasks:
                continue
            sample_tasks, uniform = self._sample_tasks(adapter_name, x)
            adapter_dtype = self.ana_tasks[adapter_name][0].down.weight.dtype
            out = self.adapter_output(adapter_name, self._cast_input_dtype(x, adapter_dtype), sample_tasks, uniform)
            if out is not None:
                result = result + out.to(previous_dtype)
        return result

    def __repr__(self) -> str:
        return "ana." + super().__repr__()


def _own_tensors(task: AnATask) -> list[nn.Parameter]:
    """A task's own projections and scale, the tensors its path is stacked from."""
    return [task.down.weight, task.down.bias, task.up.weight, task.up.bias, task.scale]


def _in_adapter_tensors(task: AnATask) -> list[nn.Parameter]:
    """A task's stacked in-adapters (none for task 0), folded into the earlier paths it reuses."""
    return [task.in_weight, task.in_bias] if task.num_in_adapters else []


def _grouped_mm_fits(x: torch.Tensor, r: int) -> bool:
    """Whether :func:`_grouped_down` can run: ``torch.nn.functional.grouped_mm`` runs on ``x``'s device and dtype
    (the CPU in float32 / bf16 / fp16, on a torch that has a CPU kernel), and the rows of its operands and of their
    gradients (``d_in`` and ``r`` wide) are 16-byte aligned."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and r % align == 0 and _cpu_grouped_mm_runs(x.dtype)


@functools.lru_cache(maxsize=None)
def _cpu_grouped_mm_runs(dtype: torch.dtype) -> bool:
    """``grouped_mm`` came to torch before its CPU kernel did: tried once per dtype on a tiny product."""
    if _GROUPED_MM is None:
        return False
    try:
        _GROUPED_MM(torch.ones(8, 8, dtype=dtype), torch.ones(2, 8, 8, dtype=dtype), offs=torch.tensor([4, 8]).int())
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _grouped_down(x: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """Down-projections ``(P, r)`` of the ``P`` pair rows (sorted by path: ``counts`` ``(E,)`` rows per path, token
    ``row_token`` ``(P,)`` each) by one grouped GEMM: each path's ``w_down`` ``(E, r, d_in)`` on its own rows."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    return _GROUPED_MM(x.index_select(0, row_token), w_down.transpose(1, 2), offs=offsets)


def _block_down(x: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """:func:`_grouped_down` by batched matmuls: each path's rows padded to a multiple of ``SPARSE_BLOCK_ROWS``, so
    that every block belongs to one path, whose weights are gathered per block (like MoE-CL's gather dispatch)."""
    num_paths, r, d_in = w_down.shape
    block, device = SPARSE_BLOCK_ROWS, x.device
    blocks = (counts + block - 1) // block
    # destination of sorted row i: its path's first padded row, plus its rank among that path's rows
    first_row = (torch.cumsum(blocks, 0) - blocks) * block - (torch.cumsum(counts, 0) - counts)
    num_rows = row_token.numel()
    dest = torch.repeat_interleave(first_row, counts, output_size=num_rows)
    dest += torch.arange(num_rows, device=device)
    num_blocks = int(blocks.sum())
    block_path = torch.repeat_interleave(torch.arange(num_paths, device=device), blocks, output_size=num_blocks)
    padded_token = torch.zeros(num_blocks * block, dtype=torch.long, device=device).index_copy_(0, dest, row_token)
    xs = x.index_select(0, padded_token).view(num_blocks, block, d_in)
    w_sel = w_down.reshape(num_paths, r * d_in).index_select(0, block_path).view(num_blocks, r, d_in)
    return torch.bmm(xs, w_sel.transpose(1, 2)).view(num_blocks * block, r).index_select(0, dest)
