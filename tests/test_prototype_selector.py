"""The prototype task selector (class means of frozen features) and deep selector features (the base model's last
hidden state, from one extra base pass per task_ids="auto" forward)."""

from __future__ import annotations

import pickle

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


# -- scoring="lda": class statistics with a covariance pooled over the tasks --------------------------------------
WIRED = "selector_scoring" in MoECLConfig.__dataclass_fields__  # the config field (peft_ext/routing/selector.py)


def test_lda_statistics_are_the_closed_form_on_hand_made_features():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 5, generator=gen) + 2.0 * torch.eye(5)[torch.arange(30) % 3]
    labels = torch.arange(30) % 3
    fit = fit_prototypes(feats, labels, holdout=0.2, quantile=0.9, seed=0)
    train = torch.randperm(30, generator=torch.Generator().manual_seed(0))[6:]
    unit, y = F.normalize(feats, dim=-1)[train].double(), labels[train]
    means = torch.stack([unit[y == c].mean(0) for c in range(3)])
    scatter = sum(torch.outer(u - means[c], u - means[c]) for u, c in zip(unit, y.tolist()))
    torch.testing.assert_close(fit.means, means.float())
    torch.testing.assert_close(fit.counts, torch.bincount(y).float())
    torch.testing.assert_close(fit.scatter, scatter.float())
    torch.testing.assert_close(fit.prototypes, F.normalize(means.float(), dim=-1))  # the cosine prototypes, as before

    # two tasks: the discriminant is the closed form of the pooled, shrunk covariance
    other = fit_prototypes(-feats, labels, holdout=0.2, quantile=0.9, seed=1)
    selector = PrototypeSelector(5, scoring="lda", shrinkage=0.3)
    selector.set_task(0, fit)
    selector.set_task(1, other)
    all_means = torch.cat([fit.means, other.means]).double()
    pooled = (fit.scatter + other.scatter).double() / (48 - 6)  # N - number of classes
    shrunk = 0.7 * pooled + 0.3 * torch.trace(pooled) / 5 * torch.eye(5, dtype=torch.double)
    weights = all_means @ torch.linalg.inv(shrunk)
    biases = -0.5 * torch.einsum("pf,pf->p", weights, all_means)
    got_w, got_b = selector.discriminant()
    torch.testing.assert_close(got_w, weights.float())
    torch.testing.assert_close(got_b, biases.float())
    # decisions: the owner of the best class, unless the cosine to that task's prototypes is below its threshold
    x = torch.randn(40, 5, generator=gen)
    u = F.normalize(x, dim=-1)
    task = torch.tensor([0, 0, 0, 1, 1, 1])[(u.double() @ weights.T + biases).argmax(1)]
    sims = torch.stack([u @ fit.prototypes.T, u @ other.prototypes.T])  # (2, B, 3)
    best = sims[task, torch.arange(40)].max(dim=1).values
    expected = torch.where(best < torch.stack([fit.threshold, other.threshold])[task], -1, task)
    assert torch.equal(selector.select(x), expected)


def lda_selector(tasks: int = 4, shrinkage: float = 0.6) -> PrototypeSelector:
    selector = PrototypeSelector(8, scoring="lda", shrinkage=shrinkage)
    for t in range(tasks):
        labels = torch.arange(200) % (2 + t % 2)  # tasks of 2 and 3 classes
        selector.set_task(t, fit_prototypes(gaussian(CENTERS[t], 200, seed=t), labels, seed=t))
    return selector


def test_lda_fitting_task_3_leaves_the_statistics_of_tasks_0_2_unchanged():
    selector = lda_selector(tasks=3)
    before = {k: v.clone() for k, v in selector.state_dict().items()}
    weights_before = selector.discriminant()[0].clone()
    selector.set_task(3, fit_prototypes(gaussian(CENTERS[3], 200, seed=3), torch.arange(200) % 3, seed=3))
    after = selector.state_dict()
    assert selector.sizes() == [2, 3, 2, 3]
    for key in ("prototypes", "means", "counts", "owner", "threshold", "scatter"):  # every stored statistic
        assert torch.equal(after[key][: before[key].shape[0]], before[key]), key
    # what does change: the pooled covariance (derived, not stored), hence every class's discriminant weights
    assert not torch.allclose(selector.discriminant()[0][:7], weights_before)
    for t in range(4):
        choice = selector.select(gaussian(CENTERS[t], 50, seed=10 + t))
        assert ((choice == t) | (choice == -1)).all() and (choice == t).float().mean() >= 0.8
    far = -4.0 * torch.ones(8) + 0.3 * torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    assert (selector.select(far) == -1).all()
    # refitting a task replaces its own statistics only
    selector.set_task(1, fit_prototypes(gaussian(CENTERS[1], 60, seed=9), torch.arange(60) % 2, seed=9))
    assert selector.sizes() == [2, 2, 2, 3]
    assert torch.equal(selector.scatter[[0, 2, 3]], after["scatter"][[0, 2, 3]])
    assert selector.counts[2:4].sum() == 48  # 60 samples, 12 held out


def test_lda_save_load_round_trip_keeps_every_decision(tmp_path):
    from safetensors.torch import load_file, save_file

    selector = lda_selector()
    x = torch.cat([gaussian(CENTERS[t], 100, seed=30 + t) for t in range(4)] + [torch.randn(100, 8) * 3])
    save_file(selector.state_dict(), tmp_path / "selector.safetensors")
    loaded = PrototypeSelector(8, selector.sizes(), scoring="lda", shrinkage=0.6)
    loaded.load_state_dict(load_file(tmp_path / "selector.safetensors"))  # strict: the same keys and shapes
    assert torch.equal(loaded.select(x), selector.select(x))
    # loading into a selector that already decided (its discriminant cached) decides with the loaded statistics
    used = PrototypeSelector(8, selector.sizes(), scoring="lda", shrinkage=0.6)
    used.load_state_dict(lda_selector(shrinkage=0.9).state_dict())
    used.select(x)
    used.load_state_dict(load_file(tmp_path / "selector.safetensors"))
    assert torch.equal(used.select(x), selector.select(x))
    assert torch.equal(pickle.loads(pickle.dumps(used)).select(x), selector.select(x))
    assert set(selector.state_dict()) == {"prototypes", "owner", "threshold", "means", "counts", "scatter"}
    # a cosine selector's keys are what adapters saved before "lda" existed: they load as they did
    assert set(PrototypeSelector(8, [2]).state_dict()) == {"prototypes", "owner", "threshold"}


def test_lda_scoring_errors():
    with pytest.raises(ValueError, match="scoring must be one of"):
        PrototypeSelector(8, scoring="ridge")
    with pytest.raises(ValueError, match="shrinkage must be in"):
        PrototypeSelector(8, scoring="lda", shrinkage=0.0)
    fit0 = fit_prototypes(gaussian(CENTERS[0], 20, seed=0), seed=0)
    with pytest.raises(ValueError, match="needs a fit with class statistics"):
        PrototypeSelector(8, scoring="lda").set_task(0, fit0._replace(scatter=None))


@pytest.mark.skipif(not WIRED, reason="selector_scoring is not a config field yet (peft_ext/routing/selector.py)")
@pytest.mark.parametrize("method", ["moecl", "ana"])
def test_lda_scoring_routes_saves_and_loads(tmp_path, method):
    model = continual_model(method, selector="prototype", selector_features="deep", selector_scoring="lda")
    fit(model, labels=True)
    selector = model.base_model._modules[model.base_model.prefix + "selector"]["default"]
    assert selector.scoring == "lda" and selector.scatter.shape[0] == 3
    batch = {k: torch.cat([words(t, 3, seed=20 + t)[k] for t in range(3)]) for k in ("input_ids", "attention_mask")}
    picks = model.predict_tasks(batch)
    with torch.no_grad():
        auto = model(**batch, task_ids="auto").last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert loaded.peft_config["default"].selector_scoring == "lda"
    assert loaded.predict_tasks(batch) == picks
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, task_ids="auto").last_hidden_state, auto)
    with pytest.raises(ValueError, match="selector_scoring must be one of"):
        MoECLConfig(selector_scoring="ridge")
