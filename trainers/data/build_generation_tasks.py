"""Rebuild the embedded generation task sequence from Debian's fortune packages (provenance script, not installed).

    apt-get install fortunes fortunes-it fortunes-es
    python trainers/data/build_generation_tasks.py [FORTUNES_DIR]   # default /usr/share/games/fortunes

Writes generation/tasks.json and generation/<task>.{train,eval}.jsonl beside this file: rows {"prompt", "target"}.
Each task is of kind "generation": the model continues the prompt, and a prediction is right when it equals the target
after normalization (lower case, punctuation and the articles a/an/the removed, whitespace collapsed). Every prompt is
"Quotation: <text>\\n<cue>:" with a task's own cue, and every target is one word with a leading space (the prompt and
the target concatenate to the training text):

- topic_word: the topic of an English quotation, the fortune file it comes from: " food", " love" or " sports".
- language_code: the language of a quotation as an ISO 639-1 code: " en", " it" or " es".
- last_word: the last word of an English quotation, copied as written (open vocabulary).

The tasks differ in what they ask (a closed-set topic, a closed-set language, an open-vocabulary copy) and, for
language_code, in their input languages too. The untouched SmolLM2-135M-Instruct fails them (it rambles, and does not
know the label words or codes); a small LoRA learns each from its train rows. The tasks and prompts were chosen by
measurement on validation rows carved from the train rows (never the eval rows); see NOTICE.md.

Rows: a quotation is a fortune's text without its attribution (the "-- Author" lines at its end), whitespace
collapsed, overstriking removed, 20-200 characters, mostly letters (ASCII art dropped). A quotation whose text
(letters only, lower case) occurs in two source files of the sequence is left out, and so is a repeat within one
file. A class's files are read in the listed order; the class's quotations are shuffled by a generator seeded with
(SEED, task, class), so a class's split does not depend on the other classes: the first EVAL rows are its eval rows,
the next TRAIN its train rows. Each task's rows are then shuffled by its own seeded generator. Running the script
twice gives identical files. Licences: see NOTICE.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from build_default_tasks import FORTUNES, SEED, is_prose, normalized, read_entries, write_splits


OUT = Path(__file__).resolve().parent / "generation"

PROMPT = "Quotation: {text}\n{cue}:"

# task -> (cue, {class -> fortune files relative to FORTUNES}, eval rows per class, train rows per class).
# A class name is the target of its rows, except for last_word, whose target is the quotation's last word.
TASKS: dict[str, tuple[str, dict[str, list[str]], int, int]] = {
    "topic_word": ("Topic", {"food": ["food"], "love": ["love"], "sports": ["sports"]}, 20, 67),
    "language_code": (
        "Language code",
        {
            "en": ["fortunes", "miscellaneous"],
            "it": ["it/italia"],
            "es": ["es/vida.fortunes", "es/sabiduria.fortunes", "es/amistad.fortunes", "es/verdad.fortunes"],
        },
        20,
        67,
    ),
    "last_word": ("Last word", {"last_word": ["people", "wisdom", "platitudes"]}, 60, 200),
}

ATTRIBUTION = re.compile(r"^\s+--\s*\S")  # an indented "-- Author" line starts a fortune's attribution
# the last word of a quotation: letters with inner apostrophes, then closing punctuation only
LAST_WORD = re.compile(r"([^\W\d_]+(?:'[^\W\d_]+)*)[\"'.,;:!?)\]]*$")
ARTICLES = {"a", "an", "the"}


def read_quotations(path: Path) -> list[str]:
    """A fortune file's quotations (attribution dropped), cleaned as build_default_tasks.read_fortunes does."""
    out = []
    for entry in read_entries(path):
        lines = entry.strip("\n").split("\n")
        end = next((i for i, line in enumerate(lines) if ATTRIBUTION.match(line)), len(lines))
        text = " ".join(" ".join(lines[:end]).split())
        if is_prose(text):
            out.append(text)
    return out


def last_word(text: str) -> str | None:
    """The quotation's last word as written, or None when it does not end in a plain word (a number, a hyphenated
    word, an article, symbols)."""
    match = LAST_WORD.search(text)
    if match is None or (
        match.start() > 0 and not text[match.start() - 1].isspace() and text[match.start() - 1] not in "\"'(["
    ):
        return None
    word = match.group(1)
    return None if word.lower() in ARTICLES else word


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fortunes", nargs="?", type=Path, default=FORTUNES, help=f"default: {FORTUNES}")
    folder = parser.parse_args().fortunes
    files = {
        rel: read_quotations(folder / rel)
        for _, classes, _, _ in TASKS.values()
        for rels in classes.values()
        for rel in rels
    }
    owners: dict[str, set[str]] = {}
    for rel, texts in files.items():
        for text in texts:
            owners.setdefault(normalized(text), set()).add(rel)
    OUT.mkdir(exist_ok=True)
    index = []
    for task, (cue, classes, n_eval, n_train) in TASKS.items():
        train, evaluation = [], []
        for name, rels in classes.items():
            rows, seen = [], set()
            for rel in rels:
                for text in files[rel]:
                    key = normalized(text)
                    target = last_word(text) if task == "last_word" else name
                    if len(owners[key]) == 1 and key not in seen and target is not None:
                        rows.append({"prompt": PROMPT.format(text=text, cue=cue), "target": " " + target})
                    seen.add(key)
            random.Random(f"{SEED}:{task}:{name}").shuffle(rows)
            if len(rows) < n_eval + n_train:
                raise SystemExit(f"{task}/{name}: {len(rows)} quotations, {n_eval + n_train} needed")
            evaluation += rows[:n_eval]
            train += rows[n_eval : n_eval + n_train]
        rng = random.Random(f"{SEED}:{task}")
        rng.shuffle(train)
        rng.shuffle(evaluation)
        write_splits(OUT, task, train, evaluation)
        index.append(
            {
                "name": task,
                "kind": "generation",
                "train": f"{task}.train.jsonl",
                "eval": f"{task}.eval.jsonl",
                "prompt_column": "prompt",
                "target_column": "target",
            }
        )
        print(task, len(train), len(evaluation))
    (OUT / "tasks.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
