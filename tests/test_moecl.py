"""MoE-CL: gating math, batched expert pool, activate-freeze, zero forgetting, save/load, model families, lifecycle."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import Tiny, tiny_bert, tiny_llama
from torch import nn

from peft_ext import MoECLConfig
from peft_ext.routing.experts import ExpertPool
from peft_ext.routing.gating import load_balancing_loss, noisy_top_k_gating
from peft_ext.tuners.moecl.layer import MoECLLayer


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def tiny_peft(seed: int = 0, **kwargs) -> PeftModel:
    torch.manual_seed(seed)
    defaults = dict(target_modules=["lin0"], num_experts=4, r=4, expert_dropout=0.0, scaling=1.0)
    defaults.update(kwargs)
    return get_peft_model(Tiny(), MoECLConfig(**defaults), adapter_name=defaults.pop("adapter_name", "task0"))


def train_steps(model, steps: int = 6, task_ids=None, seed: int = 1, weight_decay: float = 0.0, lr: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, 8, generator=gen)
    target = torch.randn(16, 5, 3, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        kwargs = {} if task_ids is None else {"task_ids": task_ids}
        loss = ((model(x=x, **kwargs) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return opt


def layer_of(model) -> MoECLLayer:
    return model.base_model.model.lin0


def one_line(exc: pytest.ExceptionInfo) -> bool:
    return "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------------------------
# gating math (hand-checked tensors)
# ----------------------------------------------------------------------------------------------------------------
def test_top_k_gating_pinned():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w_gate = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, 0.0, -1.0, 5.0]])
    out = noisy_top_k_gating(x, w_gate, None, k=2, training=False)
    # row 0: logits [1, 2, 3, 0] -> experts 2, 1; softmax over (3, 2) only
    # row 1: logits [0.5, 0, -1, 5] -> experts 3, 0; softmax over (5, 0.5)
    assert out.top_indices.tolist() == [[2, 1], [3, 0]]
    s0 = 1.0 / (1.0 + math.exp(-1.0))
    s1 = 1.0 / (1.0 + math.exp(-4.5))
    expected = torch.tensor([[0.0, 1 - s0, s0, 0.0], [1 - s1, 0.0, 0.0, s1]])
    torch.testing.assert_close(out.gates, expected, rtol=0, atol=1e-6)
    assert torch.allclose(out.gates.sum(-1), torch.ones(2))


def test_gating_noise_only_in_training():
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    w_gate, w_noise = torch.randn(3, 5), torch.randn(3, 5)
    clean = noisy_top_k_gating(x, w_gate, None, k=2, training=False)
    eval_a = noisy_top_k_gating(x, w_gate, w_noise, k=2, training=False)
    eval_b = noisy_top_k_gating(x, w_gate, w_noise, k=2, training=False)
    assert torch.equal(eval_a.gates, clean.gates) and torch.equal(eval_b.gates, clean.gates)
    noisy = noisy_top_k_gating(x, w_gate, w_noise, k=2, training=True)
    assert not torch.equal(noisy.logits, clean.logits)
    # noise std = softplus(x @ w_noise) + eps, so the noise is within a few stds of the clean logits
    std = torch.nn.functional.softplus(x @ w_noise) + 1e-2
    assert ((noisy.logits - clean.logits).abs() < 8 * std).all()


def test_gating_per_row_routers_and_expert_mask():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w_a = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    w_b = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 1.0, 2.0]])
    routers = torch.stack([w_a, w_b])
    per_row = noisy_top_k_gating(x, routers, None, k=2, training=False, router_index=torch.tensor([0, 1]))
    assert per_row.top_indices.tolist() == [[2, 1], [0, 3]]
    both_a = noisy_top_k_gating(x, routers, None, k=2, training=False, router_index=torch.tensor([0, 0]))
    assert both_a.logits.tolist() == [[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="router_index"):
        noisy_top_k_gating(x, routers, None, k=2, training=False)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    masked = noisy_top_k_gating(
        x, routers, None, k=2, training=False, expert_mask=mask, router_index=torch.tensor([0, 1])
    )
    s = 1.0 / (1.0 + math.exp(-1.0))
    torch.testing.assert_close(masked.gates[0], torch.tensor([1 - s, s, 0.0, 0.0]), rtol=0, atol=1e-6)
    assert torch.equal(masked.gates[1], torch.zeros(4))  # no allowed expert: all-zero gates
    one = noisy_top_k_gating(
        x[:1], w_a, None, k=2, training=False, expert_mask=torch.tensor([False, False, True, False])
    )
    assert one.gates[0].tolist() == [0.0, 0.0, 1.0, 0.0]  # fewer allowed than k: spread over the allowed one


# ----------------------------------------------------------------------------------------------------------------
# expert pool
# ----------------------------------------------------------------------------------------------------------------
def _manual_pool(pool: ExpertPool, x, gates):
    out = torch.zeros(x.shape[0], x.shape[1], pool.out_features)
    for b in range(x.shape[0]):
        for e in range(pool.num_experts):
            if gates[b, e] != 0:
                h = torch.relu(x[b] @ pool.down_weight[e] + pool.down_bias[e])
                out[b] += gates[b, e] * (h @ pool.up_weight[e] + pool.up_bias[e])
    return out


@pytest.mark.parametrize("dispatch", ["gather", "dense", "loop"])
def test_expert_pool_dispatch_matches_definition(dispatch):
    torch.manual_seed(0)
    pool = ExpertPool(5, 6, 3, 7, init_up_zero=False).eval()
    with torch.no_grad():
        for b in pool.down_bias:
            b.normal_()
        for b in pool.up_bias:
            b.normal_()
    x = torch.randn(4, 3, 6)
    gate = noisy_top_k_gating(x[:, 0], torch.randn(6, 5), None, k=2, training=False)
    gate = gate._replace(top_gates=gate.top_gates.clone())
    gate.top_gates[2] = 0.0  # a base-model sample
    with torch.no_grad():
        y = pool(x, gate.top_gates, gate.top_indices, dispatch=dispatch)
        expected = _manual_pool(pool, x, gate.gates)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[2], torch.zeros_like(y[2]))  # exactly zero, not approximately


def test_expert_pool_gather_gradients_match_loop():
    torch.manual_seed(0)
    pool = ExpertPool(6, 5, 3, 5, init_up_zero=False)
    x = torch.randn(2, 2, 5)  # 2 samples x top-2: at most 4 of the 6 experts are used
    gate = noisy_top_k_gating(x[:, 0], torch.randn(5, 6), None, k=2, training=False)
    grads = {}
    for dispatch in ("gather", "loop"):
        pool.zero_grad(set_to_none=True)
        pool(x, gate.top_gates, gate.top_indices, dispatch=dispatch).square().sum().backward()
        grads[dispatch] = [None if p.grad is None else p.grad.clone() for p in pool.parameters()]
    used = set(gate.top_indices.flatten().tolist())
    assert len(used) < 6  # some expert is unused ...
    for a, b in zip(grads["gather"], grads["loop"]):
        assert (a is None) == (b is None)  # ... and gets no gradient at all, as with the reference's loop
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_expert_pool_inference_cache_tracks_updates():
    pool = ExpertPool(3, 4, 2, 4, init_up_zero=False).eval()
    x = torch.randn(2, 1, 4)
    gate = noisy_top_k_gating(x[:, 0], torch.randn(4, 3), None, k=2, training=False)
    with torch.no_grad():
        y0 = pool(x, gate.top_gates, gate.top_indices)
        pool.up_weight[gate.top_indices[0, 0]].add_(1.0)  # in-place update bumps the version counter
        y1 = pool(x, gate.top_gates, gate.top_indices)
    assert not torch.equal(y0, y1)


# ----------------------------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------------------------
def test_layer_routes_each_sample_by_its_first_token():
    model = tiny_peft(init_weights=False).eval()
    layer = layer_of(model)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        y = model(x=x)
        cfg = model.peft_config["task0"]
        router = layer.moecl_router["task0"]
        gate = noisy_top_k_gating(x[:, 0], router.w_gate[0], router.w_noise[0], k=2, training=False)
        delta = _manual_pool(layer.moecl_experts["task0"], x, gate.gates) * cfg.scaling
        expected = model.base_model.model.lin1(torch.relu(layer.base_layer(x) + delta))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_identity_at_init_and_task_none_is_exact_base():
    model = tiny_peft()
    x = torch.randn(2, 3, 8)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base = model(x=x)
    with torch.no_grad():
        assert torch.equal(model(x=x), base)  # zero up-projections
    train_steps(model)
    with torch.no_grad():
        assert not torch.allclose(model(x=x), base)
        assert torch.equal(model(x=x, task_ids="none"), base)


def test_mixed_task_ids_per_sample():
    model = tiny_peft(init_weights=False)
    train_steps(model, steps=3)
    model.add_task("task1")
    train_steps(model, steps=3)
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        mixed = model(x=x, task_ids=["task0", "none", "task1"])
        t0 = model(x=x, task_ids="task0")
        t1 = model(x=x, task_ids="task1")
        with model.disable_adapter():
            base = model(x=x)
    torch.testing.assert_close(mixed[0], t0[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[2], t1[2], rtol=1e-6, atol=1e-6)
    assert torch.equal(mixed[1], base[1])


def test_balance_loss_through_get_regularization_loss():
    model = tiny_peft(balance_loss_weight=0.5, noisy_gating=False, init_weights=False)
    x = torch.randn(6, 2, 8)
    model.train()
    model(x=x)
    layer = layer_of(model)
    router = layer.moecl_router["task0"]
    gates = noisy_top_k_gating(x[:, 0], router.w_gate[0], None, k=2, training=True).gates
    torch.testing.assert_close(model.get_regularization_loss(), 0.5 * load_balancing_loss(gates))
    assert model.has_regularization
    model.eval()
    model(x=x)
    assert model.get_regularization_loss().item() == 0.0


def test_attach_modes_resolved_per_family():
    bert = get_peft_model(tiny_bert(), MoECLConfig(num_experts=3, r=2))
    layers = [m for m in bert.modules() if isinstance(m, MoECLLayer)]
    assert [m.attach_mode for m in layers] == ["residual", "residual"]
    assert all(type(m.base_layer).__name__ == "BertOutput" for m in layers)
    llama = get_peft_model(tiny_llama(), MoECLConfig(num_experts=3, r=2, routing_token="last"))
    layers = [m for m in llama.modules() if isinstance(m, MoECLLayer)]
    assert [m.attach_mode for m in layers] == ["parallel", "parallel"] and layers[0].in_features == 16


def test_bert_residual_placement_is_inside_the_residual_sum():
    model = get_peft_model(tiny_bert(), MoECLConfig(num_experts=3, r=2, init_weights=False, scaling=1.0)).eval()
    layer = [m for m in model.modules() if isinstance(m, MoECLLayer)][0]
    h = torch.randn(2, 5, 32)  # intermediate activations
    resid = torch.randn(2, 5, 16)  # post-attention stream (input_tensor)
    with torch.no_grad():
        model.base_model.routing.start_scope("", None)
        out = layer(h, resid)
        tasks = torch.zeros(2, dtype=torch.long)
        delta = layer._mixture("default", resid, tasks)
        bo = layer.base_layer
        expected = bo.LayerNorm(bo.dense(h) + resid + delta)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# activate-freeze, task schedule, zero forgetting
# ----------------------------------------------------------------------------------------------------------------
def test_activate_freeze_bit_identity_with_adamw_weight_decay():
    model = tiny_peft(num_experts=5, top_k=2, freeze_top_k=2)
    train_steps(model, steps=8)
    layer = layer_of(model)
    counts = layer.moecl_router["task0"].counts[0].clone()
    assert counts.sum() == 8 * 16 * 2  # every training sample selected two experts
    frozen = model.end_task("task0")["lin0"]
    expected = torch.sort(counts, descending=True, stable=True).indices[:2].tolist()
    assert sorted(frozen) == sorted(expected)
    pool = layer.moecl_experts["task0"]
    assert pool.frozen_at.tolist() == [0 if e in expected else -1 for e in range(5)]

    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.add_task("task1")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_trainable = {
        f"base_model.model.lin0.moecl_experts.task0.{kind}.{e}"
        for e in range(5)
        if e not in expected
        for kind in ("down_weight", "down_bias", "up_weight", "up_bias")
    } | {"base_model.model.lin0.moecl_router.task0.w_gate.1", "base_model.model.lin0.moecl_router.task0.w_noise.1"}
    assert trainable == expected_trainable

    train_steps(model, steps=8, weight_decay=0.5, lr=0.1, seed=2)
    after = dict(model.named_parameters())
    for e in range(5):
        for kind in ("down_weight", "down_bias", "up_weight", "up_bias"):
            name = f"base_model.model.lin0.moecl_experts.task0.{kind}.{e}"
            if e in expected:
                assert torch.equal(after[name], snapshot[name]), name  # bit-identical
    for name in ("w_gate.0", "w_noise.0"):
        full = f"base_model.model.lin0.moecl_router.task0.{name}"
        assert torch.equal(after[full], snapshot[full])
    moved = [
        e
        for e in range(5)
        if e not in expected
        and not torch.equal(
            after[f"base_model.model.lin0.moecl_experts.task0.down_weight.{e}"],
            snapshot[f"base_model.model.lin0.moecl_experts.task0.down_weight.{e}"],
        )
    ]
    assert moved  # the unfrozen experts task1 routes to do train
    assert layer.moecl_router["task0"].counts[0].tolist() == counts.tolist()  # task0's counts are kept


def test_end_of_last_task_freezes_everything_and_is_idempotent():
    model = tiny_peft()
    train_steps(model, steps=2)
    model.end_task()
    assert not any(p.requires_grad for p in model.parameters())
    assert model.end_task() == {}
    assert model.peft_config["task0"].ended_tasks == ["task0"]


def test_add_task_ends_previous_task_automatically():
    model = tiny_peft()
    train_steps(model, steps=2)
    model.add_task("task1")
    assert model.peft_config["task0"].ended_tasks == ["task0"]
    assert int(layer_of(model).moecl_experts["task0"].frozen_mask.sum()) == 2


@pytest.mark.parametrize("recount", [False, True])
def test_end_task_recount_freezes_the_experts_eval_routes_use(recount):
    # training counts favour experts 0 and 1 (as early, noisy routes may); the trained router sends every sample
    # to experts 2 and 3. The paper freezes by training counts; with batches, by the eval-mode routes.
    model = tiny_peft(num_experts=4, top_k=2, freeze_top_k=2, balance_loss_weight=1.0)
    layer = layer_of(model)
    with torch.no_grad():
        gate = layer.moecl_router["task0"].w_gate[0]
        gate[:, :2] = -1.0
        gate[:, 2:] = 1.0
    layer.moecl_router["task0"].counts[0] = torch.tensor([10, 9, 0, 0])
    x = torch.rand(6, 3, 8) + 0.1  # positive inputs: logits favour experts 2 and 3 for every sample
    model.train()
    frozen = model.end_task(batches=[{"x": x[:4]}, {"x": x[4:]}] if recount else None)
    assert frozen == {"lin0": [2, 3] if recount else [0, 1]}
    counts = layer.moecl_router["task0"].counts[0].tolist()
    assert counts == ([0, 0, 6, 6] if recount else [10, 9, 0, 0])
    assert model.training and layer.training  # modes restored
    assert not layer.recounting
    with torch.no_grad():
        model(x=x)  # training-mode forward after the task ended: nothing counted any more
    assert layer.moecl_router["task0"].counts[0].tolist() == counts


@pytest.mark.parametrize("isolate", [True, False])
def test_isolated_finished_task_never_changes(isolate):
    # 2 experts, both used by every sample (top_k=2), 1 frozen after task0: task1 keeps training the other one
    model = tiny_peft(num_experts=2, top_k=2, freeze_top_k=1, isolate_finished_tasks=isolate, init_weights=False)
    train_steps(model, steps=5)
    model.end_task()
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        before = model(x=x, task_ids="task0")
    model.add_task("task1")
    train_steps(model, steps=5, seed=3, lr=0.1)
    with torch.no_grad():
        after = model(x=x, task_ids="task0")
    if isolate:
        assert torch.equal(before, after)  # zero forgetting, bit for bit
    else:
        assert not torch.allclose(before, after)  # the paper's setting drifts through the shared unfrozen expert
    # a mixed batch (per-sample routers and masks) gives each sample what its task alone gives
    with torch.no_grad():
        mixed = model(x=x, task_ids=["task0", "task1", "none", "task1", "task0"])
        task1 = model(x=x, task_ids="task1")
        with model.disable_adapter():
            base = model(x=x)
    expected = torch.stack([after[0], task1[1], base[2], task1[3], after[4]])
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-6)


def test_isolation_masks_follow_freezing_and_loading():
    model = tiny_peft(num_experts=4, freeze_top_k=1, isolate_finished_tasks=True, init_weights=False)
    layer, config = layer_of(model), model.peft_config["task0"]
    assert layer._allowed_experts("task0", config, 1) is None  # nothing ended: unrestricted
    train_steps(model)
    model.end_task()
    pool = layer.moecl_experts["task0"]
    first = pool.frozen_mask.clone()
    assert torch.equal(layer._allowed_experts("task0", config, 1)[0], first)
    model.add_task("task1")
    train_steps(model, seed=2)
    model.end_task()
    allowed = layer._allowed_experts("task0", config, 2)
    assert torch.equal(allowed[0], first)  # task0 keeps only its own frozen experts
    assert torch.equal(allowed[1], pool.frozen_mask) and int(allowed[1].sum()) == 2
    with torch.no_grad():  # as loading a checkpoint does: the buffer changes in place
        pool.frozen_at.copy_(torch.tensor([-1, -1, 0, 1]))
    assert layer._allowed_experts("task0", config, 2).tolist() == [
        [False, False, True, False],
        [False, False, True, True],
    ]


def test_loading_for_training_keeps_frozen_experts_frozen(tmp_path):
    model = tiny_peft(num_experts=5)
    train_steps(model, steps=3)
    model.add_task("task1")  # ends task0: 2 experts frozen
    frozen = layer_of(model).moecl_experts["task0"].frozen_mask.tolist()
    expected = _grad_state(model)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Tiny(), str(tmp_path / "task0"), adapter_name="task0", is_trainable=True)
    assert layer_of(loaded).moecl_experts["task0"].frozen_mask.tolist() == frozen
    assert _grad_state(loaded) == expected
    assert sum(expected.values()) == 3 * 4 + 2  # 3 unfrozen experts x 4 tensors + task1's router


# ----------------------------------------------------------------------------------------------------------------
# lifecycle
# ----------------------------------------------------------------------------------------------------------------
def _grad_state(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_forward_disable_and_set_adapter_keep_the_schedule():
    model = tiny_peft(init_weights=False)
    train_steps(model, steps=3)
    model.add_task("task1")
    state = _grad_state(model)
    x = torch.randn(2, 3, 8)
    model.train()
    model(x=x).sum().backward()
    assert _grad_state(model) == state and model.base_model.model.training
    model.eval()
    with torch.no_grad():
        model(x=x)
    assert _grad_state(model) == state and not layer_of(model).training
    with model.disable_adapter():
        with torch.no_grad():
            disabled = model(x=x)
    assert _grad_state(model) == state
    model.base_model.set_adapter("task0")
    assert _grad_state(model) == state
    base = copy.deepcopy(model.base_model.model)
    for m in base.modules():
        if isinstance(m, MoECLLayer):
            m._disable_adapters = True
    with torch.no_grad():
        assert torch.equal(disabled, base(x))


def test_merge_is_refused_and_unload_gives_base():
    model = tiny_peft(init_weights=False)
    with pytest.raises(ValueError, match="cannot be merged") as exc:
        model.merge_and_unload()
    assert one_line(exc)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), model.disable_adapter():
        base = model(x=x)
    unloaded = model.unload()
    assert isinstance(unloaded.lin0, nn.Linear)
    with torch.no_grad():
        assert torch.equal(unloaded(x), base)


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
def test_bad_input_errors_are_one_line(tmp_path):
    model = tiny_peft()
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="Unknown task 'nope'") as exc:
        model(x=x, task_ids="nope")
    assert one_line(exc)
    with pytest.raises(ValueError, match="fit_task_selector") as exc:
        model(x=x, task_ids="auto")
    assert one_line(exc)
    with pytest.raises(ValueError, match="2 samples") as exc:
        model(x=x, task_ids=["task0"])
    assert one_line(exc)
    with pytest.raises(ValueError, match="already exists"):
        model.add_task("task0")
    with pytest.raises(ValueError, match="top_k"):
        MoECLConfig(num_experts=2, top_k=3)

    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    wrong = MoECLConfig(target_modules=["lin0"], num_experts=6, r=4)
    with pytest.raises(ValueError, match="4 experts .* num_experts=6") as exc:
        PeftModel.from_pretrained(Tiny(), str(tmp_path / "task0"), config=wrong)
    assert one_line(exc)


# ----------------------------------------------------------------------------------------------------------------
# model families
# ----------------------------------------------------------------------------------------------------------------


def _check_family(model, inputs, get_out):
    """init identity, training changes outputs, disable gives base outputs, task 'none' gives base outputs."""
    with torch.no_grad():
        base = get_out(model.get_base_model()(**inputs))
        assert torch.equal(get_out(model(**inputs)), base)
    for layer in (m for m in model.modules() if isinstance(m, MoECLLayer)):
        for name in layer.moecl_experts:
            with torch.no_grad():
                for w in layer.moecl_experts[name].up_weight:
                    w.normal_(0, 0.5)
    with torch.no_grad():
        adapted = get_out(model(**inputs))
        assert not torch.allclose(adapted, base)
        with model.disable_adapter():
            assert torch.equal(get_out(model(**inputs)), base)
        assert torch.equal(get_out(model(**inputs, task_ids="none")), base)


def test_bert_like_encoder():
    model = get_peft_model(tiny_bert(), MoECLConfig(num_experts=4, r=4))
    assert model.base_model.targeted_module_names == ["encoder.layer.0.output", "encoder.layer.1.output"]
    ids = torch.randint(1, 64, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    _check_family(model, {"input_ids": ids, "attention_mask": mask}, lambda o: o.last_hidden_state)


def test_vit_and_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
        )
    ).eval()
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
        )
    ).eval()
    pixels = {"pixel_values": torch.randn(2, 3, 8, 8)}
    vit_peft = get_peft_model(vit, MoECLConfig(num_experts=4, r=4))
    assert vit_peft.base_model.targeted_module_names == ["layers.0.mlp", "layers.1.mlp"]
    _check_family(vit_peft, pixels, lambda o: o.last_hidden_state)
    clip_peft = get_peft_model(clip, MoECLConfig(num_experts=4, r=4))
    assert clip_peft.base_model.targeted_module_names == ["encoder.layers.0.mlp", "encoder.layers.1.mlp"]
    _check_family(clip_peft, pixels, lambda o: o.pooler_output)


def test_llama_decoder_and_generate():
    model = get_peft_model(tiny_llama(), MoECLConfig(num_experts=4, r=4, routing_token="last"))
    ids = torch.randint(1, 64, (2, 5))
    _check_family(model, {"input_ids": ids}, lambda o: o.logits)
    model.add_task("chat")
    state = _grad_state(model)
    model.train()
    with model.route("chat"):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)
    assert _grad_state(model) == state and model.base_model.model.training
    assert all(m.training for m in model.modules() if isinstance(m, MoECLLayer))
    model.eval()
    with torch.no_grad(), model.route("none"):
        routed_none = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
        )
    with torch.no_grad(), model.disable_adapter():
        base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(routed_none, base)
    assert _grad_state(model) == state and not model.base_model.model.training


def test_generate_with_auto_picks_the_task_once_per_sequence():
    config = MoECLConfig(
        num_experts=4,
        r=4,
        routing_token="last",
        init_weights=False,
        selector_hidden=4,
        selector="autoencoder",
        selector_features="shallow",
    )
    model = get_peft_model(tiny_llama(), config)
    with pytest.warns(UserWarning, match="without any training forward"):
        model.add_task("t1")
    model.eval()
    prompts = {
        t: torch.randint(1 + 30 * t, 20 + 30 * t, (16, 5), generator=torch.Generator().manual_seed(t)) for t in (0, 1)
    }
    for t, name in enumerate(model.tasks()):
        model.fit_task_selector(name, [{"input_ids": prompts[t]}], epochs=200)
    ids = torch.stack([prompts[0][0], prompts[1][0]])
    chosen = model.predict_tasks({"input_ids": ids})
    assert chosen == model.tasks()  # each prompt's own task
    routing = model.base_model.routing
    calls = []
    select = routing.selector
    routing.selector = lambda adapter, pooled: calls.append(pooled.shape) or select(adapter, pooled)
    with torch.no_grad(), model.route("auto"):
        auto = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert calls == [torch.Size([2, 16])]  # decided on the prompts only, not again on each new token
    with torch.no_grad(), model.route(chosen):
        named = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(auto, named)


def test_decoder_with_first_token_routing_warns():
    with pytest.warns(UserWarning, match="routing_token='last'"):
        get_peft_model(tiny_llama(), MoECLConfig(num_experts=2, r=2))


# ----------------------------------------------------------------------------------------------------------------
# save / load of a 3-task model with its selector
# ----------------------------------------------------------------------------------------------------------------
def _task_batch(task: int, n: int = 24, seed: int = 0):
    """Token ids from a task-specific range, so the tasks' base features differ."""
    gen = torch.Generator().manual_seed(seed + 17 * task)
    ids = torch.randint(1 + 20 * task, 4 + 20 * task, (n, 6), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_save_load_three_tasks_with_selector(tmp_path):
    base = tiny_bert()
    pristine = copy.deepcopy(base)
    config = MoECLConfig(
        num_experts=5,
        r=4,
        routing_token="mean",
        expert_dropout=0.0,
        task_names=["a"],
        selector_hidden=4,
        selector_epochs=60,
    )
    model = get_peft_model(base, config, adapter_name="learner")
    names = ["a", "b", "c"]
    for t, name in enumerate(names):
        if t > 0:
            model.add_task(name)
        batch = _task_batch(t)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        model.train()
        for _ in range(3):
            out = model(**batch).last_hidden_state
            loss = out.square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        model.end_task(name)
        model.fit_task_selector(name, [batch])
    assert model.peft_config["learner"].selector_tasks == names
    test = {k: torch.cat([_task_batch(t, n=8, seed=99)[k] for t in range(3)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = {t: model(**test, task_ids=t).last_hidden_state for t in [*names, "none"]}
        before_auto = model(**test, task_ids="auto").last_hidden_state
        chosen = model.predict_tasks(test)
    frozen = model.frozen_experts()
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(pristine, str(tmp_path / "learner"), adapter_name="learner")
    assert loaded.peft_config["learner"].task_names == names
    assert loaded.peft_config["learner"].ended_tasks == names
    assert loaded.frozen_experts() == frozen
    for key, mod in model.named_modules():
        if isinstance(mod, MoECLLayer):
            other = loaded.get_submodule(key)
            assert torch.equal(mod.moecl_router["learner"].counts, other.moecl_router["learner"].counts)
    with torch.no_grad():
        for t, ref in before.items():
            assert torch.equal(loaded(**test, task_ids=t).last_hidden_state, ref), t
        assert torch.equal(loaded(**test, task_ids="auto").last_hidden_state, before_auto)
    assert loaded.predict_tasks(test) == chosen
    for t, name in enumerate(names):  # the selector separates the tasks' token ranges (or defers to the base model)
        part = chosen[8 * t : 8 * (t + 1)]
        assert set(part) <= {name, None} and part.count(name) >= 5, part
    assert not any(p.requires_grad for p in loaded.parameters())
