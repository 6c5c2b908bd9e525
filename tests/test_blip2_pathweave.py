"""PathWeave's placement on a tiny BLIP-2 (``tiny_blip2``: vision tower, Q-Former, projection, Llama decoder).

The ``ana-paper-pathweave`` preset puts gated AnA in the Q-Former's attention and plain per-task adapters, summed
with no gate, on ``language_projection`` (``docs/pathweave.md``). Two image-conditioned generation tasks are trained
one after the other (the decoder and everything else frozen): the first task's answers and logits stay bit-identical
after the second, ``task_ids="auto"`` answers as the task it picks, and a save/load round trip changes nothing.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from tiny_models import BLIP2_IMAGE_TOKEN, tiny_blip2

import peft_ext  # noqa: F401  (registers the methods)
from peft_ext.hub_configs import load_preset
from peft_ext.tuners.ana import AnALayer, ana_task_parameter_count


EOS = 2
PROMPT = [BLIP2_IMAGE_TOKEN] * 4 + [1, 5]  # 4 image placeholders (the projected queries go there), BOS, a word
ANSWERS = {"t0": [10, 11, EOS], "t1": [20, 21, EOS]}  # one answer per task: the adapters must steer the decoder
MAX_STEPS, LR, STREAK = 150, 3e-2, 5
QFORMER_ATTENTION = {
    f"qformer.encoder.layer.{i}.{block}.{name}"
    for i in range(2)
    for block in ("attention", "crossattention")
    for name in ("attention.query", "attention.key", "attention.value", "output.dense")
}


def images(task: str, n: int, seed: int) -> torch.Tensor:
    """``(n, 3, 16, 16)`` images; each task has a bright channel of its own, so its images are told apart."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen) * 0.3
    x[:, 2 * int(task[1:])] += 2.0
    return x


def train_batch(task: str, n: int, seed: int) -> dict:
    ids = torch.tensor([PROMPT + ANSWERS[task]] * n)
    labels = ids.clone()
    labels[:, : len(PROMPT)] = -100  # the loss covers the answer only
    return {"pixel_values": images(task, n, seed), "input_ids": ids, "labels": labels}


def train(model, task: str) -> int:
    """Train what is trainable now (the current task's adapters) on ``task``'s answer until every answer token is
    the argmax (teacher forced) in ``STREAK`` batches in a row, at most ``MAX_STEPS`` steps; returns the steps."""
    torch.manual_seed(0)  # the noisy gates draw their noise from it
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    answer, streak = torch.tensor(ANSWERS[task]), 0
    for step in range(1, MAX_STEPS + 1):
        out = model(**train_batch(task, 4, seed=1000 * int(task[1:]) + step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        streak = streak + 1 if bool((out.logits[:, len(PROMPT) - 1 : -1].argmax(-1) == answer).all()) else 0
        if streak == STREAK:
            break
    model.eval()
    return step


@torch.no_grad()
def generate(model, task_ids, pixel_values: torch.Tensor) -> list[list[int]]:
    """Greedy answers (new tokens only) to ``PROMPT`` for each image, under ``task_ids``."""
    ids = torch.tensor([PROMPT] * pixel_values.shape[0])
    with model.route(task_ids):
        out = model.generate(
            pixel_values=pixel_values,
            input_ids=ids,
            max_new_tokens=3,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
        )
    return out[:, len(PROMPT) :].tolist()


@torch.no_grad()
def logits(model, task_ids, pixel_values: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([PROMPT + ANSWERS["t0"]] * pixel_values.shape[0])
    with model.route(task_ids):
        return model(pixel_values=pixel_values, input_ids=ids).logits


def answered(tokens: list[int]) -> list[int]:
    """The answer up to and including EOS."""
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def pathweave_model(**overrides):
    return get_peft_model(tiny_blip2(), load_preset("ana-paper-pathweave", task_names=["t0"], **overrides))


EVAL = {"t0": images("t0", 3, seed=7), "t1": images("t1", 3, seed=8)}


@pytest.fixture(scope="module")
def run():
    """Task t0 trained, then t1 (with the outputs of t0 taken in between), then the task selector fitted."""
    model = pathweave_model()
    train(model, "t0")
    after_t0 = {
        "answers": generate(model, "t0", EVAL["t0"]),
        "logits": logits(model, "t0", EVAL["t0"]),
        "t0_params": {k: v.clone() for k, v in model.state_dict().items() if ".ana_tasks.default.0." in k},
    }
    model.add_task("t1")
    train(model, "t1")
    for task in ("t0", "t1"):
        model.fit_task_selector(task, [{"pixel_values": images(task, 400, seed=50 + int(task[1:]))}])
    return SimpleNamespace(model=model, after_t0=after_t0)


def test_the_preset_adapts_the_qformer_attention_and_the_llm_projection():
    model = pathweave_model(init_weights=False)
    model.add_task("t1")
    tuner = model.base_model
    adapted = {n for n, m in tuner.model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == QFORMER_ATTENTION | {"language_projection"}  # nothing in the vision tower or the decoder
    projection = tuner.model.language_projection
    assert projection.summed_only and projection.routing_scope == "qformer"  # follows the Q-Former's decision
    assert tuner.routing.scopes == ["qformer"]
    for task in projection.ana_tasks["default"]:  # plain adapters: no in-adapters, no gate
        assert task.num_in_adapters == 0 and task.gate is None and task.gate_noise is None
    query = tuner.model.qformer.encoder.layer[0].attention.attention.query
    assert query.ana_tasks["default"][1].num_in_adapters == 1 and query.ana_tasks["default"][1].gate is not None
    # trainable now: task t1 only; the projection's share is its rank-8 adapter and scale, nothing else
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ana_tasks.default.1." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == tuner.task_parameter_count("t1")
    in_projection = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "language_proj" in n)
    assert in_projection == ana_task_parameter_count(16, 24, 8, 1, True, summed=True) == 8 * (16 + 24) + 8 + 24 + 1


def test_projection_output_is_the_sum_of_the_task_adapters():
    model = pathweave_model(init_weights=False).eval()
    model.add_task("t1")
    layer = model.base_model.model.language_projection
    tasks = layer.ana_tasks["default"]
    with torch.no_grad():
        for task in tasks:  # make every adapter (the frozen one included) visible
            task.up.weight.normal_(std=0.3)
            task.scale.fill_(0.7)
        x = torch.randn(2, 4, 16)
        base = layer.get_base_layer()(x)
        adapter = [t.scale * t.up(t.down(x)) for t in tasks]
        with model.route("t0"):
            torch.testing.assert_close(layer(x), base + adapter[0])
        with model.route("t1"):  # summed, no gate: W x + A_0(x) + A_1(x)
            torch.testing.assert_close(layer(x), base + adapter[0] + adapter[1])
        with model.route(["t1", "t0"]):  # per sample
            torch.testing.assert_close(layer(x), base + torch.stack([adapter[0][0] + adapter[1][0], adapter[0][1]]))


def test_each_task_is_learned_and_training_t1_leaves_t0_bit_identical(run):
    model, after_t0 = run.model, run.after_t0
    assert [answered(a) for a in after_t0["answers"]] == [ANSWERS["t0"]] * 3
    assert [answered(a) for a in generate(model, "t1", EVAL["t1"])] == [ANSWERS["t1"]] * 3
    assert generate(model, "t0", EVAL["t0"]) == after_t0["answers"]
    assert torch.equal(logits(model, "t0", EVAL["t0"]), after_t0["logits"])
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in after_t0["t0_params"].items())
    assert any(".language_projection." in k for k in after_t0["t0_params"])
    base = generate(model, "none", EVAL["t1"])
    assert [answered(a) for a in base] != [ANSWERS["t1"]] * 3  # the adapters, not the decoder, give the answer


def test_auto_answers_as_the_task_it_picks(run):
    model = run.model
    mixed = torch.cat([EVAL["t0"][:2], EVAL["t1"], EVAL["t0"][2:]])
    expected = ["t0", "t0", "t1", "t1", "t1", "t0"]
    answers = generate(model, "auto", mixed)
    assert model.routed_tasks() == expected  # the selector picks right here ...
    per_task = [generate(model, task, mixed[i : i + 1])[0] for i, task in enumerate(expected)]
    assert answers == per_task  # ... so "auto" answers as each sample's task
    # every generate call starts its own decision (the Q-Former's forward starts the scope), even in one block
    with model.route("auto"):
        ids = torch.tensor([PROMPT] * 3)
        for task in ("t1", "t0"):
            out = model.generate(pixel_values=EVAL[task], input_ids=ids, max_new_tokens=3, do_sample=False)
            assert [answered(a) for a in out[:, len(PROMPT) :].tolist()] == [ANSWERS[task]] * 3
            assert model.routed_tasks() == [task] * 3


def test_save_and_load_round_trip(run, tmp_path):
    model = run.model
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    projection = {k.split("language_projection.", 1)[1] for k in saved if ".language_projection." in k}
    assert projection == {f"ana_tasks.{t}.{p}" for t in (0, 1) for p in ("down.weight", "down.bias", "up.weight")} | {
        f"ana_tasks.{t}.{p}" for t in (0, 1) for p in ("up.bias", "scale")
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["summed_target_modules"] == ["language_projection"] and config["task_names"] == ["t0", "t1"]
    loaded = PeftModel.from_pretrained(tiny_blip2(), tmp_path).eval()
    mixed = torch.cat([EVAL["t0"], EVAL["t1"]])
    for task_ids in ("t0", "t1", "auto", "none"):
        assert generate(loaded, task_ids, mixed) == generate(model, task_ids, mixed), task_ids
        assert torch.equal(logits(loaded, task_ids, mixed), logits(model, task_ids, mixed)), task_ids


def test_an_adapter_saved_without_the_option_loads_as_before(tmp_path):
    """The layout of adapters saved before ``summed_target_modules`` existed: Q-Former only, no such config key."""
    model = get_peft_model(tiny_blip2(), load_preset("ana-blip2-qformer", init_weights=False, task_names=["t0"]))
    model.add_task("t1")
    model.eval().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    assert config.pop("summed_target_modules") is None
    path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_blip2(), tmp_path).eval()
    assert not isinstance(loaded.base_model.model.language_projection, AnALayer)
    for task_ids in ("t0", "t1"):
        assert torch.equal(logits(loaded, task_ids, EVAL["t0"]), logits(model, task_ids, EVAL["t0"]))
