"""ReSoRA layers: a LoRA update split into equivalent subspaces, recording its de-redundancy loss in training."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..regularization import RegularizedLayerMixin
from .config import ReSoRAConfig
from .regularizer import redundancy_terms


class ReSoRALayer(BaseTunerLayer, RegularizedLayerMixin):
    """Per-adapter state of a ReSoRA-adapted module.

    ``resora_A[name]``: ``nn.Linear(in, r, bias=False)``, ``resora_B[name]``: ``nn.Linear(r, out, bias=False)``;
    subspace ``g`` is rows ``g*k:(g+1)*k`` of A's weight and the same columns of B's (``k = r / G``).
    """

    adapter_layer_names = ("resora_A", "resora_B")
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "resora_dropout",
        "num_subspaces",
        "reg_weight",
        "regularizer",
        "reg_eps",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_subspaces: dict[str, int] = {}
        self.reg_weight: dict[str, float] = {}
        self.regularizer: dict[str, str] = {}
        self.reg_eps: dict[str, float] = {}
        self.resora_dropout = nn.ModuleDict({})
        self.resora_A = nn.ModuleDict({})
        self.resora_B = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            # Conv1D stores its weight as (in, out)
            self.in_features, self.out_features = (
                base_layer.weight.ds_shape if hasattr(base_layer.weight, "ds_shape") else base_layer.weight.shape
            )
        else:
            raise TypeError(
                f"ReSoRA supports torch.nn.Linear and transformers' Conv1D targets, got {type(base_layer).__name__}."
            )

    def update_layer(self, adapter_name: str, config: ReSoRAConfig, **kwargs) -> None:
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.num_subspaces[adapter_name] = config.num_subspaces
        self.reg_weight[adapter_name] = config.reg_weight
        self.regularizer[adapter_name] = config.regularizer
        self.reg_eps[adapter_name] = config.reg_eps
        self.resora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.resora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.resora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.reset_resora_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_resora_parameters(self, adapter_name: str, init_weights: bool) -> None:
        nn.init.kaiming_uniform_(self.resora_A[adapter_name].weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.resora_B[adapter_name].weight)
        else:
            nn.init.normal_(self.resora_B[adapter_name].weight, std=0.1)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` in the layout of the base weight (transposed for Conv1D), in the adapter's dtype."""
        weight_A = self.resora_A[adapter].weight
        weight_B = self.resora_B[adapter].weight
        compute_dtype = (
            torch.float32
            if weight_A.dtype in (torch.float16, torch.bfloat16) and weight_A.device.type == "cpu"
            else weight_A.dtype
        )
        delta = (weight_B.to(compute_dtype) @ weight_A.to(compute_dtype)) * self.scaling[adapter]
        return transpose(delta, self.fan_in_fan_out).to(weight_A.dtype)

    def regularization_enabled(self) -> bool:
        return any(
            a in self.resora_A and self.reg_weight[a] > 0 and self.regularizer[a] != "none"
            for a in self.active_adapters
        )


class ReSoRALinear(nn.Module, ReSoRALayer):
    """ReSoRA on an ``nn.Linear`` or ``Conv1D``; input ``(..., in)`` -> output ``(..., out)``."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: ReSoRAConfig, fan_in_fan_out: bool = False, **kwargs
    ) -> None:
        super().__init__()
        ReSoRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``scaling * B A`` of the active (or given) adapters to the base weight.

        Args:
            safe_merge: merge into a copy first and raise ``ValueError`` if the result is not finite.
            adapter_names: adapters to merge; default: the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base_layer = self.get_base_layer()
        for name in adapter_names:
            if name not in self.resora_A:
                continue
            delta = self.get_delta_weight(name).to(base_layer.weight.dtype)
            if safe_merge:
                merged = base_layer.weight.data.clone() + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.resora_A:
                base_layer.weight.data -= self.get_delta_weight(name).to(base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.resora_A:
                continue
            resora_A = self.resora_A[name]
            resora_B = self.resora_B[name]
            h = self._cast_input_dtype(self.resora_dropout[name](x), resora_A.weight.dtype)
            z = resora_A(h)
            result = result + resora_B(z) * self.scaling[name]
            if self.training and self.reg_weight[name] > 0 and self.regularizer[name] != "none":
                # statistics over the batch's tokens, z (..., r) -> (N, r); padding excluded when the forward's
                # attention mask describes this input's (B, L) tokens
                term = redundancy_terms(
                    self.regularizer[name],
                    z.reshape(-1, z.shape[-1]),
                    resora_A.weight,
                    resora_B.weight,
                    self.num_subspaces[name],
                    self.reg_eps[name],
                    mask=self.regularization_token_mask(x),
                )
                self.record_regularization(self.reg_weight[name] * term)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "resora." + super().__repr__()
