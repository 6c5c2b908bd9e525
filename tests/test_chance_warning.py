"""A task that ends at chance is named in a warning, and every task's training accuracy is kept in run_state.json
(through task checkpoints, so a resumed run keeps it; checkpoints of earlier versions, without it, still resume)."""

import json
import logging
import shutil

import pytest
from datasets import Dataset

from peft_ext.trainers import ContinualSchedule, ContinualTrainingArguments, continual
from peft_ext.trainers.task_stream import Task
from peft_ext.trainers.testing import make_tiny_bert, make_tokenizer, synthetic_task


FAST = dict(epochs=20, lr=5e-2, batch_size=8, disable_tqdm=True, plots=False, seed=0)  # learns (test_continual)
NAMES = ["colors", "moods"]


def tiny_bert():
    return make_tiny_bert(seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def schedule(out, tokenizer, **kw):
    args = ContinualTrainingArguments(output_dir=str(out), method="lora", **{**FAST, **kw})
    return ContinualSchedule([synthetic_task(n) for n in NAMES], args, model=tiny_bert, tokenizer=tokenizer)


def run_state(out):
    return json.loads((out / "run_state.json").read_text())


def chance_warnings(text):
    return [line for line in text.splitlines() if "at chance" in line]


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tokenizer):
    """A finished run that learns both tasks, and the warnings it logged."""
    out = tmp_path_factory.mktemp("learned")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger(continual.__name__)
    log.addHandler(handler)
    try:
        result = schedule(out, tokenizer).run()
    finally:
        log.removeHandler(handler)
    return out, result, [r.getMessage() for r in records]


def test_a_task_left_at_chance_is_named_in_a_warning(tmp_path, tokenizer, caplog):
    with caplog.at_level("WARNING"):
        result = schedule(tmp_path / "run", tokenizer, epochs=1, lr=1e-9).run()
    warned = chance_warnings(caplog.text)
    for name in NAMES:
        assert sum(f"Task {name!r} ended with training accuracy" in line for line in warned) == 1
    assert all("not learned; try another learning rate (--lr) or more epochs." in line for line in warned)
    assert "at chance (majority class 0.50)" in next(line for line in warned if "'moods'" in line)
    state = run_state(tmp_path / "run")
    assert state["train_accuracy"] == result.train_accuracy and len(state["train_accuracy"]) == len(NAMES)
    assert "train_accuracy" not in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_a_task_that_is_learned_gives_no_warning(learned):
    out, result, warnings = learned
    assert not chance_warnings("\n".join(warnings))
    accuracy = run_state(out)["train_accuracy"]
    assert accuracy == result.train_accuracy and len(accuracy) == len(NAMES)
    assert all(a > 0.9 for a in accuracy)


def _resumable(learned, tmp_path):
    """The finished run, as if stopped before its last task's checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(learned[0], out)
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "checkpoints" / f"task-{len(NAMES) - 1:02d}")
    return out


def test_a_resumed_run_keeps_the_training_accuracy(learned, tmp_path, tokenizer, caplog):
    out = _resumable(learned, tmp_path)
    with caplog.at_level("WARNING"):
        schedule(out, tokenizer).run()
    assert "Resuming after task 0" in caplog.text
    assert run_state(out)["train_accuracy"] == run_state(learned[0])["train_accuracy"]


def test_a_checkpoint_without_training_accuracy_still_resumes(learned, tmp_path, tokenizer, caplog):
    out = _resumable(learned, tmp_path)
    state_file = out / "checkpoints" / "task-00" / "state.json"
    state = json.loads(state_file.read_text())
    del state["train_accuracy"]  # as written by earlier versions
    state_file.write_text(json.dumps(state))
    with caplog.at_level("WARNING"):
        result = schedule(out, tokenizer).run()
    assert "Resuming after task 0" in caplog.text
    assert run_state(out)["train_accuracy"] == [None, learned[1].train_accuracy[1]]
    assert result.accuracy == learned[1].accuracy


def test_at_chance_rule():
    assert continual._at_chance(0.5, 0.5) and continual._at_chance(0.55, 0.5)
    assert not continual._at_chance(0.56, 0.5)
    assert not continual._at_chance(1.0, 0.98)  # a perfect accuracy is learned, however skewed the labels


def test_the_train_sample_is_spread_over_the_split():
    rows = [{"text": f"w{i}", "label": "a" if i < 300 else "b"} for i in range(600)]  # sorted by label
    task = Task("sorted", train=Dataset.from_list(rows), eval=Dataset.from_list(rows[:2]))
    sample = ContinualSchedule._split(task, "train", continual.TRAIN_CHECK_EXAMPLES)
    assert len(sample) == continual.TRAIN_CHECK_EXAMPLES
    assert sample["label"].count("a") == sample["label"].count("b")
    assert len(ContinualSchedule._split(task, "eval", continual.TRAIN_CHECK_EXAMPLES)) == 2
