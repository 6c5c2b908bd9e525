"""Checks that turn a mismatched checkpoint into a one-line error instead of PyTorch's size-mismatch dump."""

from __future__ import annotations

import torch
from torch import nn


class AdapterCheckpointError(ValueError):
    """An adapter checkpoint does not fit the model/config it is being loaded into."""


def check_state_dict_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor], config) -> None:
    """Raise :class:`AdapterCheckpointError` if the checkpoint does not fit the adapter built from ``config``.

    ``state_dict`` has the model's keys (after PEFT's remapping). Two mismatches are caught: a tensor whose shape
    differs from the model's, and tensors of *another* PEFT method (e.g. ``lora_A`` keys loaded with a ReSoRA
    config), which PEFT would otherwise skip with a warning and leave the adapter at its initialization.
    """
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    foreign = {p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if t != config.peft_type}
    for key in state_dict:
        for part in key.split("."):
            if any(part.startswith(prefix) for prefix in foreign) and not part.startswith(
                PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type]
            ):
                raise AdapterCheckpointError(
                    f"Checkpoint tensor {key!r} belongs to another PEFT method, not to the {config.peft_type.value} "
                    "adapter being loaded: the config passed does not match the checkpoint's adapter type."
                )
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


class CheckedCheckpointMixin:
    """Mixin for a ``BaseTuner``: loading a checkpoint that does not fit the config fails with one line
    (:func:`check_state_dict_shapes`) instead of PyTorch's size-mismatch dump or PEFT's silent skip."""

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_state_dict_shapes(model, remapped, config)
        return remapped


def remove_nested_adapter_name(key: str, adapter_name: str, containers: tuple[str, ...]) -> str | None:
    """Drop the adapter name that follows one of ``containers`` anywhere in ``key`` (None if none matches).

    ``...query.ana_tasks.<adapter>.2.down.weight`` -> ``...query.ana_tasks.2.down.weight``. PEFT's default only
    looks at the last key components; methods that nest per-task state below the adapter need this.
    """
    for container in containers:
        marker = f".{container}.{adapter_name}."
        if marker in key:
            head, _, tail = key.rpartition(marker)
            return f"{head}.{container}.{tail}"
    return None
