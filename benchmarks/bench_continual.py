"""Continual benchmark on an embedded default sequence: one table, one run.

    python benchmarks/bench_continual.py [--variants lora,lora-separate,resora,ana,moecl] [--epochs N]
                                         [--output-dir outputs/bench_continual] [--lr LR] [--seed 0]
    python benchmarks/bench_continual.py --lrs 1e-3,3e-3,1e-2     # every variant at every learning rate
    python benchmarks/bench_continual.py --kind zero_shot         # the zero-shot sequence: Transfer, MTIL's Avg
    python benchmarks/bench_continual.py --sequence domain_incremental   # or in_domain (benchmarks/sequences.py)

With ``--lrs`` each variant runs at each learning rate; the table lists every run and the goals are checked on
each variant's best run by Last. The eval splits double as test splits here, so "best learning rate" is an
optimistic choice -- made alike for every variant, baselines included.

Variants (each a full ``ContinualSchedule`` run on all-MiniLM-L6-v2 and the fortunes sequence of
``trainers/data``, with the same TrainingArguments):

* ``lora``           one LoRA adapter shared by all tasks, trained sequentially (the forgetting baseline);
* ``lora-separate``  a fresh LoRA adapter per task (reference for "Last"); its task-agnostic columns route each
                     input to the per-task adapter + head with the **maximum softmax confidence**;
* ``resora``         one shared ReSoRA adapter (preset ``resora-bert``), trained sequentially;
* ``ana``            AnA (preset ``ana-bert``): add_task / end_task per task;
* ``moecl``          MoE-CL (preset ``moecl-bert``: finished tasks isolated, 2 experts frozen per task): add_task /
                     end_task (activate-freeze), DDAS task selector; task-agnostic columns route by the selector.
* ``moecl-drift``    the same with ``isolate_finished_tasks=False`` (the paper: finished tasks' routers may keep
                     picking experts that later tasks train, so they drift).

Writes ``bench.json`` and ``bench.md`` (the table) in the output folder and prints the table plus the issue's goals
(forgetting <= 0.5 points and Last within 3 points of separate adapters for ana/moecl; moecl task identification
>= 90 % and task-agnostic Last above max-confidence routing).

``--kind zero_shot`` runs the embedded zero_shot sequence (four English topic tasks, ``trainers/data/zero_shot``):
every task is scored before training too, and the table adds a ``zero-shot`` row (the untouched model: every row
of its matrix is the zero-shot row), Transfer, MTIL's Avg, and for the task-agnostic run its Transfer and the share
of inputs of not-yet-trained tasks the selector sent to the base model. Goals (moecl): Transfer within 1 point of
the zero-shot model's, forgetting <= 0.5 points, Last at least 10 points above zero-shot.

``--kind generation`` runs the embedded generation sequence (three one-word-answer tasks, ``trainers/data/generation``)
on the default decoder (SmolLM2-135M-Instruct, ``default_model_path("generation")``) with the presets of its model
family (``<method>-llama``). Variants: ``zero-shot`` (the untouched model: every row of its matrix is its zero-shot
row, scored directly, ROUGE-L included), ``lora``, ``lora-separate``, ``ana``, ``moecl``. Columns: Last, Avg, BWT,
Forgetting (exact match, points), ROUGE-L Last, task-agnostic Last and task identification (where the schedule routes
generation task-agnostically: methods with a task selector; one LoRA per task has none for this kind, so n/a), train
time. Goals: ana and moecl forgetting <= 1 point and Last within 3 points of LoRA per task; task identification
>= 90 %.

Choosing settings without the eval rows: ``--validation N`` holds out N rows of each task's train split (a seeded
sample) and scores them in place of the eval split (training on the rest); ``--config-for VARIANT=JSON`` (repeatable)
sets method-config options over the preset, e.g. ``--config-for 'moecl={"scaling": 1.0}'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import time
from pathlib import Path

import torch
from sequences import SEQUENCES, sequence  # benchmarks/sequences.py
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import peft_ext  # noqa: F401
from peft_ext.trainers import (
    ContinualSchedule,
    ContinualTrainingArguments,
    default_model_path,
    default_task_stream,
    format_summary,
)
from peft_ext.trainers.continual import DEFAULT_EPOCHS
from peft_ext.trainers.generation import GenerationTaskModel, answer_length, encode_examples, load_generation_metric
from peft_ext.trainers.metrics import compute_continual_metrics
from peft_ext.trainers.strategies import default_method_config
from peft_ext.trainers.task_stream import Task, load_pretrained


VARIANTS = {
    "lora": ("lora", {}),
    "lora-separate": ("lora", {"adapter_per_task": True}),
    "resora": ("resora", None),  # None: the preset for the model family
    "ana": ("ana", None),
    "moecl": ("moecl", None),
    "moecl-drift": ("moecl", {"isolate_finished_tasks": False}),  # on top of the preset
}
GENERATION_VARIANTS = ("zero-shot", "lora", "lora-separate", "ana", "moecl")


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def zero_shot_row(rows: list[dict]) -> dict:
    """The untouched model as a row: its accuracy matrix repeats the zero-shot row after every step."""
    zs = rows[0]["accuracy_zero_shot"]
    mean = sum(zs) / len(zs)
    return {"variant": "zero-shot", "last": mean, "avg_all": mean, "transfer": sum(zs[1:]) / max(1, len(zs) - 1)}


def zero_shot_table(rows: list[dict]) -> str:
    cols = ["variant", "lr", "Transfer", "Avg (MTIL)", "Last", "Forgetting", "agnostic Transfer", "agnostic Last"]
    cols += ["unseen to base", "task id.", "train s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in [zero_shot_row(rows), *rows]:
        agnostic = r.get("scores_task_agnostic") or {}
        cells = [
            r["variant"],
            f"{r.get('lr', '')}",
            pct(r["transfer"]),
            pct(r["avg_all"]),
            pct(r["last"]),
            pct(r.get("forgetting")),
            pct(agnostic.get("transfer")),
            pct(agnostic.get("last")),
            pct(r.get("unseen_to_base")),
            pct(r.get("task_identification")),
            f"{r['train_seconds']:.0f}" if "train_seconds" in r else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zero_shot_goals(rows: dict[str, dict]) -> list[str]:
    """The zero-shot issue's goals, checked on the measured rows (moecl against the untouched model)."""
    out = []
    for name, r in rows.items():
        if not name.startswith("moecl"):
            continue
        zs = zero_shot_row([r])
        gap = 100 * abs(r["transfer"] - zs["transfer"])
        out.append(f"{name}: Transfer {gap:.2f} points from the zero-shot model's (goal <= 1): {_verdict(gap <= 1)}")
        forgetting = 100 * r["forgetting"]
        out.append(f"{name}: forgetting {forgetting:.2f} points (goal <= 0.5): {_verdict(forgetting <= 0.5)}")
        gain = 100 * (r["last"] - zs["last"])
        out.append(f"{name}: Last {gain:+.2f} points over zero-shot (goal >= 10): {_verdict(gain >= 10)}")
    return out


def learned_goals(rows: dict[str, dict]) -> list[str]:
    """Every task learned: its accuracy right after training it (a_ii) at least 10 points above chance, and moecl's
    Last within 3 points of separate adapters."""
    out = []
    for name, r in rows.items():
        chance = [1 / n for n in r["num_labels"]]
        worst = min(r["accuracy"][i][i] - chance[i] for i in range(len(chance)))
        out.append(f"{name}: worst a_ii {100 * worst:+.1f} points over chance (goal >= 10): {_verdict(worst >= 0.1)}")
    sep, moe = rows.get("lora-separate"), rows.get("moecl")
    if sep is not None and moe is not None:
        gap = 100 * (sep["last"] - moe["last"])
        out.append(f"moecl: Last {gap:+.2f} points below separate adapters (goal <= 3): {_verdict(gap <= 3)}")
    return out


def table(rows: list[dict]) -> str:
    cols = ["variant", "lr", "Last", "Avg", "BWT", "Forgetting", "task-agnostic Last", "task id."]
    cols += ["trainable", "train s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ta = r["scores_task_agnostic"]["last"] if r["scores_task_agnostic"] else None
        cells = [
            r["variant"],
            f"{r.get('lr', '')}",
            pct(r["last"]),
            pct(r["avg"]),
            f"{100 * r['bwt']:+.1f}",
            pct(r["forgetting"]),
            pct(ta),
            pct(r["task_identification"]),
            f"{r['trainable_params']:,}",
            f"{r['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _pass(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def validation_tasks(tasks: list[Task], rows: int, seed: int = 0) -> list[Task]:
    """Each task with ``rows`` rows of its train split (a seeded sample, the same whatever ``--seed``) as its eval
    split and the other train rows as its train split: settings chosen on these never see the eval rows."""
    out = []
    for i, task in enumerate(tasks):
        n = len(task.train)
        if not 0 < rows < n:
            raise SystemExit(f"--validation {rows}: task {task.name!r} has {n} train rows.")
        held = set(random.Random(seed + i).sample(range(n), rows))
        train = task.train.select([k for k in range(n) if k not in held])
        out.append(dataclasses.replace(task, train=train, eval=task.train.select(sorted(held))))
    return out


def generation_zero_shot(tasks: list[Task], model: str, tokenizer, batch_size: int, max_length: int) -> dict:
    """The untouched decoder as a row of the table: its exact match and ROUGE-L on every task, scored the way the
    schedule scores a cell (greedy answers, the same metric module); every row of its matrix is that row."""
    t0 = time.perf_counter()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = GenerationTaskModel(load_pretrained(AutoModelForCausalLM, model), tokenizer)
    metric = load_generation_metric()
    exact, rouge = [], []
    for task in tasks:
        train = encode_examples(tokenizer, task.train[task.prompt_column], task.train[task.target_column], max_length)
        lm.add_task(task.name, answer_length(train["labels"]))  # the schedule's answer length
        answers = lm.generate_answers(
            task.eval[task.prompt_column], task=task.name, batch_size=batch_size, max_prompt_length=max_length
        )
        scores = metric.compute(predictions=answers, references=[str(t) for t in task.eval[task.target_column]])
        exact.append(scores["exact_match"])
        rouge.append(scores["rouge_l"])
    n = len(tasks)
    return {
        "variant": "zero-shot",
        "lr": None,
        "epochs": 0,
        **compute_continual_metrics([list(exact)] * n, zero_shot=exact),
        "accuracy": [list(exact)] * n,
        "accuracy_zero_shot": exact,
        "rouge_l": [list(rouge)] * n,
        "scores_task_agnostic": None,
        "task_identification": None,
        "trainable_params": 0,
        "train_seconds": 0.0,
        "wall_seconds": time.perf_counter() - t0,
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def generation_table(rows: list[dict]) -> str:
    cols = ["variant", "lr", "epochs", "Last", "Avg", "BWT", "Forgetting", "ROUGE-L Last", "task-agnostic Last"]
    cols += ["task id.", "trainable", "train s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        agnostic = r.get("scores_task_agnostic") or {}
        cells = [
            r["variant"],
            "" if r.get("lr") is None else f"{r['lr']:g}",
            f"{r['epochs']:g}",
            pct(r["last"]),
            pct(r["avg"]),
            f"{100 * r['bwt']:+.1f}",
            pct(r["forgetting"]),
            pct(_mean(r["rouge_l"][-1])),
            pct(agnostic.get("last")),
            pct(r.get("task_identification")),
            f"{r['trainable_params']:,}",
            f"{r['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generation_goals(rows: dict[str, dict]) -> list[str]:
    """The generative issue's goals: ana and moecl forget <= 1 point, end within 3 points of one LoRA per task, and
    identify the task of >= 90 % of the inputs (exact match throughout)."""
    out = []
    sep = rows.get("lora-separate")
    for name in ("ana", "moecl"):
        r = rows.get(name)
        if r is None:
            continue
        forgetting = 100 * r["forgetting"]
        out.append(f"{name}: forgetting {forgetting:.2f} points (goal <= 1): {_pass(forgetting <= 1)}")
        if sep is not None:
            gap = 100 * (sep["last"] - r["last"])
            out.append(f"{name}: Last {gap:+.2f} points below LoRA per task (goal <= 3): {_pass(gap <= 3)}")
        ident = r.get("task_identification")
        if ident is None:
            out.append(f"{name}: task identification n/a (no task selector; goal >= 90): FAIL")
        else:
            out.append(f"{name}: task identification {pct(ident)}% (goal >= 90): {_pass(ident >= 0.9)}")
    return out


def goals(rows: dict[str, dict]) -> list[str]:
    """The issue's goals, checked on the measured rows."""
    out = []
    sep = rows.get("lora-separate")
    for name in ("ana", "moecl", "moecl-drift"):
        r = rows.get(name)
        if r is None:
            continue
        forgetting = 100 * r["forgetting"]
        out.append(f"{name}: forgetting {forgetting:.2f} points (goal <= 0.5): {_verdict(forgetting <= 0.5)}")
        if sep is not None:
            gap = 100 * (sep["last"] - r["last"])
            out.append(f"{name}: Last {gap:+.2f} points below separate adapters (goal <= 3): {_verdict(gap <= 3)}")
    for name in ("moecl", "moecl-drift"):
        moe = rows.get(name)
        if moe is None or moe["task_identification"] is None:
            continue
        ident = moe["task_identification"]
        out.append(f"{name}: task identification {pct(ident)}% (goal >= 90): {_verdict(ident >= 0.9)}")
        if sep is not None and sep["scores_task_agnostic"] and moe["scores_task_agnostic"]:
            a, b = moe["scores_task_agnostic"]["last"], sep["scores_task_agnostic"]["last"]
            out.append(f"{name}: task-agnostic Last {pct(a)} vs max-confidence routing {pct(b)}: {_verdict(a > b)}")
    return out


def report(args, rows: list[dict], split: str, env: str) -> str:
    """The table (generation: rows in the order of GENERATION_VARIANTS) and the goals, as bench.md holds them."""
    generation, zero_shot = args.kind == "generation", args.kind == "zero_shot"
    if generation:
        rows = sorted(rows, key=lambda r: GENERATION_VARIANTS.index(r["variant"]))
        text = generation_table(rows)
    else:
        text = zero_shot_table(rows) if zero_shot else table(rows)
    best: dict[str, dict] = {}
    for r in rows:  # goals on each variant's best run by Last
        if r["variant"] not in best or r["last"] > best[r["variant"]]["last"]:
            best[r["variant"]] = r
    if generation:
        checks = generation_goals(best)
    elif zero_shot:
        checks = zero_shot_goals(best)
    else:
        checks = goals(best) if args.sequence in (None, "default") else []
        checks += learned_goals(best)
    if args.lrs:
        trained = {k: v for k, v in best.items() if v.get("lr") is not None}
        checks.append("learning rates used for the goals: " + ", ".join(f"{k} {v['lr']:g}" for k, v in trained.items()))
    return (
        f"{text}\n\n"
        + "\n".join(f"- {c}" for c in checks)
        + f"\n\nSetting: epochs {args.epochs}, batch {args.batch_size}, seed {args.seed}{split}; {env}.\n"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="classification", choices=["classification", "zero_shot", "generation"])
    parser.add_argument("--sequence", default=None, choices=SEQUENCES, help="A classification sequence (sequences.py).")
    parser.add_argument("--variants", default=None, help=f"Comma-separated, of {', '.join(VARIANTS)} (default: all).")
    parser.add_argument(
        "--epochs", type=float, default=None, help="Epochs per task (default: the kind's, 3; generation 1)."
    )
    parser.add_argument(
        "--epochs-for", action="append", default=[], metavar="VARIANT=EPOCHS", help="Epochs of one variant."
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="Learning rate of every variant (default: the method's)."
    )
    parser.add_argument(
        "--lr-for",
        action="append",
        default=[],
        metavar="VARIANT=LR",
        help="Learning rate of one variant (repeatable), e.g. moecl=1e-2.",
    )
    parser.add_argument("--lrs", default=None, help="Comma-separated learning rates: run every variant at each.")
    parser.add_argument(
        "--config-for",
        action="append",
        default=[],
        metavar="VARIANT=JSON",
        help="Method-config options of one variant over its preset (repeatable), e.g. moecl='{\"scaling\": 1.0}'.",
    )
    parser.add_argument(
        "--validation",
        type=int,
        default=None,
        metavar="N",
        help="Score N held-out train rows per task instead of the eval split (train on the rest): for choosing.",
    )
    parser.add_argument(
        "--from-json",
        action="append",
        default=[],
        metavar="BENCH_JSON",
        help="Print the table and goals of the rows of earlier runs' bench.json files (repeatable); runs nothing.",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        default=None,
        help="Default outputs/bench_continual (generation: outputs/bench_continual_generation).",
    )
    args = parser.parse_args(argv)

    hf_logging.set_verbosity_warning()
    generation = args.kind == "generation"
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(Path(path).read_text())]
        print(report(args, rows, "", "rows read from " + ", ".join(args.from_json)))
        return
    out = Path(args.output_dir or ("outputs/bench_continual_generation" if generation else "outputs/bench_continual"))
    out.mkdir(parents=True, exist_ok=True)
    if generation and args.sequence:
        parser.error("--sequence names a classification sequence; --kind generation runs the embedded one.")
    model = default_model_path(args.kind) if generation else default_model_path()
    tokenizer = load_pretrained(AutoTokenizer, model) if generation else AutoTokenizer.from_pretrained(model)
    # the presets of the model's family (the CLI's choice); the classification kinds keep the bert presets
    model_type = load_pretrained(AutoConfig, model).model_type if generation else "bert"
    tasks = sequence(args.sequence) if args.sequence else default_task_stream(args.kind)
    if args.validation:
        tasks = validation_tasks(tasks, args.validation)
    lr_for = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr_for)}
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.kind]
    epochs_for = {k: float(v) for k, v in (item.split("=", 1) for item in args.epochs_for)}
    config_for = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.config_for)}
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else None
    known = GENERATION_VARIANTS if generation else tuple(VARIANTS)
    variants = (args.variants or ",".join(known)).split(",")
    unknown = [v for v in variants if v not in known]
    if unknown:
        parser.error(f"--variants: unknown {unknown} for --kind {args.kind}; choose from {', '.join(known)}.")
    rows = []
    for variant in variants:
        if variant == "zero-shot":
            rows.append(generation_zero_shot(tasks, model, tokenizer, args.batch_size, args.max_length))
            (out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
            continue
        method, extra = VARIANTS[variant]
        if extra is None or variant.startswith("moecl"):
            config = {**default_method_config(method, model_type), **(extra or {})}
        else:
            config = dict(extra)
        config.update(config_for.get(variant, {}))
        epochs = epochs_for.get(variant, args.epochs)
        for lr in lrs or [lr_for.get(variant, args.lr)]:
            targs = ContinualTrainingArguments(
                output_dir=str(out / (variant if lr is None else f"{variant}-lr{lr:g}")), method=method,
                epochs=epochs, lr=lr,
                batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, disable_tqdm=True,
                resume=False, overwrite=generation,
            )  # fmt: skip
            t0 = time.perf_counter()
            result = ContinualSchedule(tasks, targs, model=model, tokenizer=tokenizer, method_config=config).run()
            print(format_summary(result), flush=True)
            rows.append(
                {
                    "variant": variant,
                    "lr": targs.learning_rate,
                    "epochs": epochs,
                    "method_config": config,
                    **result.to_metrics(),
                    "scores_task_agnostic": result.scores_task_agnostic,
                    "num_labels": [len(t.labels) for t in tasks],
                    "wall_seconds": time.perf_counter() - t0,
                }
            )
            (out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")  # partial results survive

    split = f"; scored on {args.validation} validation rows per task (held out of train)" if args.validation else ""
    env = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    md = report(args, rows, split, env)
    (out / "bench.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
