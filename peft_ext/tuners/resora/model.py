"""ReSoRAModel: the tuner that injects ReSoRA layers and collects their de-redundancy loss."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..checkpoint import CheckedCheckpointMixin
from ..regularization import RegularizedTunerMixin
from ..targets import linear_fan_in_fan_out
from .config import ReSoRAConfig
from .layer import ReSoRALayer, ReSoRALinear


class ReSoRAModel(CheckedCheckpointMixin, RegularizedTunerMixin, BaseTuner):
    """Creates a ReSoRA model from a pretrained transformers model (use it through ``peft.get_peft_model``).

    Args:
        model ([`torch.nn.Module`]): The model to adapt.
        config ([`ReSoRAConfig`]): The ReSoRA configuration.
        adapter_name (`str`): Name of the adapter, default `"default"`.
        low_cpu_mem_usage (`bool`): Create the adapter weights on the meta device (faster loading).

    Besides PEFT's tuner API (merge, unload, adapters), it provides `get_regularization_loss()`: the weighted
    de-redundancy loss of the last training forward, averaged over adapted modules.

    Example:
        ```py
        >>> import peft_ext
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_ext.ReSoRAConfig(r=8, num_subspaces=2, target_modules=["query", "value"]))
        >>> out = model(**batch)
        >>> loss = out.loss + model.get_regularization_loss()
        ```
    """

    prefix: str = "resora_"
    tuner_layer_cls = ReSoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._install_regularization_hook()

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, ReSoRALayer):
            target.update_layer(adapter_name, config)
            return
        new_module = self._create_new_module(config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            # an added adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: ReSoRAConfig, adapter_name: str, target: nn.Module) -> ReSoRALinear:
        fan_in_fan_out = linear_fan_in_fan_out(config, target, "ReSoRA")
        return ReSoRALinear(target, adapter_name, config=config, fan_in_fan_out=fan_in_fan_out)
