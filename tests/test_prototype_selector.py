"""The prototype task selector (class means of frozen features) and deep selector features (the base model's last
hidden state, from one extra base pass per task_ids="auto" forward)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_bert
from torch.nn import functional as F

from peft_ext import AnAConfig, MoECLConfig
from peft_ext.routing.prototypes import PrototypeSelector, fit_prototypes


def test_prototypes_are_unit_class_means_and_the_threshold_a_holdout_quantile():
    # hand-made features: two classes along the axes, 10 samples each
    feats = torch.cat(
        [torch.tensor([[2.0, 0.1 * i] for i in range(10)]), torch.tensor([[0.1 * i, 3.0] for i in range(10)])]
    )
    labels = torch.tensor([0] * 10 + [1] * 10)
    fit = fit_prototypes(feats, labels, holdout=0.2, quantile=0.75, seed=0)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    held, train = perm[:4], perm[4:]
    unit = F.normalize(feats, dim=-1)
    means = torch.stack([unit[train][labels[train] == c].mean(0) for c in (0, 1)])
    torch.testing.assert_close(fit.prototypes, F.normalize(means, dim=-1))
    scores = (unit[held] @ fit.prototypes.T).max(dim=1).values
    torch.testing.assert_close(fit.holdout_scores, scores)
    torch.testing.assert_close(fit.threshold, torch.quantile(scores, 0.25))


def gaussian(center: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return center + 0.3 * torch.randn(n, center.numel(), generator=torch.Generator().manual_seed(seed))


CENTERS = [F.one_hot(torch.tensor(i), 8).float() * 4 for i in range(4)]


def test_later_tasks_leave_earlier_statistics_unchanged_and_decisions_follow():
    selector = PrototypeSelector(8)
    for t in range(3):
        selector.set_task(t, fit_prototypes(gaussian(CENTERS[t], 200, seed=t), num_prototypes=2, seed=t))
    before = {k: v.clone() for k, v in selector.state_dict().items()}
    selector.set_task(3, fit_prototypes(gaussian(CENTERS[3], 200, seed=3), num_prototypes=2, seed=3))
    after = selector.state_dict()
    assert torch.equal(after["prototypes"][:6], before["prototypes"])  # tasks 0-2: the same prototypes...
    assert torch.equal(after["threshold"][:3], before["threshold"])  # ...and thresholds
    assert selector.sizes() == [2, 2, 2, 2]
    for t in range(4):
        choice = selector.select(gaussian(CENTERS[t], 50, seed=10 + t))
        assert ((choice == t) | (choice == -1)).all() and (choice == t).float().mean() >= 0.8  # the rest: base
    far = -4.0 * torch.ones(8) + 0.3 * torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    assert (selector.select(far) == -1).all()  # unlike every task: the base model
    selector.set_task(1, fit_prototypes(gaussian(CENTERS[1], 40, seed=9), num_prototypes=3, seed=9))  # refit
    assert selector.sizes() == [2, 3, 2, 2] and torch.equal(selector.owner, torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3]))


def words(task: int, n: int, seed: int) -> dict:
    """Token ids from a task's own quarter of tiny_bert's 64-word vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = 4 + 14 * task + torch.randint(0, 14, (n, 7), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def continual_model(method: str, **selector):
    kw = {"task_names": ["t0"], "selector_quantile": 1.0, **selector}
    if method == "moecl":
        config = MoECLConfig(num_experts=4, r=2, init_weights=False, **kw)
    else:
        config = AnAConfig(r=2, target_modules=["query", "value"], routing_token="mean", **kw)
    model = get_peft_model(tiny_bert(), config)
    for t in (1, 2):
        model.add_task(f"t{t}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ana_tasks" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def fit(model, labels: bool) -> None:
    for t in range(3):
        batch = words(t, 32, seed=t)
        model.fit_task_selector(f"t{t}", [batch], labels=torch.arange(32) % 2 if labels else None)


@pytest.mark.parametrize("method", ["moecl", "ana"])
@pytest.mark.parametrize("features", ["shallow", "deep"])
def test_prototype_selector_routes_saves_and_loads(tmp_path, method, features):
    model = continual_model(method, selector="prototype", selector_features=features)
    fit(model, labels=True)
    config = model.peft_config["default"]
    assert config.selector_classes == [2, 2, 2]  # one prototype per class
    batch = {k: torch.cat([words(t, 3, seed=20 + t)[k] for t in range(3)]) for k in ("input_ids", "attention_mask")}
    picks = model.predict_tasks(batch)
    by_hand = model.base_model._select_for_routing("default", model.collect_selector_features([batch])).tolist()
    assert picks == [f"t{i}" if i >= 0 else None for i in by_hand]
    assert {"t0", "t1", "t2"} & set(picks)  # (how well it picks: benchmarks/bench_selector.py, on real data)
    with torch.no_grad():
        auto = model(**batch, task_ids="auto").last_hidden_state
        explicit = model(**batch, task_ids=picks).last_hidden_state
    torch.testing.assert_close(auto, explicit)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert loaded.predict_tasks(batch) == picks
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, task_ids="auto").last_hidden_state, auto)


def test_deep_features_cost_one_extra_base_pass_per_auto_forward():
    model = continual_model("moecl", selector="prototype", selector_features="deep")
    fit(model, labels=False)
    assert model.peft_config["default"].selector_classes == [4, 4, 4]  # k-means without labels
    calls = []
    embeddings = model.get_base_model().embeddings
    embeddings.register_forward_pre_hook(lambda module, args: calls.append(1))
    batch = words(1, 4, seed=3)
    with torch.no_grad():
        model(**batch, task_ids="auto")
        assert len(calls) == 2  # the adapted forward and one base pass
        model(**batch, task_ids="t1")
        assert len(calls) == 3  # a named task needs no selector features
    # the deep features the forward used are those of the base model's last hidden state
    with torch.no_grad(), model.disable_adapter():
        hidden = model(**batch).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(model.collect_selector_features([batch]), hidden)


def test_prototype_selector_errors():
    model = continual_model("moecl", selector="prototype")
    with pytest.raises(ValueError, match="reference autoencoder belongs to selector='autoencoder'"):
        model.fit_reference_selector(features=torch.randn(8, 16))
    with pytest.raises(ValueError, match="one entry per sample"):
        model.fit_task_selector("t0", [words(0, 8, seed=0)], labels=torch.zeros(5))
    with pytest.raises(ValueError, match="selector must be one of"):
        MoECLConfig(selector="knn")
