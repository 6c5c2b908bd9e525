"""MTIL-style continual learning of CLIP ViT-B/16 with MoE-CL, under accelerate (DDP, DeepSpeed ZeRO-2 or FSDP).

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/moecl_clip_mtil.py \
        --tasks examples/mtil_tasks.json --output-dir out/moecl-mtil

MTIL (multi-domain task-incremental learning, from ZSCL) trains CLIP on a sequence of image-classification data
sets. Classification is CLIP's: cosine similarity between the image embedding and the embeddings of the task's
class prompts ("a photo of a {class}."), cross-entropy over that task's classes, CLIP's logit scale.

What is adapted: the MoE-CL experts of the ``moecl-paper-mtil`` preset (22 experts, r=64, top-2, 2 frozen per task,
scale 0.1, dropout 0.1, DDAS with 100 hidden units) beside every MLP of the **image** tower; the text tower stays
frozen here, so the class-prompt embeddings are computed once per task. (The paper also puts experts in the text
tower; with a single ``route(task)`` around both towers that works the same way -- pass ``--both-towers``.)

Per task: ``add_task`` (after the first), train, ``end_task`` (activate-freeze), ``fit_task_selector`` on the task's
training images; then every seen task is evaluated with its id and without it (the selector picks the task per
image, or the zero-shot base model). The accuracy matrix goes to ``metrics.json`` (docs/cli.md's schema) and the
adapter to ``output_dir`` (``peft_ext.hub.push_continual_run_to_hub`` publishes it).

``--tasks`` is a JSON list of ``{"name", "dataset", "train_split", "eval_split", "image_column", "label_column"}`` with
Hub dataset ids (the class names are read from the label feature). ``--smoke`` runs a tiny random CLIP on two
synthetic tasks on CPU (``python examples/moecl_clip_mtil.py --smoke``). The full-size run is untested on GPU in
this repository: see examples/README.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader, TensorDataset

import peft_ext  # noqa: F401  (registers MOECL with PEFT)
from peft_ext.hub_configs import load_preset
from peft_ext.trainers import compute_continual_metrics


VISION_MLPS = r"((.*\.)?vision_model\.)?encoder\.layers\.\d+\.mlp"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="openai/clip-vit-base-patch16")
    p.add_argument("--tasks", help="JSON task list (see the docstring)")
    p.add_argument("--output-dir", default="outputs/moecl-mtil")
    p.add_argument("--steps", type=int, default=1000, help="training iterations per task (MTIL: 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="per device")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--both-towers", action="store_true", help="experts in the text tower too (the paper's setting)")
    p.add_argument("--smoke", action="store_true", help="tiny random CLIP + synthetic tasks (CPU check)")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def hub_tasks(path, processor):
    from datasets import load_dataset

    tasks = []
    for spec in json.loads(Path(path).read_text()):

        def to_tensors(split):
            ds = load_dataset(spec["dataset"], split=spec[split])
            classes = ds.features[spec.get("label_column", "label")].names
            images = [img.convert("RGB") for img in ds[spec.get("image_column", "image")]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            return TensorDataset(pixels, torch.tensor(ds[spec.get("label_column", "label")])), classes

        train, classes = to_tensors("train_split")
        test, _ = to_tensors("eval_split")
        tasks.append(
            {"name": spec["name"], "classes": [c.replace("_", " ") for c in classes], "train": train, "eval": test}
        )
    return tasks


def smoke_setup():
    from transformers import CLIPConfig, CLIPModel

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=64, max_position_embeddings=16, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t, name in enumerate(["stripes", "blobs"]):
        pix = torch.randn(64, 3, 32, 32, generator=g) + 2.0 * t  # two input distributions for the selector
        labels = torch.arange(64) % 3
        pix[:, 0] += labels.view(-1, 1, 1).float()  # a learnable signal per class
        tasks.append(
            {
                "name": name,
                "classes": [f"{name} {c}" for c in "abc"],
                "train": TensorDataset(pix[:48], labels[:48]),
                "eval": TensorDataset(pix[48:], labels[48:]),
            }
        )

    def tokenize(prompts):  # a stand-in tokenizer: one id per word, padded to 8
        ids = [[1 + (hash(w) % 60) for w in p.split()][:8] for p in prompts]
        ids = [x + [0] * (8 - len(x)) for x in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) > 0).long()}

    return model, tokenize, tasks


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    accelerator = Accelerator(cpu=args.smoke)
    if args.smoke:
        base, tokenize, tasks = smoke_setup()
        args.steps, args.batch_size = 6, 16
    else:
        from transformers import CLIPModel, CLIPProcessor

        if not args.tasks:
            raise SystemExit("--tasks is required (see the docstring); or use --smoke.")
        processor = CLIPProcessor.from_pretrained(args.model)
        base = CLIPModel.from_pretrained(args.model)
        tasks = hub_tasks(args.tasks, processor)

        def tokenize(prompts):
            return dict(processor.tokenizer(prompts, padding=True, return_tensors="pt"))

    overrides = {"task_names": [tasks[0]["name"]]}
    if not args.both_towers:
        overrides["target_modules"] = VISION_MLPS
    if args.smoke:
        overrides.update(num_experts=4, r=8, selector_epochs=20)
    model = get_peft_model(base, load_preset("moecl-paper-mtil", **overrides))

    def features(output):  # transformers 5 returns an output whose pooler_output is the projected embedding
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def text_embeddings(task):
        with model.route(task["name"]), torch.no_grad():
            batch = {
                k: v.to(accelerator.device)
                for k, v in tokenize([f"a photo of a {c}." for c in task["classes"]]).items()
            }
            return F.normalize(features(model.get_text_features(**batch)), dim=-1)

    def logits(pixels, text):
        image = F.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
        return model.logit_scale.exp() * image @ text.T

    names = [t["name"] for t in tasks]
    matrix = [[None] * len(tasks) for _ in tasks]
    agnostic = [[None] * len(tasks) for _ in tasks]
    for i, task in enumerate(tasks):
        if i > 0:
            model.add_task(task["name"])  # ends the previous task first (activate-freeze) if needed
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        loader = DataLoader(task["train"], batch_size=args.batch_size, shuffle=True, drop_last=True)
        wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        text = text_embeddings(task)
        step = 0
        wrapped.train()
        while step < args.steps:
            for pixels, labels in loader:
                with model.route(task["name"]):
                    loss = F.cross_entropy(logits(pixels, text), labels) + model.get_regularization_loss()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                if step >= args.steps:
                    break
        model.end_task(task["name"])
        train_pixels = DataLoader(task["train"], batch_size=args.batch_size)
        # DDAS reads the image features of the first routed layer: pixel inputs only
        model.fit_task_selector(task["name"], ({"pixel_values": p.to(accelerator.device)} for p, _ in train_pixels))
        wrapped.eval()
        for j, seen in enumerate(tasks[: i + 1]):
            seen_text = text_embeddings(seen)
            correct = correct_auto = total = 0
            with torch.no_grad():
                for pixels, labels in DataLoader(seen["eval"], batch_size=args.batch_size):
                    pixels, labels = pixels.to(accelerator.device), labels.to(accelerator.device)
                    with model.route(seen["name"]):
                        correct += (logits(pixels, seen_text).argmax(-1) == labels).sum().item()
                    picked = model.predict_tasks({"pixel_values": pixels})
                    for k, name in enumerate(picked):  # a wrong or no task pick counts as a miss
                        if name == seen["name"]:
                            with model.route(name):
                                correct_auto += int(
                                    logits(pixels[k : k + 1], seen_text).argmax(-1).item() == labels[k].item()
                                )
                    total += len(labels)
            matrix[i][j], agnostic[i][j] = correct / total, correct_auto / total
        accelerator.print(
            f"after {task['name']}: {[round(a, 3) for a in matrix[i][: i + 1]]} "
            f"(task-agnostic {[round(a, 3) for a in agnostic[i][: i + 1]]})"
        )

    if accelerator.is_main_process:
        out = Path(args.output_dir)
        accelerator.unwrap_model(wrapped).save_pretrained(str(out))
        scores = compute_continual_metrics(matrix)
        metrics = {
            "method": "moecl",
            "tasks": names,
            "accuracy": matrix,
            "accuracy_task_agnostic": agnostic,
            **{k: scores[k] for k in ("avg", "last", "bwt", "forgetting")},
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        accelerator.print(json.dumps(metrics))


if __name__ == "__main__":
    main()
