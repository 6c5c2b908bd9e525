"""Fine-tune a 7B decoder (Mistral/Llama/Qwen2) with ReSoRA under accelerate (DDP, DeepSpeed ZeRO-2 or FSDP).

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/resora_decoder_7b.py \
        --model mistralai/Mistral-7B-v0.1 --train data/train.jsonl --output-dir out/resora-7b

``--train`` is a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a Hub dataset id with a text column
(``--text-column``, default ``text``); the model learns it as causal LM data. The adapter config is the
``resora-llama`` preset (r=16 in 4 subspaces on q/k/v/o) unless ``--preset`` names another; the de-redundancy loss
is added by ``RegularizedTrainer``. bf16 + gradient checkpointing keep a 7B model within one 80 GB GPU per process.

``--smoke`` swaps in a tiny random Llama and a few synthetic lines so the script can be checked on CPU
(``python examples/resora_decoder_7b.py --smoke``). The full-size run is untested on GPU in this repository: see
examples/README.md.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset, load_dataset
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

import peft_ext  # noqa: F401  (registers RESORA with PEFT)
from peft_ext.hub_configs import load_preset
from peft_ext.trainers import RegularizedTrainer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mistralai/Mistral-7B-v0.1")
    p.add_argument("--train", help="local data file or Hub dataset id")
    p.add_argument("--text-column", default="text")
    p.add_argument("--preset", default="resora-llama")
    p.add_argument("--output-dir", default="outputs/resora-7b")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the adapter with a model card")
    p.add_argument("--smoke", action="store_true", help="tiny random model + synthetic data (CPU check)")
    return p.parse_args()


def smoke_model_and_data():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "red", "blue"]
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    rows = [{"text": f"the {a} sat on the {b}"} for a in ("cat", "dog") for b in ("mat", "log")] * 8
    return model, tokenizer, Dataset.from_list(rows)


def main():
    args = parse_args()
    if args.smoke:
        model, tokenizer, data = smoke_model_and_data()
        args.max_length, args.batch_size, args.grad_accum = 16, 4, 1
    else:
        if not args.train:
            raise SystemExit("--train is required (a data file or a Hub dataset id); or use --smoke.")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        suffix = args.train.rsplit(".", 1)[-1]
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
        data = (
            load_dataset(builder, data_files=args.train, split="train")
            if builder
            else load_dataset(args.train, split="train")
        )

    model = get_peft_model(model, load_preset(args.preset, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    data = data.map(
        lambda b: tokenizer(b[args.text_column], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=data.column_names,
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float < 1: a fraction of the total steps (transformers 5)
        bf16=not args.smoke and torch.cuda.is_available(),
        gradient_checkpointing=not args.smoke,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        ddp_find_unused_parameters=False,  # every ReSoRA factor is used in every forward
        use_cpu=args.smoke,
    )
    trainer = RegularizedTrainer(
        model=model,
        args=training_args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    if trainer.is_fsdp_enabled:  # gather the (small) adapter on the main process before saving
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(args.output_dir)  # adapter_model.safetensors + adapter_config.json
    if args.push_to_hub and trainer.is_world_process_zero():
        from peft_ext.trainers.hub import push_continual_run_to_hub

        push_continual_run_to_hub(args.output_dir, args.push_to_hub, base_model=None if args.smoke else args.model)


if __name__ == "__main__":
    main()
