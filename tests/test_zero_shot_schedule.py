"""The continual schedule on zero_shot tasks: the full accuracy matrix with a zero-shot row, MTIL's Transfer and
Avg, untrained tasks served by the base model where the method keeps one route per task, task-agnostic routing
with the base model for inputs of no learned task, and the one-line errors of bad zero_shot input."""

import json

import pytest
from datasets import Dataset

from peft_ext.cli import main
from peft_ext.trainers import ContinualSchedule, ContinualTrainingArguments
from peft_ext.trainers.metrics import compute_continual_metrics
from peft_ext.trainers.task_stream import Task, TaskStreamError, check_stream
from peft_ext.trainers.testing import make_tiny_bert, make_tokenizer, synthetic_task, synthetic_zero_shot_task


TASKS = ["colors", "moods", "sports"]
FAST = dict(epochs=10, lr=5e-2, batch_size=8, disable_tqdm=True, plots=False, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def run(out, tokenizer, method, method_config=None, **kw):
    args = ContinualTrainingArguments(output_dir=str(out), method=method, **{**FAST, **kw})
    tasks = [synthetic_zero_shot_task(name) for name in TASKS]
    schedule = ContinualSchedule(
        tasks, args, model=lambda: make_tiny_bert(seed=0), tokenizer=tokenizer, method_config=method_config
    )
    return schedule.run()


@pytest.fixture(scope="module")
def moecl_run(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("moecl")
    config = {"num_experts": 4, "r": 4, "selector_hidden": 8, "selector_epochs": 30}
    return out, run(out, tokenizer, "moecl", config)


def untrained_cells(matrix):
    return [(i, j) for i in range(len(matrix)) for j in range(i + 1, len(matrix))]


def test_full_matrix_with_zero_shot_row_and_mtil_scores(moecl_run):
    out, result = moecl_run
    metrics = json.loads((out / "metrics.json").read_text())
    a, zero_shot = metrics["accuracy"], metrics["accuracy_zero_shot"]
    assert metrics["kind"] == "zero_shot" and len(zero_shot) == 3
    assert all(v is not None for row in a for v in row)  # the upper triangle is evaluated too
    expected = compute_continual_metrics(a, zero_shot=zero_shot)
    assert metrics["transfer"] == pytest.approx(expected["transfer"])
    assert metrics["avg_all"] == pytest.approx(sum(map(sum, a)) / 9)
    # MoE-CL serves a task it has not learned with the untouched base model: exactly the zero-shot accuracy
    assert all(a[i][j] == zero_shot[j] for i, j in untrained_cells(a))
    assert metrics["transfer"] == pytest.approx((zero_shot[1] + zero_shot[2]) / 2)
    assert (out / "zero_shot.json").is_file() and not (out / "heads.safetensors").exists()


def test_task_agnostic_full_matrix_and_unseen_inputs_routing(moecl_run):
    out, result = moecl_run
    metrics = json.loads((out / "metrics.json").read_text())
    agnostic = metrics["accuracy_task_agnostic"]
    assert all(v is not None for row in agnostic for v in row)
    assert 0.0 <= metrics["unseen_to_base"] <= 1.0 and 0.0 <= metrics["task_identification"] <= 1.0
    state = json.loads((out / "run_state.json").read_text())
    assert state["scores_task_agnostic"]["transfer"] is not None


@pytest.mark.parametrize("per_task", [True, False])
def test_lora_untrained_tasks(tmp_path, tokenizer, per_task):
    result = run(tmp_path, tokenizer, "lora", {"adapter_per_task": per_task}, epochs=4)
    a, zero_shot = result.accuracy, result.accuracy_zero_shot
    same = [a[i][j] == zero_shot[j] for i, j in untrained_cells(a)]
    # one adapter per task: a task not trained yet has none, the base model serves it; a shared adapter has moved
    assert all(same) if per_task else not all(same)
    assert result.accuracy_task_agnostic is None  # LoRA has no selector to pick a route with


def test_bad_zero_shot_input_is_one_line(tmp_path, tokenizer):
    base = synthetic_task("colors")
    for kwargs, match in [
        ({"template": "a photo"}, "no '{}' placeholder"),
        ({"label_prompts": {"red": " "}}, "prompt of label 'red' in label_prompts is empty"),
        ({"label_prompts": {"purple": "x"}}, "'purple', which is not one of its labels"),
    ]:
        with pytest.raises(TaskStreamError, match=match) as info:
            Task(name="colors", train=base.train, eval=base.eval, kind="zero_shot", **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(TaskStreamError, match="for zero_shot tasks only"):
        Task(name="colors", train=base.train, eval=base.eval, template="x {}")
    with pytest.raises(TaskStreamError, match="mixes classification and zero_shot"):
        check_stream([synthetic_task("colors"), synthetic_zero_shot_task("moods")])


def test_zero_shot_on_a_model_without_a_text_side_is_refused(tmp_path, tokenizer):
    from transformers import ViTConfig, ViTModel

    def vit():
        return ViTModel(
            ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)
        )

    args = ContinualTrainingArguments(output_dir=str(tmp_path / "run"), method="lora", **FAST)
    schedule = ContinualSchedule([synthetic_zero_shot_task("colors")], args, model=vit, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="need a model with a text side to embed class prompts") as info:
        schedule.run()
    assert "\n" not in str(info.value)


def test_cli_kind_must_match_the_task_file(tmp_path, capsys):
    rows = [{"text": f"word {i}", "label": "ab"[i % 2]} for i in range(8)]
    Dataset.from_list(rows).to_json(tmp_path / "t.jsonl")
    task = {"name": "t", "train": "t.jsonl", "eval": "t.jsonl"}
    (tmp_path / "tasks.json").write_text(json.dumps([task]))
    cli = ["continual", "--tasks", str(tmp_path / "tasks.json"), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        main([*cli, "--kind", "zero_shot"])
    assert info.value.code == 2
    assert "--kind zero_shot: the tasks of" in capsys.readouterr().err
    (tmp_path / "tasks.json").write_text(json.dumps([{**task, "kind": "zero_shot", "template": "no placeholder"}]))
    with pytest.raises(SystemExit) as info:
        main(cli)
    assert info.value.code == 2
    assert "no '{}' placeholder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("method, per_task_routes", [("ana", True), ("resora", False)])
def test_every_method_fills_the_matrix(tmp_path, tokenizer, method, per_task_routes):
    result = run(tmp_path, tokenizer, method, {"r": 4} if method == "ana" else None, epochs=4)
    a, zero_shot = result.accuracy, result.accuracy_zero_shot
    assert all(v is not None for row in a for v in row)
    if per_task_routes:  # a task AnA has not learned gets the untouched base model
        assert all(a[i][j] == zero_shot[j] for i, j in untrained_cells(a))
    assert result.scores["transfer"] is not None and result.scores["avg_all"] is not None
