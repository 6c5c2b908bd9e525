"""ReSoRA's regularizer in float32 at the edges: near-constant and large-scale features, padding, fuzzed inputs.

Every term must be finite, stay in its documented [0, 1] (``"feature"``, the sum of the A- and B-side terms, in
[0, 2]) and have finite gradients; padding tokens must not enter the statistics.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

from peft_ext import ReSoRAConfig
from peft_ext.tuners.resora import (
    ReSoRALinear,
    feature_decorrelation,
    output_cosine_redundancy,
    redundancy_terms,
    weight_overlap,
)


VARIANTS = ["feature", "feature_a", "feature_b", "weight"]
UPPER = {"feature": 2.0, "feature_a": 1.0, "feature_b": 1.0, "weight": 1.0}  # "feature" sums two [0, 1] terms


def in_range(value: torch.Tensor, upper: float = 1.0) -> bool:
    return bool(torch.isfinite(value)) and 0.0 <= value.item() <= upper


def adapter_params(model):
    return [p for n, p in model.named_parameters() if "resora_" in n]


# ---------------------------------------------------------------- identical samples at large input scale
@pytest.mark.parametrize("regularizer", VARIANTS)
@pytest.mark.parametrize("scale", [5.0, 50.0, 1e3])
def test_identical_samples_give_finite_loss_gradients_and_adamw_step(scale, regularizer):
    """The reported failure: a batch of identical samples, input scale >= 5 -> NaN loss, NaN gradients, and one
    AdamW step turned the adapter into NaN."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32))
    model = get_peft_model(
        base,
        ReSoRAConfig(target_modules=["0"], r=8, num_subspaces=2, init_weights=False, regularizer=regularizer),
    )
    model.train()
    x = (scale * torch.randn(1, 32)).expand(64, 32).contiguous()  # 64 identical samples
    model(x)
    loss = model.get_regularization_loss() / model.peft_config["default"].reg_weight
    assert in_range(loss, UPPER[regularizer]), loss
    loss.backward()
    params = adapter_params(model)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("scale", [5.0, 50.0, 1e3, 1e4])
def test_constant_features_are_uncorrelated(scale):
    """Features that are constant over the batch (up to float32 rounding of their mean) have no correlation."""
    torch.manual_seed(0)
    A = torch.randn(8, 32) / 32**0.5
    z = (scale * torch.randn(1, 32)).expand(64, 32) @ A.T
    for eps in (1e-8, 1e-5):
        loss = feature_decorrelation(z, eps)
        assert in_range(loss) and loss.item() < 1e-3, (eps, loss)


def test_near_constant_feature_sets_never_nan():
    """The issue's count: 200 near-constant feature sets (a large offset plus noise at the level of float32
    rounding), none may give a NaN, a value outside [0, 1] or a NaN gradient."""
    g = torch.Generator().manual_seed(0)
    for i in range(200):
        scale = 10.0 ** (0.7 + 3.3 * i / 199)  # 5 .. 1e4
        offset = scale * torch.randn(1, 8, generator=g)
        z = (offset + offset.abs() * 1e-7 * torch.randn(32, 8, generator=g)).requires_grad_(True)
        loss = feature_decorrelation(z, 1e-8)
        assert in_range(loss), (i, loss)
        loss.backward()
        assert torch.isfinite(z.grad).all(), i


def test_perfectly_correlated_features_stay_at_most_one_at_large_scale():
    """Cauchy-Schwarz in float32: |C_ij| <= 1 must survive the rounding of large, strongly correlated features."""
    torch.manual_seed(0)
    for scale in (1.0, 1e2, 1e4):
        t = torch.randn(256, 1)
        z = scale * torch.cat([t, 3 * t + 1e-3, -7 * t, t + 1.0], dim=1) + scale * 100.0  # large common offset
        loss = feature_decorrelation(z, 1e-8)
        assert in_range(loss), (scale, loss)
        assert loss.item() == pytest.approx(1.0, abs=1e-3)
    B = torch.ones(5, 4)  # every subspace writes along the same line
    z = 1e4 * torch.randn(64, 4).abs() + 1e4
    assert in_range(output_cosine_redundancy(z, B, 2, 1e-8))
    A = torch.randn(1, 7).expand(4, 7) * 1e4  # every row identical
    assert in_range(weight_overlap(A, A.T.contiguous(), 2))


def test_uncorrelated_features_are_never_below_zero():
    """Exactly uncorrelated features (orthonormal centred columns): the off-diagonal sum is ~0, and subtracting the
    diagonal from the full sum (instead of summing the off-diagonal entries) rounded it below 0."""
    g = torch.Generator().manual_seed(0)
    for i in range(300):
        n, r = 40, 2 + i % 12
        x = torch.randn(n, r + 1, generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(x - x.mean(0))
        z = (q[:, :r] * 10.0 ** (i % 7 - 3) + 5.0).float()
        loss = feature_decorrelation(z, 1e-8)
        assert in_range(loss) and loss.item() < 1e-6, (i, loss.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_statistics_stay_float32_under_autocast(dtype):
    """Under fp16 autocast the moments' matmul squared the features in float16: inf from |z| ~ 256, then NaN."""
    torch.manual_seed(0)
    z, A, B = 300 * torch.randn(64, 8) + 100, 30 * torch.randn(8, 12), 30 * torch.randn(16, 8)
    expected = {v: redundancy_terms(v, z, A, B, 2, 1e-5) for v in VARIANTS}
    with torch.autocast("cpu", dtype=dtype):
        for variant in VARIANTS:
            torch.testing.assert_close(redundancy_terms(variant, z, A, B, 2, 1e-5), expected[variant])


# ---------------------------------------------------------------- padding is not part of the statistics
class TokenModel(nn.Module):
    """Takes ``(B, L, d)`` token features and a ``(B, L)`` attention mask, like a transformers model; ``memory`` is
    a second stream of another length (a cross-attention's keys), which the mask does not describe."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.mem = nn.Linear(d, d)

    def forward(self, x, attention_mask=None, memory=None):
        out = self.proj(x)
        if memory is not None:
            out = out + self.mem(memory).mean(dim=1, keepdim=True)
        return out


def token_model(targets=("proj",), regularizer="feature"):
    torch.manual_seed(0)
    return get_peft_model(
        TokenModel(),
        ReSoRAConfig(
            target_modules=list(targets),
            r=4,
            num_subspaces=2,
            init_weights=False,
            reg_weight=1.0,
            regularizer=regularizer,
        ),
    ).train()


def padded_batch(lengths, side: str, d: int = 12, pad_value: float = 1e3):
    """Sequences of ``lengths`` padded to the longest on ``side``; padding rows hold large junk values."""
    torch.manual_seed(1)
    seqs = [torch.randn(n, d) for n in lengths]
    L = max(lengths)
    x = pad_value * torch.randn(len(lengths), L, d)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        pos = slice(0, len(s)) if side == "right" else slice(L - len(s), L)
        x[i, pos] = s
        mask[i, pos] = 1
    return x, mask, torch.cat(seqs)


@pytest.mark.parametrize("regularizer", VARIANTS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_the_real_tokens_unpadded(side, regularizer):
    model = token_model(regularizer=regularizer)
    x, mask, real = padded_batch([5, 2, 7, 1], side)
    model(x, attention_mask=mask)
    padded = model.get_regularization_loss()
    padded_grads = torch.autograd.grad(padded, adapter_params(model), allow_unused=True)
    model(real.unsqueeze(0))  # the real tokens, concatenated, as one unpadded sequence
    unpadded = model.get_regularization_loss()
    unpadded_grads = torch.autograd.grad(unpadded, adapter_params(model), allow_unused=True)
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-6)
    for a, b in zip(padded_grads, unpadded_grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if regularizer != "weight":  # the junk in the padding would change every feature statistic
        model(x)
        assert not torch.allclose(model.get_regularization_loss(), unpadded, rtol=1e-3)


@pytest.mark.parametrize("junk", [float("nan"), float("inf")])
def test_non_finite_padding_does_not_reach_the_loss_or_its_gradients(junk):
    torch.manual_seed(0)
    z, A, B = torch.randn(10, 4), torch.randn(4, 6), torch.randn(5, 4)
    keep = torch.arange(10) < 7
    reference = {v: redundancy_terms(v, z[keep], A, B, 2, 1e-5) for v in VARIANTS}
    z[~keep] = junk
    for variant in VARIANTS:
        leaf = z.clone().requires_grad_(True)
        loss = redundancy_terms(variant, leaf, A, B, 2, 1e-5, mask=keep)
        torch.testing.assert_close(loss, reference[variant])
        if loss.requires_grad:
            loss.backward()
            assert torch.isfinite(leaf.grad).all() and (leaf.grad[~keep] == 0).all()


def test_positional_attention_mask_is_used():
    model = token_model()
    x, mask, real = padded_batch([4, 6, 3], "right")
    model(x, mask)  # attention_mask passed positionally
    padded = model.get_regularization_loss()
    model(real.unsqueeze(0))
    torch.testing.assert_close(padded, model.get_regularization_loss(), rtol=1e-5, atol=1e-6)


def test_mask_of_one_forward_does_not_leak_into_the_next():
    model = token_model()
    x, mask, _ = padded_batch([4, 6, 3], "left")
    model(x, attention_mask=mask)
    model(x)  # no mask: every token counts
    no_mask = model.get_regularization_loss()
    layer = model.base_model.model.proj
    z = layer.resora_A["default"](x).reshape(-1, 4)
    expected = redundancy_terms(
        "feature", z, layer.resora_A["default"].weight, layer.resora_B["default"].weight, 2, 1e-5
    )
    torch.testing.assert_close(no_mask, expected)


def test_input_of_another_length_falls_back_to_all_tokens():
    """A layer whose input is not (B, L, d) of the mask (a cross-attention over a memory of another length) uses
    every token of its input."""
    model = token_model(targets=("proj", "mem"))
    x, mask, real = padded_batch([4, 6, 3], "right")
    memory = torch.randn(3, 9, 12)
    model(x, attention_mask=mask, memory=memory)
    proj, mem = model.base_model.model.proj, model.base_model.model.mem
    proj_term, mem_term = proj.recorded_regularization()[0], mem.recorded_regularization()[0]

    def term(layer, tokens):
        A, B = layer.resora_A["default"], layer.resora_B["default"]
        return redundancy_terms("feature", A(tokens).reshape(-1, 4), A.weight, B.weight, 2, 1e-5)

    torch.testing.assert_close(proj_term, term(proj, real))
    torch.testing.assert_close(mem_term, term(mem, memory))


def tiny_bert_classifier():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


def capture_inputs(model, layer_type):
    captured = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, layer_type)}
    handles = [
        m.register_forward_hook(lambda mod, args, out, key=n: captured.__setitem__(key, args[0]))
        for n, m in layers.items()
    ]
    return layers, captured, handles


@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_regularizer_uses_only_real_tokens(side):
    model = get_peft_model(
        tiny_bert_classifier(), ReSoRAConfig(target_modules=["query", "value"], r=4, init_weights=False, reg_weight=1.0)
    ).train()
    lengths = [6, 3, 5]
    ids = torch.randint(1, 60, (3, 6))
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1 if side == "right" else 0
        if side == "left":
            mask[i, 6 - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    layers, captured, handles = capture_inputs(model, ReSoRALinear)
    model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    keep = mask.reshape(-1).bool()
    expected = []
    for name, layer in layers.items():
        A, B = layer.resora_A["default"], layer.resora_B["default"]
        z = A(captured[name]).reshape(-1, 4)[keep]  # real tokens only
        expected.append(redundancy_terms("feature", z, A.weight, B.weight, 2, 1e-5))
    torch.testing.assert_close(model.get_regularization_loss(), torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_encoder_decoder_masks_the_encoder_only():
    """In an encoder-decoder model ``attention_mask`` describes the encoder's tokens: decoder layers (self- and
    cross-attention) use all their tokens, even when the two lengths coincide."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40,
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    model = get_peft_model(
        T5ForConditionalGeneration(config),
        ReSoRAConfig(target_modules=["q", "v"], r=4, init_weights=False, reg_weight=1.0),
    ).train()
    ids = torch.randint(1, 40, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.randint(1, 40, (2, 5))  # the same length as the encoder input
    layers, captured, handles = capture_inputs(model, ReSoRALinear)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    for h in handles:
        h.remove()
    keep = mask.reshape(-1).bool()
    assert any(".encoder." in n for n in layers) and any(".decoder." in n for n in layers)
    for name, layer in layers.items():
        A, B = layer.resora_A["default"], layer.resora_B["default"]
        z = A(captured[name]).reshape(-1, 4)
        if ".encoder." in name:
            z = z[keep]
        expected = redundancy_terms("feature", z, A.weight, B.weight, 2, 1e-5)
        torch.testing.assert_close(layer.recorded_regularization()[0], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- fuzzing the pure functions
SCALES = [1e-6, 1e-4, 1e-2, 1.0, 5.0, 50.0, 1e3, 1e4]
PATTERNS = ["random", "near_constant", "constant", "duplicated_rows", "duplicated_columns", "zeros", "mixed_scales"]


@st.composite
def feature_cases(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    k = draw(st.integers(1, 3))
    n = draw(st.integers(1, 48))
    out = draw(st.integers(1, 10))
    return {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "n": n,
        "r": groups * k,
        "groups": groups,
        "out": out,
        "z_scale": draw(st.sampled_from(SCALES)),
        "w_scale": draw(st.sampled_from(SCALES)),
        "z_pattern": draw(st.sampled_from(PATTERNS)),
        "w_pattern": draw(st.sampled_from(PATTERNS)),
        "eps": draw(st.sampled_from([1e-8, 1e-5])),
    }


def make_tensor(rows: int, cols: int, scale: float, pattern: str, g: torch.Generator) -> torch.Tensor:
    x = scale * torch.randn(rows, cols, generator=g)
    if pattern == "near_constant":
        offset = scale * torch.randn(1, cols, generator=g)
        x = offset + offset.abs() * 1e-7 * torch.randn(rows, cols, generator=g)
    elif pattern == "constant":
        x = x[:1].expand(rows, cols)
    elif pattern == "duplicated_rows":
        x = x[torch.randint(0, max(1, rows // 3), (rows,), generator=g) % rows]
    elif pattern == "duplicated_columns":
        x = x[:, torch.randint(0, max(1, cols // 2), (cols,), generator=g) % cols]
    elif pattern == "zeros":
        x = torch.zeros(rows, cols)
    elif pattern == "mixed_scales":  # every column its own scale in 1e-6 .. 1e4, whatever `scale` was drawn
        x = torch.randn(rows, cols, generator=g) * 10.0 ** torch.randint(-6, 5, (1, cols), generator=g).float()
    return x.contiguous()


def check_every_variant(case, mask=None):
    g = torch.Generator().manual_seed(case["seed"])
    n, r, groups = case["n"], case["r"], case["groups"]
    z0 = make_tensor(n, r, case["z_scale"], case["z_pattern"], g)
    A0 = make_tensor(r, 6, case["w_scale"], case["w_pattern"], g)
    B0 = make_tensor(case["out"], r, case["w_scale"], case["w_pattern"], g)
    masked = {} if mask is None else {"mask": mask(n, g)}
    for variant in VARIANTS:
        z, A, B = (t.clone().requires_grad_(True) for t in (z0, A0, B0))
        loss = redundancy_terms(variant, z, A, B, groups, case["eps"], **masked)
        assert in_range(loss, UPPER[variant]), (variant, loss.item())
        if not loss.requires_grad:  # a constant 0 (one sample, one feature, one subspace)
            continue
        loss.backward()
        for t in (z, A, B):
            assert t.grad is None or torch.isfinite(t.grad).all(), variant
    for term in (
        feature_decorrelation(z0, case["eps"], **masked),
        output_cosine_redundancy(z0, B0, groups, case["eps"], **masked),
        weight_overlap(A0, B0, groups),
    ):
        assert in_range(term), term.item()


@settings(max_examples=150, deadline=None, database=None)
@given(feature_cases())
def test_fuzz_every_variant_is_finite_in_range_with_finite_gradients(case):
    check_every_variant(case)


MASKS = {
    "random": lambda n, g: torch.rand(n, generator=g) < 0.6,
    "none_kept": lambda n, g: torch.zeros(n, dtype=torch.bool),
    "one_kept": lambda n, g: torch.arange(n) == n // 2,
    "all_kept": lambda n, g: torch.ones(n, dtype=torch.long),
}


@settings(max_examples=60, deadline=None, database=None)
@given(feature_cases(), st.sampled_from(sorted(MASKS)))
def test_fuzz_with_token_masks(case, mask):
    check_every_variant(case, MASKS[mask])
