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


class RegularizedTunerMixin:
    """Mixin for a ``BaseTuner`` whose layers record auxiliary losses.

    Call :meth:`_install_regularization_hook` once the adapters are injected.
    """

    def _regularized_layers(self) -> list[RegularizedLayerMixin]:
        return [m for m in self.model.modules() if isinstance(m, RegularizedLayerMixin)]

    def _install_regularization_hook(self) -> None:
        if getattr(self, "_reg_hook_handle", None) is not None:
            return

        def reset_terms(module: nn.Module, args, kwargs):
            for layer in self._regularized_layers():
                layer.clear_regularization()

        self._reg_hook_handle = self.model.register_forward_pre_hook(reset_terms, with_kwargs=True)

    def get_regularization_loss(self) -> torch.Tensor:
        """Mean of the weighted loss terms recorded by the adapted layers in the last forward pass.

        Returns a zero scalar when nothing was recorded (evaluation mode, adapters disabled or merged, weight 0).
        The terms are averaged over adapted modules, so the loss scale does not grow with model depth.
        """
        terms = [t for layer in self._regularized_layers() for t in layer.recorded_regularization()]
        if not terms:
            param = next(self.model.parameters())
            return torch.zeros((), device=param.device, dtype=torch.float32)
        return torch.stack([t.float() for t in terms]).mean()

    @property
    def has_regularization(self) -> bool:
        """True when a training forward of the active adapters records an auxiliary loss."""
        return any(layer.regularization_enabled() for layer in self._regularized_layers())
