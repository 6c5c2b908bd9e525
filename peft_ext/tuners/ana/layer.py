"""AnA layers: per-task linear adapters, adapter-in-adapter experts and a per-task noisy MoE gate.

State layout (PEFT's shape): ``ana_tasks[adapter_name]`` is an ``nn.ModuleList`` of :class:`AnATask`, one per task in
``config.task_names`` order, so PEFT's device/dtype/delete/save machinery handles every task at once. Checkpoint keys
carry task *indices*, never task names (``...query.ana_tasks.2.in_adapters.0.weight``), so renaming tasks or
adapters cannot collide with PEFT's adapter-name stripping.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...routing.gating import noisy_top_k_gating
from .config import AnAConfig


def ana_task_parameter_count(in_features: int, out_features: int, r: int, task_index: int, noisy_gating: bool) -> int:
    """Trainable parameters of task ``task_index`` (0-based) in one adapted ``in_features -> out_features`` layer.

    ``r*(d_in + d_out) + r + d_out + 1`` (own adapter with biases and scale) ``+ t*(r*r + r)`` (in-adapters)
    ``+ [t > 0] * G * d_in * (t + 1)`` (gate; ``G = 2`` with noisy gating).
    """
    t = task_index
    own = r * (in_features + out_features) + r + out_features + 1
    in_adapters = t * (r * r + r)
    gate = (2 if noisy_gating else 1) * in_features * (t + 1) if t > 0 else 0
    return own + in_adapters + gate


class AnATask(nn.Module):
    """State of one task in one adapted layer.

    Attributes:
        down (`nn.Linear`): ``d_in -> r`` with bias. up (`nn.Linear`): ``r -> d_out`` with bias.
        scale (`nn.Parameter`): shape ``(1,)``, the learnable scalar ``s_t``.
        in_adapters (`nn.ModuleList`): ``t`` linears ``r -> r`` with bias; entry ``i`` is ``F_i^t``.
        gate, gate_noise (`nn.Parameter` or None): ``(d_in, t + 1)`` gate and noise weights (None for task 0;
            ``gate_noise`` also None without noisy gating).
    """

    def __init__(self, index: int, in_features: int, out_features: int, r: int, noisy_gating: bool) -> None:
        super().__init__()
        self.index = index
        self.down = nn.Linear(in_features, r)
        self.up = nn.Linear(r, out_features)
        self.scale = nn.Parameter(torch.ones(1))
        self.in_adapters = nn.ModuleList([nn.Linear(r, r) for _ in range(index)])
        if index > 0:
            self.gate = nn.Parameter(torch.zeros(in_features, index + 1))
            self.gate_noise = nn.Parameter(torch.zeros(in_features, index + 1)) if noisy_gating else None
        else:
            self.register_parameter("gate", None)
            self.register_parameter("gate_noise", None)

    @torch.no_grad()
    def reset(self, init_weights: bool, in_adapter_init: str, scale_init: float) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        self.scale.fill_(scale_init)
        for f in self.in_adapters:
            if in_adapter_init == "identity":
                nn.init.eye_(f.weight)
                nn.init.zeros_(f.bias)
            elif in_adapter_init == "zero":
                nn.init.zeros_(f.weight)
                nn.init.zeros_(f.bias)
            else:  # "linear": PyTorch's default init, as in the reference
                f.reset_parameters()
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
    def update_layer(self, adapter_name: str, config: AnAConfig, **kwargs) -> None:
        """Create the adapter ``adapter_name`` with one :class:`AnATask` per entry of ``config.task_names``."""
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
        }
        num_tasks = max(1, len(config.task_names))
        tasks = nn.ModuleList()
        for index in range(num_tasks):
            tasks.append(self._new_task(adapter_name, index))
        if config.init_weights and num_tasks > 1:
            self._init_placeholder_tasks(tasks)
        self.ana_tasks[adapter_name] = tasks
        last_ended = bool(config.task_names) and config.task_names[-1] in config.ended_tasks
        self.ana_num_frozen[adapter_name] = num_tasks if last_ended else num_tasks - 1
        self._move_adapter_to_device_of_base_layer(adapter_name)
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
            for f in task.in_adapters:
                nn.init.zeros_(f.weight)
                nn.init.zeros_(f.bias)

    def _new_task(self, adapter_name: str, index: int) -> AnATask:
        settings = self.ana_settings[adapter_name]
        task = AnATask(index, self.in_features, self.out_features, self.ana_r[adapter_name], settings["noisy_gating"])
        task.reset(settings["init_weights"], settings["in_adapter_init"], settings["scale_init"])
        return task

    def add_task(self, adapter_name: str, task_name: str) -> None:
        """Append a task: its adapter, one in-adapter per earlier task and its gate; freeze all earlier tasks."""
        tasks = self.ana_tasks[adapter_name]
        reference = tasks[0].down.weight
        task = self._new_task(adapter_name, len(tasks))
        if reference.device.type != "meta":
            task.to(device=reference.device, dtype=reference.dtype)
        tasks.append(task)
        self.ana_num_frozen[adapter_name] = len(tasks) - 1
        trainable = adapter_name in self.active_adapters and not self.disable_adapters
        task.requires_grad_(trainable)
        self._freeze_non_trainable_peft_weights([adapter_name])

    def end_task(self, adapter_name: str) -> None:
        """Freeze the last task too (no task of this adapter is trainable afterwards)."""
        self.ana_num_frozen[adapter_name] = len(self.ana_tasks[adapter_name])
        self._freeze_non_trainable_peft_weights([adapter_name])

    def remove_last_task(self, adapter_name: str) -> None:
        tasks = self.ana_tasks[adapter_name]
        if len(tasks) <= 1:
            raise ValueError("Cannot remove the only task of an adapter; delete the adapter instead.")
        del tasks[len(tasks) - 1]
        # the task that becomes last had been frozen when the removed one was added: it stays frozen
        self.ana_num_frozen[adapter_name] = len(tasks)

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
    def task_gates(self, adapter_name: str, task_index: int, x: torch.Tensor) -> torch.Tensor:
        """Gate values ``(N, t + 1)`` (float32) of task ``t`` for tokens ``x`` ``(N, d_in)``."""
        task = self.ana_tasks[adapter_name][task_index]
        if task.gate is None:
            return x.new_ones(x.shape[0], 1, dtype=torch.float32)
        top_k = self.ana_settings[adapter_name]["top_k"]
        num_experts = task_index + 1
        k = num_experts if top_k is None else min(top_k, num_experts)
        return noisy_top_k_gating(x, task.gate, task.gate_noise, k, training=self.training).gates

    def task_output(self, adapter_name: str, task_index: int, x: torch.Tensor) -> torch.Tensor:
        """Adapter output of task ``t`` for tokens ``x`` ``(N, d_in)`` -> ``(N, d_out)`` (dtype of the adapter).

        ``sum_e g_e(x) * s_e * up_e(h_e)`` with ``h_e = F_e^t(down_e(x))`` for ``e < t`` and ``h_t = down_t(x)``,
        computed with one matmul per projection: the experts' down weights are stacked to ``(E*r, d_in)``, the
        in-adapters applied as a batched ``(t, r, r)`` product, and the gate-and-scale-weighted features multiply the
        concatenated up weights ``(d_out, E*r)``.
        """
        tasks = self.ana_tasks[adapter_name]
        task = tasks[task_index]
        if task_index == 0:
            return task.scale * task.up(task.down(x))
        experts = list(tasks)[: task_index + 1]
        r = self.ana_r[adapter_name]
        num_experts = len(experts)
        w_down = torch.cat([e.down.weight for e in experts], dim=0)  # (E*r, d_in)
        b_down = torch.cat([e.down.bias for e in experts], dim=0)
        h = F.linear(x, w_down, b_down).view(-1, num_experts, r)  # (N, E, r)
        w_in = torch.stack([f.weight for f in task.in_adapters])  # (t, r, r): out x in
        b_in = torch.stack([f.bias for f in task.in_adapters])  # (t, r)
        h_in = torch.einsum("ntj,tij->nti", h[:, :-1], w_in) + b_in  # F_e^t(down_e(x)) for e < t
        h = torch.cat([h_in, h[:, -1:]], dim=1)  # (N, E, r)
        scales = torch.cat([e.scale for e in experts])  # (E,)
        coef = self.task_gates(adapter_name, task_index, x).to(x.dtype) * scales  # (N, E)
        w_up = torch.cat([e.up.weight for e in experts], dim=1)  # (d_out, E*r)
        b_up = torch.stack([e.up.bias for e in experts])  # (E, d_out)
        return F.linear((h * coef.unsqueeze(-1)).reshape(h.shape[0], -1), w_up) + coef @ b_up

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
        """``(task index per sample (batch,), the batch's one task index if known)``, see ``RoutingState``."""
        routing = self.routing
        if routing is None or adapter_name not in routing.task_names:
            # injected without an AnAModel (inject_adapter_in_model): use the last task
            last = len(self.ana_tasks[adapter_name]) - 1
            return torch.full((x.shape[0],), last, dtype=torch.long, device=x.device), last
        routing.observe(adapter_name, x)
        tasks = routing.sample_tasks(adapter_name, x)
        return tasks, routing.uniform_task(adapter_name)

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


class AnALinear(nn.Module, AnALayer):
    """AnA on a ``torch.nn.Linear`` (or transformers ``Conv1D``) base layer."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: AnAConfig, fan_in_fan_out: bool = False, **kwargs
    ) -> None:
        super().__init__()
        AnALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

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
            if self.routing is not None:
                # the task selector takes its features from a forward with adapters disabled
                for adapter_name in self.active_adapters:
                    if adapter_name in self.ana_tasks:
                        self.routing.observe(adapter_name, x)
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
