"""Config validation shared by the three tuners' configs (their ``__post_init__`` s)."""

from __future__ import annotations


def normalize_module_names(config) -> None:
    """``target_modules``/``exclude_modules`` given as lists become sets (PEFT's convention; str = a regex)."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        if isinstance(value, list):
            setattr(config, name, set(value))


def check_positive_ints(config, *names: str) -> None:
    """Each named field must be an ``int`` (not a ``bool``) above zero."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_layer_selection(config) -> None:
    """``layers_to_transform``/``layers_pattern`` combinations PEFT's LoRA refuses too."""
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
