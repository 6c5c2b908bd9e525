"""Auxiliary training losses computed inside tuner layers and collected by the tuner.

A layer that contributes a loss (ReSoRA's de-redundancy term, MoE-CL's load balance) calls
:meth:`RegularizedLayerMixin.record_regularization` during its forward. The tuner resets every layer's record at
the start of each top-level forward (a forward pre-hook on the wrapped model), so after ``outputs = model(**batch)``
:meth:`RegularizedTunerMixin.get_regularization_loss` returns the terms of exactly that forward -- no second
forward pass is needed.

PEFT's ``PeftModel.forward`` never adds tuner losses to ``outputs.loss``; a training loop adds them itself::

    loss = model(**batch).loss + model.get_regularization_loss()

(:class:`peft_ext.trainers.RegularizedTrainer` does this for ``transformers.Trainer``.)

The same pre-hook hands every layer the forward's ``attention_mask`` (a :class:`TokenMask`), so that token
statistics (ReSoRA's feature correlations) can leave out padding: a layer whose input is ``(B, L, d)`` with the
mask's ``(B, L)`` uses the real tokens only, any other input (another sequence length, e.g. a cross-attention's
keys, or a decoding step on a KV cache) all of its tokens. In an encoder-decoder model the mask describes the
encoder's tokens, so only the encoder's layers get it.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from torch import nn


class TokenMask:
    """The ``(B, L)`` attention mask of the current forward (nonzero = real token, 0 = padding)."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        self.attention_mask = attention_mask
        self._flat: dict[torch.device, torch.Tensor] = {}  # per device: shared by every layer of the forward

    def for_input(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``(N,)`` bool over the rows of ``x.reshape(-1, x.shape[-1])`` (True = real token) when ``x`` is
        ``(B, L, d)`` with the mask's ``B, L``; None (use every row) for any other input."""
        if x.dim() != 3 or x.shape[:2] != self.attention_mask.shape:
            return None
        flat = self._flat.get(x.device)
        if flat is None:
            flat = self._flat[x.device] = (self.attention_mask != 0).reshape(-1).to(x.device)
        return flat


_MASK_POSITION: dict = {}  # forward function -> position of its attention_mask parameter (-1: none)


def forward_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The ``attention_mask`` a call of ``module`` receives, by keyword or by position, if it is a ``(B, L)`` tensor."""
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        forward = type(module).forward
        position = _MASK_POSITION.get(forward)
        if position is None:
            params = list(inspect.signature(forward).parameters.values())[1:]  # without self
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            position = _MASK_POSITION[forward] = names.index("attention_mask") if "attention_mask" in names else -1
        if 0 <= position < len(args):
            mask = args[position]
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class RegularizedLayerMixin:
    """Mixin for tuner layers that record auxiliary losses. ``_reg_terms`` is a plain list, not state."""

    def record_regularization(self, term: torch.Tensor) -> None:
        """Record a scalar loss term (already multiplied by its weight) for the current forward."""
        terms = self.__dict__.setdefault("_reg_terms", [])
        terms.append(term)

    def clear_regularization(self) -> None:
        self.__dict__["_reg_terms"] = []

    def set_token_mask(self, token_mask: Optional[TokenMask]) -> None:
        """Set by the tuner's pre-hook at the start of each forward (None: no mask, or not this layer's tokens)."""
        self.__dict__["_reg_token_mask"] = token_mask

    def regularization_token_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``(N,)`` bool: which rows of ``x.reshape(-1, x.shape[-1])`` are real tokens of the current forward;
        None when every row counts (no attention mask, or ``x`` is not ``(B, L, d)`` of the mask's shape)."""
        token_mask = self.__dict__.get("_reg_token_mask")
        return None if token_mask is None else token_mask.for_input(x)

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
        mask = forward_attention_mask(module, args, kwargs)
        token_mask = TokenMask(mask) if mask is not None else None
        masked = self.tuner._token_masked_layers()
        for layer in layers:
            layer.clear_regularization()
            layer.set_token_mask(token_mask if masked is None or id(layer) in masked else None)


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

    def _token_masked_layers(self) -> Optional[set[int]]:
        """Ids of the layers that see the tokens ``attention_mask`` describes; None: every layer.

        In an encoder-decoder model that is the encoder's layers only: the decoder's tokens (and the encoder states
        its cross-attention reads) have other masks, and a shape check alone cannot tell them apart when the
        lengths coincide, so the decoder's statistics use all of its tokens.
        """
        if "_reg_masked_layers" not in self.__dict__:
            masked = None
            if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
                try:
                    encoder = self.model.get_encoder()
                    masked = {id(m) for m in encoder.modules() if isinstance(m, RegularizedLayerMixin)}
                except (AttributeError, TypeError, NotImplementedError):
                    masked = set()
            self.__dict__["_reg_masked_layers"] = masked
        return self.__dict__["_reg_masked_layers"]

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        self.__dict__.pop("_reg_layers", None)
        self.__dict__.pop("_reg_masked_layers", None)
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
