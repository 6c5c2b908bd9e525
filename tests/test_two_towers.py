"""Routing a two-tower model (CLIP): each tower has its own per-forward decision, the task selector reads the image
side, and the text side follows the image side's decision (MoE-CL and AnA alike)."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_clip

from peft_ext import AnAConfig, MoECLConfig


def clip_model(method: str):
    if method == "moecl":
        config = MoECLConfig(
            num_experts=4, r=2, top_k=2, init_weights=False, task_names=["t0"], selector_hidden=8, selector_quantile=1.0
        )
    else:
        # the first routed layer is an attention input, where the CLS token does not depend on the image yet: pool
        # the mean token (as the ana-clip-vision preset does)
        config = AnAConfig(
            routing_token="mean",
            r=2,
            target_modules=["q_proj", "v_proj"],
            task_names=["t0"],
            selector_hidden=8,
            selector_quantile=1.0,
        )
    model = get_peft_model(tiny_clip(), config)
    model.add_task("t1")
    torch.manual_seed(1)
    with torch.no_grad():  # AnA's up projections start at zero: make every task's output visible
        for name, param in model.named_parameters():
            if "ana_tasks" in name or "moecl_" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def images(task: int, n: int, seed: int) -> torch.Tensor:
    """Synthetic images; the two tasks' images come from well separated distributions (a bright channel of their own,
    which the layer norms before the first routed layer keep apart)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen) * 0.3
    x[:, 2 * task] += 2.0
    return x


def prompts(n: int = 5) -> dict:
    gen = torch.Generator().manual_seed(7)
    return {
        "input_ids": torch.randint(1, 99, (n, 6), generator=gen),
        "attention_mask": torch.ones(n, 6, dtype=torch.long),
    }


def fit_selector(model) -> None:
    for task in (0, 1):
        model.fit_task_selector(f"t{task}", [{"pixel_values": images(task, 64, seed=task)}], epochs=60)


@pytest.mark.parametrize("method", ["moecl", "ana"])
def test_each_tower_is_its_own_scope(method):
    model = clip_model(method)
    assert model.base_model.routing.scopes == ["vision_model", "text_model"]  # the image side is primary
    scopes = {layer.routing_scope for layer in model.base_model._routed_layers()}
    assert scopes == {"vision_model", "text_model"}
    text = prompts()
    with torch.no_grad():
        with model.route("none"):
            none_text = model.get_text_features(**text).pooler_output
        with model.route("t1"):  # one task: both towers, whatever their batch sizes
            t1_image = model.get_image_features(pixel_values=images(0, 3, seed=5)).pooler_output
            t1_text = model.get_text_features(**text).pooler_output
        assert model.routed_tasks(scope="text_model") == ["t1"] * 5
        assert model.routed_tasks() == ["t1"] * 3
        with model.route("t0"):
            t0_text = model.get_text_features(**text).pooler_output
        with model.disable_adapter():
            base_text = model.get_text_features(**text).pooler_output
    torch.testing.assert_close(none_text, base_text)
    assert not torch.allclose(t1_text, t0_text) and not torch.allclose(t1_text, base_text)
    assert t1_image.shape == (3, 16)


@pytest.mark.parametrize("method", ["moecl", "ana"])
def test_auto_decides_on_the_image_and_the_text_side_follows(method):
    model = clip_model(method)
    fit_selector(model)
    # the selector was fitted on the image tower's features (deep and shallow halves, 32 wide each), not the text
    # tower's (24)
    assert model.peft_config["default"].selector_feature_dim == 2 * 32
    pixel_values = torch.cat([images(0, 2, seed=11), images(1, 2, seed=12)])
    picks = model.predict_tasks({"pixel_values": pixel_values})
    features = model.collect_selector_features([{"pixel_values": pixel_values}])
    by_hand = model.base_model._select_for_routing("default", features).tolist()
    assert picks == [f"t{i}" if i >= 0 else None for i in by_hand]  # the decision is the selector's, on the images
    assert picks[2:] == ["t1", "t1"] and "t0" in picks
    text = prompts(4)
    with torch.no_grad():
        # a whole CLIP forward under "auto": the text batch (as many prompts as images here) follows each image's
        # pick instead of running the selector on text features of another width
        out = model(pixel_values=pixel_values, **text, task_ids="auto")
        assert model.routed_tasks(scope="text_model") == model.routed_tasks() == picks
        explicit = model(pixel_values=pixel_values, **text, task_ids=picks)
        torch.testing.assert_close(out.logits_per_image, explicit.logits_per_image)
    # 5 class prompts cannot follow a per-sample decision on 4 images (the caller groups images by their pick and
    # routes the prompts to each picked task: see routed_tasks)
    with pytest.raises(ValueError, match="text_model batch has 5 samples and cannot follow"):
        with torch.no_grad(), model.route("auto"):
            model.get_image_features(pixel_values=pixel_values)
            model.get_text_features(**prompts(5))
    with pytest.raises(ValueError, match="follows the routing of vision_model"):
        with torch.no_grad(), model.route("auto"):
            model.get_text_features(**prompts(5))  # no image decision in this block yet


def test_zero_shot_training_reaches_the_experts_of_both_towers():
    from tiny_models import clip_tokenizer

    from peft_ext.trainers.zero_shot import ZeroShotClassifier

    model = get_peft_model(tiny_clip(), MoECLConfig(num_experts=4, r=2, top_k=2, task_names=["t0"])).train()
    clf = ZeroShotClassifier(model, clip_tokenizer())
    clf.add_task("t0", ["cat", "dog"], template="a photo of a {}")
    clf.set_task("t0")
    loss = clf(pixel_values=images(0, 4, seed=3), labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    grads = {"vision_model": 0.0, "text_model": 0.0}
    for name, param in model.named_parameters():
        if "moecl_experts" in name and param.grad is not None:
            grads[name.split("model.", 2)[2].split(".")[0]] += float(param.grad.abs().sum())
    assert grads["vision_model"] > 0 and grads["text_model"] > 0  # the prompts' route trains the text experts


@pytest.mark.parametrize("method", ["moecl", "ana"])
def test_two_tower_adapter_round_trip(tmp_path, method):
    from peft import PeftModel

    model = clip_model(method)
    fit_selector(model)
    pixel_values = torch.cat([images(0, 2, seed=11), images(1, 2, seed=12)])
    with torch.no_grad():
        before = model(pixel_values=pixel_values, **prompts(4), task_ids="auto").logits_per_image
        picks = model.routed_tasks()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path).eval()
    assert loaded.base_model.routing.scopes == ["vision_model", "text_model"]
    with torch.no_grad():
        after = loaded(pixel_values=pixel_values, **prompts(4), task_ids="auto").logits_per_image
    assert loaded.routed_tasks() == picks
    torch.testing.assert_close(after, before)


def test_a_tower_adapted_alone_is_its_own_scope():
    # Only the image tower adapted: its calls through get_image_features (which skips CLIPModel.forward) must each
    # start a new decision, else a later batch of another size reuses the first batch's.
    config = MoECLConfig(num_experts=4, r=2, top_k=2, task_names=["t0"], target_modules=r"vision_model\..*\.mlp")
    model = get_peft_model(tiny_clip(), config).eval()
    assert model.base_model.routing.scopes == ["vision_model"]
    with torch.no_grad(), model.route(["t0", "none", "t0"]):
        model.get_image_features(pixel_values=images(0, 3, seed=1))
        assert model.routed_tasks() == ["t0", None, "t0"]
    with torch.no_grad(), model.route("t0"):
        for n in (4, 2):
            model.get_image_features(pixel_values=images(0, n, seed=n))
            assert model.routed_tasks() == ["t0"] * n


def test_a_following_layer_between_towers_takes_the_scope_before_it():
    from torch import nn

    from peft_ext.routing.core import assign_scopes

    # BLIP-2's layout: qformer, then language_projection (outside every tower), then language_model
    model = nn.Module()
    model.qformer, model.language_projection, model.language_model = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    towers = [("qformer.q", False), ("language_projection", True), ("language_model.q", False)]
    assert assign_scopes(model, towers) == (
        ["qformer", "language_model"],
        ["qformer", "qformer", "language_model"],
    )
    # the same layer deciding on its own makes the model one scope
    deciding = [(name, False) for name, _ in towers]
    assert assign_scopes(model, deciding) == ([""], ["", "", ""])
    # every layer following: the scopes come from all of them
    assert assign_scopes(model, [("language_projection", True)]) == ([""], [""])
    assert assign_scopes(model, [("qformer.q", True)]) == (["qformer"], ["qformer"])
