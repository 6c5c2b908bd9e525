"""A fourth method defined only here -- config, layer, tuner and one registration call -- runs through
``get_peft_model``, ``save_pretrained``/``PeftModel.from_pretrained``, the continual schedule (which derives its
strategy from the registration), the CLI's ``--method`` and the run's model card, without any other file knowing
it."""

import json
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from peft import PeftConfig, PeftModel, PeftType, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

import peft_ext
from peft_ext.cli import main
from peft_ext.trainers import (
    ContinualSchedule,
    ContinualTrainingArguments,
)
from peft_ext.trainers.testing import (
    make_tiny_bert,
    make_tokenizer,
    save_tiny_model,
    synthetic_task,
    write_synthetic_stream,
)


# -- the method: each output feature of a Linear scaled by (1 + s), s trained --------------------------------------
@dataclass
class ToyScaleConfig(PeftConfig):
    target_modules: Optional[list[str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_weights: bool = field(default=True)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.TOYSCALE


class ToyScaleLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("toyscale_s",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, init_weights: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.toyscale_s = nn.ParameterDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, init_weights)

    def update_layer(self, adapter_name: str, init_weights: bool) -> None:
        s = (
            torch.zeros(self.base_layer.out_features)
            if init_weights
            else 0.1 * torch.randn(self.base_layer.out_features)
        )
        self.toyscale_s[adapter_name] = nn.Parameter(s)
        self.set_adapter(self.active_adapters)

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return out
        for name in self.active_adapters:
            if name in self.toyscale_s:
                out = out * (1 + self.toyscale_s[name])
        return out


class ToyScaleModel(BaseTuner):
    prefix = "toyscale_"
    tuner_layer_cls = ToyScaleLayer
    target_module_mapping = {"bert": ["query", "value"]}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, ToyScaleLayer):
            target.update_layer(adapter_name, config.init_weights)
        else:
            self._replace_module(parent, target_name, ToyScaleLayer(target, adapter_name, config.init_weights), target)


peft_ext.register_method(
    "toyscale",
    ToyScaleConfig,
    ToyScaleModel,
    display_name="ToyScale",
    summary="each output feature of a Linear scaled by a trained factor",
    default_learning_rate=5e-2,
)


@pytest.fixture(autouse=True, scope="module")
def _forget_the_toy_method_afterwards():
    yield
    del peft_ext.METHODS["toyscale"]  # the other test modules' CLI help and method lists stay as shipped


def test_the_method_works_through_peft(tmp_path):
    base = make_tiny_bert(seed=0)
    model = get_peft_model(base, ToyScaleConfig(target_modules=["query"], init_weights=False))
    ids = torch.tensor([[2, 7, 9, 3]])
    expected = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "TOYSCALE"
    loaded = PeftModel.from_pretrained(make_tiny_bert(seed=0), tmp_path)
    assert torch.allclose(loaded(input_ids=ids).last_hidden_state, expected)


def test_the_method_runs_a_continual_schedule_and_the_cli(tmp_path, capsys):
    tokenizer = make_tokenizer(tmp_path / "tok")
    args = ContinualTrainingArguments(
        output_dir=str(tmp_path / "run"), method="toyscale", epochs=2, batch_size=8, disable_tqdm=True, plots=False
    )
    assert args.learning_rate == 5e-2  # the method's own default rate, from its registration
    tasks = [synthetic_task("colors"), synthetic_task("moods")]
    result = ContinualSchedule(tasks, args, model=lambda: make_tiny_bert(seed=0), tokenizer=tokenizer).run()
    assert result.method == "toyscale" and len(result.accuracy) == 2
    model_dir = save_tiny_model(tmp_path / "model")
    tasks_json = write_synthetic_stream(tmp_path / "data", names=["colors"])
    command = ["continual", "--method", "toyscale", "--model", str(model_dir), "--tasks", str(tasks_json),
               "--output-dir", str(tmp_path / "cli"), "--epochs", "1", "--disable_tqdm", "true"]  # fmt: skip
    assert main(command) == 0
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["method"] == "toyscale"
    card = (tmp_path / "cli" / "README.md").read_text()
    assert "ToyScale" in card and "scaled by a trained factor" in card  # the card reads the registration
    assert "import peft_ext" in card  # PEFT alone cannot load a TOYSCALE adapter
    assert main(["continual", "--help"]) == 0
    assert "toyscale" in capsys.readouterr().out  # the help lists the registry's methods
