"""Causal-LM continual learning: the task kind ``"generation"``.

A task is a set of ``prompt -> target`` pairs. The model (a ``PeftModel`` over an ``AutoModelForCausalLM``: Llama,
Qwen2, Mistral, GPT-2, SmolLM2, ...) is trained with the causal-LM loss on the target tokens only, and scored by
generating an answer for each prompt (greedy) and comparing it to the target (exact match and ROUGE-L, from the local
``evaluate`` module ``generation_metrics.py``). There are no per-task parameters: a task only moves the adapter, so
the untouched model can be scored on every task before any training, as with the zero_shot kind.

Text layout. A training row is the prompt followed by the target, as they are (no chat template, no separator added),
then the tokenizer's EOS::

    [leading special tokens, e.g. BOS] prompt tokens | target tokens EOS
    labels: -100 ...                             -100 | target tokens EOS

so the prompt must end with whatever separator the task wants (``"...\\nAnswer:"``); the target is whatever the
model should write after it. The prompt is tokenized exactly as :func:`generate_answers` tokenizes it (the
tokenizer's leading special tokens -- Llama's BOS -- then the prompt text without special tokens), and the target
tokens are the ones the tokenizer gives the target *in context* (``tokenize(prompt + target)`` past the prompt's
tokens), or, where the two texts do not split at the prompt's end, the target tokenized on its own without special
tokens. No BOS (or any other special token the tokenizer adds) lands in the middle or at the end of a row.

:class:`GenerationTaskModel` is the sibling of :class:`~.heads.TaskHeadClassifier` and
:class:`~.zero_shot.ZeroShotClassifier` for this kind. Nothing is saved but ``generation.json`` (the tasks with their
generation length, the default length, the answer normalization).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import evaluate
import torch
from torch import nn

from .heads import EncoderTaskModel
from .run_folder import atomic_write_text
from .zero_shot import base_model_of


GENERATION_CONFIG = "generation.json"
GENERATION_METRIC_SCRIPT = Path(__file__).resolve().parent / "generation_metrics.py"
NORMALIZATIONS = ("squad", "strip")  # as generation_metrics.NORMALIZATIONS (that module imports nothing from here)
IGNORE_INDEX = -100  # the label of a position that carries no loss (transformers' cross-entropy ignore_index)
DEFAULT_MAX_NEW_TOKENS = 32
# Tokens an answer may run past the longest training target (with its EOS) before generation stops: enough that an
# answer which goes on after a right start is still seen to be wrong, few enough that a rambling model (the untouched
# one) costs a few tokens per prompt instead of DEFAULT_MAX_NEW_TOKENS.
ANSWER_SLACK = 3


# -- models and tokenizers -------------------------------------------------------------------------------------------
def check_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (a ``PeftModel`` or the model itself), checked to be a causal LM
    (it can ``generate`` and is not an encoder-decoder); a one-line ``ValueError`` naming its class otherwise."""
    base = base_model_of(model)
    can_generate = getattr(base, "can_generate", None)
    config = getattr(base, "config", None)
    if not (callable(can_generate) and can_generate()) or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "generation tasks need a causal language model (AutoModelForCausalLM); got " + type(base).__name__
        )
    return base


def pad_id_of(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (the collator and :func:`generate_answers` mask
    padding out by position, so a pad id equal to EOS is safe)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token to pad with.")


def eos_id_of(tokenizer: Any) -> int:
    value = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(value, int):
        raise ValueError(f"generation tasks need a tokenizer with an EOS token; {type(tokenizer).__name__} has none.")
    return value


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when it adds special tokens (Llama: ``([bos], [])``,
    GPT-2 and Qwen2: ``([], [])``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []  # an unusual tokenizer: add nothing rather than guess


def _texts(values: Sequence[Any], what: str) -> list[str]:
    if isinstance(values, str):
        raise ValueError(f"{what} must be a list of strings, not one string.")
    return ["" if v is None else str(v) for v in values]


def _where(task: Optional[str], row: int) -> str:
    return f"Task {task!r}, row {row}" if task is not None else f"Row {row}"


def _keep_prompt(prefix: list[int], prompt: list[int], room: Optional[int]) -> list[int]:
    """``prefix + prompt`` with the prompt cut from the left to at most ``room`` tokens (None: no limit)."""
    if room is not None and len(prompt) > room:
        prompt = prompt[len(prompt) - room :] if room > 0 else []
    return prefix + prompt


def encode_prompts(
    tokenizer: Any, prompts: Sequence[Any], max_length: Optional[int] = None, task: Optional[str] = None
) -> dict[str, list[list[int]]]:
    """Prompts as the model reads them before answering: the tokenizer's leading special tokens (BOS) then the
    prompt's tokens; a prompt longer than ``max_length`` loses tokens from the left (the leading special tokens
    stay). Returns ``input_ids`` and ``attention_mask`` lists. An empty result (an empty prompt and no BOS) is a
    one-line ``ValueError`` naming the row."""
    prompts = _texts(prompts, "prompts")
    prefix, _ = _special_affixes(tokenizer)
    room = None if max_length is None else max_length - len(prefix)
    if room is not None and room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a prompt token.")
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    rows = []
    for i, tokens in enumerate(ids):
        row = _keep_prompt(prefix, list(tokens), room)
        if not row:
            raise ValueError(f"{_where(task, i)}: the prompt is empty (and the tokenizer adds no BOS to start from).")
        rows.append(row)
    return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}


def encode_examples(
    tokenizer: Any,
    prompts: Sequence[Any],
    targets: Sequence[Any],
    max_length: Optional[int] = None,
    task: Optional[str] = None,
) -> dict[str, list[list[int]]]:
    """Training rows ``prompt tokens + target tokens + EOS`` (see the module docstring for the exact layout), with
    ``labels`` -100 on the prompt (and its leading special tokens) and the token ids on the target and EOS.

    A row longer than ``max_length`` keeps its whole target and EOS: the prompt is cut from the left (its leading
    special tokens stay). One-line ``ValueError`` naming the row (and ``task`` when given) for an empty target, an
    empty prompt with no BOS, or a target too long to leave room for one prompt token within ``max_length``.
    """
    prompts, targets = _texts(prompts, "prompts"), _texts(targets, "targets")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets.")
    for i, target in enumerate(targets):
        if not target.strip():
            raise ValueError(f"{_where(task, i)}: the target is empty; every row needs an answer to learn.")
    eos = eos_id_of(tokenizer)
    prefix, _ = _special_affixes(tokenizer)
    if not prompts:
        return {"input_ids": [], "attention_mask": [], "labels": []}
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    joint_ids = tokenizer([p + t for p, t in zip(prompts, targets)], add_special_tokens=False)["input_ids"]
    alone = {}  # row -> the target tokenized on its own, for rows whose joint text splits elsewhere
    for i, (p, j) in enumerate(zip(prompt_ids, joint_ids)):
        if list(j[: len(p)]) != list(p) or len(j) == len(p):
            alone[i] = None
    if alone:
        rows = sorted(alone)
        for i, ids in zip(rows, tokenizer([targets[i] for i in rows], add_special_tokens=False)["input_ids"]):
            alone[i] = list(ids)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for i, (p, j) in enumerate(zip(prompt_ids, joint_ids)):
        answer = (alone[i] if i in alone else list(j[len(p) :])) + [eos]
        room = None if max_length is None else max_length - len(prefix) - len(answer)
        if room is not None and room < min(1, len(p)):  # keep at least one prompt token when there is one
            raise ValueError(
                f"{_where(task, i)}: the target needs {len(answer)} tokens with EOS, which leaves no room for the "
                f"prompt within max_length {max_length}; raise max_length."
            )
        context = _keep_prompt(prefix, list(p), room)
        if not context:
            raise ValueError(f"{_where(task, i)}: the prompt is empty (and the tokenizer adds no BOS to start from).")
        out["input_ids"].append(context + answer)
        out["attention_mask"].append([1] * (len(context) + len(answer)))
        out["labels"].append([IGNORE_INDEX] * len(context) + answer)
    return out


class GenerationCollator:
    """Pads rows of :func:`encode_examples` (or :func:`encode_prompts`) into a batch of tensors; usable as a
    ``Trainer``'s ``data_collator``.

    ``input_ids`` are padded with the pad id (the tokenizer's pad token, else its EOS), ``attention_mask`` with 0 and
    ``labels`` (when the rows have them) with -100, on the right (training) or on the left (``padding_side="left"``,
    prompts to generate from). Other keys of the rows are dropped.

    Args:
        tokenizer: gives the pad id (unless ``pad_token_id`` is given).
        pad_token_id (`int`, *optional*): the id to pad ``input_ids`` with.
        padding_side (`str`): "right" (default) or "left".
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        pad_token_id: Optional[int] = None,
        padding_side: str = "right",
        pad_to_multiple_of: Optional[int] = None,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        if pad_token_id is None:
            if tokenizer is None:
                raise ValueError("GenerationCollator needs a tokenizer or a pad_token_id.")
            pad_token_id = pad_id_of(tokenizer)
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("GenerationCollator got no rows.")
        ids = [_as_list(r["input_ids"]) for r in rows]
        masks = [_as_list(r["attention_mask"]) if "attention_mask" in r else [1] * len(i) for r, i in zip(rows, ids)]
        with_labels = ["labels" in r and r["labels"] is not None for r in rows]
        if any(with_labels) and not all(with_labels):
            raise ValueError("GenerationCollator got rows with and without labels in one batch.")
        width = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": self._pad(ids, width, self.pad_token_id),
            "attention_mask": self._pad(masks, width, 0),
        }
        if all(with_labels):
            batch["labels"] = self._pad([_as_list(r["labels"]) for r in rows], width, IGNORE_INDEX)
        return batch

    def _pad(self, rows: list[list[int]], width: int, value: int) -> torch.Tensor:
        fill = [[value] * (width - len(r)) for r in rows]
        padded = [f + r if self.padding_side == "left" else r + f for r, f in zip(rows, fill)]
        return torch.tensor(padded, dtype=torch.long)


def _as_list(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


# -- generation ------------------------------------------------------------------------------------------------------
def _stop_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS (what training appends) and the model's own EOS ids."""
    ids = [eos_id_of(tokenizer)]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    max_prompt_length: Optional[int] = None,
) -> list[str]:
    """Greedy answers to ``prompts``, in order: batched (prompts of similar lengths together), LEFT-padded, at most
    ``max_new_tokens`` new tokens each, stopping at EOS; only the new tokens are decoded, without special tokens and
    surrounding whitespace.

    ``model`` is a ``PeftModel`` over a causal LM, the causal LM itself, or a :class:`GenerationTaskModel`. Its
    routing is the caller's: wrap the call in ``peft_model.route(task)`` (or ``route("auto")``) as for any forward.
    The model runs in eval mode; every module's train/eval mode is restored afterwards. Prompts are tokenized as
    training tokenizes them (:func:`encode_prompts`), cut from the left to ``max_prompt_length`` tokens if given.
    Decoding is pure greedy whatever the model's ``generation_config`` says (no sampling, beams, repetition penalty,
    n-gram blocking or minimum length).
    """
    lm = model.encoder if isinstance(model, GenerationTaskModel) else model
    check_causal_lm(lm)
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}.")
    rows = encode_prompts(tokenizer, prompts, max_prompt_length)["input_ids"]
    if not rows:
        return []
    collate = GenerationCollator(tokenizer, padding_side="left")
    stop = _stop_ids(tokenizer, base_model_of(lm))
    device = next(lm.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    answers: list[str] = [""] * len(rows)
    modes = [(m, m.training) for m in lm.modules()]
    lm.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([{"input_ids": rows[i]} for i in chunk]).items()}
            out = lm.generate(
                **batch,
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                min_new_tokens=0,
                pad_token_id=collate.pad_token_id,
                eos_token_id=stop,
            )
            for i, new in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist()):
                ends = [k for k, t in enumerate(new) if t in stop]
                new = new[: ends[0]] if ends else new
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        for module, training in modes:
            module.training = training
    return answers


def load_generation_metric(**kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the local exact-match / ROUGE-L module (no network); kwargs go to ``evaluate.load``."""
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(GENERATION_METRIC_SCRIPT), **kwargs)


# -- the task model --------------------------------------------------------------------------------------------------
class GenerationTaskModel(EncoderTaskModel):
    """A causal LM (e.g. a ``PeftModel`` over ``AutoModelForCausalLM``) trained on prompt -> target tasks; no
    parameters of its own.

    ``forward`` returns the model's causal-LM output, whose loss covers the target tokens only (the rows'
    ``labels``, from :func:`encode_examples`, are -100 on the prompt). The encoder's routing (which adapter or
    continual task it uses) is the caller's business, in training as in :meth:`generate_answers`.

    Args:
        encoder (`nn.Module`): a ``PeftModel`` or the plain model, an ``AutoModelForCausalLM``; anything else (an
            encoder-only ``AutoModel``, an encoder-decoder) is refused with a one-line ``ValueError``.
        tokenizer: the model's tokenizer; it needs an EOS token (the pad token defaults to it).
        max_new_tokens (`int`): the answer length a task generates unless :meth:`add_task` says otherwise.
        normalization (`str`): how answers are compared ("squad" or "strip", see ``generation_metrics.py``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        normalization: str = "squad",
    ) -> None:
        super().__init__()
        base = check_causal_lm(encoder)
        if tokenizer is None:
            raise ValueError(f"generation tasks need the tokenizer of {type(base).__name__} (got None).")
        eos_id_of(tokenizer)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}.")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_new_tokens = _positive(max_new_tokens, "max_new_tokens")
        self.normalization = normalization
        self.tasks: dict[str, int] = {}  # task -> its max_new_tokens
        self.current_task: Optional[str] = None
        # The Trainer passes num_items_in_batch (the batch's target-token count over all accumulation steps) when
        # the model takes it: the loss is then token-weighted across micro-batches, as transformers' own LMs do.
        self.accepts_loss_kwargs = _takes_loss_kwargs(base)

    # -- tasks ------------------------------------------------------------------------------------------------
    def add_task(self, task: str, max_new_tokens: Optional[int] = None) -> None:
        """Register ``task`` (bookkeeping only: there are no per-task parameters); ``max_new_tokens``: its answer
        length, default the model's."""
        if task in self.tasks:
            raise ValueError(f"Task {task!r} is already registered.")
        self.tasks[task] = self.max_new_tokens if max_new_tokens is None else _positive(max_new_tokens, task)

    def set_task(self, task: str) -> None:
        """Train and answer ``task`` (there is nothing of the model's own to make trainable)."""
        self._check_task(task)
        self.current_task = task

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"No generation task {task!r}; tasks: {list(self.tasks)}.")

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if num_items_in_batch is not None and labels is not None and self.accepts_loss_kwargs:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return self.encoder(**kwargs)

    def generate_answers(
        self, prompts: Sequence[Any], task: Optional[str] = None, batch_size: int = 8, **kwargs
    ) -> list[str]:
        """:func:`generate_answers` with ``task``'s answer length (default the current task's); the routing is the
        caller's, as for :meth:`forward`."""
        task = self.current_task if task is None else task
        if task is None:
            raise ValueError("Call set_task(task) or pass task= to generate answers.")
        self._check_task(task)
        return generate_answers(self.encoder, self.tokenizer, prompts, self.tasks[task], batch_size, **kwargs)

    # -- persistence ------------------------------------------------------------------------------------------
    def save_tasks(self, directory: str | os.PathLike) -> None:
        """Write ``generation.json`` (each task's answer length, the default length, the normalization); there are
        no tensors to save."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "normalization": self.normalization,
            "max_new_tokens": self.max_new_tokens,
            "tasks": {t: {"max_new_tokens": n} for t, n in self.tasks.items()},
        }
        path = directory / GENERATION_CONFIG
        atomic_write_text(path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    def load_tasks(self, directory: str | os.PathLike) -> None:
        """Add (or overwrite) the tasks saved in ``directory``; the saved normalization and default answer length
        must match this model's."""
        path = Path(directory) / GENERATION_CONFIG
        meta = json.loads(path.read_text(encoding="utf-8"))
        saved = (meta.get("normalization"), meta.get("max_new_tokens"))
        if saved != (self.normalization, self.max_new_tokens):
            raise ValueError(
                f"{path} was written for (normalization, max_new_tokens) = {saved}, this model has "
                f"{(self.normalization, self.max_new_tokens)}."
            )
        for task, spec in meta["tasks"].items():
            self.tasks.pop(task, None)
            self.add_task(task, spec.get("max_new_tokens"))


def answer_length(labels: Sequence[Sequence[int]]) -> int:
    """The new tokens to generate for a task whose training rows have ``labels`` (from :func:`encode_examples`):
    its longest target with EOS, plus :data:`ANSWER_SLACK`."""
    longest = max((sum(1 for t in row if t != IGNORE_INDEX) for row in labels), default=0)
    if longest < 1:
        raise ValueError("answer_length needs at least one row with a target.")
    return longest + ANSWER_SLACK


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens ({what}) must be a positive integer, got {value!r}.")
    return value


def _takes_loss_kwargs(base: nn.Module) -> bool:
    declared = getattr(base, "accepts_loss_kwargs", None)
    if isinstance(declared, bool):
        return declared
    try:
        params = inspect.signature(base.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch" for p in params)


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GENERATION_CONFIG",
    "GENERATION_METRIC_SCRIPT",
    "IGNORE_INDEX",
    "GenerationCollator",
    "GenerationTaskModel",
    "check_causal_lm",
    "encode_examples",
    "encode_prompts",
    "eos_id_of",
    "generate_answers",
    "load_generation_metric",
    "pad_id_of",
]
