"""Target-module handling shared by the tuners that wrap linear layers (ReSoRA, AnA)."""

from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D


def linear_fan_in_fan_out(config, target: nn.Module, method: str) -> bool:
    """``fan_in_fan_out`` for a ``nn.Linear`` (False) or transformers ``Conv1D`` (True) target.

    Corrects ``config.fan_in_fan_out`` with a warning when it disagrees (as PEFT's LoRA does) and raises a
    ``TypeError`` naming the module for any other target type.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        expected = False
    elif isinstance(base, Conv1D):
        expected = True
    else:
        raise TypeError(
            f"Target module {target.__class__.__name__} is not supported by {method}: only torch.nn.Linear and "
            "transformers' Conv1D can be targeted."
        )
    if config.fan_in_fan_out != expected:
        kind = "Conv1D" if expected else "torch.nn.Linear"
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out} but the target is {kind}; using fan_in_fan_out={expected}."
        )
        config.fan_in_fan_out = expected
    return expected
