import importlib
import json
import pickle

import pytest
import torch
from peft import PeftConfig, PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from transformers import BertConfig, BertModel

import peft_ext
from peft_ext import registry
from peft_ext.tuners.checkpoint import AdapterCheckpointError


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    )


def test_resora_member_behaves_like_a_builtin_member():
    member = PeftType.RESORA
    assert PeftType("RESORA") is member
    assert PeftType["RESORA"] is member
    assert member == "RESORA" and member.value == "RESORA" and member.name == "RESORA"
    assert member in list(PeftType)
    assert pickle.loads(pickle.dumps(member)) is member
    assert sorted([member, PeftType.LORA])[0] is PeftType.LORA  # sorts after PEFT's own members
    assert json.dumps({"t": member}) == '{"t": "RESORA"}'


def test_registration_is_idempotent_under_reimport_and_reload():
    members_before = list(PeftType)
    importlib.import_module("peft_ext")
    reloaded = importlib.reload(importlib.import_module("peft_ext.tuners.resora"))
    assert list(PeftType) == members_before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RESORA] is reloaded.ReSoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.RESORA] is reloaded.ReSoRAModel
    assert registry.extend_peft_type("RESORA") is PeftType.RESORA


def test_prefixes_are_unique_and_not_prefixes_of_each_other():
    ours = {info.model_cls.prefix for info in registry.METHODS.values() if info.needs_peft_ext}
    assert ours >= {"resora_", "ana_", "moecl_"}
    for prefix in ours:
        others = [p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p != prefix]
        assert not any(o.startswith(prefix) or prefix.startswith(o) for o in others), prefix


def test_prefix_clash_is_rejected(monkeypatch):
    monkeypatch.setitem(PEFT_TYPE_TO_PREFIX_MAPPING, PeftType.LORA, "resora_x_")
    with pytest.raises(ValueError, match="clashes"):
        registry._check_prefix_is_unique("resora", "resora_")


def test_invalid_member_name_is_rejected():
    with pytest.raises(ValueError, match="upper-case"):
        registry.extend_peft_type("resora")


@pytest.mark.parametrize("bad_type", ["RESORAX", "resora", "NOT_A_METHOD"])
def test_unknown_peft_type_in_checkpoint_is_a_one_line_error(tmp_path, bad_type):
    model = get_peft_model(tiny_bert(), peft_ext.ReSoRAConfig(target_modules=["query"]))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["peft_type"] = bad_type
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a registered PEFT method") as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert "\n" not in str(info.value)
    if bad_type != "NOT_A_METHOD":
        assert "Did you mean 'RESORA'" in str(info.value)
    with pytest.raises(ValueError, match="not a registered PEFT method"):
        PeftConfig.from_pretrained(tmp_path)


def test_checkpoint_shape_mismatch_is_a_one_line_error(tmp_path):
    model = get_peft_model(tiny_bert(), peft_ext.ReSoRAConfig(target_modules=["query"], r=4))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterCheckpointError, match=r"has shape \(4, 16\) .* expects \(8, 16\)") as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert "\n" not in str(info.value)


def test_checkpoint_of_another_method_is_rejected(tmp_path):
    from peft import LoraConfig

    get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"])).save_pretrained(tmp_path)
    with pytest.raises(AdapterCheckpointError, match="belongs to another PEFT method"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path, config=peft_ext.ReSoRAConfig(target_modules=["query"]))


def test_version_is_set():
    assert isinstance(peft_ext.__version__, str) and peft_ext.__version__[0].isdigit()
