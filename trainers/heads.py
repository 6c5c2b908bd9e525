"""Per-task classification heads over a (PEFT-wrapped) encoder.

Tasks of a stream have their own label sets, which may differ or overlap; one linear head per task keeps them
apart (a head is never shared, so training a later task cannot overwrite an earlier task's decision layer). The
heads live beside the PEFT adapter, not inside it, and are saved next to it as ``heads.safetensors`` (one
``{task}.weight``/``{task}.bias`` pair per task) plus ``heads.json`` (pooling and each task's labels in head order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.json"


POOLING_MODES = ("mean", "cls", "max")


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """Sentence vector ``(batch, hidden)`` from token states ``(batch, seq, hidden)``: 'mean' or 'max' over real
    tokens (attention_mask 1), or 'cls' (first token) -- sentence-transformers' Pooling modes."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        if attention_mask is None:
            return hidden.max(dim=1).values
        return hidden.masked_fill((attention_mask == 0).unsqueeze(-1), torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode != "mean":
        raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {mode!r}.")
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class EncoderTaskModel(nn.Module):
    """Base of the task models (one per task kind: :class:`TaskHeadClassifier`, the zero_shot and generation
    ones) that wrap an ``encoder`` (a PEFT model) for the Trainer: what they share."""

    encoder: nn.Module

    def get_regularization_loss(self) -> Optional[torch.Tensor]:
        """The encoder's regularization loss of the last forward, None when the encoder has no regularizer."""
        try:
            getter = getattr(self.encoder, "get_regularization_loss")
        except AttributeError:
            return None
        return getter()


class TaskHeadClassifier(EncoderTaskModel):
    """An encoder (e.g. a ``PeftModel`` over ``AutoModel``) with one linear head per task.

    ``forward`` classifies with the head of :attr:`current_task` (set by :meth:`set_task`); the encoder's routing
    (which adapter or continual task it uses) is the caller's business. Only the current task's head is trainable.

    Args:
        encoder (`nn.Module`): returns ``last_hidden_state`` (batch, seq, hidden) for ``input_ids``/``attention_mask``.
        hidden_size (`int`): width of the encoder's hidden states.
        pooling (`str`): 'mean' or 'max' (over real tokens) or 'cls'.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}.")
        self.encoder = encoder
        self.hidden_size = hidden_size
        self.pooling = pooling
        self.heads = nn.ModuleDict()
        self.labels: dict[str, list[str]] = {}
        self.current_task: Optional[str] = None

    # -- heads ------------------------------------------------------------------------------------------------
    def add_head(self, task: str, labels: list[str]) -> None:
        if task in self.heads:
            raise ValueError(f"Task {task!r} already has a head.")
        param = next(self.encoder.parameters())
        head = nn.Linear(self.hidden_size, len(labels)).to(param.device)
        self.heads[task] = head
        self.labels[task] = [str(x) for x in labels]

    def set_task(self, task: str) -> None:
        """Classify with ``task``'s head and make only that head trainable."""
        if task not in self.heads:
            raise ValueError(f"No head for task {task!r}; heads: {list(self.heads)}.")
        self.current_task = task
        for name, head in self.heads.items():
            head.requires_grad_(name == task)

    # -- forward ----------------------------------------------------------------------------------------------
    def features(self, input_ids=None, attention_mask=None, token_type_ids=None, **encoder_kwargs) -> torch.Tensor:
        """Pooled sentence features ``(batch, hidden)``; extra kwargs (e.g. ``task_ids``) go to the encoder."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **encoder_kwargs}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, attention_mask, self.pooling)

    def logits(self, features: torch.Tensor, task: str) -> torch.Tensor:
        """Head ``task`` applied to ``features`` ``(batch, hidden)`` -> ``(batch, len(labels[task]))``."""
        return self.heads[task](features)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        if self.current_task is None:
            raise ValueError("Call set_task(task) before training or evaluating the classifier.")
        logits = self.logits(self.features(input_ids, attention_mask, token_type_ids), self.current_task)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # -- persistence ------------------------------------------------------------------------------------------
    def save_heads(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for task, head in self.heads.items():
            tensors[f"{task}.weight"] = head.weight.detach().cpu().contiguous()
            tensors[f"{task}.bias"] = head.bias.detach().cpu().contiguous()
        save_file(tensors, str(directory / HEADS_WEIGHTS))
        meta = {
            "pooling": self.pooling,
            "hidden_size": self.hidden_size,
            "tasks": {t: self.labels[t] for t in self.heads},
        }
        (directory / HEADS_CONFIG).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def load_heads(self, directory: str | os.PathLike) -> None:
        """Add (or overwrite) the heads saved in ``directory``."""
        directory = Path(directory)
        meta = json.loads((directory / HEADS_CONFIG).read_text(encoding="utf-8"))
        if meta["hidden_size"] != self.hidden_size:
            raise ValueError(f"Saved heads have hidden size {meta['hidden_size']}, the encoder {self.hidden_size}.")
        tensors = load_file(str(directory / HEADS_WEIGHTS))
        for task, labels in meta["tasks"].items():
            if task not in self.heads:
                self.add_head(task, labels)
            head = self.heads[task]
            with torch.no_grad():
                head.weight.copy_(tensors[f"{task}.weight"])
                head.bias.copy_(tensors[f"{task}.bias"])
            self.labels[task] = list(labels)


__all__ = ["HEADS_CONFIG", "HEADS_WEIGHTS", "POOLING_MODES", "EncoderTaskModel", "TaskHeadClassifier", "pool"]
