"""Rebuild the embedded default task sequence from Debian's fortune packages (provenance script, not installed).

    apt-get install fortunes fortunes-it fortunes-es
    python trainers/data/build_default_tasks.py

Each task is a topic classification over quotations of one fortune collection; the label is the collection file a
quotation comes from. Three languages keep the tasks' input distributions apart (what a task selector has to
tell), and overlapping label names ("computers" in every task) exercise label sets that differ or overlap.
Licences: see NOTICE.md beside this file.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path


FORTUNES = Path("/usr/share/games/fortunes")
HERE = Path(__file__).resolve().parent

# task -> label -> fortune file (relative to FORTUNES)
TASKS: dict[str, dict[str, str]] = {
    "en_topics": {"computers": "computers", "food": "food", "sports": "sports"},
    "it_topics": {"computers": "it/computer", "laws": "it/leggi", "definitions": "it/definizioni"},
    "es_topics": {
        "computers": "es/informatica.fortunes",
        "science": "es/ciencia.fortunes",
        "family": "es/familia.fortunes",
    },
}
TRAIN_PER_LABEL, EVAL_PER_LABEL = 80, 40
MIN_CHARS, MAX_CHARS = 20, 200
SEED = 0


def read_entries(path: Path) -> list[str]:
    """The raw entries of a fortune file (split at its ``%`` lines), overstriking removed."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    raw = re.sub(r".\x08", "", raw)  # overstriking (x BACKSPACE x) in old BSD files
    return re.split(r"^%\s*$", raw, flags=re.M)


def is_prose(text: str) -> bool:
    """Within the length bounds and mostly letters: drops ASCII art and tables."""
    letters = sum(c.isalpha() for c in text)
    return MIN_CHARS <= len(text) <= MAX_CHARS and letters >= 0.6 * len(text)


def normalized(text: str) -> str:
    """Letters only, lower case: the key under which two copies of a quotation are one."""
    return re.sub(r"[^a-z]", "", text.lower())


def write_splits(folder: Path, task: str, train: list[dict], evaluation: list[dict]) -> None:
    """``folder/<task>.train.jsonl`` and ``folder/<task>.eval.jsonl``, one JSON row per line."""
    for split, rows in (("train", train), ("eval", evaluation)):
        with open(folder / f"{task}.{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_fortunes(path: Path) -> list[str]:
    texts = (" ".join(entry.split()) for entry in read_entries(path))
    return sorted({text for text in texts if is_prose(text)})


def main() -> None:
    rng = random.Random(SEED)
    index = []
    for task, labels in TASKS.items():
        train, evaluation = [], []
        for label, rel in labels.items():
            texts = read_fortunes(FORTUNES / rel)
            rng.shuffle(texts)
            n_eval = min(EVAL_PER_LABEL, len(texts) * 3 // 10)
            n_train = min(TRAIN_PER_LABEL, len(texts) - n_eval)
            evaluation += [{"text": t, "label": label} for t in texts[:n_eval]]
            train += [{"text": t, "label": label} for t in texts[n_eval : n_eval + n_train]]
        rng.shuffle(train)
        rng.shuffle(evaluation)
        write_splits(HERE, task, train, evaluation)
        index.append({"name": task, "train": f"{task}.train.jsonl", "eval": f"{task}.eval.jsonl"})
        print(task, len(train), len(evaluation))
    (HERE / "tasks.json").write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()
