"""DDAS task selector: calibration, per-sample selection and bypass on synthetic Gaussian distributions."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_ext import MoECLConfig
from peft_ext.routing.selector import TaskSelector, fit_autoencoder, squash


F = 12
DDAS = {
    "selector": "autoencoder",
    "selector_features": "shallow",
}  # the paper's DDAS: autoencoders on the first routed layer's input (not the default prototypes)
MEANS = [torch.full((F,), -3.0), torch.zeros(F), torch.full((F,), 3.0)]
MEANS[1][::2] = 3.0  # task 1 differs from both others in half of the coordinates
MEANS[1][1::2] = -3.0


def gaussian(task: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return MEANS[task] + torch.randn(n, F, generator=gen)


def unknown(n: int, seed: int) -> torch.Tensor:
    """Far from every task: mean 12 in every coordinate."""
    gen = torch.Generator().manual_seed(seed)
    return 12.0 + torch.randn(n, F, generator=gen)


def fitted_selector(compare_hidden: int = 4) -> TaskSelector:
    selector = TaskSelector(F, compare_hidden)
    for t in range(3):
        selector.tasks.set_entry(t, fit_autoencoder(gaussian(t, 200, seed=t), compare_hidden, epochs=60, seed=t))
    return selector


def test_threshold_is_the_holdout_quantile():
    feats = gaussian(0, 50, seed=0)
    fit = fit_autoencoder(feats, 4, epochs=5, holdout=0.2, quantile=0.9, seed=3)
    assert fit.holdout_errors.numel() == 10
    assert torch.equal(fit.threshold, torch.quantile(fit.holdout_errors, 0.9))
    # the held-out errors are those of the fitted autoencoder on the squashed held-out samples
    bank = TaskSelector(F, 4).tasks
    bank.set_entry(0, fit)
    errs = bank.errors(feats)[0]
    assert all(any(torch.isclose(e, errs, atol=1e-6).tolist()) for e in fit.holdout_errors)
    torch.testing.assert_close(squash(feats, fit.mean, fit.std), torch.sigmoid((feats - fit.mean) / fit.std))


@pytest.mark.parametrize("compare", ["normalized", "raw"])
def test_selects_the_right_task_per_sample(compare):
    selector = fitted_selector()
    for t in range(3):
        choice = selector.select(gaussian(t, 100, seed=100 + t), compare)
        assert (choice == t).float().mean() >= 0.9, (t, choice)
        assert ((choice == t) | (choice == -1)).all()  # never another task
    far = selector.select(unknown(100, seed=7), compare)
    assert (far == -1).float().mean() >= 0.95  # unknown inputs bypass the adapters
    mixed = torch.cat([gaussian(2, 1, seed=11), unknown(1, seed=12), gaussian(0, 1, seed=13)])
    assert selector.select(mixed, compare).tolist() == [2, -1, 0]  # decisions per sample within one batch


def test_reference_autoencoder_decides_per_batch():
    selector = fitted_selector()
    # a reference fitted on out-of-task data (here: mean 6, between task 2 and the unknown inputs)
    ref_data = 6.0 + torch.randn(200, F, generator=torch.Generator().manual_seed(5))
    selector.reference.set_entry(0, fit_autoencoder(ref_data, 4, epochs=60, seed=5))
    in_task = gaussian(1, 32, seed=21)
    assert (selector.select(in_task) == 1).float().mean() >= 0.9  # the reference loses on in-task batches
    out_batch = 6.0 + torch.randn(32, F, generator=torch.Generator().manual_seed(22))
    assert selector.select(out_batch).tolist() == [-1] * 32  # and wins on out-of-task batches, batch-wide


class Probe(nn.Module):
    """The first adapted layer sees the raw input, so its base features are the Gaussian samples themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(F, F)
        self.lin1 = nn.Linear(F, 2)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def probe_model():
    torch.manual_seed(0)
    cfg = MoECLConfig(
        target_modules=["lin0"],
        num_experts=4,
        r=4,
        init_weights=False,
        task_names=["t0"],
        selector_hidden=4,
        **DDAS,
        selector_epochs=60,
        expert_dropout=0.0,
    )
    model = get_peft_model(Probe(), cfg)
    for previous, task in (("t0", "t1"), ("t1", "t2")):
        model.end_task(previous, freeze_top_k=0)  # nothing trained here: nothing to freeze
        model.add_task(task)
    with torch.no_grad():  # give every task's router its own non-zero weights
        for w in model.base_model.model.lin0.moecl_router["default"].w_gate:
            w.normal_()
    return model


def test_auto_routing_through_the_model_matches_explicit_task_ids():
    model = probe_model()
    for t in range(3):
        model.fit_task_selector(f"t{t}", [{"x": gaussian(t, 100, seed=t)}, {"x": gaussian(t, 100, seed=50 + t)}])
    assert model.has_task_selector
    batch = torch.cat([gaussian(0, 2, seed=31), unknown(2, seed=32), gaussian(2, 2, seed=33), gaussian(1, 2, seed=34)])
    assert model.predict_tasks({"x": batch}) == ["t0", "t0", None, None, "t2", "t2", "t1", "t1"]
    model.eval()
    with torch.no_grad():
        auto = model(x=batch, task_ids="auto")
        explicit = model(x=batch, task_ids=["t0", "t0", "none", "none", "t2", "t2", "t1", "t1"])
        with model.disable_adapter():
            base = model(x=batch)
    assert torch.equal(auto, explicit)
    assert torch.equal(auto[2:4], base[2:4])  # unknown inputs get the untouched base model
    assert not torch.allclose(auto[:2], base[:2])


def test_feature_capture_restores_modes_and_flags():
    model = probe_model()
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x = gaussian(0, 5, seed=0)
    feats = model.collect_selector_features([{"x": x}])
    assert torch.equal(feats, x)  # the pooled input of lin0 (2-D input: the sample itself)
    assert model.base_model.model.training and model.base_model.model.lin0.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not model.base_model.model.lin0.disable_adapters
    assert not model.base_model.model.lin0._forward_pre_hooks  # the capture hooks are gone


def test_selector_errors():
    model = probe_model()
    x = gaussian(0, 4, seed=0)
    assert not model.has_task_selector
    with pytest.raises(ValueError, match="fit_task_selector"):
        model(x=x, task_ids="auto")
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        model.fit_task_selector("nope", [{"x": x}])
    with pytest.raises(ValueError, match="at least 4 samples"):
        model.fit_task_selector("t0", features=x[:3])
    with pytest.raises(ValueError, match="Fit at least one task"):
        model.fit_reference_selector(features=x)
    model.fit_task_selector("t0", features=gaussian(0, 20, seed=1), epochs=2)
    with pytest.raises(ValueError, match="size 5 but"):
        model.fit_task_selector("t1", features=torch.randn(20, 5))
    with pytest.raises(ValueError, match="selector_quantile"):
        MoECLConfig(selector_quantile=0.0)
    with pytest.warns(UserWarning, match="identity"):
        get_peft_model(Probe(), MoECLConfig(target_modules=["lin0"], selector_hidden=F, **DDAS)).fit_task_selector(
            "default", features=gaussian(0, 20, seed=1), epochs=1
        )


def test_shallow_features_stop_the_forward_once_taken():
    # A deep causal LM's selector fit needs only its first routed layer's input: the rest of the forward is skipped,
    # and the features are those a full forward gives that layer.
    from tiny_models import tiny_llama

    from peft_ext import AnAConfig

    config = AnAConfig(
        r=2, target_modules=["q_proj"], task_names=["t0"], routing_token="last", selector_hidden=4, **DDAS
    )
    model = get_peft_model(tiny_llama(), config)
    layers = model.base_model.model.model.layers
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    seen = []
    first = layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, -1]))
    last = layers[-1].register_forward_pre_hook(lambda m, args: seen.append("last layer ran"))
    with torch.no_grad():
        model(input_ids=ids, task_ids="none")
        before = model(input_ids=ids, task_ids="t0").logits
    assert seen[-1] == "last layer ran"
    full, seen[:] = seen[0], []
    features = model.collect_selector_features([{"input_ids": ids}])
    first.remove(), last.remove()
    assert len(seen) == 1 and torch.equal(features, full)  # only the first layer's input was reached
    assert model.base_model.routing.requested is None  # the stopped forward left no request behind
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, task_ids="t0").logits, before)


def test_deep_and_shallow_features_are_both_parts_at_unit_length():
    from tiny_models import tiny_bert

    def features(kind, token="first"):
        config = MoECLConfig(
            num_experts=2, r=2, target_modules=["intermediate.dense"], selector_features=kind, routing_token=token
        )
        return get_peft_model(tiny_bert(), config).collect_selector_features([batch])

    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long()}
    both = features("deep+shallow")
    deep, shallow = features("deep"), features("shallow", token="mean")  # the shallow part is always mean-pooled
    assert both.shape == (2, deep.shape[1] + shallow.shape[1])
    torch.testing.assert_close(
        both, torch.cat([deep / deep.norm(dim=1, keepdim=True), shallow / shallow.norm(dim=1, keepdim=True)], 1)
    )
    assert not torch.allclose(features("shallow"), shallow)  # alone, it follows routing_token ("first" here)
