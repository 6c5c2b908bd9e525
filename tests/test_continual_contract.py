"""The continual contract (``ContinualTunerMixin``) AnA and MoE-CL share, how the trainer's strategies use it, and
the schedule's progress record that task checkpoints save."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from peft import get_peft_model
from tiny_models import MLP

import peft_ext  # noqa: F401  (registers the methods)
from peft_ext import AnAConfig, MoECLConfig
from peft_ext.routing.selector import TaskSelectorMixin
from peft_ext.routing.tasks import ContinualTunerMixin
from peft_ext.trainers.continual import _Progress
from peft_ext.trainers.strategies import get_strategy
from peft_ext.tuners.ana.model import AnAModel
from peft_ext.tuners.moecl.model import MoECLModel


def ana_model():
    torch.manual_seed(0)
    return get_peft_model(MLP(), AnAConfig(r=2, target_modules=["lin0"], task_names=["t0"], selector_hidden=4))


def moecl_model(freeze_top_k: int = 0):
    torch.manual_seed(0)
    config = MoECLConfig(
        target_modules=["lin0"],
        num_experts=4,
        r=2,
        top_k=2,
        task_names=["t0"],
        selector_hidden=4,
        freeze_top_k=freeze_top_k,
    )
    return get_peft_model(MLP(), config)


def _contract_parameters(cls) -> list[tuple[str, object, object]]:
    signature = inspect.signature(cls.end_task)
    return [(p.name, p.kind, p.default) for p in signature.parameters.values() if p.name != "freeze_top_k"]


def test_end_task_has_one_signature():
    expected = _contract_parameters(ContinualTunerMixin)
    assert [name for name, _, _ in expected] == ["self", "task_name", "adapter_name", "batches"]
    assert expected[-1][1] is inspect.Parameter.KEYWORD_ONLY
    assert _contract_parameters(AnAModel) == expected
    assert _contract_parameters(MoECLModel) == expected
    # MoE-CL's own extra stays keyword-only
    assert inspect.signature(MoECLModel.end_task).parameters["freeze_top_k"].kind is inspect.Parameter.KEYWORD_ONLY


def test_ana_end_task_ignores_batches_and_reports_no_frozen_experts():
    model = ana_model()
    x = torch.rand(4, 6)
    assert model.end_task("t0", batches=[{"X": x}]) == {}
    assert model.peft_config["default"].ended_tasks == ["t0"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "ana_" in n)
    assert model.end_task("t0", batches=None) == {}  # twice: a no-op


def test_moecl_end_task_counts_routes_on_batches():
    model = moecl_model(freeze_top_k=1)
    report = model.end_task("t0", batches=[{"X": torch.rand(5, 6)}])
    assert set(report) == {"lin0"} and len(report["lin0"]) == 1
    assert model.end_task("t0", batches=[{"X": torch.rand(5, 6)}]) == {}  # twice: a no-op, the same type


@pytest.mark.parametrize("make", [ana_model, moecl_model])
def test_both_methods_have_a_task_selector(make):
    model = make()
    assert model.supports_task_selector is True
    assert model.has_task_selector is False  # not fitted yet
    model.end_task("t0")
    x = torch.randn(40, 6)
    model.fit_task_selector("t0", features=model.collect_selector_features([{"X": x}]), epochs=2)
    assert model.has_task_selector is True
    assert len(model.predict_tasks({"X": torch.randn(3, 6)})) == 3


def test_a_method_without_selector_says_so():
    class NoSelector(ContinualTunerMixin):
        pass

    tuner = NoSelector()
    assert tuner.supports_task_selector is False and tuner.has_task_selector is False
    with pytest.raises(ValueError, match="no task selector"):
        tuner.fit_task_selector("t0", [])
    with pytest.raises(ValueError, match="no task selector"):
        tuner.predict_tasks({})
    with pytest.raises(NotImplementedError):
        tuner.end_task()
    with pytest.raises(NotImplementedError, match="delete_adapter"):
        tuner.delete_task("t0")
    assert TaskSelectorMixin.supports_task_selector is True


def test_moecl_cannot_delete_a_single_task():
    model = moecl_model()
    model.add_task("t1")
    with pytest.raises(NotImplementedError, match="delete_adapter"):
        model.delete_task("t1")


class FakeModel:
    """The contract as the strategies see it, recording the calls."""

    def __init__(self, supports_task_selector: bool) -> None:
        self.supports_task_selector = supports_task_selector
        self.calls = []

    def end_task(self, task_name=None, adapter_name=None, *, batches=None):
        self.calls.append(("end_task", task_name, batches))
        return {}

    def fit_task_selector(self, task_name, batches, *, labels=None):
        self.calls.append(("fit_task_selector", task_name, batches, None if labels is None else labels.tolist()))


@pytest.mark.parametrize(
    "method, options, expect_batches",
    [("ana", {}, True), ("moecl", {}, True), ("moecl", {"recount_routes": False}, False)],
)
@pytest.mark.parametrize("selector", [True, False])
def test_routed_strategies_call_the_contract(method, options, expect_batches, selector):
    strategy = get_strategy(method, {**options, "selector_batches": 1})
    batches = [{"x": torch.zeros(2)}, {"x": torch.zeros(3)}]
    model = FakeModel(selector)
    strategy.end_task(model, "t0", iter(batches), torch.arange(5))
    expected = [("end_task", "t0", batches if expect_batches else None)]
    if selector:  # selector_batches=1: the first batch, and the labels of its two inputs
        expected.append(("fit_task_selector", "t0", batches[:1], [0, 1]))
    assert model.calls == expected


def test_progress_state_keys_round_trip():
    progress = _Progress.empty(2)
    progress.accuracy[0][0] = 0.5
    progress.agnostic = [[0.25, None], [None, None]]
    progress.identification = 0.75
    progress.trainable_names = {"b", "a"}
    progress.task_seconds = [1.5]
    progress.train_accuracy[0] = 1.0
    state = progress.to_state()
    # the keys of checkpoints/task-XX/state.json written before _Progress existed: old runs keep resuming
    assert state == {
        "accuracy": [[0.5, None], [None, None]],
        "accuracy_task_agnostic": [[0.25, None], [None, None]],
        "task_identification": 0.75,
        "trainable_names": ["a", "b"],
        "task_seconds": [1.5],
        "train_accuracy": [1.0, None],  # added later: optional when read
        "accuracy_zero_shot": None,  # zero_shot runs only; optional when read
        "unseen_routing": [0, 0],  # zero_shot runs only; optional when read
        "rouge_l": None,  # generation runs only; optional when read
    }
    assert _Progress.from_state({**state, "index": 0, "task": "t0"}) == progress
    later = ("train_accuracy", "accuracy_zero_shot", "unseen_routing", "rouge_l")
    old = {k: v for k, v in state.items() if k not in later}
    assert _Progress.from_state(old).train_accuracy == [None, None]
    assert _Progress.from_state(old) == dataclasses.replace(progress, train_accuracy=[None, None])
    assert _Progress.empty(2) == _Progress(accuracy=[[None, None], [None, None]], train_accuracy=[None, None])
