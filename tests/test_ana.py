"""Tests of AnA (Adapter-in-Adapter with an MoE gate): math on hand-checked tensors, the continual protocol, zero
forgetting, parameter counts, save/load, lifecycle, merging, task-agnostic routing and three transformers models."""

from __future__ import annotations

import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_ext  # noqa: F401  (registers the methods)
from peft_ext import AnAConfig
from peft_ext.tuners.ana import QFORMER_TARGET_MODULES, AnALinear, ana_task_parameter_count


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, hidden, bias=bias)
        self.lin1 = nn.Linear(hidden, d_out, bias=bias)

    def forward(self, X):
        return self.lin1(torch.tanh(self.lin0(X)))


def ana_layers(model):
    return [m for m in model.modules() if isinstance(m, AnALinear)]


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def tiny_base(bias=True):
    torch.manual_seed(0)
    return MLP(bias=bias).eval()


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"in_adapter_init": "kaiming"}, "in_adapter_init must be one of"),
        ({"top_k": 0}, "top_k must be None or a positive integer"),
        ({"task_names": ["ta", "ta"]}, "task_names must be unique"),
        ({"task_names": ["ta"], "ended_tasks": ["tb"]}, "ended_tasks"),
        ({"task_names": ["auto"]}, "Invalid task name"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnAConfig(target_modules=["lin0"], **kwargs)


def test_config_copies_task_lists():
    names = ["ta", "tb"]
    config = AnAConfig(target_modules=["lin0"], task_names=names)
    config.task_names.append("tc")
    assert names == ["ta", "tb"]


# ----------------------------------------------------------------------------------------------------------------
# math on hand-checked tensors
# ----------------------------------------------------------------------------------------------------------------
def _hand_model(top_k=None):
    """Base Linear(2, 2) = identity with zero bias, rank 1, two tasks with hand-set weights."""
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(2, 2))
    with torch.no_grad():
        base.lin.weight.copy_(torch.eye(2))
        base.lin.bias.zero_()
    model = get_peft_model(base, AnAConfig(target_modules=["lin"], r=1, top_k=top_k), adapter_name="t0")
    layer = model.base_model.model.lin
    with torch.no_grad():
        t0 = layer.ana_tasks["t0"][0]
        t0.down.weight.copy_(torch.tensor([[1.0, 2.0]]))
        t0.down.bias.copy_(torch.tensor([0.5]))
        t0.up.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        t0.up.bias.copy_(torch.tensor([0.1, 0.2]))
        t0.scale.fill_(2.0)
    return model, layer


def test_single_task_math():
    model, _ = _hand_model()
    model.eval()
    x = torch.tensor([[1.0, 1.0]])
    # down: 1 + 2 + 0.5 = 3.5; up: [3.5 + 0.1, -3.5 + 0.2]; times s = 2; plus base x
    expected = torch.tensor([[1.0 + 7.2, 1.0 - 6.6]])
    torch.testing.assert_close(model(x), expected)


def _add_hand_task(model, layer):
    model.add_task("t1")
    with torch.no_grad():
        t1 = layer.ana_tasks["t0"][1]
        t1.down.weight.copy_(torch.tensor([[0.0, 1.0]]))
        t1.down.bias.zero_()
        t1.up.weight.copy_(torch.tensor([[2.0], [0.0]]))
        t1.up.bias.zero_()
        t1.scale.fill_(1.0)
        t1.in_weight[0].fill_(0.5)
        t1.in_bias[0].fill_(1.0)
        # logits x @ W_gate = [0, ln 3] for x = [1, 1]  ->  gates [1/4, 3/4]
        t1.gate.copy_(torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]))
        t1.gate_noise.fill_(5.0)  # large noise weights: must not matter in eval mode


def test_adapter_in_adapter_and_dense_gate_math():
    model, layer = _hand_model()
    _add_hand_task(model, layer)
    model.eval()
    x = torch.tensor([[1.0, 1.0]])
    # expert 0 through F_0^1: F(3.5) = 0.5 * 3.5 + 1 = 2.75; 2 * up_0(2.75) = 2 * [2.85, -2.55] = [5.7, -5.1]
    # expert 1 (own adapter): 1 * up_1(down_1 x = 1) = [2, 0]
    # gated: 1/4 * [5.7, -5.1] + 3/4 * [2, 0] = [2.925, -1.275]
    expected_t1 = torch.tensor([[1.0 + 2.925, 1.0 - 1.275]])
    torch.testing.assert_close(model(x), expected_t1)
    torch.testing.assert_close(layer.task_gates("t0", 1, x), torch.tensor([[0.25, 0.75]]))
    # task 0 is untouched by its in-adapter: F_0^1 only lives inside task 1's experts
    torch.testing.assert_close(model(x, task_ids="t0"), torch.tensor([[8.2, -5.6]]))
    # 'none' routes to the base model
    torch.testing.assert_close(model(x, task_ids="none"), x)


def test_top_k_gate_math():
    model, layer = _hand_model(top_k=1)
    _add_hand_task(model, layer)
    model.eval()
    x = torch.tensor([[1.0, 1.0]])
    # top-1 keeps only expert 1 (logit ln 3 > 0) with gate 1
    torch.testing.assert_close(layer.task_gates("t0", 1, x), torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(model(x), torch.tensor([[3.0, 1.0]]))


def test_gate_is_zero_initialized_uniform_and_noise_only_in_training():
    model = get_peft_model(tiny_base(), AnAConfig(target_modules=["lin0"]), "ta")
    model.add_task("tb")
    model.add_task("tc")
    layer = model.base_model.model.lin0
    x = torch.randn(5, 6)
    assert torch.count_nonzero(layer.ana_tasks["ta"][2].gate) == 0
    model.eval()
    torch.testing.assert_close(layer.task_gates("ta", 2, x), torch.full((5, 3), 1 / 3))
    with torch.no_grad():
        layer.ana_tasks["ta"][2].gate_noise.fill_(1.0)
    torch.testing.assert_close(layer.task_gates("ta", 2, x), torch.full((5, 3), 1 / 3))  # eval: no noise
    model.train()
    g1, g2 = layer.task_gates("ta", 2, x), layer.task_gates("ta", 2, x)
    assert not torch.allclose(g1, g2)
    torch.testing.assert_close(g1.sum(-1), torch.ones(5))


def test_gate_is_per_token():
    model, layer = _hand_model()
    _add_hand_task(model, layer)
    model.eval()
    x = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # one sample, two tokens
    gates = layer.task_gates("t0", 1, x.reshape(-1, 2))
    torch.testing.assert_close(gates[0], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(gates[1], torch.tensor([0.5, 0.5]))  # logits [0, 0] for the second token
    out = model(x)
    torch.testing.assert_close(out[0, 0], model(x[:, :1])[0, 0])
    torch.testing.assert_close(out[0, 1], model(x[:, 1:])[0, 0])


@pytest.mark.parametrize("init", ["identity", "zero", "linear"])
def test_in_adapter_init(init):
    config = AnAConfig(target_modules=["lin0"], init_weights=False, in_adapter_init=init)
    model = get_peft_model(tiny_base(), config, "ta")
    model.add_task("tb")
    layer = model.base_model.model.lin0
    b = layer.ana_tasks["ta"][1]
    a = layer.ana_tasks["ta"][0]
    z = torch.randn(4, 6)
    h = a.down(z)
    expert = a.scale * a.up(b.in_adapter(0, h))
    if init == "identity":
        torch.testing.assert_close(expert, a.scale * a.up(h))  # the expert starts as the plain frozen A_0
    elif init == "zero":
        torch.testing.assert_close(expert, (a.scale * a.up.bias).expand(4, -1))
    else:
        weight, bias = b.in_weight[0], b.in_bias[0]
        assert not torch.equal(weight, torch.eye(8)) and torch.count_nonzero(weight) > 0
        bound = 1 / math.sqrt(8)  # PyTorch's default nn.Linear init range, of the weight and of the bias
        assert weight.abs().max() <= bound and 0 < bias.abs().max() <= bound


def test_init_weights_true_is_identity_and_false_is_not():
    base = tiny_base()
    x = torch.randn(4, 6)
    expected = base(x)
    model = get_peft_model(base, AnAConfig(target_modules=["lin0", "lin1"]), "ta")
    assert torch.equal(model(x), expected)
    config = AnAConfig(target_modules=["lin0", "lin1"], task_names=["ta", "tb", "tc"])
    model2 = get_peft_model(tiny_base(), config, "x")
    assert torch.equal(model2(x), expected)  # several tasks built at once: still unchanged at start
    model3 = get_peft_model(tiny_base(), AnAConfig(target_modules=["lin0"], init_weights=False), "ta")
    assert not torch.allclose(model3(x), expected)


# ----------------------------------------------------------------------------------------------------------------
# routing per sample
# ----------------------------------------------------------------------------------------------------------------
def _three_task_model(**kwargs):
    model = get_peft_model(tiny_base(), AnAConfig(target_modules=["lin0", "lin1"], init_weights=False, **kwargs), "t0")
    model.add_task("t1")
    model.add_task("t2")
    return model.eval()


def test_mixed_tasks_in_one_batch():
    model = _three_task_model()
    x = torch.randn(5, 6)
    per_task = {t: model(x, task_ids=t) for t in ("t0", "t1", "t2", "none")}
    ids = ["t2", "t0", None, "t1", "t0"]
    mixed = model(x, task_ids=ids)
    for i, t in enumerate(ids):
        torch.testing.assert_close(mixed[i], per_task[t or "none"][i])
    with model.route(ids):
        torch.testing.assert_close(model(x), mixed)
    # the active task (last added) is the default; set_task changes it
    torch.testing.assert_close(model(x), per_task["t2"])
    model.set_task("t1")
    torch.testing.assert_close(model(x), per_task["t1"])
    assert len({round(per_task[t].sum().item(), 4) for t in per_task}) == 4  # tasks really differ


def test_bad_task_ids():
    model = _three_task_model()
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="Unknown task"):
        model(x, task_ids="t9")
    with pytest.raises(ValueError, match="entries but the batch has"):
        model(x, task_ids=["t0"])


# ----------------------------------------------------------------------------------------------------------------
# continual protocol: trainable sets, parameter formula, zero forgetting
# ----------------------------------------------------------------------------------------------------------------
def test_trainable_parameters_follow_formula():
    model = get_peft_model(tiny_base(), AnAConfig(target_modules=["lin0", "lin1"], r=4), "t0")
    dims = [(6, 8), (8, 3)]
    for t, name in enumerate(["t0", "t1", "t2", "t3"]):
        if t:
            model.add_task(name)
        count = sum(p.numel() for p in trainable(model).values())
        # hand formula: r*(d_in+d_out) + r + d_out + 1 + t*(r*r + r) + [t>0]*2*d_in*(t+1)
        by_hand = sum(4 * (i + o) + 4 + o + 1 + t * 20 + (2 * i * (t + 1) if t else 0) for i, o in dims)
        assert count == by_hand == model.task_parameter_count(name)
        assert all(f".ana_tasks.t0.{t}." in n for n in trainable(model))
    assert ana_task_parameter_count(10, 20, 8, 0, True) == 269
    assert ana_task_parameter_count(10, 20, 8, 1, True) == 269 + 72 + 40
    assert ana_task_parameter_count(10, 20, 8, 1, False) == 269 + 72 + 20


def test_training_task_3_leaves_tasks_0_to_2_bit_identical():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    base = BertModel(cfg).eval()
    model = get_peft_model(base, AnAConfig(r=4, in_adapter_init="linear"), adapter_name="t0")
    ids = torch.randint(0, 50, (4, 7))
    optimizer_kwargs = {"lr": 5e-2, "weight_decay": 0.1}
    tasks = ["t0", "t1", "t2", "t3"]
    snapshots = {}
    for t, name in enumerate(tasks):
        if t:
            model.add_task(name)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), **optimizer_kwargs)  # all params: frozen ones have no grad
        for _ in range(3):
            optimizer.zero_grad()
            out = model(input_ids=ids).last_hidden_state
            out.pow(2).mean().backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            snapshots[name] = model(input_ids=ids, task_ids=name).last_hidden_state.clone()
    with torch.no_grad():
        for name in tasks[:3]:
            assert torch.equal(model(input_ids=ids, task_ids=name).last_hidden_state, snapshots[name]), name
        base_out = model(input_ids=ids, task_ids="none").last_hidden_state
    # task 3 really trained (differs from its untrained start, i.e. from the others and from the base)
    assert not torch.allclose(snapshots["t3"], snapshots["t2"])
    assert not torch.allclose(snapshots["t3"], base_out)


def test_earlier_task_parameters_unchanged_and_frozen_after_training():
    model = _three_task_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".ana_tasks.t0.0." in n or ".t0.1." in n}
    assert before and not any(p.requires_grad for n, p in model.named_parameters() if n in before)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    after = dict(model.named_parameters())
    for n, p in before.items():
        assert torch.equal(after[n], p), n


def test_end_task_and_delete_task():
    model = _three_task_model()
    model.end_task()
    assert not trainable(model)
    assert model.peft_config["t0"].ended_tasks == ["t0", "t1", "t2"]
    with pytest.raises(ValueError, match="later tasks \\['t1', 't2'\\] use its adapter"):
        model.delete_task("t0")
    x = torch.randn(3, 6)
    out_t1 = model(x, task_ids="t1")
    model.delete_task("t2")
    assert model.tasks() == ["t0", "t1"] and model.active_task() == "t1"
    assert all(len(layer.ana_tasks["t0"]) == 2 for layer in ana_layers(model))
    assert not trainable(model)  # t1 stays frozen
    torch.testing.assert_close(model(x), out_t1)
    with pytest.raises(ValueError, match="already exists"):
        model.add_task("t1")
    model.add_task("t2b")
    assert all(".ana_tasks.t0.2." in n for n in trainable(model)) and trainable(model)


def test_set_adapter_and_requires_grad_never_unfreeze_earlier_tasks():
    model = _three_task_model()
    model.base_model.set_adapter("t0")
    model.base_model._mark_only_adapters_as_trainable(model.base_model.model)
    model.base_model.set_requires_grad("t0", True)
    names = list(trainable(model))
    assert names and all(".ana_tasks.t0.2." in n for n in names)


# ----------------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------------
def test_save_load_three_tasks_identical_outputs(tmp_path):
    model = _three_task_model(in_adapter_init="linear")
    x = torch.randn(4, 6)
    outputs = {t: model(x, task_ids=t) for t in ("t0", "t1", "t2")}
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path / "t0"))
    assert "adapter_model.safetensors" in files and "adapter_model.bin" not in files
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "t0" / "adapter_model.safetensors").keys()
    assert any(".ana_tasks.2.in_weight" in k for k in keys)
    assert not any(".t0." in k for k in keys)  # no adapter/task names in checkpoint keys

    loaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "t0", adapter_name="renamed").eval()
    assert loaded.tasks("renamed") == ["t0", "t1", "t2"]
    for t, expected in outputs.items():
        assert torch.equal(loaded(x, task_ids=t), expected), t
    assert not trainable(loaded)
    trainable_loaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "t0", is_trainable=True)
    assert trainable(trainable_loaded) and all(".ana_tasks.default.2." in n for n in trainable(trainable_loaded))


def test_load_with_mismatched_config_is_a_clear_error(tmp_path):
    model = _three_task_model()
    model.save_pretrained(tmp_path)
    import json

    cfg_path = tmp_path / "t0" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not\\s+match|expects"):
        PeftModel.from_pretrained(tiny_base(), tmp_path / "t0")


# ----------------------------------------------------------------------------------------------------------------
# lifecycle
# ----------------------------------------------------------------------------------------------------------------
def _requires_grad_map(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def test_disable_adapter_gives_base_outputs_and_forward_keeps_state():
    base = tiny_base()
    x = torch.randn(3, 6)
    expected = base(x)
    model = _three_task_model()
    model.train()
    grads, modes = _requires_grad_map(model), _modes(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x, task_ids="t1"), expected)
    assert _requires_grad_map(model) == grads and _modes(model) == modes
    model(x)
    model(x, task_ids=["t0", "t1", "none"])
    assert _requires_grad_map(model) == grads and _modes(model) == modes
    model.eval()
    modes = _modes(model)
    model(x, task_ids="t0")
    assert _requires_grad_map(model) == grads and _modes(model) == modes


def test_merge_single_task_exact_and_multi_task_refused():
    model = get_peft_model(tiny_base(), AnAConfig(target_modules=["lin0", "lin1"], init_weights=False), "ta").eval()
    x = torch.randn(4, 6)
    expected = model(x)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)

    model = _three_task_model()
    with pytest.raises(ValueError, match="has 3 tasks: its per-token gated mixture"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="has 3 tasks"):
        model.base_model.model.lin0.merge()
    assert not any(layer.merged for layer in ana_layers(model))


def test_merge_refused_when_bias_term_needs_missing_base_bias():
    model = get_peft_model(tiny_base(bias=False), AnAConfig(target_modules=["lin0"], init_weights=False), "ta")
    with pytest.raises(ValueError, match="base layer has no bias"):
        model.merge_and_unload()
    fresh = get_peft_model(tiny_base(bias=False), AnAConfig(target_modules=["lin0"]), "ta")
    fresh.merge_and_unload()  # zero bias term: merges


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_multi_task(dtype):
    model = get_peft_model(tiny_base().to(dtype), AnAConfig(target_modules=["lin0", "lin1"], init_weights=False), "ta")
    model.add_task("tb")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "ana_" in n)  # autocast
    out = model(torch.randn(3, 6, dtype=dtype), task_ids=["ta", "tb", None])
    assert out.dtype == dtype and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------------
# transformers models
# ----------------------------------------------------------------------------------------------------------------
def test_blip2_qformer_preset():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=12,
        cross_attention_frequency=1,
    )
    base = Blip2QFormerModel(cfg).eval()
    query = torch.randn(2, 4, 16)
    image = torch.randn(2, 5, 12)
    expected = base(query_embeds=query, encoder_hidden_states=image).last_hidden_state
    model = get_peft_model(base, AnAConfig(target_modules=QFORMER_TARGET_MODULES, r=4), "image")
    targeted = sorted(model.base_model.targeted_module_names)
    assert len(targeted) == 2 * 8
    assert "encoder.layer.0.crossattention.attention.key" in targeted
    assert "encoder.layer.1.attention.output.dense" in targeted
    assert not any("intermediate" in n or "output_query" in n for n in targeted)
    key_layer = model.base_model.model.encoder.layer[0].crossattention.attention.key
    assert key_layer.in_features == 12  # cross-attention keys read the 12-d encoder features
    torch.testing.assert_close(model(query_embeds=query, encoder_hidden_states=image).last_hidden_state, expected)
    model.add_task("video")
    model.train()
    out = model(query_embeds=query, encoder_hidden_states=image).last_hidden_state
    out.pow(2).mean().backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads and all(".ana_tasks.image.1." in n for n in grads)
    model.eval()
    mixed = model(query_embeds=query, encoder_hidden_states=image, task_ids=["image", "video"]).last_hidden_state
    torch.testing.assert_close(mixed[0], expected[0])  # 'image' is untrained: identity


def test_bert_encoder_default_targets():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = get_peft_model(BertModel(cfg).eval(), AnAConfig(r=4), "ta")
    targeted = model.base_model.targeted_module_names
    assert len(targeted) == 2 * 4
    assert all(n.endswith(("query", "key", "value", "attention.output.dense")) for n in targeted)
    model.add_task("tb")
    ids = torch.randint(0, 50, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    out = model(input_ids=ids, attention_mask=mask, task_ids=["ta", "tb", "none"]).last_hidden_state
    assert out.shape == (3, 5, 16)


def test_llama_decoder_generate_routes_and_keeps_state():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 40, (2, 5))
    base_gen = base.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    model = get_peft_model(base, AnAConfig(r=4, init_weights=False, routing_token="last"), "t0")
    model.add_task("t1")
    model.train()
    grads, modes = _requires_grad_map(model), _modes(model)
    with model.route("none"):
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), base_gen)
    with model.route(["t0", "t1"]):
        gen = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (2, 9)
    assert _requires_grad_map(model) == grads and _modes(model) == modes
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), base_gen)
    assert _requires_grad_map(model) == grads and _modes(model) == modes
    # per-sample routing inside generate matches routing each sample alone
    model.eval()
    with model.route("t0"):
        alone = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False)
    model.train()
    assert torch.equal(gen[:1], alone)


# ----------------------------------------------------------------------------------------------------------------
# task-agnostic inference through the shared selector (DDAS)
# ----------------------------------------------------------------------------------------------------------------
def test_auto_routing_with_task_selector(tmp_path):
    torch.manual_seed(0)
    centers = {"t0": torch.full((6,), -3.0), "t1": torch.full((6,), 3.0)}
    centers["t1"][::2] = -3.0  # a different direction, not only a shift of the mean

    def sample(task, n):
        return centers[task] + 0.3 * torch.randn(n, 6)

    config = AnAConfig(target_modules=["lin0", "lin1"], init_weights=False, selector_epochs=30)
    model = get_peft_model(tiny_base(), config, "t0")
    model.add_task("t1")
    for task in ("t0", "t1"):
        model.fit_task_selector(task, [{"X": sample(task, 64)}, {"X": sample(task, 64)}])
    assert model.has_task_selector
    model.eval()
    x = torch.cat([sample("t0", 3), sample("t1", 3), torch.full((1, 6), 40.0)])
    auto = model(X=x, task_ids="auto")
    expected = model(X=x, task_ids=["t0"] * 3 + ["t1"] * 3 + [None])
    torch.testing.assert_close(auto, expected)
    # the selector is saved with the adapter
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "t0").eval()
    torch.testing.assert_close(loaded(X=x, task_ids="auto"), expected)
