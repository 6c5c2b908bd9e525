"""examples/moecl_clip_mtil.py: the MTIL recipe file, the Hub data path (on a local parquet copy) and the smoke run
(tiny random CLIP, three synthetic tasks): full accuracy matrices, the zero-shot row, MTIL's transfer / avg_all, the
task-agnostic fallback to the base model, and both towers trained when asked."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "moecl_clip_mtil.py"
ORDER_I = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet"]
ORDER_I += ["StanfordCars", "SUN397"]
ORDER_II = ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD"]
ORDER_II += ["EuroSAT", "CIFAR100"]


@pytest.fixture(scope="module")
def mtil():
    spec = importlib.util.spec_from_file_location("moecl_clip_mtil_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def both_towers_run(mtil, tmp_path_factory):
    out = tmp_path_factory.mktemp("mtil-both")
    mtil.main(["--smoke", "--both-towers", "--output-dir", str(out)])
    return out, json.loads((out / "metrics.json").read_text())


def test_recipe_file_holds_the_papers_settings(mtil):
    recipe = mtil.load_recipe(mtil.RECIPE)
    assert recipe["orders"]["I"] == ORDER_I and recipe["orders"]["II"] == ORDER_II
    settings = recipe["recipe"]
    assert settings["label_smoothing"] == 0.2 and settings["batch_size"] == 64 and settings["warmup_steps"] == 100
    assert settings["full"]["iterations"] == 1000
    assert settings["few_shot"]["shots"] == 5 and settings["few_shot"]["iterations"] == 500
    assert settings["full"]["lr"]["Aircraft"] == 5e-3 and settings["full"]["lr"]["MNIST"] == 1e-4
    assert settings["few_shot"]["lr"]["Food"] == 1e-2
    for name, spec in recipe["datasets"].items():
        assert "{}" in spec["template"] and spec["hub"] in ("verified", "unverified"), name
        assert spec["dataset"].count("/") == 1 and spec["num_classes"] > 1, name
    # the reference's schedule: linear warmup from 1/warmup, then a cosine down to 0
    assert mtil.warmup_cosine(0, 100, 1000) == pytest.approx(0.01)
    assert mtil.warmup_cosine(100, 100, 1000) == pytest.approx(1.0)
    assert mtil.warmup_cosine(550, 100, 1000) == pytest.approx(0.5)
    assert mtil.warmup_cosine(1000, 100, 1000) == pytest.approx(0.0)
    # per-data-set learning rates follow the data set in either order and variant
    args = mtil.parse_args(["--order", "II", "--shots", "5"])
    run = mtil.run_settings(args, recipe)
    specs = mtil.task_specs(recipe, "II")
    assert [s["key"] for s in specs] == ORDER_II and run["steps"] == 500
    assert [mtil.task_lr(s, run) for s in specs][:2] == [1e-2, 1e-2]  # StanfordCars, Food (5-shot)


def test_hub_data_path_on_a_local_copy(mtil, tmp_path, monkeypatch):
    """Class names from the ClassLabel, the 5-shot subset, a held-out split, and the load-time checks."""
    import datasets
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from transformers import CLIPImageProcessor

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # keep the user's cache clean
    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(names=["apple_pie", "beagle", "cat"])})
    (tmp_path / "data").mkdir()
    for split, n in (("train", 30), ("test", 12)):
        images = [PILImage.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)) for _ in range(n)]
        Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features).to_parquet(
            str(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
        )
    size = {"shortest_edge": 32}
    processor = types.SimpleNamespace(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32})
    )
    args = mtil.parse_args(["--shots", "5", "--max-eval", "5"])
    settings = mtil.run_settings(args, mtil.load_recipe(mtil.RECIPE))
    spec = {"name": "toy", "key": "Food", "dataset": str(tmp_path), "train_split": "train", "eval_split": "test"}
    spec.update(num_classes=3, template="a photo of a {}, a type of food.")
    toy, held = mtil.hub_tasks([spec, dict(spec, name="held", holdout=0.5)], processor, settings, args)
    assert toy["classes"] == ["apple pie", "beagle", "cat"] and toy["lr"] == 1e-2  # Food's 5-shot rate
    assert len(toy["train"]) == 15 and len(toy["eval"]) == 5  # 5 per class; eval capped
    pixels, label = toy["train"][0]
    assert pixels.shape == (3, 32, 32) and label in (0, 1, 2)
    assert 3 <= len(held["train"]) <= 15 and len(held["eval"]) == 5  # 15 kept, 15 held out; <= 5 per class, capped
    with pytest.raises(SystemExit, match="3 classes where MTIL has 4"):
        mtil.class_names(toy["train"].ds, dict(spec, num_classes=4))
    numbers = Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=["0", "1"])}))
    with pytest.raises(SystemExit, match="label names are numbers"):
        mtil.class_names(numbers, {"dataset": "x", "label_column": "label"})
    assert mtil.class_names(numbers, {"dataset": "x", "numeric_names": True}) == ["0", "1"]


def test_smoke_run_writes_full_mtil_metrics(mtil, both_towers_run):
    from peft_ext.trainers import compute_continual_metrics

    _, metrics = both_towers_run
    T = len(metrics["tasks"])
    assert T == 3 and metrics["kind"] == "zero_shot" and metrics["method"] == "moecl"
    for key in ("accuracy", "accuracy_task_agnostic"):
        matrix = metrics[key]
        assert len(matrix) == T and all(len(row) == T for row in matrix), key
        assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for row in matrix for a in row), key  # no nulls
    assert len(metrics["accuracy_zero_shot"]) == T
    expected = compute_continual_metrics(metrics["accuracy"], zero_shot=metrics["accuracy_zero_shot"])
    for key in ("avg", "last", "bwt", "forgetting", "transfer", "avg_all", "fwt"):
        assert isinstance(metrics[key], float) and metrics[key] == pytest.approx(expected[key]), key
    agnostic = compute_continual_metrics(metrics["accuracy_task_agnostic"], zero_shot=metrics["accuracy_zero_shot"])
    assert metrics["scores_task_agnostic"]["transfer"] == pytest.approx(agnostic["transfer"])
    # the synthetic tasks' images are far apart: before a task is trained, the selector sends its images to the
    # base model (the fallback path of task-agnostic scoring), and after the last task it knows every task
    assert metrics["unseen_to_base"] > 0.5 and metrics["task_identification"] > 0.5


def test_both_towers_train_the_text_experts(mtil, both_towers_run):
    out, metrics = both_towers_run
    assert metrics["run"]["both_towers"] and metrics["trainable_params_text_tower"] > 0
    # the initial adapter, rebuilt as the run built it
    args = mtil.parse_args(["--smoke", "--both-towers"])
    base, _, tasks = mtil.smoke_setup()
    initial = mtil.build_model(base, tasks[0]["name"], args, seed=metrics["run"]["seed"])
    from peft import get_peft_model_state_dict

    before = get_peft_model_state_dict(initial)
    after = load_file(str(out / "adapter_model.safetensors"))
    experts = [k for k in before if "moecl_experts" in k and k.endswith(tuple(f"weight.{i}" for i in range(4)))]
    for tower in ("text_model", "vision_model"):
        keys = [k for k in experts if f".{tower}." in k]
        assert keys, tower
        changed = [k for k in keys if not torch.equal(before[k], after[k])]
        assert changed, f"no {tower} expert moved in training"


def test_image_tower_only_by_default(mtil, tmp_path):
    mtil.main(["--smoke", "--output-dir", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert not metrics["run"]["both_towers"] and metrics["trainable_params_text_tower"] == 0
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not [k for k in saved if ".text_model." in k] and [k for k in saved if ".vision_model." in k]
    assert all(None not in row for row in metrics["accuracy_task_agnostic"])
