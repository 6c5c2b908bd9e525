"""Zero-shot classification over a (PEFT-wrapped) dual encoder: the task kind ``"zero_shot"``.

A task's classes are scored by cosine similarity between the input's embedding and the embeddings of the task's
class prompts (``template.format(label_prompts.get(label, label))``), times a logit scale; the loss is cross-entropy
over the task's classes. There are no head parameters, so the untouched model classifies every task before any
training, and training a task only moves the encoder (its adapter). Two model families, told apart from the model:

* a sentence encoder (``AutoModel`` returning ``last_hidden_state``, e.g. all-MiniLM-L6-v2): one tower embeds inputs
  and prompts, pooled as the model folder's sentence-transformers files say (``modules.json`` -> the Pooling
  module's ``config.json``; masked mean when there are none), logit scale a fixed 20.0;
* ``CLIPModel`` (or any model with ``get_image_features`` and ``get_text_features``): images through the image
  tower, prompts through the text tower, logit scale CLIP's own ``logit_scale.exp()``.

:class:`ZeroShotClassifier` is the sibling of :class:`~.heads.TaskHeadClassifier` for this kind. Nothing is saved
but ``zero_shot.json`` (pooling, logit-scale rule, each task's labels, template and label prompts).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Hashable, Optional

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .heads import POOLING_MODES, EncoderTaskModel, pool
from .run_folder import atomic_write_text


ZERO_SHOT_CONFIG = "zero_shot.json"
SENTENCE_LOGIT_SCALE = 20.0  # sentence-transformers' usual scale for cross-entropy over cosine similarities
SENTENCE_ENCODER = "sentence_encoder"
DUAL_TOWER = "dual_tower"
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# sentence-transformers' Pooling config: `pooling_mode` (str or list; sentence-transformers >= 6) or, in older
# folders, one boolean key per mode.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def sentence_pooling(model_dir: str | os.PathLike) -> Optional[str]:
    """The pooling (one of :data:`POOLING_MODES`) that the sentence-transformers files of ``model_dir`` declare:
    ``modules.json`` -> the Pooling module's folder -> its ``config.json``. None when the folder has no such files
    (e.g. a plain transformers model or a hub id); a declared pooling we cannot reproduce raises a one-line
    ``ValueError``."""
    folder = Path(model_dir)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read {modules_file}: {err}".replace("\n", " ")) from None
    entry = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None)
    if entry is None:
        return None
    config_file = folder / str(entry.get("path", "")) / "config.json"
    if not config_file.is_file():
        return None  # sentence-transformers' own default then is mean pooling, as ours
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read {config_file}: {err}".replace("\n", " ")) from None
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{config_file} asks for pooling {modes}; zero_shot supports one of {list(POOLING_MODES)} (pass pooling=)."
        )
    return modes[0]


def tower_embedding(output: Any) -> torch.Tensor:
    """The ``(batch, dim)`` embedding a tower call (``get_image_features``/``get_text_features``) returned: the
    tensor itself (transformers 4), or the projected ``pooler_output`` of the output object (transformers 5), or its
    ``image_embeds``/``text_embeds``."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"Cannot find an embedding in the tower output {type(output).__name__}.")


def base_model_of(encoder: nn.Module) -> nn.Module:
    """The transformers model inside ``encoder`` (a ``PeftModel``'s base model, or ``encoder`` itself)."""
    get_base_model = getattr(encoder, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else encoder


def _takes_argument(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def class_prompts(
    task: str, labels: list[str], template: str = "{}", label_prompts: Optional[dict] = None
) -> list[str]:
    """The texts embedded for ``task``'s classes, in label order: ``template.format(label_prompts.get(label,
    label))``. Raises a one-line ``ValueError`` naming the task for a bad template (no ``{}``), a label prompt of
    no known label or an empty one, or an empty or repeated label list."""
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"Task {task!r}: its labels {labels} must be a non-empty list without repeats.")
    if not isinstance(template, str):
        raise ValueError(f"Task {task!r}: template must be a string, got {type(template).__name__}.")
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError) as err:  # e.g. two placeholders, a named one, a lone brace
        raise ValueError(
            f"Task {task!r}: template {template!r} is not a format string with one '{{}}' ({err})."
        ) from None
    if "\0" not in filled:  # also catches an escaped '{{}}', which formats to a literal '{}'
        raise ValueError(f"Task {task!r}: template {template!r} has no '{{}}' placeholder for the class name.")
    label_prompts = label_prompts or {}
    for label, prompt in label_prompts.items():
        if label not in labels:
            raise ValueError(f"Task {task!r}: label_prompts names {label!r}, which is not one of its labels.")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"Task {task!r}: the prompt of label {label!r} in label_prompts is empty.")
    return [template.format(label_prompts.get(label, label)) for label in labels]


class ZeroShotClassifier(EncoderTaskModel):
    """An encoder (e.g. a ``PeftModel`` over a sentence encoder or ``CLIPModel``) scoring each task's classes by
    cosine similarity to the embeddings of their prompts; no parameters of its own.

    ``forward`` classifies among the classes of :attr:`current_task` (set by :meth:`set_task`); the encoder's routing
    (which adapter or continual task it uses) is the caller's business, and prompts are embedded under the routing
    in force when they are embedded, the same as the inputs.

    Args:
        encoder (`nn.Module`): a ``PeftModel`` or the plain model: a sentence encoder returning ``last_hidden_state``
            (batch, seq, hidden) for ``input_ids``/``attention_mask``, or a model with ``get_image_features`` and
            ``get_text_features`` (``CLIPModel``).
        tokenizer: tokenizes the class prompts (for CLIP, the CLIP tokenizer).
        pooling (`str`, *optional*): sentence encoders only: 'mean', 'cls' or 'max'. Default: what the model
            folder's sentence-transformers files say (:func:`sentence_pooling`), else 'mean'.
        logit_scale (`float`, *optional*): fixed multiplier of the cosine similarities. Default: the model's own
            ``logit_scale.exp()`` for a dual-tower model, :data:`SENTENCE_LOGIT_SCALE` for a sentence encoder.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        pooling: Optional[str] = None,
        logit_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        base = base_model_of(encoder)
        name = type(base).__name__
        if callable(getattr(base, "get_text_features", None)) and callable(getattr(base, "get_image_features", None)):
            family = DUAL_TOWER
            if pooling is not None:
                raise ValueError(f"pooling applies to sentence encoders; {name} pools in its own towers.")
            if logit_scale is None and not isinstance(getattr(base, "logit_scale", None), torch.Tensor):
                raise ValueError(f"{name} has no logit_scale of its own; pass logit_scale=.")
        elif _takes_argument(base, "input_ids"):
            family = SENTENCE_ENCODER
            if pooling is None:
                pooling = sentence_pooling(getattr(base.config, "name_or_path", "") or "") or "mean"
            if pooling not in POOLING_MODES:
                raise ValueError(f"pooling must be one of {list(POOLING_MODES)}, got {pooling!r}.")
        else:
            raise ValueError(f"zero_shot tasks need a model with a text side to embed class prompts (got {name}).")
        if tokenizer is None:
            raise ValueError(f"zero_shot tasks need a tokenizer to embed class prompts for {name} (got None).")
        if logit_scale is not None and not float(logit_scale) > 0:
            raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}.")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.family = family
        self.pooling = pooling if family == SENTENCE_ENCODER else None
        if logit_scale is None and family == SENTENCE_ENCODER:
            logit_scale = SENTENCE_LOGIT_SCALE
        self.logit_scale = None if logit_scale is None else float(logit_scale)  # None: the model's own
        self.labels: dict[str, list[str]] = {}
        self.templates: dict[str, str] = {}
        self.label_prompts: dict[str, dict[str, str]] = {}
        self.current_task: Optional[str] = None
        self._prompt_tokens: dict[str, dict[str, torch.Tensor]] = {}  # task -> tokenized prompts (CPU)
        self._prompt_cache: dict[tuple, torch.Tensor] = {}

    # -- tasks ------------------------------------------------------------------------------------------------
    def add_task(
        self, task: str, labels: list[str], template: str = "{}", label_prompts: Optional[dict[str, str]] = None
    ) -> None:
        """Register ``task``'s classes (in label order) and how their prompts read: class ``label`` is embedded as
        ``template.format(label_prompts.get(label, label))``."""
        if task in self.labels:
            raise ValueError(f"Task {task!r} already has classes.")
        labels = [str(x) for x in labels]
        label_prompts = {str(k): v for k, v in (label_prompts or {}).items()}
        class_prompts(task, labels, template, label_prompts)  # validates
        self.labels[task] = labels
        self.templates[task] = template
        self.label_prompts[task] = label_prompts
        self._prompt_tokens.pop(task, None)

    def prompts(self, task: str) -> list[str]:
        """The texts embedded for ``task``'s classes, in label order."""
        self._check_task(task)
        return class_prompts(task, self.labels[task], self.templates[task], self.label_prompts[task])

    def set_task(self, task: str) -> None:
        """Classify among ``task``'s classes (there is nothing of the classifier's own to make trainable)."""
        self._check_task(task)
        self.current_task = task

    def _check_task(self, task: str) -> None:
        if task not in self.labels:
            raise ValueError(f"No classes for task {task!r}; tasks: {list(self.labels)}.")

    # -- embeddings -------------------------------------------------------------------------------------------
    def features(
        self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None, **encoder_kwargs
    ) -> torch.Tensor:
        """L2-normalized input embeddings ``(batch, dim)``: texts (``input_ids``/``attention_mask``/
        ``token_type_ids``) for a sentence encoder, images (``pixel_values``) for a dual-tower model. Extra kwargs go
        to the encoder call (a sentence encoder's forward, which takes e.g. ``task_ids``; ``get_image_features``,
        which does not: route a dual-tower model with ``peft_model.base_model.route(task_ids)`` instead)."""
        if self.family == SENTENCE_ENCODER:
            if pixel_values is not None or input_ids is None:
                raise ValueError("A sentence encoder embeds texts: features needs input_ids and no pixel_values.")
            text = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self._embed_texts(text, **encoder_kwargs)
        if pixel_values is None or input_ids is not None:
            raise ValueError(
                f"{type(base_model_of(self.encoder)).__name__} embeds images: features needs pixel_values and no "
                "input_ids (the texts it embeds are the class prompts)."
            )
        if "task_ids" in encoder_kwargs:
            raise ValueError(
                "task_ids cannot reach a dual-tower model's image tower (get_image_features skips the model forward "
                "hook that reads it); route with `with peft_model.base_model.route(task_ids):` around the call instead."
            )
        image = base_model_of(self.encoder).get_image_features(pixel_values=pixel_values, **encoder_kwargs)
        return nn.functional.normalize(tower_embedding(image), dim=-1)

    def prompt_features(self, task: str, cache_key: Optional[Hashable] = None) -> torch.Tensor:
        """L2-normalized embeddings ``(num_classes, dim)`` of ``task``'s class prompts, computed with the encoder
        under the routing in force now.

        While the prompt side trains (one of its parameters requires grad, and grad is enabled) they are recomputed
        on every call, so that gradients reach it, and every cached entry is dropped (the weights are about to
        change). Otherwise the result is cached per ``task``, ``cache_key`` (e.g. the route the caller set) and
        what the classifier can see of the routing (the active adapters; the continual route requested, or the
        active task); :meth:`clear_prompt_cache` empties the cache -- call it whenever the encoder's weights
        change otherwise (after a training phase, after loading an adapter).
        """
        self._check_task(task)
        if torch.is_grad_enabled() and self.prompt_side_trains():
            self._prompt_cache.clear()
            return self._embed_prompts(task)
        signature = self._routing_signature()
        if signature is None:  # the route depends on the inputs: the prompts' embedding may change with each batch
            return self._embed_prompts(task)
        key = (task, cache_key, signature)
        cached = self._prompt_cache.get(key)
        if cached is None:
            cached = self._prompt_cache[key] = self._embed_prompts(task).detach()
        return cached

    def clear_prompt_cache(self) -> None:
        """Forget every cached prompt embedding."""
        self._prompt_cache.clear()

    def prompt_side_trains(self) -> bool:
        """Whether a parameter the prompts go through requires grad (the text tower, or the sentence encoder)."""
        return any(p.requires_grad for module in self._prompt_modules() for p in module.parameters())

    def logit_scale_value(self) -> torch.Tensor:
        """The multiplier of the cosine similarities: CLIP's ``logit_scale.exp()`` or the fixed scale."""
        if self.logit_scale is not None:
            return torch.tensor(self.logit_scale)
        return base_model_of(self.encoder).logit_scale.exp()

    def logits(self, features: torch.Tensor, task: str, cache_key: Optional[Hashable] = None) -> torch.Tensor:
        """Scaled cosine similarities ``(batch, len(labels[task]))`` of normalized ``features`` ``(batch, dim)``
        to ``task``'s class prompts."""
        return self._similarities(features, self.prompt_features(task, cache_key))

    def _similarities(self, features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale_value().to(device=features.device, dtype=features.dtype)
        return scale * features @ prompts.to(features.dtype).T

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None, labels=None):
        task = self.current_task
        if task is None:
            raise ValueError("Call set_task(task) before training or evaluating the classifier.")
        prompt_side_trains = torch.is_grad_enabled() and self.prompt_side_trains()
        if prompt_side_trains or (torch.is_grad_enabled() and self._records_regularization()):
            # A training step: one model forward embeds the inputs and the prompts, so the encoder's per-forward
            # state (the loss terms get_regularization_loss returns, a continual method's routing) covers both, as
            # in a plain forward. Separate calls would leave only the prompts' terms (sentence encoder) or never
            # reset the terms at all (CLIP's get_*_features skip the model forward's hooks).
            features, prompts = self._embed_with_prompts(input_ids, attention_mask, token_type_ids, pixel_values, task)
            if prompt_side_trains:
                self._prompt_cache.clear()  # the prompt side's weights are about to change
            logits = self._similarities(features, prompts)
        else:
            logits = self.logits(self.features(input_ids, attention_mask, token_type_ids, pixel_values), task)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # -- persistence ------------------------------------------------------------------------------------------
    def save_tasks(self, directory: str | os.PathLike) -> None:
        """Write ``zero_shot.json`` (pooling, logit-scale rule, each task's labels, template and label prompts);
        there are no tensors to save."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "family": self.family,
            "pooling": self.pooling,
            "logit_scale": "model" if self.logit_scale is None else self.logit_scale,
            "tasks": {
                t: {"labels": self.labels[t], "template": self.templates[t], "label_prompts": self.label_prompts[t]}
                for t in self.labels
            },
        }
        path = directory / ZERO_SHOT_CONFIG
        atomic_write_text(path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    def load_tasks(self, directory: str | os.PathLike) -> None:
        """Add (or overwrite) the tasks saved in ``directory``; the saved pooling and logit-scale rule must match."""
        path = Path(directory) / ZERO_SHOT_CONFIG
        meta = json.loads(path.read_text(encoding="utf-8"))
        scale = "model" if self.logit_scale is None else self.logit_scale
        saved = (meta.get("family"), meta.get("pooling"), meta.get("logit_scale"))
        if saved != (self.family, self.pooling, scale):
            raise ValueError(
                f"{path} was written for (family, pooling, logit_scale) = {saved}, this classifier has "
                f"{(self.family, self.pooling, scale)}."
            )
        for task, spec in meta["tasks"].items():
            for store in (self.labels, self.templates, self.label_prompts, self._prompt_tokens):
                store.pop(task, None)
            self.add_task(task, spec["labels"], spec["template"], spec["label_prompts"])
        self.clear_prompt_cache()

    # -- internals --------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def _prompt_modules(self) -> list[nn.Module]:
        if self.family == SENTENCE_ENCODER:
            return [self.encoder]
        base = base_model_of(self.encoder)
        towers = [
            getattr(base, n) for n in ("text_model", "text_projection") if isinstance(getattr(base, n, None), nn.Module)
        ]
        return towers or [base]  # unknown layout: count every parameter as the prompt side's

    def _routing_signature(self) -> Optional[tuple]:
        """What selects the encoder's weights for prompts, as far as the classifier can see it (active adapters; a
        continual method's requested route, or its active tasks), plus the device and train/eval mode (dropout).
        None when a continual method routes per input (``"auto"``, one task per sample): nothing to cache then."""
        active = getattr(self.encoder, "active_adapters", None)  # a PeftModel's list (a plain model's is a method)
        active = tuple(active) if isinstance(active, (list, tuple)) else active if isinstance(active, str) else None
        routing = getattr(getattr(self.encoder, "base_model", None), "routing", None)
        requested = getattr(routing, "requested", None)
        if requested == "auto" or (requested is not None and not isinstance(requested, str)):
            return None
        default = tuple(sorted(getattr(routing, "active_task", {}).items())) if requested is None else None
        training = any(m.training for m in self._prompt_modules())
        return active, requested, default, self._device(), training

    def _tokenized_prompts(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self._prompt_tokens:
            base = base_model_of(self.encoder)
            config = getattr(base.config, "text_config", base.config)
            limits = [
                getattr(self.tokenizer, "model_max_length", None),
                getattr(config, "max_position_embeddings", None),
            ]
            limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
            enc = self.tokenizer(
                self.prompts(task),
                padding=True,
                truncation=True,
                max_length=min(limits) if limits else None,
                return_tensors="pt",
            )
            names = _TEXT_INPUTS if self.family == SENTENCE_ENCODER else ("input_ids", "attention_mask")
            self._prompt_tokens[task] = {k: v for k, v in enc.items() if k in names}
        device = self._device()
        return {k: v.to(device) for k, v in self._prompt_tokens[task].items()}

    def _embed_prompts(self, task: str) -> torch.Tensor:
        tokens = self._tokenized_prompts(task)
        if self.family == SENTENCE_ENCODER:
            return self._embed_texts(tokens)
        base = base_model_of(self.encoder)
        return nn.functional.normalize(tower_embedding(base.get_text_features(**tokens)), dim=-1)

    def _embed_texts(self, text: dict[str, Optional[torch.Tensor]], **encoder_kwargs) -> torch.Tensor:
        """Sentence encoder: pooled, normalized embeddings of tokenized texts."""
        kwargs = {k: v for k, v in text.items() if v is not None}
        out = self.encoder(**kwargs, **encoder_kwargs)
        if hasattr(out, "last_hidden_state"):
            hidden = out.last_hidden_state
        elif isinstance(out, (tuple, list)) or torch.is_tensor(out):
            hidden = out[0] if not torch.is_tensor(out) else out
        else:
            raise ValueError(
                f"zero_shot needs token states (last_hidden_state) from the encoder, got {type(out).__name__}."
            )
        return nn.functional.normalize(pool(hidden, kwargs.get("attention_mask"), self.pooling), dim=-1)

    def _records_regularization(self) -> bool:
        """Whether a training forward of the encoder records loss terms (a peft-ext tuner with a regularizer)."""
        return bool(getattr(getattr(self.encoder, "base_model", None), "has_regularization", False))

    def _embed_with_prompts(
        self, input_ids, attention_mask, token_type_ids, pixel_values, task: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One model forward: normalized embeddings of the inputs ``(batch, dim)`` and of ``task``'s prompts
        ``(num_classes, dim)``. A sentence encoder gets the two batches as one, right-padded to one length (the
        padding is masked out); a dual-tower model its own forward on images and prompts."""
        prompts = self._tokenized_prompts(task)
        if self.family == DUAL_TOWER:
            if pixel_values is None or input_ids is not None:
                raise ValueError(f"{type(base_model_of(self.encoder)).__name__} classifies images: pass pixel_values.")
            out = self.encoder(pixel_values=pixel_values, **prompts)
            return (nn.functional.normalize(out.image_embeds, dim=-1), nn.functional.normalize(out.text_embeds, dim=-1))
        if pixel_values is not None or input_ids is None:
            raise ValueError("A sentence encoder embeds texts: forward needs input_ids and no pixel_values.")
        text = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        batch, length = input_ids.shape
        width = max(length, prompts["input_ids"].shape[1])
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        joint = {}
        for name in _TEXT_INPUTS:
            ours, theirs = text.get(name), prompts.get(name)
            if name == "attention_mask" and ours is None:
                ours = torch.ones_like(input_ids)
            if ours is None and theirs is None:
                continue
            if ours is None or theirs is None:  # token_type_ids on one side only: zeros, BERT's default
                ours = torch.zeros_like(input_ids) if ours is None else ours
                theirs = torch.zeros_like(prompts["input_ids"]) if theirs is None else theirs
            fill = pad_id if name == "input_ids" else 0
            parts = [nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in (ours, theirs)]
            joint[name] = torch.cat([parts[0], parts[1].to(parts[0])])
        embeddings = self._embed_texts(joint)
        return embeddings[:batch], embeddings[batch:]


__all__ = [
    "SENTENCE_LOGIT_SCALE",
    "ZERO_SHOT_CONFIG",
    "ZeroShotClassifier",
    "base_model_of",
    "class_prompts",
    "sentence_pooling",
    "tower_embedding",
]
