import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from peft_ext import ReSoRAConfig
from peft_ext.tuners.resora import (
    ReSoRALinear,
    feature_decorrelation,
    output_cosine_redundancy,
    redundancy_terms,
    weight_overlap,
)
from peft_ext.tuners.resora.regularizer import subspace_output_gram


def tiny_bert_classifier():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()


# ---------------------------------------------------------------- regularizer math on hand-checked tensors
def test_feature_decorrelation_hand_checked():
    # columns a, b, c over 4 samples: corr(a, b) = 0, corr(a, c) = 1, corr(b, c) = 0
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    b = torch.tensor([1.0, 1.0, -1.0, -1.0])
    z = torch.stack([a, b, a * 3 + 2], dim=1)
    # off-diagonal squares: C_ac = C_ca = 1, others 0 -> 2 / (3 * 2)
    assert feature_decorrelation(z).item() == pytest.approx(1 / 3, abs=1e-6)
    assert feature_decorrelation(torch.stack([a, b], dim=1)).item() == pytest.approx(0.0, abs=1e-7)
    assert feature_decorrelation(torch.stack([a, -a], dim=1)).item() == pytest.approx(1.0, abs=1e-6)


def test_feature_decorrelation_partial_correlation():
    # x = [1, 2, 3, 4], y = [1, 3, 2, 4]: Pearson r = 0.8 -> loss = r^2 = 0.64
    z = torch.tensor([[1.0, 1.0], [2.0, 3.0], [3.0, 2.0], [4.0, 4.0]])
    assert feature_decorrelation(z).item() == pytest.approx(0.64, abs=1e-5)


def test_output_cosine_hand_checked():
    z = torch.tensor([[2.0, 3.0], [-1.0, 0.5]])  # r = 2, two subspaces of rank 1
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # o_1 along e1, o_2 along e2
    parallel = torch.tensor([[1.0, 2.0], [0.0, 0.0]])  # both along e1
    diagonal = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # o_1 along (1, 0), o_2 along (1, 1): cos^2 = 1/2
    assert output_cosine_redundancy(z, orthogonal, 2).item() == pytest.approx(0.0, abs=1e-7)
    assert output_cosine_redundancy(z, parallel, 2).item() == pytest.approx(1.0, abs=1e-6)
    assert output_cosine_redundancy(z, diagonal, 2).item() == pytest.approx(0.5, abs=1e-6)
    assert output_cosine_redundancy(z, torch.zeros(2, 2), 2).item() == 0.0  # B = 0 at init
    assert output_cosine_redundancy(z, parallel, 1).item() == 0.0  # one subspace: no pairs


def test_gram_trick_matches_explicit_subspace_outputs():
    torch.manual_seed(1)
    n, r, g, out = 7, 6, 3, 11
    z, B = torch.randn(n, r), torch.randn(out, r)
    k = r // g
    outputs = torch.stack([z[:, i * k : (i + 1) * k] @ B[:, i * k : (i + 1) * k].T for i in range(g)], dim=1)
    explicit = torch.einsum("ngo,nho->ngh", outputs, outputs)
    torch.testing.assert_close(subspace_output_gram(z, B, g), explicit, rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(outputs.unsqueeze(2), outputs.unsqueeze(1), dim=-1)
    rows, cols = torch.triu_indices(g, g, 1)
    expected = cos[:, rows, cols].pow(2).mean()
    assert output_cosine_redundancy(z, B, g).item() == pytest.approx(expected.item(), rel=1e-5)


def test_weight_overlap_hand_checked():
    A_orth = torch.eye(4)  # rows of different subspaces orthogonal
    B_orth = torch.eye(4)
    assert weight_overlap(A_orth, B_orth, 2).item() == pytest.approx(0.0, abs=1e-7)
    A_same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # subspace 0 row == subspace 1 row
    B_same = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert weight_overlap(A_same, B_same, 2).item() == pytest.approx(1.0, abs=1e-6)
    assert weight_overlap(A_same, torch.zeros(2, 2), 2).item() == pytest.approx(0.5, abs=1e-6)  # B side 0 at init


def test_variants_select_the_right_terms():
    torch.manual_seed(2)
    z, A, B = torch.randn(9, 4), torch.randn(4, 5), torch.randn(6, 4)
    fa, fb = feature_decorrelation(z), output_cosine_redundancy(z, B, 2)
    assert redundancy_terms("feature", z, A, B, 2, 1e-8).item() == pytest.approx((fa + fb).item(), rel=1e-6)
    assert redundancy_terms("feature_a", z, A, B, 2, 1e-8).item() == pytest.approx(fa.item(), rel=1e-6)
    assert redundancy_terms("feature_b", z, A, B, 2, 1e-8).item() == pytest.approx(fb.item(), rel=1e-6)
    assert redundancy_terms("weight", z, A, B, 2, 1e-8).item() == pytest.approx(weight_overlap(A, B, 2).item())
    assert redundancy_terms("none", z, A, B, 2, 1e-8).item() == 0.0


@pytest.mark.parametrize("regularizer", ["feature", "feature_a", "feature_b", "weight"])
def test_gradients_are_finite_at_init(regularizer):
    """B = 0 at init: every subspace output is 0, a square root there would give NaN gradients."""
    A = torch.randn(4, 6, requires_grad=True)
    B = torch.zeros(5, 4, requires_grad=True)
    z = torch.randn(10, 6) @ A.T
    redundancy_terms(regularizer, z, A, B, 2, 1e-8).backward()
    grads = [g for g in (A.grad, B.grad) if g is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_training_from_identity_init_stays_finite():
    model = get_peft_model(tiny_bert_classifier(), ReSoRAConfig(target_modules=["query", "value"], r=4, reg_weight=1.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(input_ids=torch.randint(0, 60, (4, 6)), labels=torch.tensor([0, 1, 2, 0]))
        (out.loss + model.get_regularization_loss()).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.get_regularization_loss().item() > 0


# ---------------------------------------------------------------- the loss as the model exposes it
def test_regularization_loss_is_collected_from_the_forward():
    model = get_peft_model(
        tiny_bert_classifier(), ReSoRAConfig(target_modules=["query", "value"], r=4, init_weights=False, reg_weight=0.5)
    )
    inputs = torch.randint(0, 60, (3, 5))
    captured = {}

    def grab(name):
        def hook(module, args, output):
            captured[name] = (args[0], module)

        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, ReSoRALinear)}
    handles = [m.register_forward_hook(grab(n)) for n, m in layers.items()]
    model.train()
    model(input_ids=inputs)
    for h in handles:
        h.remove()
    expected = []
    for x, layer in captured.values():
        z = layer.resora_A["default"](x).reshape(-1, 4)  # dropout is 0
        expected.append(
            0.5
            * redundancy_terms(
                "feature", z, layer.resora_A["default"].weight, layer.resora_B["default"].weight, 2, 1e-8
            )
        )
    assert len(expected) == 4  # 2 layers x (query, value)
    loss = model.get_regularization_loss()
    assert loss.requires_grad
    torch.testing.assert_close(loss, torch.stack(expected).mean())

    # a new forward replaces the record; eval mode records nothing
    model.eval()
    with torch.no_grad():
        model(input_ids=inputs)
    assert model.get_regularization_loss().item() == 0.0


def test_regularization_off_when_weight_zero_or_disabled():
    model = get_peft_model(
        tiny_bert_classifier(), ReSoRAConfig(target_modules=["query"], reg_weight=0.0, init_weights=False)
    )
    model.train()
    model(input_ids=torch.randint(0, 60, (2, 4)))
    assert model.get_regularization_loss().item() == 0.0
    assert not model.has_regularization
    model = get_peft_model(tiny_bert_classifier(), ReSoRAConfig(target_modules=["query"], init_weights=False))
    assert model.has_regularization
    model.train()
    with model.disable_adapter():
        model(input_ids=torch.randint(0, 60, (2, 4)))
    assert model.get_regularization_loss().item() == 0.0


def test_regularizer_gradient_reduces_redundancy():
    """A few steps on the regularizer alone lower it: the loss is differentiable in the right direction."""
    model = get_peft_model(
        tiny_bert_classifier(), ReSoRAConfig(target_modules=["query", "value"], r=4, init_weights=False, reg_weight=1.0)
    )
    model.train()
    inputs = torch.randint(0, 60, (8, 6))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=inputs)
    first = model.get_regularization_loss().item()
    for _ in range(20):
        opt.zero_grad()
        model(input_ids=inputs)
        model.get_regularization_loss().backward()
        opt.step()
    model(input_ids=inputs)
    assert model.get_regularization_loss().item() < 0.7 * first


# ---------------------------------------------------------------- LoRA semantics, merge, save/load
def test_output_is_lora_math():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(5, 7))
    model = get_peft_model(
        base, ReSoRAConfig(target_modules=["0"], r=4, lora_alpha=8, num_subspaces=2, init_weights=False)
    )
    layer = model.base_model.model[0]
    x = torch.randn(3, 5)
    A, B = layer.resora_A["default"].weight, layer.resora_B["default"].weight
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W.T + b + 2.0 * (x @ A[:2].T @ B[:, :2].T + x @ A[2:].T @ B[:, 2:].T)  # sum over subspaces
    torch.testing.assert_close(model(x), expected)


def test_init_weights_true_is_identity():
    base = tiny_bert_classifier()
    inputs = torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        expected = base(input_ids=inputs).logits
        model = get_peft_model(base, ReSoRAConfig(target_modules=["query", "value", "dense"]))
        torch.testing.assert_close(model(input_ids=inputs).logits, expected)


@pytest.mark.parametrize(
    "factory,targets", [(tiny_bert_classifier, ["query", "value", "dense"]), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])]
)
def test_merge_is_exact(factory, targets):
    model = get_peft_model(factory(), ReSoRAConfig(target_modules=targets, r=4, init_weights=False)).eval()
    inputs = torch.randint(0, 60, (2, 6))
    with torch.no_grad():
        unmerged = model(input_ids=inputs).logits
        model.merge_adapter()
        merged = model(input_ids=inputs).logits
        model.unmerge_adapter()
        again = model(input_ids=inputs).logits
        unloaded = model.merge_and_unload()(input_ids=inputs).logits
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert (again - unmerged).abs().max().item() < 1e-5
    assert (unloaded - unmerged).abs().max().item() < 1e-5


def test_conv1d_is_detected_and_fan_in_fan_out_set():
    model = get_peft_model(tiny_gpt2(), ReSoRAConfig(target_modules=["c_attn"], r=4))
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, ReSoRALinear) and (layer.in_features, layer.out_features) == (16, 48)


def test_half_precision_base_outputs_and_merge_in_base_dtype():
    model = get_peft_model(
        tiny_bert_classifier().to(torch.bfloat16), ReSoRAConfig(target_modules=["query"], init_weights=False)
    )
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.resora_A["default"].weight.dtype == torch.float32  # PEFT autocasts adapters to fp32
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    model.merge_adapter()
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_save_and_load_round_trip(tmp_path):
    model = get_peft_model(
        tiny_bert_classifier(),
        ReSoRAConfig(target_modules=["query", "value"], r=6, num_subspaces=3, init_weights=False),
    ).eval()
    inputs = torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "RESORA" and config["num_subspaces"] == 3
    loaded = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=inputs).logits, expected, rtol=0, atol=0)


def test_multiple_adapters_switch_and_delete():
    model = get_peft_model(
        tiny_bert_classifier(), ReSoRAConfig(target_modules=["query"], init_weights=False), adapter_name="first"
    )
    model.add_adapter("second", ReSoRAConfig(target_modules=["query"], init_weights=False))
    inputs = torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        out_a = model(input_ids=inputs).logits
        model.set_adapter("second")
        out_b = model(input_ids=inputs).logits
    assert not torch.allclose(out_a, out_b)
    model.delete_adapter("first")
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert all(
        "first" not in d for d in (layer.resora_A, layer.resora_B, layer.scaling, layer.num_subspaces, layer.reg_weight)
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 6, "num_subspaces": 4}, "divisible"),
        ({"r": 0}, "positive"),
        ({"num_subspaces": 0}, "positive"),
        ({"reg_weight": -1.0}, "reg_weight"),
        ({"regularizer": "barlow"}, "regularizer"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"bias": "lora_only"}, "bias"),
    ],
)
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReSoRAConfig(target_modules=["query"], **kwargs)


def test_wrong_target_modules_are_reported():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_bert_classifier(), ReSoRAConfig(target_modules=["no_such_module"]))
    with pytest.raises(TypeError, match="only torch.nn.Linear and transformers' Conv1D"):
        get_peft_model(tiny_bert_classifier(), ReSoRAConfig(target_modules=["LayerNorm"]))


def test_scaling_and_repr():
    model = get_peft_model(tiny_bert_classifier(), ReSoRAConfig(target_modules=["query"], r=4, lora_alpha=16))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert math.isclose(layer.scaling["default"], 4.0)
    assert repr(layer).startswith("resora.")
