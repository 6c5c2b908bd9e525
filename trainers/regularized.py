"""A ``transformers.Trainer`` that adds the model's regularization loss to the task loss.

Any model that exposes ``get_regularization_loss()`` -- a ``PeftModel`` over a peft-ext tuner (ReSoRA's
de-redundancy term, MoE-CL's balance loss), or any other module -- gets that term added to its loss. The only
override is the public extension point ``compute_loss(..., **kwargs)`` (plus ``log`` to report the two parts), so
``TrainingArguments``, callbacks, ``report_to``, mixed precision, checkpointing and accelerate/DDP behave exactly as
with ``Trainer``.

Gradient accumulation. ``Trainer.training_step`` divides the loss returned by ``compute_loss`` by the number of
accumulation steps *unless* that loss is already normalized over the whole accumulated batch (a model that accepts
``num_items_in_batch``, a ``compute_loss_func``, or ``loss_is_scaled_for_ga=True``). The regularization term is a
per-forward mean, so it is added here as ``reg`` in the first case and as ``reg / accumulation_steps`` in the second:
either way each optimizer step sees the mean of the micro-batches' terms, and the weight of the regularizer does
not change with ``gradient_accumulation_steps``.

Resuming. ``Trainer`` draws each epoch's sample order from the global RNG as the epoch starts; a checkpoint saved
in the middle of epoch ``e`` keeps the RNG state of that step, not of the epoch's start, so a run resumed there used
to see another order for the rest of epoch ``e`` than the run it continues. Here the order of epoch ``e`` is drawn
from a generator seeded with ``(seed, e)`` alone (:class:`EpochSeededSampler`), so a resumed run trains on exactly
the batches an uninterrupted one does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.utils import logging


logger = logging.get_logger(__name__)


def regularization_loss_of(model: nn.Module) -> Optional[torch.Tensor]:
    """The regularization loss of the last forward of ``model``, or None if the model has no regularizer.

    ``model`` is the unwrapped module. ``PeftModel`` forwards unknown attributes to its tuner, so a peft-ext tuner's
    ``get_regularization_loss`` is found on the ``PeftModel``; a wrapper (e.g. a task-head classifier) may expose
    the method itself.
    """
    try:
        getter = getattr(model, "get_regularization_loss")
    except AttributeError:
        return None
    return getter() if callable(getter) else None


class EpochSeededSampler(Sampler):
    """``sampler``'s order for epoch ``e`` drawn with the global RNG seeded to ``seed + e`` (restored afterwards, so
    drawing an order consumes no randomness of training). ``epoch`` tells the epoch about to start."""

    def __init__(self, sampler: Sampler, seed: int, epoch: Callable[[], int]) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch())
            order = list(self.sampler)
        return iter(order)


class RegularizedTrainer(Trainer):
    """``Trainer`` whose loss is ``task loss + model.get_regularization_loss()``.

    The logged history gets ``task_loss`` and ``reg_loss`` beside ``loss`` (``loss = task_loss + reg_loss``), averaged
    over the logging window and over processes. A model without ``get_regularization_loss`` trains exactly as with
    ``Trainer``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reg_sum = 0.0
        self._reg_count = 0

    def _get_train_sampler(self, *args, **kwargs):
        sampler = super()._get_train_sampler(*args, **kwargs)
        if sampler is None or isinstance(sampler, EpochSeededSampler):
            return sampler
        # The Trainer state's epoch is the epoch about to start (a resumed state holds e + the fraction done).
        return EpochSeededSampler(sampler, self.args.seed, lambda: math.floor((self.state.epoch or 0) + 1e-6))

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        # Mirrors Trainer.training_step's own decision (public attributes only).
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = out if return_outputs else (out, None)
        reg = regularization_loss_of(self.accelerator.unwrap_model(model))
        if reg is not None and model.training:
            reg = reg.to(loss.device, loss.dtype)
            self._reg_sum += float(reg.detach())
            self._reg_count += 1
            if self._loss_is_scaled_for_ga(kwargs.get("num_items_in_batch")):
                steps = (
                    getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
                )
                reg = reg / steps
            loss = loss + reg
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._reg_count:
            # Every process logs training losses (Trainer gathers `loss` collectively), so this reduce is safe.
            mean = torch.tensor(self._reg_sum / self._reg_count, device=self.args.device)
            mean = self.accelerator.reduce(mean, reduction="mean") if self.accelerator.num_processes > 1 else mean
            logs["reg_loss"] = round(float(mean), 6)
            logs["task_loss"] = round(float(logs["loss"]) - float(mean), 6)
            self._reg_sum, self._reg_count = 0.0, 0
        super().log(logs, *args, **kwargs)


__all__ = ["EpochSeededSampler", "RegularizedTrainer", "regularization_loss_of"]
