"""MTIL continual learning of CLIP ViT-B/16 with MoE-CL (MoE-Adapters4CL's recipe), under accelerate.

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/moecl_clip_mtil.py \
        --order I --both-towers --output-dir out/moecl-mtil-order1
    python examples/moecl_clip_mtil.py --smoke --both-towers --output-dir /tmp/mtil-smoke   # CPU check

MTIL (multi-domain task-incremental learning, from ZSCL) trains CLIP on 11 image-classification data sets in turn.
Classification is CLIP's: cosine similarity between the image embedding and the embeddings of the task's class
prompts (one template per data set, e.g. "a photo of a {}, a type of aircraft."), CLIP's logit scale,
cross-entropy over that task's classes with label smoothing.

The recipe -- the 11 data sets as Hub ids with their templates, orders I and II, the per-data-set learning rates of
the full and the 5-shot variant, iterations, batch size, label smoothing, warmup and cosine schedule -- is the
JSON file ``examples/mtil_tasks.json`` (``--tasks``); its ``sources`` name the reference files the values come
from. Class names are read from each data set's ``ClassLabel`` at load time.

What is adapted: the MoE-CL experts of the ``moecl-paper-mtil`` preset (22 experts, r=64, top-2, 2 frozen per
task) beside every MLP of the image tower, and with ``--both-towers`` of the text tower too (the paper's setting:
the class prompts are then re-embedded under the task's route at every step, as the reference does).

Per task: ``add_task`` (after the first), train, ``end_task`` (activate-freeze, counted on the task's images and,
with both towers, its class prompts), ``fit_task_selector`` on the task's training images. Evaluation, as MTIL
scores it: a zero-shot row before any training (the untouched model), then after every task **every** task, the
ones not trained yet included:

* ``accuracy`` (task id given): trained tasks under their own route; tasks not trained yet have no route of their
  own, so the untouched base model (route ``"none"``) serves them;
* ``accuracy_task_agnostic`` (the reference's protocol, the numbers to compare with the paper): the task selector
  picks a seen task per image, or none (the base model); the image is embedded under that route, the eval task's
  class prompts under the same route, and the prediction among the eval task's classes is scored -- a wrong pick
  is not a miss by itself.

``metrics.json`` (schema: the zero_shot kind of docs/cli.md) holds both matrices, the zero-shot row, avg / last /
bwt / forgetting / transfer / avg_all of each (``peft_ext.trainers.compute_continual_metrics``); the adapter goes to
``--output-dir``. ``--smoke`` runs a tiny random CLIP on three synthetic tasks on CPU (seconds). The full-size runs
are untested in this repository (no GPU here): see examples/README.md for the exact commands.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import peft_ext  # noqa: F401  (registers MOECL with PEFT)
from peft_ext.hub_configs import load_preset
from peft_ext.trainers import compute_continual_metrics


RECIPE = Path(__file__).resolve().parent / "mtil_tasks.json"
VISION_MLPS = r"((.*\.)?vision_model\.)?encoder\.layers\.\d+\.mlp"
MTIL_DATASETS = 11
SCORE_KEYS = ("avg", "last", "bwt", "forgetting", "transfer", "avg_all", "fwt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=str(RECIPE), help="the MTIL recipe (default) or a JSON list of task specs")
    p.add_argument("--order", choices=["I", "II"], default="I", help="MTIL task order (recipe only)")
    p.add_argument("--shots", type=int, default=0, help="0: full training sets; 5: the 5-shot variant's recipe")
    p.add_argument("--model", default=None, help="CLIP checkpoint (default: the recipe's, ViT-B/16)")
    p.add_argument("--output-dir", default="outputs/moecl-mtil")
    p.add_argument("--both-towers", action="store_true", help="experts in the text tower too (the paper's setting)")
    # the recipe's values, overridable for quick checks (a run with overrides is not the paper's recipe)
    p.add_argument("--steps", type=int, default=None, help="iterations per task (recipe: 1000 full, 500 5-shot)")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every task (recipe: per data set)")
    p.add_argument("--batch-size", type=int, default=None, help="global, split across processes (recipe: 64)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="per device (recipe: 128)")
    p.add_argument("--label-smoothing", type=float, default=None, help="recipe: 0.2")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps before the cosine decay (recipe: 100)")
    p.add_argument("--seed", type=int, default=None, help="recipe: 42")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on at most N images per task (not the recipe)")
    p.add_argument(
        "--selector-images", type=int, default=10000, help="training images per task for DDAS and activate-freeze"
    )
    p.add_argument("--num-workers", type=int, default=8, help="DataLoader workers (image decoding)")
    p.add_argument("--smoke", action="store_true", help="tiny random CLIP + 3 synthetic tasks on CPU")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------------------------
def load_recipe(path) -> dict:
    """The MTIL recipe file, checked: 11 data sets, both orders permutations of them, an lr for each per variant."""
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"Cannot read the task file {path}: {err}".replace("\n", " ")) from None
    if isinstance(recipe, list):
        return {"tasks": recipe}
    names = set(recipe["datasets"])
    if len(names) != MTIL_DATASETS:
        raise SystemExit(f"{path}: expected the {MTIL_DATASETS} MTIL data sets, found {len(names)}.")
    for order, listed in recipe["orders"].items():
        if sorted(listed) != sorted(names):
            raise SystemExit(f"{path}: order {order} is not a permutation of the data sets.")
    for variant in ("full", "few_shot"):
        missing = names - set(recipe["recipe"][variant]["lr"])
        if missing:
            raise SystemExit(f"{path}: no {variant} learning rate for {sorted(missing)}.")
    return recipe


def run_settings(args, recipe: dict) -> dict:
    """Training settings: the recipe's (full or 5-shot variant), then the command line's overrides."""
    shared = recipe.get("recipe", {})
    variant = shared.get("few_shot" if args.shots > 0 else "full", {})
    if args.shots > 0 and variant and args.shots != variant.get("shots"):
        print(f"note: the recipe's few-shot settings are for {variant.get('shots')} shots, running {args.shots}.")
    settings = {
        "model": args.model or shared.get("model", "openai/clip-vit-base-patch16"),
        "steps": variant.get("iterations", 1000),
        "batch_size": shared.get("batch_size", 64),
        "eval_batch_size": shared.get("eval_batch_size", 128),
        "label_smoothing": shared.get("label_smoothing", 0.2),
        "warmup": shared.get("warmup_steps", 100),
        "weight_decay": shared.get("weight_decay", 0.0),
        "betas": tuple(shared.get("betas", (0.9, 0.999))),
        "seed": shared.get("seed", 42),
        "crop_scale": tuple(shared.get("train_crop_scale", (0.9, 1.0))),
        "lr_table": variant.get("lr", {}),
        "shots": args.shots,
    }
    if args.smoke:  # a tiny model and a few synthetic steps; the schedule's shape is kept
        settings.update(steps=20, batch_size=16, eval_batch_size=32, warmup=3, lr_table={}, default_lr=3e-2)
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "label_smoothing": args.label_smoothing,
        "warmup": args.warmup,
        "seed": args.seed,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["lr_override"] = args.lr
    return settings


def task_specs(recipe: dict, order: str) -> list[dict]:
    """The task specs in training order: the recipe's data sets in ``order``, or a custom list as given."""
    if "tasks" in recipe:
        return [dict(spec, key=spec.get("key", spec["name"])) for spec in recipe["tasks"]]
    return [dict(recipe["datasets"][key], key=key) for key in recipe["orders"][order]]


def task_lr(spec: dict, settings: dict) -> float:
    if settings["lr_override"] is not None:
        return settings["lr_override"]
    return float(spec.get("lr", settings["lr_table"].get(spec["key"], settings.get("default_lr", 1e-3))))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The reference's schedule (mtil/src/utils.py cosine_lr) as a factor of the base lr: (step + 1) / warmup during
    the warmup, then half a cosine from 1 down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
class HubImages(Dataset):
    """Rows of a Hub image data set as ``(pixel_values, label)``, decoded and transformed lazily (in the loader's
    workers), so that no data set is held in memory as tensors."""

    def __init__(self, ds, image_column: str, label_column: str, transform):
        self.ds, self.image_column, self.label_column, self.transform = ds, image_column, label_column, transform

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        return self.transform(row[self.image_column]), int(row[self.label_column])


class ClipTransform:
    """CLIP preprocessing; ``train=True`` first takes a random crop of 90-100% of the image area (aspect 3/4-4/3)
    resized to the input size, the reference's training augmentation (mtil/clip/clip.py, ``_transform``)."""

    def __init__(self, image_processor, train: bool, scale=(0.9, 1.0)):
        self.processor, self.train, self.scale = image_processor, train, scale
        crop = getattr(image_processor, "crop_size", None)  # a dict, a SizeDict or an int, by version
        height = getattr(crop, "height", None) or (crop.get("height") if hasattr(crop, "get") else crop)
        self.size = int(height or 224)

    def __call__(self, image):
        image = image.convert("RGB")
        if self.train:
            image = self.random_resized_crop(image)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def random_resized_crop(self, image):
        from PIL import Image

        width, height = image.size
        area = width * height
        for _ in range(10):  # torch's generator: the DataLoader seeds it per worker
            u = torch.rand(4).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            ratio = math.exp(math.log(3 / 4) + u[1] * (math.log(4 / 3) - math.log(3 / 4)))
            w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1))
                image = image.crop((left, top, left + w, top + h))
                break
        return image.resize((self.size, self.size), Image.BICUBIC)


def class_names(ds, spec: dict) -> list[str]:
    """The task's class names: the spec's ``classnames`` list, else the label column's ``ClassLabel`` names ('_' read
    as a space). One-line ``SystemExit`` when they are missing, numbers only (MNIST aside) or not ``num_classes``."""
    column = spec.get("label_column", "label")
    if column not in ds.features:
        raise SystemExit(f"{spec['dataset']}: no label column {column!r} (columns: {list(ds.features)}).")
    names = spec.get("classnames") or getattr(ds.features[column], "names", None)
    if not names:
        raise SystemExit(
            f"{spec['dataset']}: column {column!r} is not a ClassLabel with names; add a 'classnames' list to its spec."
        )
    names = [str(n).replace("_", " ").strip() for n in names]
    if all(n.isdigit() for n in names) and not spec.get("numeric_names"):
        raise SystemExit(f"{spec['dataset']}: the label names are numbers; add a 'classnames' list to its spec.")
    expected = spec.get("num_classes")
    if expected is not None and len(names) != expected:
        raise SystemExit(
            f"{spec['dataset']}: {len(names)} classes where MTIL has {expected}; fix the spec (num_classes, "
            "classnames) or pick another Hub copy."
        )
    return names


def few_shot_indices(labels: list[int], shots: int, seed: int) -> list[int]:
    """The first ``shots`` examples of each class met in one shuffled pass over the training set (the reference's
    5-shot subset, mtil/src/models/finetune.py)."""
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        if taken.get(labels[i], 0) < shots:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            keep.append(i)
    return sorted(keep)


def subset(ds, limit: Optional[int], seed: int):
    if limit is None or len(ds) <= limit:
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def hub_tasks(specs: list[dict], processor, settings: dict, args) -> list[dict]:
    """Load every task up front (a bad id or label layout fails before any training)."""
    from datasets import load_dataset

    seed, tasks = settings["seed"], []
    for spec in specs:
        for key in ("name", "dataset", "train_split", "eval_split"):
            if key not in spec:
                raise SystemExit(f"Task spec {spec.get('name', spec)!r} lacks {key!r}.")
        train = load_dataset(spec["dataset"], split=spec["train_split"])
        if spec.get("holdout"):  # a single split, held out at random as the reference does for its 80/20 data sets
            parts = train.train_test_split(test_size=spec["holdout"], seed=seed)
            train, test = parts["train"], parts["test"]
        else:
            test = load_dataset(spec["dataset"], split=spec["eval_split"])
        classes = class_names(train, spec)
        image_col, label_col = spec.get("image_column", "image"), spec.get("label_column", "label")
        if settings["shots"] > 0:
            train = train.select(few_shot_indices(list(train[label_col]), settings["shots"], seed))
        test = subset(test, args.max_eval, seed)
        image_processor = processor.image_processor
        augment = ClipTransform(image_processor, train=True, scale=settings["crop_scale"])
        plain = ClipTransform(image_processor, train=False)
        tasks.append(
            {
                "name": spec["name"],
                "classes": classes,
                "template": spec.get("template", "a photo of a {}."),
                "lr": task_lr(spec, settings),
                "train": HubImages(train, image_col, label_col, augment),
                "train_plain": HubImages(subset(train, args.selector_images, seed), image_col, label_col, plain),
                "eval": HubImages(test, image_col, label_col, plain),
            }
        )
    return tasks


def smoke_setup(seed: int = 0):
    """A tiny random CLIP, a stand-in tokenizer and three synthetic tasks. Each task's images have a bright colour
    channel of their own (three input distributions for the task selector); the class is a brighter horizontal band."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        # eos id 1: the text tower pools the position of the first eos, which the stand-in tokenizer appends
        text_config=dict(
            hidden_size=24,
            vocab_size=99,
            max_position_embeddings=16,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            **tower,
        ),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    base = CLIPModel(config)
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t, name in enumerate(["reds", "greens", "blues"]):
        n_train, n_eval = 48, 24
        labels = torch.arange(n_train + n_eval) % 3
        pix = 0.3 * torch.randn(n_train + n_eval, 3, 32, 32, generator=g)
        pix[:, t] += 2.0
        pix[:, (t + 1) % 3] += labels.view(-1, 1, 1).float()  # the class: the next channel's brightness
        train = TensorDataset(pix[:n_train], labels[:n_train])
        tasks.append(
            {
                "name": name,
                "classes": [f"{name} {c}" for c in ("top", "middle", "bottom")],
                "template": "a photo of a {}.",
                "lr": None,
                "train": train,
                "train_plain": train,
                "eval": TensorDataset(pix[n_train:], labels[n_train:]),
            }
        )

    def tokenize(prompts):  # one id per word (a stable hash), then eos; padded with 0
        ids = [[3 + zlib.crc32(w.encode()) % 95 for w in p.split()][:14] + [1] for p in prompts]
        width = max(len(x) for x in ids)
        ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        mask = torch.ones_like(ids)
        for row, x in zip(mask, (p.split() for p in prompts)):
            row[min(len(x), 14) + 1 :] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return base, tokenize, tasks


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------
def build_model(base, first_task: str, args, seed: int = 0):
    """The MoE-CL model of the ``moecl-paper-mtil`` preset (image tower only unless ``--both-towers``); the smoke
    mode shrinks it. Seeded, so that a test can rebuild the initial adapter."""
    overrides = {"task_names": [first_task]}
    if not args.both_towers:
        overrides["target_modules"] = VISION_MLPS
    if args.smoke:
        overrides.update(num_experts=4, r=8, scaling=1.0, selector_hidden=8, selector_epochs=40, selector_batch_size=32)
    torch.manual_seed(seed)
    return get_peft_model(base, load_preset("moecl-paper-mtil", **overrides))


def embeddings(output) -> torch.Tensor:
    """transformers 5's get_*_features return an output whose pooler_output is the projected embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipClassifier(nn.Module):
    """The training forward, one module so that accelerate's DDP wrapper sees it: CLIP logits of a batch of images
    against the task's class prompts -- embedded here when the text tower trains (both towers), else given."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft = peft_model

    def forward(self, pixel_values, text_inputs=None, text_embeds=None):
        if text_embeds is None:
            return self.peft(pixel_values=pixel_values, **text_inputs).logits_per_image
        image = F.normalize(embeddings(self.peft.get_image_features(pixel_values=pixel_values)), dim=-1)
        return self.peft.logit_scale.exp() * image @ text_embeds.T


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    recipe = load_recipe(args.tasks)  # checked in smoke mode too
    settings = run_settings(args, recipe)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)  # a batch may leave experts unused
    accelerator = Accelerator(cpu=args.smoke, kwargs_handlers=[ddp])
    set_seed(settings["seed"])
    workers = 0 if args.smoke else args.num_workers
    if args.smoke:
        base, tokenize, tasks = smoke_setup()
        for task in tasks:
            task["lr"] = settings["lr_override"] or settings["default_lr"]
    else:
        from transformers import CLIPModel, CLIPProcessor

        processor = CLIPProcessor.from_pretrained(settings["model"])
        base = CLIPModel.from_pretrained(settings["model"])
        tasks = hub_tasks(task_specs(recipe, args.order), processor, settings, args)

        def tokenize(prompts):
            return dict(processor.tokenizer(prompts, padding=True, return_tensors="pt"))

    model = build_model(base, tasks[0]["name"], args, settings["seed"]).to(accelerator.device)
    # the reference trains with one global batch of 64 (DataParallel): keep it global across processes
    per_device, rest = divmod(settings["batch_size"], accelerator.num_processes)
    if rest or not per_device:
        raise SystemExit(
            f"--batch-size {settings['batch_size']} does not split over {accelerator.num_processes} processes."
        )
    device, names, T = accelerator.device, [t["name"] for t in tasks], len(tasks)

    def prompts(task) -> dict:
        batch = tokenize([task["template"].format(c) for c in task["classes"]])
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def text_embeddings(task, route: str) -> torch.Tensor:
        """Normalized embeddings of ``task``'s class prompts under ``route`` (a task name or "none")."""
        batch, chunks = prompts(task), []
        with model.route(route), accelerator.autocast():
            for start in range(0, batch["input_ids"].shape[0], 512):
                part = {k: v[start : start + 512] for k, v in batch.items()}
                chunks.append(embeddings(model.get_text_features(**part)).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    for task in tasks:
        loader = DataLoader(task["eval"], batch_size=settings["eval_batch_size"], num_workers=workers)
        task["eval_loader"] = accelerator.prepare(loader)  # sharded across processes; gather_for_metrics undoes it

    @torch.no_grad()
    def evaluate(j: int, route: str) -> float:
        """Task-aware: task ``j``'s images and class prompts both under ``route``."""
        text, correct = text_embeddings(tasks[j], route), []
        model.eval()
        for pixels, labels in tasks[j]["eval_loader"]:
            with model.route(route), accelerator.autocast():
                image = F.normalize(embeddings(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
            correct.append(accelerator.gather_for_metrics(((image @ text.T).argmax(-1) == labels).long()))
        correct = torch.cat(correct)
        return int(correct.sum()) / len(correct)

    @torch.no_grad()
    def evaluate_agnostic(j: int, trained: int, cache: dict) -> tuple[float, int, int, int]:
        """Task-agnostic, as the reference scores MTIL: the selector picks each image's route (a seen task, or None:
        the base model); the image is embedded under it (one forward, each image under its own pick), task ``j``'s
        class prompts under the same route (cached per (task, route) for the row), and the prediction among task
        ``j``'s classes is scored. Returns the accuracy, the images routed right (to task ``j`` when it is trained,
        to the base model when not), the images sent to the base model, and the number of images."""
        expected = tasks[j]["name"] if j <= trained else None
        correct, right, to_base = [], [], []
        model.eval()
        for pixels, labels in tasks[j]["eval_loader"]:
            with model.route("auto"), accelerator.autocast():  # one route block per forward: a fresh decision
                image = F.normalize(embeddings(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
            picks = model.routed_tasks()
            preds = torch.empty(len(picks), dtype=torch.long, device=device)
            for pick in set(picks):
                route = pick if pick is not None else "none"
                if (j, route) not in cache:
                    cache[(j, route)] = text_embeddings(tasks[j], route)
                rows = torch.tensor([k for k, p in enumerate(picks) if p == pick], device=device)
                preds[rows] = (image[rows] @ cache[(j, route)].T).argmax(-1)
            flags = torch.tensor([[p == expected, p is None] for p in picks], dtype=torch.long, device=device)
            correct.append(accelerator.gather_for_metrics((preds == labels).long()))
            routed = accelerator.gather_for_metrics(flags)
            right.append(routed[:, 0])
            to_base.append(routed[:, 1])
        correct, right, to_base = torch.cat(correct), torch.cat(right), torch.cat(to_base)
        return int(correct.sum()) / len(correct), int(right.sum()), int(to_base.sum()), len(correct)

    # zero-shot row: every task before any training, the untouched model
    zero_shot = [evaluate(j, "none") for j in range(T)]
    accelerator.print(f"zero-shot: {[round(a, 3) for a in zero_shot]}")

    matrix = [[None] * T for _ in range(T)]
    agnostic = [[None] * T for _ in range(T)]
    identification, unseen = [0, 0], [0, 0]
    trainable: set[str] = set()  # every parameter trained by some task
    train_seconds = 0.0
    for i, task in enumerate(tasks):
        started = time.perf_counter()
        if i > 0:
            model.add_task(task["name"])  # ends the previous task first if needed; only the new task trains
        params = [p for p in model.parameters() if p.requires_grad]
        trainable |= {n for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(
            params, lr=task["lr"], weight_decay=settings["weight_decay"], betas=settings["betas"]
        )
        steps, warmup = settings["steps"], settings["warmup"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, steps))
        loader = DataLoader(task["train"], batch_size=per_device, shuffle=True, drop_last=False, num_workers=workers)
        wrapped, optimizer, loader = accelerator.prepare(ClipClassifier(model), optimizer, loader)
        if len(loader) == 0:
            raise SystemExit(f"Task {task['name']!r} has no training batch.")
        text_inputs = prompts(task)
        # image tower only: the text tower is frozen and unrouted, its class embeddings are fixed for the task
        fixed_text = None if args.both_towers else text_embeddings(task, task["name"])
        wrapped.train()
        step = 0
        while step < steps:  # iterations, cycling over the (few-shot) training set as often as needed
            for pixels, labels in loader:
                with model.route(task["name"]):
                    logits = wrapped(pixels, text_inputs=text_inputs, text_embeds=fixed_text)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=settings["label_smoothing"])
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                if step >= steps:
                    break
        # every process walks the same (unsharded) images, so activate-freeze and the selector agree across them
        size = settings["eval_batch_size"]

        def images():  # a fresh pass each time, batch by batch
            loader = DataLoader(task["train_plain"], batch_size=size, num_workers=workers)
            return ({"pixel_values": p.to(device)} for p, _ in loader)

        # Activate-freeze counts each tower's routes: the task's images, and with both towers its class prompts.
        model.end_task(task["name"], batches=itertools.chain(images(), [text_inputs] if args.both_towers else []))
        model.fit_task_selector(task["name"], images(), seed=settings["seed"])
        train_seconds += time.perf_counter() - started
        # row i: every task, trained or not
        cache: dict = {}
        for j in range(T):
            matrix[i][j] = evaluate(j, tasks[j]["name"] if j <= i else "none")
            agnostic[i][j], right, to_base, n = evaluate_agnostic(j, i, cache)
            if i == T - 1:
                identification = [identification[0] + right, identification[1] + n]
            if j > i:
                unseen = [unseen[0] + to_base, unseen[1] + n]
        accelerator.print(
            f"after {task['name']}: task-aware {[round(a, 3) for a in matrix[i]]}, "
            f"task-agnostic {[round(a, 3) for a in agnostic[i]]}"
        )

    if not accelerator.is_main_process:
        return {}
    out = Path(args.output_dir)
    model.save_pretrained(str(out))
    aware = compute_continual_metrics(matrix, zero_shot=zero_shot)
    free = compute_continual_metrics(agnostic, zero_shot=zero_shot)
    metrics = {
        "method": "moecl",
        "kind": "zero_shot",
        "tasks": names,
        "accuracy": matrix,
        "accuracy_task_agnostic": agnostic,
        "accuracy_zero_shot": zero_shot,
        **{k: aware[k] for k in SCORE_KEYS},
        "scores_task_agnostic": {k: free[k] for k in SCORE_KEYS},
        "task_identification": identification[0] / identification[1] if identification[1] else None,
        "unseen_to_base": unseen[0] / unseen[1] if unseen[1] else None,
        "trainable_params": sum(p.numel() for n, p in model.named_parameters() if n in trainable),
        "trainable_params_text_tower": sum(
            p.numel() for n, p in model.named_parameters() if n in trainable and ".text_model." in n
        ),
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "run": {
            "smoke": args.smoke,
            "both_towers": args.both_towers,
            "order": None if args.smoke or "tasks" in recipe else args.order,
            "shots": settings["shots"],
            "seed": settings["seed"],
            "model": "tiny random CLIP" if args.smoke else settings["model"],
            "steps": settings["steps"],
            "batch_size": settings["batch_size"],
            "batch_size_per_device": per_device,
            "processes": accelerator.num_processes,
            "label_smoothing": settings["label_smoothing"],
            "warmup": settings["warmup"],
            "lr": {t["name"]: t["lr"] for t in tasks},
            "templates": {t["name"]: t["template"] for t in tasks},
            "num_classes": {t["name"]: len(t["classes"]) for t in tasks},
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.print(json.dumps({k: metrics[k] for k in SCORE_KEYS}))
    accelerator.print(f"task-agnostic (MTIL's protocol): {json.dumps(metrics['scores_task_agnostic'])}")
    return metrics


if __name__ == "__main__":
    main()
