"""Rebuild the embedded zero-shot task sequence from Debian's fortune packages (provenance script, not installed).

    apt-get install fortunes fortunes-min
    python trainers/data/build_zero_shot_tasks.py [FORTUNES_DIR]   # default /usr/share/games/fortunes

Writes zero_shot/tasks.json and zero_shot/<task>.{train,eval}.jsonl beside this file. Each task is a topic
classification of kind "zero_shot" over English quotations: the label is the fortune file a quotation comes from,
and the model scores a quotation against the class prompts TEMPLATE.format(LABEL_PROMPTS.get(label, label)). All
tasks are English and their label sets are disjoint (and disjoint from en_topics': computers, food, sports), so the
tasks differ by topic only. The tasks, template and prompts were chosen by measurement on validation rows carved from
the train rows (see NOTICE.md). Licences: see NOTICE.md beside this file.

Rows: the cleaning of build_default_tasks.read_fortunes (20-200 characters, whitespace collapsed, ASCII art dropped).
Each file is shuffled by its own seeded generator, so a file's split does not depend on the other files: the first
min(40, 30%) quotations are its eval rows, the next (at most 80) its train rows. A row is then dropped when its text
(letters only, lower case) also occurs in another file of the sequence or earlier in the same file, so no quotation
has two labels nor sits in both splits. Running the script twice gives identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from build_default_tasks import (
    EVAL_PER_LABEL,
    FORTUNES,
    SEED,
    TRAIN_PER_LABEL,
    normalized,
    read_fortunes,
    write_splits,
)


OUT = Path(__file__).resolve().parent / "zero_shot"

# task -> labels; a label is the name of its fortune file (relative to FORTUNES)
TASKS: dict[str, list[str]] = {
    "en_society": ["politics", "law", "education"],
    "en_culture": ["literature", "songs-poems", "startrek"],
    "en_tech": ["linux", "perl", "science"],
    "en_life": ["men-women", "drugs", "work"],
}
TEMPLATE = "{}"
# class prompt of a label whose file name is not a good English phrase
LABEL_PROMPTS = {
    "men-women": "men and women",
    "songs-poems": "songs and poems",
    "startrek": "Star Trek",
    "linux": "Linux",
    "perl": "Perl",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fortunes", nargs="?", type=Path, default=FORTUNES, help=f"default: {FORTUNES}")
    folder = parser.parse_args().fortunes
    files = {}
    for labels in TASKS.values():
        for label in labels:
            texts = read_fortunes(folder / label)
            random.Random(f"{SEED}:{label}").shuffle(texts)
            files[label] = texts
    OUT.mkdir(exist_ok=True)
    index = []
    for task, labels in TASKS.items():
        train, evaluation = [], []
        for label in labels:
            texts = files[label]
            elsewhere = {normalized(t) for other, ts in files.items() if other != label for t in ts}
            n_eval = min(EVAL_PER_LABEL, len(texts) * 3 // 10)
            n_train = min(TRAIN_PER_LABEL, len(texts) - n_eval)
            seen = set()
            for i, text in enumerate(texts[: n_eval + n_train]):
                key = normalized(text)
                if key not in elsewhere and key not in seen:
                    (evaluation if i < n_eval else train).append({"text": text, "label": label})
                seen.add(key)
        rng = random.Random(f"{SEED}:{task}")
        rng.shuffle(train)
        rng.shuffle(evaluation)
        write_splits(OUT, task, train, evaluation)
        index.append(
            {
                "name": task,
                "kind": "zero_shot",
                "train": f"{task}.train.jsonl",
                "eval": f"{task}.eval.jsonl",
                "template": TEMPLATE,
                "label_prompts": {label: LABEL_PROMPTS[label] for label in labels if label in LABEL_PROMPTS},
            }
        )
        print(task, len(train), len(evaluation))
    (OUT / "tasks.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
