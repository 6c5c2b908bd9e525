"""Every preset in hub_configs/ applied to a tiny model of each family it names (built from transformers configs).

For each (preset, model) pair: the config loads through PEFT's own loader, ``get_peft_model`` adapts exactly the
expected modules (names listed here by hand, independently of the presets' patterns), and a forward runs through
the adapters (random, non-identity init: the output must differ from the base model's).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from peft import PeftConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import BLIP2_IMAGE_TOKEN, tiny_blip2

import peft_ext  # noqa: F401
from peft_ext import AnAConfig, MoECLConfig, ReSoRAConfig
from peft_ext.hub_configs import (
    FAMILIES,
    list_presets,
    load_preset,
    preset_dict,
    preset_info,
)


LAYERS = 2
SMALL = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48)


# ----------------------------------------------------------------------------------------------------------------
# tiny models and their inputs
# ----------------------------------------------------------------------------------------------------------------
def _ids(batch=2, length=7, vocab=99):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _pixels(batch=2, size=16):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def _clip_config():
    return T.CLIPConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, **SMALL),
        vision_config=dict(image_size=16, patch_size=8, **SMALL),
        projection_dim=16,
    )


def bert():
    model = T.BertModel(T.BertConfig(vocab_size=100, **SMALL))
    return model, {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def roberta():  # with a classification head whose `classifier.dense` must stay untouched
    cfg = T.RobertaConfig(vocab_size=100, max_position_embeddings=20, num_labels=3, **SMALL)
    return T.RobertaForSequenceClassification(cfg), {"input_ids": _ids(vocab=97) + 2}


def vit():
    return T.ViTModel(T.ViTConfig(image_size=16, patch_size=8, **SMALL)), {"pixel_values": _pixels()}


def clip_vision():
    return T.CLIPVisionModel(_clip_config().vision_config), {"pixel_values": _pixels()}


def clip_text():
    return T.CLIPTextModel(_clip_config().text_config), {"input_ids": _ids()}


def clip():
    return T.CLIPModel(_clip_config()), {"input_ids": _ids(), "pixel_values": _pixels()}


def _decoder(config_cls, model_cls):
    def build():
        cfg = config_cls(vocab_size=100, num_key_value_heads=2, max_position_embeddings=32, **SMALL)
        return model_cls(cfg), {"input_ids": _ids()}

    build.__name__ = model_cls.__name__
    return build


llama = _decoder(T.LlamaConfig, T.LlamaForCausalLM)
qwen2 = _decoder(T.Qwen2Config, T.Qwen2ForCausalLM)
mistral = _decoder(T.MistralConfig, T.MistralForCausalLM)


def gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=16)), {
        "input_ids": _ids()
    }


def qformer():
    cfg = T.Blip2QFormerConfig(encoder_hidden_size=24, cross_attention_frequency=1, vocab_size=100, **SMALL)
    inputs = {"query_embeds": torch.randn(2, 4, 32), "encoder_hidden_states": torch.randn(2, 5, 24)}
    return T.Blip2QFormerModel(cfg), inputs


def blip2():
    ids = torch.cat([torch.full((2, 4), BLIP2_IMAGE_TOKEN), torch.randint(3, 60, (2, 5))], dim=1)
    return tiny_blip2(), {"pixel_values": _pixels(), "input_ids": ids}


# family -> the tiny models it covers
MODELS = {
    "bert": [bert, roberta],
    "vit": [vit],
    "clip-vision": [clip_vision, clip],
    "clip-text": [clip_text, clip],
    "clip": [clip],
    "llama": [llama, qwen2, mistral],
    "gpt2": [gpt2],
    "blip2-qformer": [qformer],
    "blip2": [blip2],
}


# ----------------------------------------------------------------------------------------------------------------
# expected adapted modules, written out per architecture
# ----------------------------------------------------------------------------------------------------------------
def _per_layer(prefix: str, suffixes: list[str]) -> set[str]:
    return {f"{prefix}.{i}.{s}" for i in range(LAYERS) for s in suffixes}


BERT_ATTN = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
CLIP_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
DEC_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
QF_ATTN = [
    f"{block}.{name}"
    for block in ("attention", "crossattention")
    for name in ("attention.query", "attention.key", "attention.value", "output.dense")
]


def expected_modules(method: str, family: str, model_name: str) -> set[str]:
    """Names of the modules ``method``'s preset for ``family`` must adapt in the model built by ``model_name``."""
    attention = method in ("resora", "ana")
    if family == "bert":
        prefix = "roberta.encoder.layer" if model_name == "roberta" else "encoder.layer"
        return _per_layer(prefix, BERT_ATTN if attention else ["output"])
    if family == "vit":
        return _per_layer("layers", [f"attention.{p}_proj" for p in "qkvo"] if attention else ["mlp"])
    if family in ("clip-vision", "clip-text", "clip"):
        towers = {"clip-vision": ["vision"], "clip-text": ["text"], "clip": ["text", "vision"]}[family]
        names = set()
        for tower in towers:
            # transformers 5 flattens the standalone towers (CLIPTextModel.encoder); inside CLIPModel: text_model.*
            prefix = "encoder.layers" if model_name != "clip" else f"{tower}_model.encoder.layers"
            names |= _per_layer(prefix, CLIP_ATTN if attention else ["mlp"])
        return names
    if family == "llama":
        return _per_layer("model.layers", DEC_ATTN if attention else ["mlp"])
    if family == "gpt2":
        return _per_layer("transformer.h", ["attn.c_attn", "attn.c_proj"] if attention else ["mlp"])
    if family == "blip2-qformer":
        return _per_layer("encoder.layer", QF_ATTN if attention else ["output_query"])
    if family == "blip2":  # PathWeave's placement: the Q-Former's attention, and the LLM projection summed
        return _per_layer("qformer.encoder.layer", QF_ATTN) | {"language_projection"}
    raise AssertionError(f"no expectation for family {family!r}")


CASES = [
    pytest.param(name, family, build, id=f"{name}@{build.__name__}")
    for name in list_presets()
    for family in preset_info(name).families
    for build in MODELS[family]
]
CONFIG_CLASSES = {"resora": ReSoRAConfig, "ana": AnAConfig, "moecl": MoECLConfig}


def _output(out) -> torch.Tensor:
    """One tensor summarising a model output (logits, last hidden state or CLIP's two embeddings)."""
    if hasattr(out, "logits_per_image"):
        return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f"unexpected output {type(out).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
def test_catalogue_is_complete():
    names = list_presets()
    # one preset per method x family, plus the two paper presets
    families = [f for f in FAMILIES if f not in ("clip", "blip2")]  # those two: paper presets only
    assert set(names) == {f"{m}-{f}" for m in CONFIG_CLASSES for f in families} | {
        "moecl-paper-mtil",
        "ana-paper-pathweave",
    }
    for name in names:
        info = preset_info(name)
        assert info.method == name.split("-")[0] and info.families and info.description
        assert all(f in MODELS for f in info.families)
    assert list_presets("ana") == [n for n in names if n.startswith("ana-")]


@pytest.mark.parametrize("name", list_presets())
def test_preset_loads_through_peft(name, tmp_path):
    """The JSON is a plain config: PEFT's own loaders (from_peft_type, from_pretrained of a folder) give the class."""
    method = preset_info(name).method
    config = load_preset(name)
    assert type(config) is CONFIG_CLASSES[method]
    (tmp_path / "adapter_config.json").write_text(json.dumps(preset_dict(name)))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is CONFIG_CLASSES[method]
    assert loaded.to_dict() == config.to_dict()
    direct = CONFIG_CLASSES[method](**preset_dict(name))
    assert direct.to_dict() == config.to_dict()


def test_paper_presets_hold_the_papers_hyper_parameters():
    mtil = load_preset("moecl-paper-mtil")
    assert (mtil.num_experts, mtil.r, mtil.top_k, mtil.freeze_top_k) == (22, 64, 2, 2)
    assert (mtil.scaling, mtil.expert_dropout, mtil.noisy_gating, mtil.selector_hidden) == (0.1, 0.1, True, 100)
    pathweave = load_preset("ana-paper-pathweave")
    assert pathweave.r == 8 and pathweave.top_k is None and pathweave.noisy_gating
    assert pathweave.in_adapter_init == "linear"
    from peft_ext.tuners.ana import QFORMER_TARGET_MODULES

    assert pathweave.target_modules == QFORMER_TARGET_MODULES
    assert pathweave.summed_target_modules == {"language_projection"}  # PathWeave's LLM-projection adapters


def test_overrides_and_bad_names():
    config = load_preset("resora-bert", r=4, task_type="SEQ_CLS", modules_to_save=["classifier"])
    assert config.r == 4 and config.task_type == "SEQ_CLS" and config.modules_to_save == ["classifier"]
    with pytest.raises(ValueError, match="Unknown ReSoRAConfig field"):
        load_preset("resora-bert", rank=4)
    with pytest.raises(ValueError, match="Did you mean 'resora-bert'"):
        load_preset("resora-bret")
    with pytest.raises(ValueError, match="divisible"):
        load_preset("resora-bert", r=3)


@pytest.mark.parametrize("name, family, build", CASES)
def test_preset_applies_to_family(name, family, build):
    info = preset_info(name)
    torch.manual_seed(0)
    base, inputs = build()
    base.eval()
    with torch.no_grad():
        reference = _output(base(**inputs)).clone()
    # init_weights=False: random non-identity adapters, so the forward below must change the output
    model = get_peft_model(base, load_preset(name, init_weights=False))
    model.eval()
    targeted = set(model.base_model.targeted_module_names)
    assert targeted == expected_modules(info.method, family, build.__name__)
    adapted = {n for n, m in model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == targeted
    assert all(
        any(p.requires_grad for p in m.parameters()) for n, m in model.base_model.model.named_modules() if n in adapted
    )
    with torch.no_grad():
        out = _output(model(**inputs))
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, reference), "the adapters did not change the forward"


@pytest.mark.parametrize(
    "name, build",
    [("resora-bert", llama), ("ana-llama", gpt2), ("moecl-clip-vision", vit), ("resora-vit", gpt2)],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_wrong_family_is_refused(name, build):
    """A preset whose target names do not exist in the model fails loudly instead of training nothing."""
    base, _ = build()
    with pytest.raises(ValueError, match="[Tt]arget modules"):
        get_peft_model(base, load_preset(name))


def test_misspelled_target_is_caught():
    """What this file guards against: one wrong name in a preset changes the adapted set, and the test sees it."""
    base, _ = bert()
    config = load_preset("resora-bert", target_modules=["query", "key", "value", "attention.out.dense"])
    model = get_peft_model(base, config)
    assert set(model.base_model.targeted_module_names) != expected_modules("resora", "bert", "bert")
