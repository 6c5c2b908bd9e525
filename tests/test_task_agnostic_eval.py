"""Task-agnostic evaluation inside a run (classification and zero_shot): the selector reads base-model features kept
across rows, and inputs picked for a route whose outputs the row already has reuse them. Both shortcuts must give
what a ``task_ids="auto"`` forward and each input answered alone under its pick give."""

import pytest
import torch

from peft_ext.trainers import ContinualSchedule, ContinualTrainingArguments
from peft_ext.trainers.testing import make_tiny_bert, make_tokenizer, synthetic_task, synthetic_zero_shot_task


TASKS = ["colors", "moods"]
MOECL = {"num_experts": 4, "r": 4, "selector_hidden": 8, "selector_epochs": 30}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def trained(out, tokenizer, kind, features="deep"):
    make = synthetic_task if kind == "classification" else synthetic_zero_shot_task
    args = ContinualTrainingArguments(
        output_dir=str(out), method="moecl", epochs=10, lr=5e-2, batch_size=8, disable_tqdm=True, plots=False, seed=0
    )
    schedule = ContinualSchedule(
        [make(name) for name in TASKS],
        args,
        model=lambda: make_tiny_bert(seed=0),
        tokenizer=tokenizer,
        method_config={**MOECL, "selector_features": features},
    )
    schedule.run()
    return schedule


@pytest.mark.parametrize("features", ["shallow", "deep", "deep+shallow"])
def test_kept_features_pick_what_an_auto_forward_picks(tmp_path, tokenizer, features):
    schedule = trained(tmp_path, tokenizer, "classification", features)
    model, picks_forward, picks_kept = schedule._peft_model, [], []
    for task in schedule.tasks:
        for batch, kept in zip(schedule._eval_batches(task), schedule._selector_inputs(task)):
            picks_forward += model.predict_tasks(batch)
            picks_kept += model.predict_tasks(features=kept)
    assert picks_kept == picks_forward and len(set(picks_forward)) > 1
    with pytest.raises(ValueError, match="either a batch or features"):
        model.predict_tasks()


def answered_alone(schedule, task, picks):
    """Each eval input of ``task`` run on its own under its pick (None: the base model), as label strings."""
    clf, model, out, inputs = schedule.classifier, schedule._peft_model, [], []
    for batch in schedule._eval_batches(task):
        size = batch["input_ids"].shape[0]
        inputs += [{k: v[i : i + 1] for k, v in batch.items()} for i in range(size)]
    for one, pick in zip(inputs, picks):
        if pick is None and schedule.kind == "classification":
            out.append(None)  # no head on the base model
            continue
        head, labels = (pick, clf.labels[pick]) if schedule.kind == "classification" else (task.name, task.labels)
        with torch.no_grad(), model.route(pick or "none"):
            out.append(labels[int(clf.logits(clf.features(**one), head).argmax(-1))])
    return out


@pytest.mark.parametrize("kind", ["classification", "zero_shot"])
def test_reused_outputs_are_each_inputs_answer_under_its_pick(tmp_path, tokenizer, kind):
    schedule = trained(tmp_path, tokenizer, kind)
    model, seen = schedule._peft_model, list(TASKS)
    assert {("colors", "colors"), ("moods", "moods")} <= set(schedule._outputs)  # the last row's, to reuse
    for task in schedule.tasks:
        gold = schedule._eval_labels(task)
        picks = [[*seen, None][i % 3] for i in range(len(gold))]  # each task and the base model, mixed in batches
        remaining = iter(picks)
        model.predict_tasks = lambda features: [next(remaining) for _ in features]
        accuracy, right, to_base, total = schedule.evaluate_task_agnostic(task, seen)
        alone = answered_alone(schedule, task, picks)
        assert accuracy == pytest.approx(sum(a == g for a, g in zip(alone, gold)) / len(gold))
        assert (right, to_base, total) == (picks.count(task.name), picks.count(None), len(gold))
        # the picks matter: the task's own route alone scores otherwise
        assert accuracy != pytest.approx(schedule._cell(task, task.name)[0])
