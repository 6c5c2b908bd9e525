"""Auxiliary training losses computed inside tuner layers and collected by the tuner.

A layer that contributes a loss (ReSoRA's de-redundancy term, MoE-CL's load balance) calls
:meth:`RegularizedLayerMixin.record_regularization` during its forward. The tuner resets every layer's record at
the start of each top-level forward (a forward pre-hook on the wrapped model), so after ``outputs = model(**batch)``
:meth:`RegularizedTunerMixin.get_regularization_loss` returns the terms of exactly that forward -- no second
forward pass is needed.

PEFT's ``PeftModel.forward`` never adds tuner losses to ``outputs.loss``; a training loop adds them itself::

    loss = model(**batch).loss + model.get_regularization_loss()

(:class:`peft_ext.trainers.RegularizedTrainer` does this for ``transformers.Trainer``.)
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class RegularizedLayerMixin:
    """Mixin for tuner layers that record auxiliary losses. ``_reg_terms`` is a plain list, not state."""

    def record_regularization(self, term: torch.Tensor) -> None:
        """Record a scalar loss term (already multiplied by its weight) for the current forward."""
        terms = self.__dict__.setdefault("_reg_terms", [])
        terms.append(term)

    def clear_regularization(self) -> None:
        self.__dict__["_reg_terms"] = []

    def recorded_regularization(self) -> list[torch.Tensor]:
        return self.__dict__.get("_reg_terms", [])

    def regularization_enabled(self) -> bool:
        """Whether a training forward of this layer's active adapters records a term (override per method)."""
        return False


def _warn_if_uncollected(tuner, layers) -> None:
    """Warn (once per tuner) when a training forward recorded loss terms that nobody collected.

    That is what a plain ``transformers.Trainer`` (or any loop that ignores ``get_regularization_loss``) does: it
    cannot be hooked from outside, but the next forward can tell that the previous one's terms were never read.
    """
    collected = tuner.__dict__.get("_reg_collected", True)
    tuner.__dict__["_reg_collected"] = False
    if collected or tuner.__dict__.get("_reg_warned", False):
        return
    if any(t.requires_grad for layer in layers for t in layer.recorded_regularization()):
        tuner.__dict__["_reg_warned"] = True
        warnings.warn(
            "peft-ext: the model computed a regularization loss that was never added to the training loss, so the "
            "regularizer is not applied; train with peft_ext.trainers.RegularizedTrainer or add "
            "model.get_regularization_loss() to your loss.",
            UserWarning,
            stacklevel=2,
        )


class _ClearRegularization:
    """Forward pre-hook of the wrapped model: each top-level forward starts with empty loss records.

    A class rather than a closure so that the model stays picklable and deep-copyable.
    """

    def __init__(self, tuner: "RegularizedTunerMixin") -> None:
        self.tuner = tuner

    def __call__(self, module: nn.Module, args, kwargs):
        layers = self.tuner._regularized_layers()
        _warn_if_uncollected(self.tuner, layers)
        for layer in layers:
            layer.clear_regularization()


class RegularizedTunerMixin:
    """Mixin for a ``BaseTuner`` whose layers record auxiliary losses.

    Call :meth:`_install_regularization_hook` once the adapters are injected.
    """

    def _regularized_layers(self) -> list[RegularizedLayerMixin]:
        # Cached: the pre-hook asks on every forward, and walking all modules costs ~1 ms on a small encoder.
        # Every module swap (injection, unloading) goes through _replace_module, which drops the cache.
        layers = self.__dict__.get("_reg_layers")
        if layers is None:
            layers = [m for m in self.model.modules() if isinstance(m, RegularizedLayerMixin)]
            self.__dict__["_reg_layers"] = layers
        return layers

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        self.__dict__.pop("_reg_layers", None)
        return super()._replace_module(parent, child_name, new_module, child)

    def _install_regularization_hook(self) -> None:
        if getattr(self, "_reg_hook_handle", None) is not None:
            return
        self._reg_hook_handle = self.model.register_forward_pre_hook(_ClearRegularization(self), with_kwargs=True)

    def get_regularization_loss(self) -> torch.Tensor:
        """Mean of the weighted loss terms recorded by the adapted layers in the last forward pass.

        Returns a zero scalar when nothing was recorded (evaluation mode, adapters disabled or merged, weight 0).
        The terms are averaged over adapted modules, so the loss scale does not grow with model depth.
        """
        terms = [t for layer in self._regularized_layers() for t in layer.recorded_regularization()]
        self.__dict__["_reg_collected"] = True
        if not terms:
            param = next(self.model.parameters())
            return torch.zeros((), device=param.device, dtype=torch.float32)
        return torch.stack([t.float() for t in terms]).mean()

    @property
    def has_regularization(self) -> bool:
        """True when a training forward of the active adapters records an auxiliary loss."""
        return any(layer.regularization_enabled() for layer in self._regularized_layers())
