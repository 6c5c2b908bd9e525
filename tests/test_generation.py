"""The generation task kind's building blocks (trainers.generation, trainers.generation_metrics): target-only loss,
prompt truncation, left-padded greedy generation, a LoRA-trained tiny Llama answering exactly, exact match and
ROUGE-L, on tiny_llama with a word-level tokenizer built offline."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from assertions import one_line_error
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny_models import BOS, EOS, PAD, tiny_bert, tiny_llama, word_tokenizer
from torch import nn

from peft_ext.trainers import generation_metrics
from peft_ext.trainers.generation import (
    ANSWER_SLACK,
    GENERATION_CONFIG,
    IGNORE_INDEX,
    GenerationCollator,
    GenerationTaskModel,
    answer_length,
    encode_examples,
    encode_prompts,
    generate_answers,
    load_generation_metric,
)


def batch_of(rows: dict, collator: GenerationCollator) -> dict[str, torch.Tensor]:
    return collator([{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))])


# -- encoding and loss ----------------------------------------------------------------------------------------------
def test_rows_put_bos_first_the_target_after_the_prompt_and_eos_last():
    tok = word_tokenizer()
    prompts, targets = ["capital of france ? answer :", "sky color ?"], ["paris .", "blue"]
    rows = encode_examples(tok, prompts, targets)
    for ids, labels, mask, prompt, target in zip(
        rows["input_ids"], rows["labels"], rows["attention_mask"], prompts, targets
    ):
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tok(target, add_special_tokens=False)["input_ids"]
        assert ids == [BOS, *prompt_ids, *target_ids, EOS]  # BOS once, at the start; EOS once, at the end
        assert labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*target_ids, EOS]
        assert mask == [1] * len(ids)
    # the prompt part of a row is what generation reads
    assert [r[: len(p)] for r, p in zip(rows["input_ids"], encode_prompts(tok, prompts)["input_ids"])] == [
        [BOS, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts
    ]
    # GPT-2-style tokenizer: nothing added in front
    plain = encode_examples(word_tokenizer(bos=False), ["sky color ?"], ["blue"])
    blue = tok.convert_tokens_to_ids("blue")
    assert plain["input_ids"] == [[*tok("sky color ?", add_special_tokens=False)["input_ids"], blue, EOS]]
    assert plain["labels"][0][:3] == [IGNORE_INDEX] * 3


def test_prompt_tokens_carry_no_loss():
    tok = word_tokenizer()
    model = GenerationTaskModel(tiny_llama(), tok)
    rows = encode_examples(tok, ["capital of france ? answer :", "sky color ?"], ["paris .", "blue green"])
    batch = batch_of(rows, GenerationCollator(tok))
    # right padding: pad id, attention 0 and label -100 on the short row's tail
    assert batch["input_ids"][1, -2:].tolist() == [PAD, PAD] and batch["attention_mask"][1, -2:].tolist() == [0, 0]
    assert batch["labels"][1, -2:].tolist() == [IGNORE_INDEX] * 2
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]  # position t predicts token t + 1
    on_target = labels != IGNORE_INDEX
    assert int(on_target.sum()) == (2 + 1) + (2 + 1)  # each target's tokens and its EOS, nothing else
    by_hand = nn.functional.cross_entropy(logits[on_target], labels[on_target])
    torch.testing.assert_close(out.loss, by_hand)
    every = batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:].bool()]
    all_tokens = nn.functional.cross_entropy(logits[batch["attention_mask"][:, 1:].bool()], every)
    assert not torch.isclose(out.loss, all_tokens)  # the prompt positions would change it
    # the Trainer's num_items_in_batch (target tokens over all accumulation steps) makes it a sum over that count
    with torch.no_grad():
        halved = model(**batch, num_items_in_batch=torch.tensor(2 * int(on_target.sum())))
    torch.testing.assert_close(halved.loss, by_hand / 2)


def test_answer_length_is_the_longest_target_with_eos_plus_the_slack():
    rows = encode_examples(word_tokenizer(), ["color of sky ?", "capital ?"], ["blue", "paris rome"])
    assert [sum(t != IGNORE_INDEX for t in row) for row in rows["labels"]] == [2, 3]  # target tokens + EOS
    assert answer_length(rows["labels"]) == 3 + ANSWER_SLACK
    with pytest.raises(ValueError, match="at least one row with a target"):
        answer_length([[IGNORE_INDEX, IGNORE_INDEX]])


def test_collator_pads_left_and_falls_back_to_eos():
    tok = word_tokenizer(pad=False)
    collate = GenerationCollator(tok, padding_side="left")
    assert collate.pad_token_id == EOS
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [EOS, EOS, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]] and "labels" not in batch
    assert GenerationCollator(pad_token_id=9, pad_to_multiple_of=4)([{"input_ids": [5]}])["input_ids"].shape == (1, 4)


def test_truncation_keeps_the_target_and_cuts_the_prompt_from_the_left():
    tok = word_tokenizer()
    prompt = "what is capital of france ? answer :"  # 8 tokens
    rows = encode_examples(tok, [prompt], ["paris ."], max_length=7)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    paris, dot = tok("paris .", add_special_tokens=False)["input_ids"]
    assert rows["input_ids"] == [[BOS, *ids[-3:], paris, dot, EOS]]  # BOS stays; the prompt's end stays
    assert rows["labels"] == [[IGNORE_INDEX] * 4 + [paris, dot, EOS]]
    assert encode_prompts(tok, [prompt], max_length=3)["input_ids"] == [[BOS, *ids[-2:]]]
    message = one_line_error("row 1", encode_examples, tok, ["sky ?", prompt], ["blue", "paris ."], 4, task="capitals")
    assert "'capitals'" in message and "max_length 4" in message


def test_an_empty_target_is_a_one_line_error_naming_the_row():
    tok = word_tokenizer()
    message = one_line_error("row 2", encode_examples, tok, ["a", "b", "c"], ["x", "y", "  "], task="qa")
    assert "'qa'" in message and "empty" in message
    one_line_error("Row 0: the target is empty", encode_examples, tok, ["a"], [None])
    one_line_error("Row 0: the prompt is empty", encode_examples, word_tokenizer(bos=False), [""], ["blue"])


# -- generation -----------------------------------------------------------------------------------------------------
PROMPTS = ["what is", "capital of france ? answer :", "sky", "green grass blue color ?", "rome"]


def greedy_by_hand(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Argmax decoding without cache or padding: the reference for generate_answers."""
    ids = encode_prompts(tok, [prompt])["input_ids"][0]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == EOS:
                break
            new.append(token)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_left_padded_batched_greedy_generation_matches_one_by_one():
    tok, model = word_tokenizer(), tiny_llama()
    model.train()  # generate_answers runs in eval mode and puts every module back as it was
    one_by_one = generate_answers(model, tok, PROMPTS, max_new_tokens=5, batch_size=1)
    batched = generate_answers(model, tok, PROMPTS, max_new_tokens=5, batch_size=len(PROMPTS))
    assert batched == one_by_one == generate_answers(model, tok, PROMPTS, max_new_tokens=5, batch_size=2)
    assert all(m.training for m in model.modules())
    model.eval()
    assert batched == [greedy_by_hand(model, tok, p, 5) for p in PROMPTS]  # new tokens only, greedy
    assert all(a and a == a.strip() for a in batched)
    assert tok.padding_side == "right"  # the tokenizer is untouched
    # the model's own sampling settings do not apply: answers stay greedy
    model.generation_config.update(do_sample=True, temperature=0.7, top_k=3, repetition_penalty=1.5)
    assert generate_answers(model, tok, PROMPTS, max_new_tokens=5, batch_size=3) == batched


def test_lora_trained_tiny_llama_answers_exactly():
    from transformers import TrainingArguments

    from peft_ext.trainers.regularized import RegularizedTrainer

    tok = word_tokenizer()
    # lm_head is adapted too: tiny_llama's RMS-normed states times its 0.02-std head give near-uniform logits that
    # the layers' adapters alone move only slowly
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    model = GenerationTaskModel(peft_model, tok, max_new_tokens=4)
    model.add_task("capitals")
    model.set_task("capitals")
    prompts, answers = ["capital of france ? answer :", "capital of italy ? answer :"], ["paris .", "rome"]
    assert model.generate_answers(prompts) != answers
    train = Dataset.from_dict(encode_examples(tok, prompts, answers, max_length=16))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=50,
            per_device_train_batch_size=2,
            learning_rate=3e-2,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        trainer = RegularizedTrainer(model=model, args=args, train_dataset=train, data_collator=GenerationCollator(tok))
        assert trainer.model_accepts_loss_kwargs  # token-weighted loss under gradient accumulation
        trainer.train()
    predictions = model.generate_answers(prompts)  # "paris ." and "rome": stops at EOS within 4 new tokens
    scores = load_generation_metric().compute(predictions=predictions, references=answers)
    assert scores == {"exact_match": 1.0, "rouge_l": 1.0}, predictions


def test_encoder_only_model_is_refused_with_one_line_error():
    expected = r"generation tasks need a causal language model \(AutoModelForCausalLM\); got BertModel$"
    tok = word_tokenizer()
    one_line_error(expected, GenerationTaskModel, tiny_bert(), tok)
    one_line_error(
        expected, GenerationTaskModel, get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"])), tok
    )
    one_line_error(expected, generate_answers, tiny_bert(), tok, ["sky"], 3)
    one_line_error("with an EOS token", GenerationTaskModel, tiny_llama(), word_tokenizer(eos=False))


def test_tasks_regularization_and_generation_json():
    import peft_ext  # noqa: F401  (registers ReSoRA)
    from peft_ext import ReSoRAConfig

    tok = word_tokenizer()
    peft_model = get_peft_model(tiny_llama(), ReSoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model = GenerationTaskModel(peft_model, tok, max_new_tokens=6)
    model.add_task("a")
    model.add_task("b", max_new_tokens=2)
    one_line_error("already registered", model.add_task, "a")
    one_line_error("No generation task 'c'", model.set_task, "c")
    model.set_task("b")
    assert model.current_task == "b"
    assert all(name.startswith("encoder.") for name, _ in model.named_parameters())  # nothing of its own
    model.train()
    model(**batch_of(encode_examples(tok, ["sky ?"], ["blue"]), GenerationCollator(tok)))
    torch.testing.assert_close(model.get_regularization_loss(), peft_model.get_regularization_loss())
    assert GenerationTaskModel(tiny_llama(), tok).get_regularization_loss() is None
    assert all(len(a.split()) <= 2 for a in model.generate_answers(PROMPTS))  # task b's answer length
    with tempfile.TemporaryDirectory() as d:
        model.save_tasks(d)
        meta = json.loads(open(f"{d}/{GENERATION_CONFIG}", encoding="utf-8").read())
        assert meta == {
            "normalization": "squad",
            "max_new_tokens": 6,
            "tasks": {"a": {"max_new_tokens": 6}, "b": {"max_new_tokens": 2}},
        }
        assert sorted(p.name for p in Path(d).iterdir()) == [GENERATION_CONFIG]
        again = GenerationTaskModel(tiny_llama(), tok, max_new_tokens=6)
        again.load_tasks(d)
        assert again.tasks == model.tasks
        one_line_error("was written for", GenerationTaskModel(tiny_llama(), tok, max_new_tokens=5).load_tasks, d)


# -- metrics --------------------------------------------------------------------------------------------------------
def test_exact_match_normalization_is_squads():
    norm = generation_metrics.normalize_answer
    assert norm("  The Eiffel   Tower. ") == "eiffel tower"
    assert norm("An apple, a day!") == "apple day"
    assert norm("theater") == "theater" and norm("Anna") == "anna"  # articles only as whole words
    assert norm("Rock-'n'-roll") == "rocknroll"  # punctuation removed, not split on
    assert norm("  Paris. ", "strip") == "Paris."
    scores = generation_metrics.generation_scores(["The Paris!", "rome", "Madrid"], ["paris", "Rome.", "spain"])
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert generation_metrics.generation_scores(["Paris."], ["paris"], "strip")["exact_match"] == 0.0
    assert generation_metrics.generation_scores(["The"], ["a"])["rouge_l"] == 1.0  # both empty: agree, as EM


# (prediction, reference, ROUGE-L F). The values come from the maintained implementation, rouge-score 0.1.2
# (`RougeScorer(["rougeL"]).score(normalize(reference), normalize(prediction)).fmeasure`, no stemming), installed
# in a scratch venv outside the project; the texts are SQuAD-normalized first, as this module does.
ROUGE_L_REFERENCE = [
    ("the cat sat on the mat", "the cat is on the mat", 0.75),
    ("police killed the gunman", "police kill the gunman", 0.6666666666666666),
    ("the gunman killed police", "police killed the gunman", 0.3333333333333333),
    ("Paris", "paris.", 1.0),
    ("a b c d e f", "b d f", 0.7499999999999999),
    ("New York City", "new york", 0.8),
    ("", "something", 0.0),
    ("one two three", "four five six", 0.0),
    ("w1 w2 w1 w2 w1", "w2 w1 w2", 0.7499999999999999),
    ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps on the log", 0.4615384615384615),
    ("alpha beta gamma delta", "delta gamma beta alpha", 0.25),
]


def test_rouge_l_matches_rouge_score():
    for prediction, reference, expected in ROUGE_L_REFERENCE:
        got = generation_metrics.generation_scores([prediction], [reference])["rouge_l"]
        assert got == pytest.approx(expected, abs=1e-12), (prediction, reference)
    assert generation_metrics.lcs_length("abcbdab", "bdcaba") == 4  # CLRS's example


def test_metric_module_loads_with_evaluate():
    metric = load_generation_metric()
    predictions, references, expected = zip(*ROUGE_L_REFERENCE)
    scores = metric.compute(predictions=list(predictions), references=list(references))
    assert scores["rouge_l"] == pytest.approx(sum(expected) / len(expected))
    assert scores["exact_match"] == pytest.approx(1 / len(expected))  # "Paris" / "paris."
    import evaluate

    direct = evaluate.load(generation_metrics.__file__, keep_in_memory=True)
    assert direct.compute(predictions=["The cat sat."], references=["cat sat on mat"]) == {
        "exact_match": 0.0,
        "rouge_l": pytest.approx(2 / 3),
    }
    assert metric.compute(predictions=["Paris."], references=["paris"], normalization="strip")["exact_match"] == 0.0
