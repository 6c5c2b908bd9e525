"""Checks that turn a mismatched checkpoint into a one-line error instead of PyTorch's size-mismatch dump."""

from __future__ import annotations

import torch
from torch import nn


class AdapterCheckpointError(ValueError):
    """An adapter checkpoint does not fit the model/config it is being loaded into."""


def check_state_dict_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor], config) -> None:
    """Raise :class:`AdapterCheckpointError` if an adapter tensor's shape differs from the model's.

    ``state_dict`` has the model's keys (after PEFT's remapping); keys the model does not have are left to PEFT.
    """
    model_state = model.state_dict()
    for key, tensor in state_dict.items():
        expected = model_state.get(key)
        if expected is None or expected.shape == tensor.shape:
            continue
        raise AdapterCheckpointError(
            f"Checkpoint tensor {key!r} has shape {tuple(tensor.shape)} but the {config.peft_type.value} adapter "
            f"built from its config expects {tuple(expected.shape)}: the checkpoint and adapter_config.json do not "
            "match (edited config, or weights of another model?)."
        )
