"""The continual schedule on tiny synthetic streams: strategies, per-task heads, accuracy matrix, reload, resume
after a kill, and a 2-process accelerate run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

from peft_ext.trainers import (
    STRATEGIES,
    ContinualSchedule,
    ContinualTrainingArguments,
    TaskHeadClassifier,
    available_methods,
    get_strategy,
    register_strategy,
)
from peft_ext.trainers.strategies import LoraStrategy
from peft_ext.trainers.task_stream import Task, TaskStreamError, check_stream
from peft_ext.trainers.testing import (
    make_tiny_bert,
    make_tokenizer,
    save_tiny_model,
    synthetic_task,
    write_synthetic_stream,
)


TASKS = ["colors", "moods", "sports"]
FAST = dict(epochs=20, lr=5e-2, batch_size=8, disable_tqdm=True, plots=False, seed=0)


def tiny_bert():
    return make_tiny_bert(seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def run(tmp_path, tokenizer, method="lora", method_config=None, names=TASKS, **kw):
    args = ContinualTrainingArguments(output_dir=str(tmp_path), method=method, **{**FAST, **kw})
    schedule = ContinualSchedule(
        [synthetic_task(n) for n in names], args, model=tiny_bert, tokenizer=tokenizer, method_config=method_config
    )
    return schedule, schedule.run()


@pytest.fixture(scope="module")
def per_task_run(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("per_task")
    return out, *run(out, tokenizer, method_config={"adapter_per_task": True})


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("shared")
    return out, *run(out, tokenizer)


def test_registry_has_the_four_methods_and_no_unknown():
    assert {"lora", "resora", "ana", "moecl"} <= set(available_methods())
    assert type(get_strategy("ana")).__mro__[1].__name__ == "_RoutedStrategy"  # derived from its description
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        get_strategy("nope")


def test_separate_adapters_per_task_forget_nothing(per_task_run):
    out, schedule, result = per_task_run
    a = result.accuracy
    assert [row[i + 1 :] for i, row in enumerate(a)] == [[None] * (2 - i) for i in range(3)]  # upper triangle unset
    for i in range(3):
        for j in range(i + 1):
            assert a[i][j] == a[j][j]  # exactly: frozen adapter + frozen head
    assert result.scores["forgetting"] == 0.0 and result.scores["bwt"] == 0.0
    assert min(a[j][j] for j in range(3)) >= 0.75  # the tasks are learned at all
    # Max-confidence routing over the per-task adapters: a task-agnostic matrix and a task-identification rate.
    assert result.accuracy_task_agnostic is not None
    assert 0.0 <= result.task_identification <= 1.0
    assert result.accuracy_task_agnostic[0][0] == a[0][0]  # one task seen: routing cannot go wrong


def test_shared_adapter_forgets_and_trains_fewer_parameters(shared_run, per_task_run):
    _, _, shared = shared_run
    _, _, separate = per_task_run
    assert shared.scores["forgetting"] > 0.0  # the sequential baseline forgets
    assert shared.accuracy_task_agnostic is None and shared.task_identification is None
    # One adapter instead of three (heads are per task in both).
    assert shared.trainable_params < separate.trainable_params
    assert shared.total_params < separate.total_params


def test_metrics_json_schema_and_files(shared_run):
    out, _, result = shared_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == [
        "method", "tasks", "accuracy", "accuracy_task_agnostic", "avg", "last", "bwt", "forgetting",
        "task_identification", "trainable_params", "total_params", "train_seconds",
        "kind", "accuracy_zero_shot", "transfer", "avg_all", "unseen_to_base", "rouge_l",
    ]  # fmt: skip
    assert metrics["tasks"] == TASKS and metrics["method"] == "lora"
    assert metrics["accuracy"] == result.accuracy
    assert metrics["last"] == pytest.approx(sum(result.accuracy[-1]) / 3)
    assert isinstance(metrics["trainable_params"], int) and metrics["train_seconds"] > 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "heads.safetensors", "heads.json"):
        assert (out / name).is_file()
    for i in range(3):
        assert json.loads((out / "checkpoints" / f"task-{i:02d}" / "state.json").read_text())["complete"] is True
    assert not (out / "trainer").exists() or not any((out / "trainer").iterdir())


def test_heads_keep_each_tasks_label_set(shared_run):
    out, _, _ = shared_run
    labels = json.loads((out / "heads.json").read_text())["tasks"]
    assert labels == {"colors": ["blue", "red", "yes"], "moods": ["no", "yes"], "sports": ["ball", "ice", "water"]}


@pytest.mark.parametrize("which", ["shared", "per_task"])
def test_saved_adapters_and_heads_reproduce_the_last_row(which, shared_run, per_task_run, tokenizer):
    out, schedule, result = shared_run if which == "shared" else per_task_run
    if which == "shared":
        encoder = PeftModel.from_pretrained(tiny_bert(), str(out))
    else:  # one adapter per task: DIR/<task>/
        encoder = PeftModel.from_pretrained(tiny_bert(), str(out / "colors"), adapter_name="colors")
        for name in TASKS[1:]:
            encoder.load_adapter(str(out / name), adapter_name=name)
    clf = TaskHeadClassifier(encoder, hidden_size=32)
    clf.load_heads(out)
    schedule.classifier = clf  # evaluate the reloaded model with the schedule's own evaluation
    assert [schedule.evaluate_task(t) for t in schedule.tasks] == result.accuracy[-1]


def test_task_agnostic_compares_label_strings(tmp_path, tokenizer):
    """A wrong task can still give the right label when label sets overlap ('yes' is in colors and moods)."""
    schedule, _ = run(tmp_path, tokenizer, names=["colors", "moods"], epochs=1)

    class AlwaysMoods:
        def picks_routes(self, model):
            return False

        def infer_tasks(self, classifier, batch, tasks):
            n = batch["input_ids"].shape[0]
            return ["moods"] * n, torch.full((n,), classifier.labels["moods"].index("yes"))

    schedule.strategy = AlwaysMoods()
    colors = schedule.tasks[0]
    acc, picked, to_base, total = schedule.evaluate_task_agnostic(colors, ["colors", "moods"])
    gold = [str(x) for x in colors.eval["label"]]
    assert acc == pytest.approx(gold.count("yes") / len(gold)) and 0 < acc < 1
    assert picked == to_base == 0 and total == len(gold)


def test_a_registered_strategy_is_used_without_editing_the_schedule(tmp_path, tokenizer):
    calls = []

    @register_strategy("lora_traced")
    class Traced(LoraStrategy):
        def begin_task(self, model, task, index):
            calls.append(("begin", task, index))

        def end_task(self, model, task, batches, labels=None):
            calls.append(("end", task, sum(b["input_ids"].shape[0] for b in batches)))
            assert labels is not None and labels.shape[0] == calls[-1][2]  # one label per input, in batch order

    try:
        run(tmp_path, tokenizer, method="lora", names=["colors", "moods"], epochs=1)  # method validated by args
        args = ContinualTrainingArguments(output_dir=str(tmp_path / "t"), **{**FAST, "epochs": 1})
        ContinualSchedule(
            [synthetic_task(n) for n in ["colors", "moods"]],
            args,
            model=tiny_bert,
            tokenizer=tokenizer,
            method="lora_traced",
        ).run()
    finally:
        del STRATEGIES["lora_traced"]
    assert calls == [("end", "colors", 48), ("begin", "moods", 1), ("end", "moods", 48)]


def test_stream_validation():
    good = synthetic_task("colors")
    with pytest.raises(TaskStreamError, match="Duplicate task name 'colors'"):
        check_stream([good, synthetic_task("colors")])
    with pytest.raises(TaskStreamError, match="empty"):
        Task("t", train=Dataset.from_dict({"text": [], "label": []}), eval=good.eval)
    with pytest.raises(TaskStreamError, match="unknown column 'sentence'"):
        Task("t", train=good.train, eval=good.eval, text_column="sentence")
    with pytest.raises(TaskStreamError, match=r"eval labels \['purple'\] never occur in training"):
        Task("t", train=good.train, eval=Dataset.from_dict({"text": ["navy wall"], "label": ["purple"]}))
    with pytest.raises(TaskStreamError, match="Invalid task name"):
        Task("a.b", train=good.train, eval=good.eval)


def test_int_labels_are_label_strings():
    t = Task(
        "nums",
        train=Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}),
        eval=Dataset.from_dict({"text": ["a"], "label": [1]}),
    )
    assert t.labels == ["0", "1"] and t.label_ids([1, "0"]) == [1, 0]


# -- resume after a kill --------------------------------------------------------------------------------------------
def _cli(model_dir, tasks_json, out, *extra):
    return [sys.executable, "-m", "peft_ext.cli", "continual", "--model", str(model_dir), "--tasks", str(tasks_json),
            "--output-dir", str(out), "--epochs", "30", "--lr", "5e-2", "--batch-size", "8", "--seed", "3",
            "--disable_tqdm", "true", "--plots", "false", *extra]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_killed_run_resumes_to_the_same_matrix(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    tasks_json = write_synthetic_stream(tmp_path / "data", n_train=96)

    ref = subprocess.run(_cli(model_dir, tasks_json, tmp_path / "ref"), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(model_dir, tasks_json, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = out / "checkpoints" / "task-00" / "state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    assert not (out / "checkpoints" / "task-02" / "state.json").exists()

    resumed = subprocess.run(_cli(model_dir, tasks_json, out), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming after task" in resumed.stderr
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["accuracy"] == a["accuracy"]
    assert b["trainable_params"] == a["trainable_params"]


def test_resume_refuses_a_different_run(tmp_path, tokenizer):
    run(tmp_path, tokenizer, names=["colors"], epochs=1)
    with pytest.raises(ValueError, match=r"holds a different peft-ext run \(it differs in: seed\)"):
        run(tmp_path, tokenizer, names=["colors"], epochs=1, seed=1)


# -- accelerate launch, 2 CPU processes ------------------------------------------------------------------------------
AUDIT = r"""
import atexit, json, os, sys
watched, audit_dir = os.environ["WATCH_DIR"], os.environ["AUDIT_DIR"]
rank, writes = os.environ.get("RANK", "0"), []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and os.path.abspath(path).startswith(watched):
            writes.append(path)
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"):
        target = args[0] if args else None
        if isinstance(target, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(target)).startswith(watched):
            writes.append(event + ":" + os.fsdecode(target))
sys.addaudithook(hook)
atexit.register(lambda: open(os.path.join(audit_dir, f"rank{rank}.json"), "w").write(json.dumps(writes)))
from peft_ext.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _loss_logs(text):
    """(epoch, loss) of the Trainer's training logs in a captured output, in order (first task only)."""
    import ast

    logs = []
    for line in text.splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            entry = ast.literal_eval(line[start : line.index("}", start) + 1])
            logs.append((float(entry["epoch"]), float(entry["loss"])))
    first_task = [logs[0]]
    for log in logs[1:]:
        if log[0] <= first_task[-1][0]:
            break
        first_task.append(log)
    return first_task


def test_two_process_accelerate_run_matches_one_process(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    tasks_json = write_synthetic_stream(tmp_path / "data", names=["colors", "moods"], n_train=64)
    (tmp_path / "audit").mkdir()
    launcher = tmp_path / "launch.py"
    launcher.write_text(AUDIT)
    common = ["continual", "--model", str(model_dir), "--tasks", str(tasks_json), "--epochs", "15", "--lr", "5e-2",
              "--seed", "0", "--disable_tqdm", "true", "--method-config", str(tmp_path / "cfg.json")]  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps({"adapter_per_task": True}))
    one = subprocess.run(
        [sys.executable, "-m", "peft_ext.cli", *common, "--output-dir", str(tmp_path / "one"), "--batch-size", "8"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**_env(), "WATCH_DIR": str(tmp_path / "two"), "AUDIT_DIR": str(tmp_path / "audit")}
    two = subprocess.run(
        # --multi_gpu = accelerate's torchrun launcher; without GPUs the run becomes gloo DDP on CPU (use_cpu is set
        # by ContinualTrainingArguments). accelerate's --cpu alone starts ONE process unless mpirun is configured.
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
         "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561", str(launcher), *common,
         "--output-dir", str(tmp_path / "two"), "--batch-size", "4"],  # 2 x 4 = the same global batch as 1 x 8
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["tasks"] == m2["tasks"] and m1["trainable_params"] == m2["trainable_params"]
    # Same global batch, same number of optimizer steps: the logged losses follow the same curve (a run where each
    # process trained alone on all the data would log twice the steps per epoch) ...
    logs1, logs2 = _loss_logs(one.stdout + one.stderr), _loss_logs(two.stdout + two.stderr)
    assert [e for e, _ in logs1] == [e for e, _ in logs2]
    assert abs(logs1[0][1] - logs2[0][1]) < 0.1, (logs1[0], logs2[0])
    # ... and the metrics agree within the noise of a different data order on 24 eval examples per task.
    for key in ("last", "avg"):
        assert abs(m1[key] - m2[key]) <= 0.2, (key, m1[key], m2[key])
    rank0 = json.loads((tmp_path / "audit" / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "audit" / "rank1.json").read_text())
    assert any("metrics.json" in p for p in rank0) and any("adapter_config.json" in p for p in rank0), rank0
    assert rank1 == [], rank1[:5]


# -- the continual protocol: AnA and MoE-CL -------------------------------------------------------------------------
ROUTED = {
    "ana": {"selector_hidden": 8},
    "moecl": {
        "selector_hidden": 8,
        "num_experts": 4,
        "r": 8,
        "top_k": 2,
        "freeze_top_k": 2,
        "isolate_finished_tasks": True,
    },
}


@pytest.mark.parametrize("method", list(ROUTED))
def test_routed_methods_follow_the_protocol_and_resume(tmp_path, tokenizer, method):
    names = ["colors", "moods"]
    schedule, result = run(
        tmp_path, tokenizer, method=method, method_config=dict(ROUTED[method]), names=names, epochs=8, lr=1e-2
    )
    model = schedule.classifier.encoder
    assert model.tasks() == names  # one adapter holds both tasks
    # Earlier tasks are frozen (AnA) or isolated (MoE-CL with isolate_finished_tasks): nothing is forgotten.
    assert result.accuracy[1][0] == result.accuracy[0][0]
    assert result.scores["forgetting"] == 0.0
    # The selector was fitted after each task: task-agnostic evaluation and task identification exist.
    assert result.accuracy_task_agnostic is not None and result.task_identification is not None
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_names"] == names and saved["peft_type"] == method.upper()

    # Resume from the first task's checkpoint (the second is dropped): the same matrix again.
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "task-01")
    _, again = run(
        tmp_path, tokenizer, method=method, method_config=dict(ROUTED[method]), names=names, epochs=8, lr=1e-2
    )
    assert again.accuracy == result.accuracy
    assert again.accuracy_task_agnostic == result.accuracy_task_agnostic


def test_resume_inside_a_task_from_trainer_checkpoints(tmp_path, tokenizer):
    """A crash in the middle of task 1 resumes from task 0's checkpoint *and* the Trainer's own mid-task checkpoint,
    reaching the matrix of an uninterrupted run with the same settings."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def __init__(self):
            self.tasks_started = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.tasks_started += 1

        def on_step_end(self, args, state, control, **kwargs):
            if self.tasks_started == 2 and state.global_step == 6:
                raise RuntimeError("simulated crash")

    names = ["colors", "moods"]
    settings = dict(names=names, epochs=2, save_strategy="steps", save_steps=4)
    _, reference = run(tmp_path / "ref", tokenizer, **settings)

    out = tmp_path / "crashed"
    args = ContinualTrainingArguments(
        output_dir=str(out), method="lora", **{**FAST, "epochs": 2}, save_strategy="steps", save_steps=4
    )
    tasks = [synthetic_task(n) for n in names]
    with pytest.raises(RuntimeError, match="simulated crash"):
        ContinualSchedule(tasks, args, model=tiny_bert, tokenizer=tokenizer, callbacks=[Crash()]).run()
    assert (out / "trainer" / "task-01" / "checkpoint-4").is_dir()
    assert not (out / "metrics.json").exists()

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.steps += 1

    resumed = ContinualSchedule(tasks, args, model=tiny_bert, tokenizer=tokenizer, callbacks=[CountSteps()]).run()
    assert resumed.accuracy == reference.accuracy
    # Only task 1 was trained again, and only from its step 4 on: 2 epochs x 48 / 8 = 12 steps, minus 4.
    assert CountSteps.steps == 12 - 4
