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


def check_state_dict_complete(
    model: nn.Module, state_dict: dict[str, torch.Tensor], config, adapter_name: str, checkpoint_key
) -> None:
    """Raise :class:`AdapterCheckpointError` if ``state_dict`` lacks tensors of adapter ``adapter_name``.

    ``state_dict`` has the model's keys (after PEFT's remapping); the adapter's tensors are found as PEFT finds the
    ones it saves (every parameter and buffer of the tuner layers and of the tuner's per-adapter containers).
    ``checkpoint_key(model_key, adapter_name)`` turns a model key into the key the checkpoint would hold, which
    the message names. PEFT itself only warns about missing adapter keys and leaves those weights at their
    initialization: a truncated or edited weights file would load as a partly untrained adapter.
    """
    from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
    missing = [key for key in expected if key not in state_dict]
    if not missing:
        return
    shown = ", ".join(repr(checkpoint_key(key, adapter_name)) for key in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise AdapterCheckpointError(
        f"Checkpoint lacks {len(missing)} of the {len(expected)} tensors of the {config.peft_type.value} adapter "
        f"{adapter_name!r} built from its config ({shown}{more}): the weights file is incomplete, and those weights "
        "would stay at their initialization; load the adapter_model.safetensors saved with this adapter_config.json."
    )


def check_task_record(recorded, config, adapter_name: str) -> None:
    """Raise :class:`AdapterCheckpointError` unless the task lists a checkpoint recorded (``{list name: names}``,
    see :class:`~peft_ext.routing.tasks.TaskRecord`) equal the config's lists of the same name.

    Per-task tensors are stored by position; only ``adapter_config.json`` names the task at each position. A
    ``task_names`` (or ``selector_tasks``) list cut, extended or reordered there would otherwise load silently with
    tasks dropped, left untrained or swapped.
    """
    if not isinstance(recorded, dict) or not all(isinstance(v, list) for v in recorded.values()):
        raise AdapterCheckpointError(
            f"The task record of adapter {adapter_name!r} in the checkpoint is unreadable: the weights file is damaged."
        )
    for field_name, saved in recorded.items():
        current = getattr(config, field_name, None)
        if current is None or list(current) == saved:
            continue  # a list this version's config does not have cannot disagree with it
        raise AdapterCheckpointError(
            f"adapter_config.json of adapter {adapter_name!r} has {field_name}={list(current)} but the checkpoint's "
            f"per-task tensors belong to {saved} (in that order): they are stored by position, so loading would drop, "
            "add or swap tasks; use the adapter_config.json saved with the checkpoint."
        )


class CheckedCheckpointMixin:
    """Mixin for a ``BaseTuner``: loading a checkpoint that does not fit the config fails with one line
    (:func:`check_state_dict_shapes`, :func:`check_state_dict_complete`) instead of PyTorch's size-mismatch dump or
    PEFT's silent skip."""

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_state_dict_shapes(model, remapped, config)
        check_state_dict_complete(model, remapped, config, adapter_name, cls._remove_adapter_name_from_key)
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
