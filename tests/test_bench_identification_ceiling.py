"""benchmarks/bench_identification_ceiling.py: classes numbered across tasks, and identification read by task."""

import pytest
import torch
from benchmark_modules import benchmark_module
from datasets import Dataset

from peft_ext.trainers.task_stream import Task


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_identification_ceiling") as module:
        yield module


def _task(name, labels, rows):
    data = Dataset.from_list([{"text": f"{name} {i}", "label": labels[i % len(labels)]} for i in range(rows)])
    return Task(name=name, train=data, eval=data.select(range(4)), labels=labels)


def test_classes_are_numbered_across_tasks_and_rows_split_80_20(bench):
    tasks = [_task("a", ["x", "y"], 10), _task("b", ["x", "z", "w"], 15)]
    rows, class_task = bench.split_rows(tasks, seed=0)
    assert class_task.tolist() == [0, 0, 1, 1, 1]  # "x" of task b is class 2, not task a's class 0
    assert len(rows["fit"]) == 8 + 12 and len(rows["validation"]) == 2 + 3 and len(rows["eval"]) == 8
    for split in ("fit", "validation"):
        for text, c in rows[split]:
            task, i = text.split()
            assert class_task[c] == "ab".index(task)
            assert c == (0 if task == "a" else 2) + int(i) % (2 if task == "a" else 3)
    fit_texts = {t for t, _ in rows["fit"]}
    assert fit_texts.isdisjoint(t for t, _ in rows["validation"])
    assert rows == bench.split_rows(tasks, seed=0)[0] and rows != bench.split_rows(tasks, seed=1)[0]


def test_identification_counts_the_task_not_the_class(bench):
    class_task = torch.tensor([0, 0, 1, 1, 1])
    rows = [("", 0), ("", 1), ("", 2), ("", 4)]
    logits = torch.full((4, 5), -1.0)
    logits[0, 1] = logits[1, 0] = 1.0  # wrong class, right task: identified
    logits[2, 1] = 1.0  # task 0 for a task-1 row: not
    logits[3, 3] = 1.0  # right task
    assert bench.identification(logits, rows, class_task) == pytest.approx(0.75)
