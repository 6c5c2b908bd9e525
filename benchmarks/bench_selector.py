"""Task selectors side by side: which task an input belongs to, when nobody says.

    python benchmarks/bench_selector.py [--sequences in_domain,default] [--epochs 3]
                                        [--selectors prototype/deep,prototype-lda/deep,...]
                                        [--output-dir outputs/bench_selector]

For each sequence, MoE-CL (preset ``moecl-bert``) is trained once on all-MiniLM-L6-v2; then every selector variant
is fitted on the same trained model (task by task, on each task's training inputs) and measured on the eval
splits:

* ``autoencoder/shallow``  DDAS as the paper has it: per-task autoencoders on the first routed layer's input;
* ``autoencoder/deep``     the same autoencoders on the frozen base model's mean-pooled last hidden state;
* ``prototype/shallow``    class means (cosine) of the first routed layer's input;
* ``prototype/deep``       class means of the base model's last hidden state (one extra base pass per forward);
* ``prototype-lda/deep``   the same class statistics compared through a linear discriminant (a covariance pooled
                           over the tasks, ``selector_scoring="lda"``), the out-of-distribution test unchanged;
* ``prototype/deep+shallow``  class means of both, each of unit length, side by side (the default; the shallow
                           part mean-pooled): the same extra pass;
* ``max-confidence``       one LoRA adapter (and head) per task, the most confident adapter + head wins (one
                           forward per task: its cost is the number of tasks, by construction).

``--selectors`` runs only the variants named (``max-confidence`` trains one more model per sequence).

Columns: task identification (share of eval inputs routed to their own task), task-agnostic Last, task-aware Last
(the same for every selector of a sequence), out-of-distribution inputs sent to the base model (the other
sequence's eval texts: for ``in_domain``, Italian and Spanish quotations and English ones of other topics; for
``default``, English quotations of other topics), in all and per task of the other sequence, and the cost of a
``task_ids="auto"`` forward relative to a forward with the task named (median of repeats, batch 64, 1 thread).

Sequences (``benchmarks/sequences.py``): ``default`` is the embedded en/it/es sequence (tasks differ by language);
``in_domain`` is the four English topic tasks of ``trainers/data/zero_shot`` run as classification (tasks differ
by topic only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from sequences import sequence  # benchmarks/sequences.py
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

import peft_ext  # noqa: F401
from peft_ext.trainers import ContinualSchedule, ContinualTrainingArguments, default_model_path
from peft_ext.trainers.strategies import default_method_config


SELECTORS = {
    "autoencoder/shallow": {"selector": "autoencoder", "selector_features": "shallow"},
    "autoencoder/deep": {"selector": "autoencoder", "selector_features": "deep"},
    "prototype/shallow": {"selector": "prototype", "selector_features": "shallow"},
    "prototype/deep": {"selector": "prototype", "selector_features": "deep"},
    "prototype-lda/deep": {"selector": "prototype", "selector_features": "deep", "selector_scoring": "lda"},
    "prototype/deep+shallow": {"selector": "prototype", "selector_features": "deep+shallow"},
}
MAX_CONFIDENCE = "max-confidence"


def refit(schedule: ContinualSchedule, options: dict) -> None:
    """Replace the trained model's selector by a fresh one of ``options``, fitted task by task."""
    model = schedule._peft_model
    config = model.peft_config["default"]
    # every field some variant sets starts from its default: a variant does not inherit the previous one's options
    fields = {f.name: f for f in dataclasses.fields(config)}
    unknown = [k for k in options if k not in fields]
    if unknown:  # setattr would pass silently and the row would measure the default selector
        raise ValueError(f"{type(config).__name__} has no field {unknown}: this variant needs a newer peft_ext.")
    varied = set().union(*SELECTORS.values()) & set(fields)
    options = {k: fields[k].default for k in varied} | options
    for key, value in options.items():
        setattr(config, key, value)
    config.selector_tasks, config.selector_classes = [], []
    config.selector_feature_dim, config.selector_reference = None, False
    model.base_model._delete_task_selector("default")
    model.base_model._init_task_selector("default")
    for task in schedule.tasks:
        batches, labels = schedule._input_batches(task)
        model.fit_task_selector(task.name, batches, labels=labels)


@torch.no_grad()
def ood_to_base(schedule: ContinualSchedule, others) -> dict[str, float]:
    """The share of the other sequence's eval inputs sent to the base model: per task of it, and ``"all"``."""
    model, shares, sent_all, total_all = schedule._peft_model, {}, 0, 0
    schedule.classifier.eval()
    for task in others:
        sent = total = 0
        for batch in schedule._loader(schedule.encode(task, "eval"), False):
            picks = model.predict_tasks({k: v.to(schedule._device()) for k, v in batch.items()})
            sent += sum(p is None for p in picks)
            total += len(picks)
        shares[task.name] = sent / total
        sent_all, total_all = sent_all + sent, total_all + total
    return {"all": sent_all / total_all, **shares}


@torch.no_grad()
def auto_cost(schedule: ContinualSchedule, repeats: int = 7) -> float:
    """Seconds of a task_ids="auto" forward / seconds of a forward with the task named (same batch)."""
    model, task = schedule._peft_model, schedule.tasks[-1]
    batch = next(iter(schedule._loader(schedule.encode(task, "eval"), False)))
    times = {"auto": [], task.name: []}
    model.eval()
    for _ in range(repeats):
        for ids in times:
            start = time.perf_counter()
            model(**batch, task_ids=ids)
            times[ids].append(time.perf_counter() - start)
    return statistics.median(times["auto"]) / statistics.median(times[task.name])


def agnostic(schedule: ContinualSchedule) -> tuple[float, float]:
    """Task-agnostic Last and task identification after the last task."""
    seen = [t.name for t in schedule.tasks]
    accs, right, total = [], 0, 0
    for task in schedule.tasks:
        acc, picked, _, n = schedule.evaluate_task_agnostic(task, seen)
        accs.append(acc)
        right, total = right + picked, total + n
    return sum(accs) / len(accs), right / total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", default="in_domain,default")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selectors", default=",".join([*SELECTORS, MAX_CONFIDENCE]), help="Variants to run.")
    parser.add_argument("--output-dir", default="outputs/bench_selector")
    args = parser.parse_args(argv)
    chosen = args.selectors.split(",")
    unknown = set(chosen) - {*SELECTORS, MAX_CONFIDENCE}
    if unknown:
        parser.error(f"unknown selectors {sorted(unknown)}; choose among {[*SELECTORS, MAX_CONFIDENCE]}")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    out = Path(args.output_dir)
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = []
    for name in args.sequences.split(","):
        tasks = sequence(name)
        others = sequence("default" if name == "in_domain" else "in_domain")

        def train(method, config, folder):
            targs = ContinualTrainingArguments(
                output_dir=str(out / name / folder), method=method, epochs=args.epochs, seed=args.seed,
                disable_tqdm=True, resume=False, overwrite=True, plots=False,
            )  # fmt: skip
            schedule = ContinualSchedule(tasks, targs, model=model_path, tokenizer=tokenizer, method_config=config)
            return schedule, schedule.run()

        schedule, result = train("moecl", default_method_config("moecl", "bert"), "moecl")
        aware = result.scores["last"]
        for variant in [v for v in SELECTORS if v in chosen]:
            options = SELECTORS[variant]
            refit(schedule, options)
            last, ident = agnostic(schedule)
            row = dict(sequence=name, selector=variant, identification=ident, agnostic_last=last, aware_last=aware)
            row.update(ood_to_base=ood_to_base(schedule, others), cost=auto_cost(schedule))
            rows.append(row)
            print(row, flush=True)
        if MAX_CONFIDENCE not in chosen:
            (out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
            continue
        _, lora = train("lora", {"adapter_per_task": True}, "lora-separate")
        rows.append(
            dict(
                sequence=name,
                selector=MAX_CONFIDENCE,
                identification=lora.task_identification,
                agnostic_last=lora.scores_task_agnostic["last"],
                aware_last=lora.scores["last"],
                ood_to_base=None,
                cost=None,
            )  # fmt: skip  (its cost: one forward per task, by construction)
        )
        (out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")

    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = [
        "| sequence | selector | task id. | task-agnostic Last | task-aware Last | OOD to base | OOD to base, per task "
        "| auto / named |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ood = r["ood_to_base"] or {}
        cells = [r["sequence"], r["selector"], pct(r["identification"]), pct(r["agnostic_last"])]
        cells += [
            pct(r["aware_last"]),
            pct(ood.get("all")),
            " / ".join(f"{k} {pct(v)}" for k, v in ood.items() if k != "all") or "n/a",
        ]
        cells.append(f"{r['cost']:.2f}" if r["cost"] is not None else f"{len(sequence(r['sequence']))} forwards")
        lines.append("| " + " | ".join(cells) + " |")
    env = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"
    text = "\n".join(lines) + f"\n\nSetting: MoE-CL preset moecl-bert, epochs {args.epochs}, seed {args.seed}; {env}.\n"
    (out / "bench.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
