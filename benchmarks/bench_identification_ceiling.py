"""How well can the tasks of a sequence be told apart at all? Upper bounds on task identification.

    python benchmarks/bench_identification_ceiling.py [--sequences in_domain,default] [--seeds 0,1,2]
                                                      [--epochs 6] [--output-dir outputs/bench_identification_ceiling]

A task selector (``task_ids="auto"``, :mod:`peft_ext.routing.selector`) reads the *frozen* base model and learns
task by task, without the earlier tasks' rows. Two readers that break both rules, on all-MiniLM-L6-v2:

* ``linear probe``: a logistic regression over all the tasks' classes on the frozen model's mean-pooled last
  hidden state, trained on every task's rows at once (its weight decay chosen on validation);
* ``joint fine-tuning``: the whole encoder plus a linear head over all the classes, fine-tuned on every task's rows
  at once (AdamW 5e-5, batch 16; its epoch chosen on validation): what a model may reach when it sees all the data
  and adapts its own features -- more than any continual selector gets.

Both pick a class; the input is assigned to that class's task, as the prototype selector does.

Each task's training rows are split 80 / 20 (seeded) into fit and validation rows; every choice is made on the
validation rows; the eval splits are scored once, at the chosen setting (the test figures). Identification: share
of eval inputs assigned to their own task.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sequences import sequence  # benchmarks/sequences.py
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from peft_ext.trainers import default_model_path


MAX_LENGTH = 128  # as bench_selector tokenizes
WEIGHT_DECAYS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


def split_rows(tasks, seed: int) -> tuple[dict[str, list[tuple[str, int]]], torch.Tensor]:
    """``({"fit" | "validation" | "eval": [(text, class index)]}, task of each class (C,))``: the classes of all
    tasks numbered in task order."""
    out, class_task = {"fit": [], "validation": [], "eval": []}, []
    for index, task in enumerate(tasks):
        offset = len(class_task)
        class_task += [index] * len(task.labels)
        texts = [str(t) for t in task.train[task.text_column]]
        labels = [offset + c for c in task.label_ids(task.train[task.label_column])]
        order = list(range(len(texts)))
        random.Random(seed + index).shuffle(order)
        cut = int(0.8 * len(order))
        out["fit"] += [(texts[i], labels[i]) for i in order[:cut]]
        out["validation"] += [(texts[i], labels[i]) for i in order[cut:]]
        out["eval"] += [
            (str(t), offset + c)
            for t, c in zip(task.eval[task.text_column], task.label_ids(task.eval[task.label_column]))
        ]
    return out, torch.tensor(class_task)


def mean_pooled(encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled last hidden state ``(len(texts), hidden)`` (gradients flow if enabled)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def identification(logits: torch.Tensor, rows, class_task: torch.Tensor) -> float:
    """Share of ``rows`` whose best-scoring class (``logits`` ``(N, C)``) belongs to their own class's task."""
    truth = class_task[torch.tensor([c for _, c in rows])]
    return (class_task[logits.argmax(-1)] == truth).float().mean().item()


def linear_probe(rows, class_task: torch.Tensor, encoder, tokenizer, seed: int) -> dict:
    """Logistic regression on frozen features; weight decay chosen on validation (full-batch, 300 Adam steps)."""
    with torch.no_grad():
        feats = {
            split: torch.cat(
                [mean_pooled(encoder, tokenizer, [t for t, _ in part[i : i + 64]]) for i in range(0, len(part), 64)]
            )
            for split, part in rows.items()
        }
    mean, std = feats["fit"].mean(0), feats["fit"].std(0) + 1e-6
    x = {split: (f - mean) / std for split, f in feats.items()}
    y = torch.tensor([t for _, t in rows["fit"]])

    def fit(decay: float) -> torch.nn.Linear:
        torch.manual_seed(seed)
        head = torch.nn.Linear(x["fit"].shape[1], len(class_task))
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=decay)
        for _ in range(300):
            loss = F.cross_entropy(head(x["fit"]), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return head

    heads = {decay: fit(decay) for decay in WEIGHT_DECAYS}
    with torch.no_grad():
        scores = {
            decay: identification(head(x["validation"]), rows["validation"], class_task)
            for decay, head in heads.items()
        }
        best = max(WEIGHT_DECAYS, key=lambda d: scores[d])
        test = identification(heads[best](x["eval"]), rows["eval"], class_task)
    return {"choice": f"weight decay {best:g}", "validation": scores[best], "test": test}


def joint_fine_tuning(rows, class_task: torch.Tensor, model_path: str, tokenizer, seed: int, epochs: int) -> dict:
    """Encoder + head fine-tuned on every task's fit rows; the epoch with the best validation score is tested."""
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(model_path)
    head = torch.nn.Linear(encoder.config.hidden_size, len(class_task))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=5e-5)
    fit_rows, order = list(rows["fit"]), random.Random(seed)
    best = {"validation": -1.0}
    for epoch in range(1, epochs + 1):
        encoder.train()
        order.shuffle(fit_rows)
        for i in range(0, len(fit_rows), 16):
            part = fit_rows[i : i + 16]
            loss = F.cross_entropy(
                head(mean_pooled(encoder, tokenizer, [t for t, _ in part])), torch.tensor([t for _, t in part])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        encoder.eval()
        with torch.no_grad():
            scored = {
                split: identification(
                    torch.cat(
                        [
                            head(mean_pooled(encoder, tokenizer, [t for t, _ in rows[split][i : i + 64]]))
                            for i in range(0, len(rows[split]), 64)
                        ]
                    ),
                    rows[split],
                    class_task,
                )
                for split in ("validation", "eval")
            }
        print(f"  joint fine-tuning, epoch {epoch}: validation {100 * scored['validation']:.1f}", flush=True)
        if scored["validation"] > best["validation"]:
            best = {"choice": f"epoch {epoch}", "validation": scored["validation"], "test": scored["eval"]}
    return best


def table(results: list[dict]) -> str:
    lines = [
        "| sequence | reader | seed | chosen on validation | validation id. | test id. |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['sequence']} | {r['reader']} | {r['seed']} | {r['choice']} | {100 * r['validation']:.1f} | "
            f"{100 * r['test']:.1f} |"
        )
    groups: dict[tuple[str, str], list[float]] = {}
    for r in results:
        groups.setdefault((r["sequence"], r["reader"]), []).append(100 * r["test"])
    for (name, reader), tests in groups.items():
        lines.append(f"| {name} | {reader} | mean of {len(tests)} | | | {statistics.mean(tests):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", default="in_domain")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--output-dir", default="outputs/bench_identification_ceiling")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    frozen = AutoModel.from_pretrained(model_path).eval()
    start, results = time.perf_counter(), []
    for name in args.sequences.split(","):
        tasks = sequence(name)
        for seed in [int(s) for s in args.seeds.split(",")]:
            rows, class_task = split_rows(tasks, seed)
            for reader, run in (
                ("linear probe", lambda: linear_probe(rows, class_task, frozen, tokenizer, seed)),
                (
                    "joint fine-tuning",
                    lambda: joint_fine_tuning(rows, class_task, model_path, tokenizer, seed, args.epochs),
                ),
            ):
                results.append({"sequence": name, "reader": reader, "seed": seed, **run()})
                print(results[-1], flush=True)
    text = table(results)
    print(text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "results": results,
                "seconds": time.perf_counter() - start,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
