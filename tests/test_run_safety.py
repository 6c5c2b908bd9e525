"""The run folder and the task input, as a careful user probes them: nothing written outside the output folder,
nothing of the user's lost, resume only of the same run and never stuck, one-line errors for bad input."""

import json
import shutil
import subprocess
import sys

import pytest
from datasets import Dataset

from peft_ext.trainers import ContinualRunError, ContinualSchedule, ContinualTrainingArguments
from peft_ext.trainers.run_folder import MARKER_FILE, RunFolder
from peft_ext.trainers.task_stream import Task, TaskStreamError, load_task_stream
from peft_ext.trainers.testing import make_tiny_bert, make_tokenizer, save_tiny_model, synthetic_task


FAST = dict(epochs=2, lr=5e-2, batch_size=8, disable_tqdm=True, plots=False, seed=0)


def tiny_bert():
    return make_tiny_bert(seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def schedule(out, tokenizer, tasks=None, method_config=None, callbacks=None, **kw):
    args = ContinualTrainingArguments(output_dir=str(out), method="lora", **{**FAST, **kw})
    tasks = tasks if tasks is not None else [synthetic_task("colors"), synthetic_task("moods")]
    return ContinualSchedule(
        tasks, args, model=tiny_bert, tokenizer=tokenizer, method_config=method_config, callbacks=callbacks
    )


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


# -- 1. nothing written outside the output folder --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/tmp/peft-ext-outside/x", "../outside", "a/b", "..", "C:evil", "a\\b", " x"])
def test_a_task_name_is_never_a_path(tmp_path, name):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    tasks_json = tmp_path / "tasks.json"
    tasks_json.write_text(json.dumps([{"name": name, "train": "d.jsonl", "eval": "d.jsonl"}]))
    with pytest.raises(TaskStreamError, match="Invalid task name") as err:
        load_task_stream(tasks_json)
    assert "\n" not in str(err.value)
    good = synthetic_task("colors")
    with pytest.raises(TaskStreamError, match="Invalid task name"):
        Task(name, train=good.train, eval=good.eval)


def test_per_task_adapters_stay_inside_the_output_folder(tmp_path, tokenizer):
    out = tmp_path / "run"
    schedule(out, tokenizer, method_config={"adapter_per_task": True}, epochs=1).run()
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"run"}
    assert (out / "colors" / "adapter_model.safetensors").is_file()


# -- 3. nothing of the user's lost; one run per folder ---------------------------------------------------------------
def test_a_folder_of_other_files_is_refused_and_kept(tmp_path, tokenizer):
    out = tmp_path / "mine"
    (out / "trainer").mkdir(parents=True)
    (out / "trainer" / "notes.txt").write_text("keep me")
    with pytest.raises(ContinualRunError, match="is not empty and holds no peft-ext run.*--overwrite"):
        schedule(out, tokenizer).run()
    assert (out / "trainer" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["trainer"]


def test_overwrite_replaces_only_a_runs_files(tmp_path, tokenizer):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1, overwrite=True).run()
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "metrics.json").is_file() and (out / MARKER_FILE).is_file()
    # Another run over it (other seed) replaces the run's files, still not the user's.
    with pytest.raises(ContinualRunError, match="different peft-ext run"):
        schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1, seed=5).run()
    schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1, seed=5, overwrite=True).run()
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / MARKER_FILE).read_text())["fingerprint"]["training"]["seed"] == 5


def test_no_resume_on_a_finished_run_is_refused_not_wiped(tmp_path, tokenizer):
    out = tmp_path / "run"
    schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1).run()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ContinualRunError, match="holds this run already; drop --no_resume.*--overwrite"):
        schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1, resume=False).run()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "checkpoints" / "task-00" / "state.json").is_file()


def test_a_folder_in_use_by_another_run_is_refused(tmp_path, tokenizer):
    out = tmp_path / "run"
    first = schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1)
    first.folder.claim("new")  # holds the lock, as a run in progress does
    try:
        with pytest.raises(ContinualRunError, match=r"in use by another peft-ext run \(pid \d+\)"):
            schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1).run()
    finally:
        first.folder.release()
    schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1).run()  # free again
    assert (out / "metrics.json").is_file()


# -- 4. resume refuses what it cannot continue -----------------------------------------------------------------------
def _relabelled(name, extra_label):
    task = synthetic_task(name)
    rows = task.train.to_list() + [{"text": "crimson paint", "label": extra_label}]
    return Task(name, train=Dataset.from_list(rows), eval=task.eval)


@pytest.mark.parametrize(
    "change, differs",
    [
        (dict(epochs=3), "num_train_epochs"),
        (dict(lr=1e-2), "learning_rate"),
        (dict(batch_size=4), "per_device_train_batch_size"),
        (dict(max_length=16), "max_length"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
        (dict(tasks=[_relabelled("colors", "green")]), "task 'colors' labels"),
        (dict(tasks=[_relabelled("colors", "red")]), "task 'colors' data"),
        (dict(method_config={"r": 4}), "method_config"),
    ],
    ids=["epochs", "lr", "batch", "max_length", "accumulation", "labels", "data", "method_config"],
)
def test_resume_refuses_a_run_with_other_settings_or_data(tmp_path, tokenizer, change, differs):
    out = tmp_path / "run"
    one = [synthetic_task("colors")]
    schedule(out, tokenizer, tasks=one, epochs=1).run()
    kwargs = {"tasks": one, "epochs": 1, **change}
    with pytest.raises(ContinualRunError, match=f"differs in: {differs}"):
        schedule(out, tokenizer, **kwargs).run()
    assert (out / "metrics.json").is_file()  # the refused run touched nothing


def test_logging_options_do_not_block_a_resume(tmp_path, tokenizer):
    out = tmp_path / "run"
    schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1).run()
    again = schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1, logging_steps=3, plots=True).run()
    assert again.accuracy == [[metrics(out)["accuracy"][0][0]]]


# -- 5. resume never gets stuck --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("finished")
    schedule(out, tokenizer).run()
    return out


def _copy_unfinished(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "metrics.json").unlink()
    return out


def test_a_truncated_checkpoint_state_falls_back_to_the_previous_task(finished, tmp_path, tokenizer, caplog):
    out = _copy_unfinished(finished, tmp_path)
    state = out / "checkpoints" / "task-01" / "state.json"
    state.write_text(state.read_text()[:40])
    result = schedule(out, tokenizer).run()
    assert result.accuracy == metrics(finished)["accuracy"]
    assert str(state) in caplog.text and "unreadable" in caplog.text


def test_a_partial_checkpoint_is_never_a_resume_point(finished, tmp_path, tokenizer, caplog):
    out = _copy_unfinished(finished, tmp_path)
    checkpoints = out / "checkpoints"
    (checkpoints / "task-01").rename(checkpoints / "task-01.partial")  # complete-looking, but never renamed
    result = schedule(out, tokenizer).run()
    assert "Resuming after task 0" in caplog.text and "task-01.partial" in caplog.text
    assert result.accuracy == metrics(finished)["accuracy"]
    assert not (checkpoints / "task-01.partial").exists()


def test_an_empty_trainer_checkpoint_is_skipped(tmp_path, tokenizer, caplog):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("simulated kill")

    settings = dict(tasks=[synthetic_task("colors")], save_strategy="steps", save_steps=2)
    _, reference = tmp_path / "ref", schedule(tmp_path / "ref", tokenizer, **settings).run()
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated kill"):
        schedule(out, tokenizer, callbacks=[Crash()], **settings).run()
    trainer_dir = out / "trainer" / "task-00"
    assert (trainer_dir / "checkpoint-4" / "trainer_state.json").is_file()
    (trainer_dir / "checkpoint-6").mkdir()  # what a kill while the Trainer saved step 6 leaves
    (trainer_dir / "checkpoint-8").mkdir()
    (trainer_dir / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')
    result = schedule(out, tokenizer, **settings).run()
    assert result.accuracy == reference.accuracy
    assert "checkpoint-6" in caplog.text and "checkpoint-8" in caplog.text


# -- 8. one-line errors for bad input --------------------------------------------------------------------------------
def _tasks_file(tmp_path, train_text, train_name="train.jsonl", eval_text=None):
    (tmp_path / train_name).write_bytes(train_text if isinstance(train_text, bytes) else train_text.encode())
    (tmp_path / "eval.jsonl").write_text(eval_text or '{"text": "a", "label": 0}\n')
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"name": "t", "train": train_name, "eval": "eval.jsonl"}]))
    return path


@pytest.mark.parametrize(
    "content, name, message",
    [
        ("", "train.jsonl", "holds no rows"),
        ("\n\n", "train.jsonl", "holds no rows"),
        ("text,label\n", "train.csv", "holds no rows"),
        ("[]", "train.json", "holds no rows"),
        (b'{"text": "caf\xe9", "label": 0}\n', "train.jsonl", "train.jsonl is not UTF-8 text"),
        ('{"text": "a", "label": 0}\n{"text": "b"', "train.jsonl", "train.jsonl line 2 is not valid JSON"),
        ('{"text": "a", "label": 0}\n[1, 2]\n', "train.jsonl", "line 2 is not a JSON object"),
        ('{"text": "a", "label": 0}\n', "train.jsonl", r"one label \('0'\); a classification task needs at least two"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": null}\n', "train.jsonl", r"1 row\(s\) of the train split"),
        ('{"text": "a", "label": 0}\n{"text": "b"}\n', "train.jsonl", "have no label"),
        ("not parquet", "train.parquet", "Cannot read .*train.parquet as parquet"),
    ],
    ids=[
        "empty",
        "blank",
        "csv-header-only",
        "json-empty",
        "utf8",
        "bad-json",
        "not-object",
        "one-label",
        "null-label",
        "missing-label",
        "bad-parquet",
    ],  # fmt: skip
)
def test_bad_data_files_are_one_line_errors(tmp_path, content, name, message):
    with pytest.raises(TaskStreamError, match=message) as err:
        load_task_stream(_tasks_file(tmp_path, content, name))
    assert "\n" not in str(err.value)


def test_a_folder_given_as_a_data_file_says_so(tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"name": "t", "train": "train.jsonl", "eval": "train.jsonl"}]))
    with pytest.raises(TaskStreamError, match="train.jsonl is a folder, not a data file"):
        load_task_stream(path)
    with pytest.raises(TaskStreamError, match="is a folder; name its TASKS.json"):
        load_task_stream(tmp_path)


def test_a_task_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_bytes(b'[{"name": "caf\xe9"}]')
    with pytest.raises(TaskStreamError, match=r"tasks.json is not UTF-8 text"):
        load_task_stream(path)


def test_float_and_int_labels_are_one_class(tmp_path):
    train = '{"text": "a", "label": 0}\n{"text": "b", "label": 1.0}\n{"text": "c", "label": "1"}\n'
    eval_ = '{"text": "a", "label": 0.0}\n{"text": "b", "label": 1}\n'
    (task,) = load_task_stream(_tasks_file(tmp_path, train, eval_text=eval_))
    assert task.labels == ["0", "1"]
    assert task.label_ids(task.eval["label"]) == [0, 1]
    csv_task = tmp_path / "csv"
    csv_task.mkdir()
    (task,) = load_task_stream(_tasks_file(csv_task, "text,label\na,0\nb,1\n", "train.csv", eval_text=eval_))
    assert task.labels == ["0", "1"] and task.label_ids(task.eval["label"]) == [0, 1]


def test_loading_local_files_writes_no_datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    from peft_ext.trainers.testing import write_synthetic_stream

    tasks = load_task_stream(write_synthetic_stream(tmp_path / "data"))
    assert len(tasks) == 3 and not cache.exists()


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "peft_ext.cli", "continual", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


def test_cli_output_dir_problems_exit_2_with_one_line(tmp_path):
    from peft_ext.trainers.testing import write_synthetic_stream

    model_dir = save_tiny_model(tmp_path / "model")
    tasks_json = write_synthetic_stream(tmp_path / "data", names=["colors"])
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    common = ("--model", model_dir, "--tasks", tasks_json, "--epochs", "1", "--disable_tqdm", "true")
    proc = _cli(*common, "--output-dir", a_file)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines() == [
        f"peft-ext: error: --output-dir {a_file} is a file, not a folder; name a folder."
    ]
    assert a_file.read_text() == "not a folder"
    (tmp_path / "user" / "keep.txt").parent.mkdir()
    (tmp_path / "user" / "keep.txt").write_text("x")
    proc = _cli(*common, "--output-dir", tmp_path / "user")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "holds no peft-ext run" in proc.stderr


def test_run_folder_inspect_writes_nothing(tmp_path):
    folder = RunFolder(tmp_path / "new", {"version": 1}, ["a"])
    assert folder.inspect(resume=True, overwrite=False) == "new"
    assert not (tmp_path / "new").exists()


def test_a_folder_left_with_only_the_lock_is_still_new(tmp_path, tokenizer):
    """A run killed between taking the lock and writing its marker leaves the lock (and maybe the marker's temp
    file): the next run starts there instead of refusing a folder nobody can use."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".peft_ext.lock").write_text("12345")
    (out / "peft_ext_run.json.tmp").write_text('{"finger')
    assert schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1).folder.inspect(True, False) == "new"
    schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1).run()
    assert (out / "metrics.json").is_file()


def test_a_marker_that_is_not_an_object_is_refused_in_one_line(tmp_path, tokenizer):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER_FILE).write_text("[1, 2]")
    with pytest.raises(ContinualRunError, match="has an unreadable \\(not a JSON object\\) marker"):
        schedule(out, tokenizer, tasks=[synthetic_task("colors")], epochs=1).run()
