"""Tiny, offline fixtures for tests and examples: a small BERT built from a config, its word-level tokenizer, and
synthetic keyword classification tasks whose vocabularies differ per task (so a task selector can tell them apart).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from datasets import Dataset


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# task -> (label -> keywords, filler words); labels overlap across tasks on purpose ("yes").
SYNTHETIC_TASKS: dict[str, tuple[dict[str, list[str]], list[str]]] = {
    "colors": (
        {"red": ["crimson", "scarlet"], "blue": ["navy", "azure"], "yes": ["teal", "cyan"]},
        ["paint", "wall", "shade", "bright"],
    ),
    "moods": ({"yes": ["happy", "glad"], "no": ["sad", "gloomy"]}, ["today", "feel", "very", "quite"]),
    "sports": (
        {"ball": ["soccer", "tennis"], "water": ["swim", "dive"], "ice": ["skate", "hockey"]},
        ["play", "team", "match", "score"],
    ),
}


def synthetic_vocab() -> list[str]:
    words = set()
    for labels, filler in SYNTHETIC_TASKS.values():
        words.update(filler)
        for keys in labels.values():
            words.update(keys)
    return SPECIAL + sorted(words)


def make_tokenizer(directory: str | Path):
    """A ``BertTokenizerFast`` over :func:`synthetic_vocab`, saved to ``directory``."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {word: i for i, word in enumerate(synthetic_vocab())}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tok.save_pretrained(str(directory))
    return tok


def make_tiny_bert(seed: int = 0, hidden_size: int = 32, layers: int = 2):
    """A randomly initialized 2-layer BERT (``BertModel``) with :func:`synthetic_vocab`'s size."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(synthetic_vocab()),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config)


def save_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Tiny BERT + tokenizer in one folder, loadable with ``AutoModel``/``AutoTokenizer.from_pretrained``."""
    directory = Path(directory)
    make_tokenizer(directory)
    make_tiny_bert(seed).save_pretrained(str(directory))
    return directory


def synthetic_rows(task: str, n: int, seed: int) -> list[dict[str, str]]:
    labels, filler = SYNTHETIC_TASKS[task]
    rng = random.Random(f"{task}-{seed}")
    names = sorted(labels)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        words = [rng.choice(filler) for _ in range(rng.randint(2, 5))] + [rng.choice(labels[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def synthetic_task(name: str, n_train: int = 48, n_eval: int = 24, seed: int = 0):
    """A :class:`~peft_ext.trainers.task_stream.Task` of keyword classification."""
    from .task_stream import Task

    return Task(
        name=name,
        train=Dataset.from_list(synthetic_rows(name, n_train, seed)),
        eval=Dataset.from_list(synthetic_rows(name, n_eval, seed + 1)),
    )


def synthetic_zero_shot_task(name: str, n_train: int = 48, n_eval: int = 24, seed: int = 0):
    """:func:`synthetic_task` of kind ``zero_shot``: a class's prompt is its first keyword (a word of the tokenizer's
    vocabulary, unlike some labels)."""
    from .task_stream import ZERO_SHOT

    task = synthetic_task(name, n_train, n_eval, seed)
    labels, _ = SYNTHETIC_TASKS[name]
    task.kind = ZERO_SHOT
    task.label_prompts = {label: words[0] for label, words in labels.items()}
    task.__post_init__()  # validates the prompts
    return task


def write_synthetic_stream(
    directory: str | Path, names: Optional[list[str]] = None, n_train: int = 48, n_eval: int = 24
) -> Path:
    """Write ``TASKS.json`` plus one train/eval ``.jsonl`` pair per task; returns the TASKS.json path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in names or list(SYNTHETIC_TASKS):
        for split, n, seed in (("train", n_train, 0), ("eval", n_eval, 1)):
            with open(directory / f"{name}.{split}.jsonl", "w") as f:
                for row in synthetic_rows(name, n, seed):
                    f.write(json.dumps(row) + "\n")
        entries.append({"name": name, "train": f"{name}.train.jsonl", "eval": f"{name}.eval.jsonl"})
    path = directory / "tasks.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


__all__ = [
    "SYNTHETIC_TASKS",
    "make_tiny_bert",
    "make_tokenizer",
    "save_tiny_model",
    "synthetic_task",
    "synthetic_zero_shot_task",
    "synthetic_vocab",
    "write_synthetic_stream",
]
