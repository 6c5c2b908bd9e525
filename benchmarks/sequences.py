"""Harder task sequences built from the embedded data, for the benchmarks (the embedded default separates its tasks
by language, which makes telling them apart easy):

* ``in_domain``: the four English topic tasks of ``trainers/data/zero_shot`` (politics/law/education,
  literature/songs-poems/startrek, linux/perl/science, men-women/drugs/work) run as classification: class-incremental,
  one language, tasks that differ by topic only;
* ``domain_incremental``: one label set, ``computers`` vs ``other``, in each language of the default sequence
  (English, Italian, Spanish quotations; ``other`` is an equal-sized, seeded sample of that language's two other
  topics): the domain moves, the labels do not.
"""

from __future__ import annotations

import dataclasses
import random

from datasets import Dataset

from peft_ext.trainers import default_task_stream
from peft_ext.trainers.task_stream import CLASSIFICATION, ZERO_SHOT, Task


SEQUENCES = ("default", "in_domain", "domain_incremental")


def in_domain() -> list[Task]:
    return [
        dataclasses.replace(task, kind=CLASSIFICATION, template="{}", label_prompts={})
        for task in default_task_stream(ZERO_SHOT)
    ]


def _computers_vs_other(split: Dataset, seed: int) -> Dataset:
    rows = list(split)
    computers = [r for r in rows if r["label"] == "computers"]
    other = [r for r in rows if r["label"] != "computers"]
    other = random.Random(seed).sample(other, min(len(other), len(computers)))
    mixed = computers + [{**r, "label": "other"} for r in other]
    random.Random(seed + 1).shuffle(mixed)
    return Dataset.from_list(mixed)


def domain_incremental() -> list[Task]:
    tasks = []
    for i, task in enumerate(default_task_stream(CLASSIFICATION)):
        language = task.name.split("_")[0]
        tasks.append(
            Task(
                name=f"{language}_computers",
                train=_computers_vs_other(task.train, seed=i),
                eval=_computers_vs_other(task.eval, seed=100 + i),
                labels=["computers", "other"],
            )
        )
    return tasks


def sequence(name: str) -> list[Task]:
    if name == "default":
        return default_task_stream(CLASSIFICATION)
    if name == "in_domain":
        return in_domain()
    if name == "domain_incremental":
        return domain_incremental()
    raise ValueError(f"Unknown sequence {name!r}; choose one of {', '.join(SEQUENCES)}.")
