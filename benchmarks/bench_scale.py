"""Cost as the task count grows: forward / train-step time, parameters, task-selector overhead and a whole continual
run's time split, for AnA and MoE-CL at 1 to 100 tasks (issue #17, item 2).

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py                       # CPU defaults, about 10 minutes
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --quick               # smoke check, 1-3 minutes
    python benchmarks/bench_scale.py --device cuda --dtype bfloat16          # GPU: every (batch, model) pair
    python benchmarks/bench_scale.py --parts forward,params --tasks 1 10 30  # a subset
    python benchmarks/bench_scale.py --run-methods moecl,ana                 # whole runs of both methods

Writes ``bench_scale.json`` (every figure, medians and every round too) and ``bench_scale.md`` (the tables and the
goal lines, also printed) in ``--output-dir`` (default ``outputs/bench_scale``; the continual runs of ``--parts
run`` write their folders there too). Both files are rewritten after every part, so a run stopped by a time limit
keeps the parts it finished (order: params, forward, train, selector, run).

What is measured and how:

* ``forward`` / ``train``: an all-MiniLM-L6-v2-shaped BERT built from its config (6 layers, hidden 384, 12 heads,
  intermediate 1536, random weights: timing only), ``batch x 64`` tokens. Compared side by side: the base model,
  LoRA r=8 on AnA's modules (query, key, value, attention output dense of every layer), LoRA of rank ``T*r`` there
  (the floor of a dense gate over ``T`` rank-``r`` paths), AnA r=8 with ``T`` tasks -- one model timed twice per
  round, with the dense gate and with ``gate_top_k=2`` (the layers' gate setting switched between calls) -- and
  MoE-CL with ``T`` tasks (preset ``moecl-bert``: 8 experts r=32 top-2 beside every block's MLP, 2 experts frozen
  per task, finished tasks isolated). Every model is routed to its last task (AnA: the most paths) and has a
  trained-like state (random non-zero up-projections, gates and routers, so that tokens spread over paths and
  experts; MoE-CL's earlier tasks ended with activate-freeze counted on a small batch, so all 8 experts are frozen
  from the 4th task on and later tasks train their router only, as in a real run). All models of a batch size are
  timed round-robin in one process (machine load hits all alike), after warm-up calls (CUDA: 3); CUDA timings are
  bracketed by ``torch.cuda.synchronize()``. A time is the best of ``--repeats`` rounds; a ratio is the median over
  the rounds of the ratio within a round (:func:`paired_ratio`: both timings of a round ran under the same load).
  Forward: eval mode, ``no_grad``. Train step: train mode, forward + ``mean(last_hidden_state^2)`` backward + AdamW
  step over the trainable parameters (the last task's: AnA's task adapter, in-adapters and gate; MoE-CL's router
  and unfrozen experts; LoRA's A and B).
* ``params``: adapter parameters (all tasks), trainable parameters of the current (last) task and AdamW state
  (2 floats per trainable parameter) per method and task count; AnA's trainable count is checked against its
  documented formula ``task_parameter_count``.
* ``selector``: MoE-CL at the largest task count with every task's selector entry fitted (the last task's on the
  timed inputs' own features, the others on shifted random features), a ``task_ids="auto"`` forward against a
  forward with the last task named, for prototypes of *deep* features (one extra base-model pass per auto forward,
  the cost of the default ``deep+shallow`` too), prototypes of *shallow* features (the first routed layer's input,
  captured during the forward: no extra pass) and the paper's autoencoders on shallow features. Also the selector's
  own compute (``select`` on pooled features ``(B, 384)``) as a share of the forward.
* ``run``: whole ``ContinualSchedule`` runs of 5, 10 and 20 tasks (``--run-methods``, default moecl; the ``*-bert``
  presets) over the synthetic keyword tasks of ``trainers/testing.py`` repeated under new names (96 train / 48
  eval rows each: the embedded sequence's 2:1 ratio), 3 epochs, the schedule's default batch sizes, on a random
  BERT: ``--run-model tiny`` (``trainers/testing.py``: 2 layers, hidden 32; the CPU default) or ``minilm``
  (MiniLM-shaped; the CUDA default). Each run is a fresh subprocess; its phases are timed by wrapping the
  schedule's hooks on the instance (``_before_task``, ``_train_task``, ``_after_task``, ``_check_learned``,
  ``_evaluate_row``, ``_checkpoint``, ``_write_outputs``) and the model's ``fit_task_selector`` (called inside
  ``_after_task``, listed on its own). Memory: peak RSS (``VmHWM``; ``ru_maxrss`` where there is no ``/proc``),
  the RSS after each task (growth per task = (last - first) / (T - 1)) and on CUDA
  ``torch.cuda.max_memory_allocated``.

CPU defaults: 5 rounds (2 at batch 64; the selector's 15 and 5: a few percent is what it measures); batch 64 is not
timed for the 100-task models' forwards nor for any train step (one base forward of 64 x 64 tokens takes 2-3 s on
one thread): those ratios come from a GPU run, or from ``--full``. On CUDA everything is timed, 20 rounds (the
selector's 60). Building the models is CPU work on either device: about 1 minute the four 100-task MoE-CL models
and 5 s AnA's 100-task model on the CPU below (7,400 modules: each task's in-adapters are two stacked tensors). Under
a hard time limit, ``--parts params,forward,train`` and ``--parts selector,run`` can
run as two calls (with two ``--output-dir``).

Goals (issue #17), printed as PASS/FAIL: AnA forward / LoRA r=8 at 30 tasks <= 1.15 with ``gate_top_k=2``; AnA
dense at 30 tasks no worse than LoRA of rank 30*r (checked as <= 1.05x: timing noise); MoE-CL forward at 100 tasks
/ at 1 task <= 1.05; task-selector overhead at 100 tasks <= 2 % of the forward (end to end, per selector); the
matrix evaluation <= 25 % of a 20-task run's time. Time ratios are checked at every timed batch size (the verdict
needs all of them).

Measured (``benchmarks/results/bench_scale_cpu.md``, latest run: CPU, 2 cores, 1 thread, the defaults plus
``--run-methods moecl,ana``, 245 s). Forward / LoRA r=8, batch 1 / 8 / 64: AnA at 30 tasks 1.40 / 1.43 / 1.37 dense
and 1.30 / 1.15 / 1.06 with ``gate_top_k=2`` (1.31-1.33 / 1.14-1.15 / 1.09 in 15-round reruns; goal 1.15: FAIL at
batch 1: 64 tokens over 30 paths, about 20 small calls per layer, each costing more than its arithmetic),
at 100 tasks 2.2 / 2.4 dense and 1.55 / 1.30 top-2 (batch 1 / 8); dense AnA at 30 tasks / LoRA r=240 1.10 / 1.05 /
1.06 (FAIL at batch 1: the gate's projection and the up-projection's bias row are ``1/r`` of the adapter's
arithmetic beyond LoRA's, 12.5 % at r=8). Train step / LoRA r=8 at 100 tasks 3.4 / 2.6 (batch 1, dense / top-2) and
3.0 / 1.6 (batch 8). MoE-CL does not grow with the task count: 100 tasks / 1 task 1.02 / 1.02 forward (PASS), 0.96 /
0.97 train step. Adapter parameters at 100 tasks: AnA 117.3 M (5.2x the 22.7 M model: the gates, ``(d, t+1)`` per
task and layer, are quadratic in T), 2.17 M trainable (4.3 M AdamW floats); MoE-CL 4.9 M, 36,864 trainable (only
the router once the 8 experts are frozen). Selector at 100 tasks, ``auto`` vs the task named, batch 1 / 8 / 64:
prototypes on shallow features +1.6 / +0.2 / +0.7 % (PASS), ``select()`` itself 1.1 / 0.23 / 0.06 %; on deep
features (the extra base pass, of the default ``deep+shallow`` too) +91 / +94 / +95 %; autoencoders on shallow
features +10.6 / +4.6 / +2.0 %, their ``select()`` 8.3 / 3.5 / 1.8 %. Whole runs (tiny BERT): evaluation takes 4.1 /
6.5 / 10.9 % of the run at 5 / 10 / 20 tasks (moecl; ana 4.3 / 7.6 / 19.0 %; goal 25 % at 20 tasks: PASS), peak RSS
538-550 MiB, RSS growth 0.2-0.4 MiB per task (moecl) and 0.8-1.0 MiB (ana).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch


SEQ = 64
R = 8
ANA_TARGETS = ["query", "key", "value", "attention.output.dense"]
MINILM = dict(
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)
MINILM_VOCAB = 30522
SELECTOR_VARIANTS = {  # name -> (selector, selector_features)
    "prototype/deep": ("prototype", "deep"),
    "prototype/shallow": ("prototype", "shallow"),
    "autoencoder/shallow": ("autoencoder", "shallow"),
}
RUN_METHODS = ("moecl", "ana")


# ------------------------------------------------------------------------------------------------------------------
# device, timing
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    repeats: int
    warmup: int
    full: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def round_robin(fns: dict[str, Callable[[], Any]], env: Env, repeats: int) -> dict[str, list[float]]:
    """Wall times (seconds) of each callable over ``repeats`` round-robin rounds, after ``env.warmup`` warm-up calls
    each: load from other processes on a shared machine hits every callable alike."""
    for _ in range(env.warmup):
        for fn in fns.values():
            fn()
    env.sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            env.sync()
            t0 = time.perf_counter()
            fn()
            env.sync()
            times[k].append(time.perf_counter() - t0)
    return times


def _best(times: list[float]) -> float:
    return min(times)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over the rounds of ``a[i] / b[i]``: the two timings of a round ran one after the other under the same
    load from other processes, so their ratio is steadier than ``min(a) / min(b)``, whose minima may come from
    different rounds."""
    return statistics.median(x / y for x, y in zip(a, b))


def _inputs(batch: int, env: Env, seed: int = 0, vocab: int = MINILM_VOCAB) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``(batch, SEQ)`` on the device (ids past BERT's special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, SEQ), generator=gen)
    return {"input_ids": ids.to(env.device), "attention_mask": torch.ones_like(ids).to(env.device)}


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` of ``/proc/self/status`` where there is one (the
    peak of this process image: Linux carries ``ru_maxrss`` over from the parent across fork + exec, so a child
    started by a big parent would report the parent's size), else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------------
def minilm_base(env: Env):
    """A random all-MiniLM-L6-v2-shaped ``BertModel`` (on the CPU, float32; moved by :func:`_place`)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=MINILM_VOCAB, **MINILM)).eval()


def _place(model, env: Env):
    return model.to(device=env.device, dtype=env.dtype).eval()


def lora_model(base, rank: int, env: Env):
    from peft import LoraConfig, get_peft_model

    return _place(
        get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=ANA_TARGETS)), env
    )


def ana_model(base, num_tasks: int, env: Env):
    """AnA r=8 with ``num_tasks`` tasks built at once (``task_names``), the last one open (trainable), with random
    non-zero up-projections and gates: a freshly added gate is zero, which sends every token to the same paths."""
    from peft import get_peft_model

    from peft_ext import AnAConfig

    names = [f"task{t}" for t in range(num_tasks)]
    model = get_peft_model(copy.deepcopy(base), AnAConfig(r=R, target_modules=ANA_TARGETS, task_names=names))
    gen = torch.Generator().manual_seed(num_tasks)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up." in name or name.endswith(".gate") or name.endswith(".gate_noise"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return _place(model, env)


def ana_gate_switch(model, k: Optional[int]) -> Callable[[], None]:
    """A function that switches every AnA layer of ``model`` to the dense gate (``k=None``) or to the sparse gate
    of ``k`` paths (what ``AnAConfig.gate_top_k`` sets), so that one model serves both timings. The layers'
    settings are collected here, once: walking ``model.modules()`` per call would be timed with the forward (an AnA
    model of 100 tasks has about 7,400 modules)."""
    settings = [
        entry
        for module in model.modules()
        if isinstance(getattr(module, "ana_settings", None), dict)
        for entry in module.ana_settings.values()
    ]

    def switch() -> None:
        for entry in settings:
            entry["gate_top_k"] = k

    return switch


def moecl_model(base, num_tasks: int, env: Env, **config):
    """MoE-CL (preset ``moecl-bert``) with ``num_tasks`` tasks as a continual run leaves them: each task's router
    random (trained-like), every task but the last ended with activate-freeze counted on a small batch (so the 8
    experts are all frozen after 4 tasks, as in a real run), the last task open."""
    from peft import get_peft_model

    from peft_ext.hub_configs import load_preset

    cfg = load_preset("moecl-bert", init_weights=False, **config)
    model = _place(get_peft_model(copy.deepcopy(base), cfg), env)  # the counting forwards run on the device
    gen = torch.Generator().manual_seed(1000 + num_tasks)
    counting = _inputs(4, env, seed=1000 + num_tasks, vocab=base.config.vocab_size)
    for t in range(num_tasks):
        if t:
            model.add_task(f"task{t}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f"w_gate.{t}" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        if t < num_tasks - 1:
            model.end_task(batches=[counting])
    return model.eval()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def last_task(model) -> Optional[str]:
    config = model.peft_config.get("default")
    names = getattr(config, "task_names", None)
    return names[-1] if names else None


@dataclasses.dataclass
class Entry:
    """One timed configuration: a model, its extra forward keywords and how to prepare it before each call."""

    model: Any
    kwargs: dict
    method: str
    tasks: int
    prepare: Callable[[], None] = lambda: None


def build_models(task_counts: list[int], env: Env, log, base=None) -> dict[str, Entry]:
    """Every model of the forward/train/params parts, keyed by display name (``base``: the encoder to adapt,
    default :func:`minilm_base`)."""
    base = minilm_base(env) if base is None else base
    entries: dict[str, Entry] = {"base": Entry(_place(copy.deepcopy(base), env), {}, "base", 0)}
    entries[f"LoRA r={R}"] = Entry(lora_model(base, R, env), {}, "lora", 1)
    for count in task_counts:
        t0 = time.perf_counter()
        if count > 1:
            entries[f"LoRA r={count * R}"] = Entry(lora_model(base, count * R, env), {}, "lora", count)
        ana = ana_model(base, count, env)
        t_ana = time.perf_counter() - t0
        task = {"task_ids": last_task(ana)}
        entries[f"AnA {count} dense"] = Entry(ana, task, "ana-dense", count, ana_gate_switch(ana, None))
        if count > 2:  # task t has t + 1 paths: with at most 2 the sparse gate is the dense one
            entries[f"AnA {count} top2"] = Entry(ana, task, "ana-top2", count, ana_gate_switch(ana, 2))
        moe = moecl_model(base, count, env)
        entries[f"MoE-CL {count}"] = Entry(moe, {"task_ids": last_task(moe)}, "moecl", count)
        log(f"  built the {count}-task models in {time.perf_counter() - t0:.0f} s (LoRA and AnA {t_ana:.0f} s)")
    return entries


def _forward_fn(entry: Entry, inputs: dict) -> Callable[[], None]:
    def run():
        entry.prepare()
        with torch.no_grad():
            entry.model(**inputs, **entry.kwargs)

    return run


def _train_fn(entry: Entry, inputs: dict, optimizers: dict) -> Callable[[], None]:
    model = entry.model
    if id(model) not in optimizers:  # one optimizer per model (AnA's dense and top-2 share theirs)
        optimizers[id(model)] = torch.optim.AdamW(trainable(model), lr=1e-5)
    opt = optimizers[id(model)]

    def run():
        entry.prepare()
        out = model(**inputs, **entry.kwargs).last_hidden_state
        loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def _skipped(name: str, entry: Entry, batch: int, kind: str, env: Env, max_tasks: int) -> bool:
    """CPU defaults (module docstring): batch 64 only for forwards of models below the largest task count."""
    if env.cuda or env.full or batch < 64:
        return False
    return kind == "train" or (entry.tasks >= max_tasks and max_tasks >= 100)


def time_models(entries: dict[str, Entry], batch_sizes: list[int], kind: str, env: Env, log) -> dict:
    """``{batch: {name: {"best": s, "median": s}}}`` of forwards (``kind="forward"``) or train steps."""
    max_tasks = max(e.tasks for e in entries.values())
    vocab = next(iter(entries.values())).model.config.vocab_size
    results: dict[int, dict] = {}
    optimizers: dict = {}
    for batch in batch_sizes:
        inputs = _inputs(batch, env, vocab=vocab)
        chosen = {n: e for n, e in entries.items() if not _skipped(n, e, batch, kind, env, max_tasks)}
        if kind == "train":
            chosen.pop("base", None)  # nothing to train
        if len(chosen) <= 1:
            continue  # nothing to compare (the CPU defaults skip this batch size)
        for e in chosen.values():
            e.model.train(kind == "train")
        fns = {
            n: (_train_fn(e, inputs, optimizers) if kind == "train" else _forward_fn(e, inputs))
            for n, e in chosen.items()
        }
        # fewer rounds where one round is long (CPU at batch 64); the minimum of few rounds is still the least noisy
        repeats = env.repeats if env.cuda or batch < 64 else max(2, env.repeats // 2)
        t0 = time.perf_counter()
        times = round_robin(fns, env, repeats)
        results[batch] = {n: {"best": _best(t), "median": statistics.median(t), "all": t} for n, t in times.items()}
        log(f"  {kind} batch {batch}: {len(fns)} models x {repeats} rounds in {time.perf_counter() - t0:.0f} s")
    for e in entries.values():
        e.model.eval()
    return results


def ratio_rows(times: dict, task_counts: list[int]) -> list[dict]:
    """Per (batch, task count): the times in ms and the issue's ratios."""
    rows = []
    for batch, t in times.items():
        get = lambda name: t.get(name, {}).get("best")  # noqa: E731

        def div(a: str, b: Optional[str]) -> Optional[float]:  # paired: see paired_ratio
            return paired_ratio(t[a]["all"], t[b]["all"]) if a in t and b in t else None

        lora_name = f"LoRA r={R}"
        lora = get(lora_name)
        moe1 = f"MoE-CL {min(task_counts)}" if min(task_counts) == 1 else None
        for count in task_counts:
            floor_name = f"LoRA r={count * R}" if count > 1 else lora_name
            floor = get(floor_name)
            names = f"AnA {count} dense", f"AnA {count} top2", f"MoE-CL {count}"
            dense, top2, moe = map(get, names)
            rows.append(
                {
                    "batch": batch,
                    "tasks": count,
                    "ms": {
                        "base": 1e3 * get("base") if get("base") else None,
                        f"lora_r{R}": 1e3 * lora if lora else None,
                        "lora_Tr": 1e3 * floor if floor else None,
                        "ana_dense": 1e3 * dense if dense else None,
                        "ana_top2": 1e3 * top2 if top2 else None,
                        "moecl": 1e3 * moe if moe else None,
                    },
                    "ana_dense_over_lora": div(names[0], lora_name),
                    "ana_top2_over_lora": div(names[1], lora_name),
                    "ana_dense_over_lora_Tr": div(names[0], floor_name),
                    "lora_Tr_over_lora": div(floor_name, lora_name),
                    "moecl_over_lora": div(names[2], lora_name),
                    "moecl_over_moecl1": div(names[2], moe1),
                }
            )
    return rows


def _f(x, spec=".2f", none="-") -> str:
    return none if x is None else format(x, spec)


def ratio_table(rows: list[dict], kind: str) -> list[str]:
    head = (
        f"| batch | tasks | LoRA r={R} ms | LoRA r=T*{R} ms | AnA dense ms | AnA top2 ms | MoE-CL ms | "
        f"AnA dense / LoRA{R} | AnA top2 / LoRA{R} | AnA dense / LoRA T*{R} | MoE-CL / LoRA{R} | MoE-CL / MoE-CL@1 |"
    )
    lines = [
        f"**{kind}** (times: best of the rounds; ratios: median over the rounds of the ratio within a round; `-`: "
        "not timed)",
        "",
        head,
        "|" + "---|" * 12,
    ]
    for r in rows:
        ms = r["ms"]
        cells = [
            str(r["batch"]),
            str(r["tasks"]),
            _f(ms[f"lora_r{R}"], ".1f"),
            _f(ms["lora_Tr"], ".1f"),
            _f(ms["ana_dense"], ".1f"),
            _f(ms["ana_top2"], ".1f"),
            _f(ms["moecl"], ".1f"),
            _f(r["ana_dense_over_lora"]),
            _f(r["ana_top2_over_lora"]),
            _f(r["ana_dense_over_lora_Tr"]),
            _f(r["moecl_over_lora"]),
            _f(r["moecl_over_moecl1"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------------------------
def _adapter_params(model) -> int:
    base = model.get_base_model()
    names = {n for n, _ in base.named_parameters()}
    own = {n for n in names if any(k in n for k in ("lora_", "ana_", "moecl_"))}
    return sum(p.numel() for n, p in base.named_parameters() if n in own)


def parameter_rows(entries: dict[str, Entry], task_counts: list[int]) -> list[dict]:
    """Per task count: adapter parameters (all tasks), trainable now (the last task), AdamW floats (2 per
    trainable parameter) of LoRA r=8 (one adapter; one per task), LoRA r=T*8, AnA and MoE-CL."""
    lora = entries[f"LoRA r={R}"].model
    lora_n = sum(p.numel() for p in trainable(lora))
    rows = []
    for count in task_counts:
        ana = entries[f"AnA {count} dense"].model
        moe = entries[f"MoE-CL {count}"].model
        big = entries[f"LoRA r={count * R}"].model if count > 1 else lora
        ana_trainable = sum(p.numel() for p in trainable(ana))
        formula = ana.task_parameter_count(last_task(ana))
        report = moe.parameter_report()
        rows.append(
            {
                "tasks": count,
                "lora_r8": lora_n,
                "lora_r8_per_task_total": count * lora_n,
                "lora_Tr": sum(p.numel() for p in trainable(big)),
                "ana_total": _adapter_params(ana),
                "ana_trainable": ana_trainable,
                "ana_formula_ok": ana_trainable == formula,
                "ana_adamw_floats": 2 * ana_trainable,
                "moecl_total": report["total"],
                "moecl_trainable": report["trainable_now"],
                "moecl_adamw_floats": 2 * report["trainable_now"],
                "moecl_frozen_experts": report["frozen_experts"],
            }
        )
    return rows


def parameter_table(rows: list[dict]) -> list[str]:
    head = (
        "| tasks | LoRA r=8 | T x LoRA r=8 | LoRA r=T*8 | AnA total | AnA trainable (= formula) | AnA AdamW floats | "
        "MoE-CL total | MoE-CL trainable | MoE-CL AdamW floats |"
    )
    lines = ["**parameters** (adapter parameters; trainable = the current, last task's)", "", head, "|" + "---|" * 10]
    for r in rows:
        cells = [
            str(r["tasks"]),
            f"{r['lora_r8']:,}",
            f"{r['lora_r8_per_task_total']:,}",
            f"{r['lora_Tr']:,}",
            f"{r['ana_total']:,}",
            f"{r['ana_trainable']:,} ({'yes' if r['ana_formula_ok'] else 'NO'})",
            f"{r['ana_adamw_floats']:,}",
            f"{r['moecl_total']:,}",
            f"{r['moecl_trainable']:,}",
            f"{r['moecl_adamw_floats']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------------------------
# task selector
# ------------------------------------------------------------------------------------------------------------------
def selector_model(base, num_tasks: int, selector: str, features: str, fit_inputs: dict, env: Env):
    """MoE-CL with ``num_tasks`` tasks whose selector entries are all fitted: tasks ``< T-1`` on shifted random
    features ``(64, F)``, the last task on the features of ``fit_inputs`` (so that ``"auto"`` picks it for them)."""
    model = moecl_model(base, num_tasks, env, selector=selector, selector_features=features)
    names = model.peft_config["default"].task_names
    feats = model.collect_selector_features([fit_inputs])  # (B, F) float32, on the device
    gen = torch.Generator().manual_seed(7)
    for t, name in enumerate(names[:-1]):
        fake = torch.randn(64, feats.shape[1], generator=gen).to(feats.device) + 3.0 * (t + 1)
        model.fit_task_selector(name, features=fake, epochs=2)
    model.fit_task_selector(names[-1], features=feats, epochs=2)
    return model.eval()


def time_selector(num_tasks: int, batch_sizes: list[int], env: Env, log, base=None) -> dict:
    """``{variant: {batch: {...}}}``: forward with the last task named vs ``task_ids="auto"``, and ``select``
    alone on pooled features ``(B, F)``."""
    base = minilm_base(env) if base is None else base
    fit_inputs = _inputs(max(max(batch_sizes), 8), env, seed=3, vocab=base.config.vocab_size)
    models = {}
    for variant, (selector, features) in SELECTOR_VARIANTS.items():
        t0 = time.perf_counter()
        models[variant] = selector_model(base, num_tasks, selector, features, fit_inputs, env)
        log(f"  built the {num_tasks}-task selector model {variant} in {time.perf_counter() - t0:.0f} s")
    out: dict[str, dict] = {v: {} for v in models}
    for batch in batch_sizes:
        inputs = {k: v[:batch] for k, v in fit_inputs.items()}
        fns = {}
        for variant, model in models.items():
            task = last_task(model)
            store = model.base_model.moecl_selector["default"]
            pooled = model.collect_selector_features([inputs]).to(env.device)
            compare = model.peft_config["default"].selector_compare

            def fwd(m=model, ids=task):
                with torch.no_grad():
                    m(**inputs, task_ids=ids)

            def select(s=store, x=pooled, c=compare):
                s.select(x, c)

            fns[(variant, "task")] = fwd
            fns[(variant, "auto")] = lambda m=model: fwd(m, "auto")
            fns[(variant, "select")] = select
        # a few percent is the quantity measured: three times the rounds of the other parts (the forwards of
        # batch 64 are the slow ones)
        repeats = 3 * env.repeats if env.cuda or batch < 64 else env.repeats
        t0 = time.perf_counter()
        times = round_robin(fns, env, repeats)
        for variant, model in models.items():
            with torch.no_grad():
                model(**inputs, task_ids="auto")
            picked = model.routed_tasks()
            t_task, t_auto = _best(times[(variant, "task")]), _best(times[(variant, "auto")])
            t_sel = _best(times[(variant, "select")])
            paired = paired_ratio(times[(variant, "auto")], times[(variant, "task")])
            out[variant][batch] = {
                "task_ms": 1e3 * t_task,
                "auto_ms": 1e3 * t_auto,
                "task_median_ms": 1e3 * statistics.median(times[(variant, "task")]),
                "auto_median_ms": 1e3 * statistics.median(times[(variant, "auto")]),
                "overhead": paired - 1,
                "overhead_best": t_auto / t_task - 1,
                "select_ms": 1e3 * t_sel,
                "select_share": t_sel / t_task,
                "picked_last_task": sum(p == last_task(model) for p in picked) / len(picked),
            }
        log(f"  selector batch {batch}: {len(fns)} callables x {repeats} rounds in {time.perf_counter() - t0:.0f} s")
    return out


def selector_table(sel: dict, num_tasks: int) -> list[str]:
    lines = [
        f"**task selector** (MoE-CL, {num_tasks} tasks fitted; `auto` vs the last task named; times: best of the "
        "rounds; auto overhead: median over the rounds of auto / named within a round, and best / best)",
        "",
        "| selector/features | batch | task named ms | auto ms | auto overhead | (best / best) | select() ms "
        "| select / forward | picked the last task |",
        "|" + "---|" * 9,
    ]
    for variant, per_batch in sel.items():
        for batch, r in per_batch.items():
            lines.append(
                f"| {variant} | {batch} | {r['task_ms']:.1f} | {r['auto_ms']:.1f} | {100 * r['overhead']:+.1f}% | "
                f"{100 * r['overhead_best']:+.1f}% | "
                f"{r['select_ms']:.3f} | {100 * r['select_share']:.2f}% | {100 * r['picked_last_task']:.0f}% |"
            )
    return lines


# ------------------------------------------------------------------------------------------------------------------
# whole continual runs
# ------------------------------------------------------------------------------------------------------------------
def scaled_tasks(count: int, n_train: int = 96, n_eval: int = 48):
    """``count`` synthetic keyword tasks: the three of ``trainers/testing.py`` repeated with new seeds, each under a
    new name (``colors_03``, ...)."""
    from peft_ext.trainers.testing import SYNTHETIC_TASKS, synthetic_task

    kinds = sorted(SYNTHETIC_TASKS)
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        task = synthetic_task(kind, n_train=n_train, n_eval=n_eval, seed=10 * i)
        out.append(dataclasses.replace(task, name=f"{kind}_{i:02d}"))
    return out


def run_child(method: str, count: int, out_dir: Path, device: str, dtype: str, epochs: float, model_kind: str) -> dict:
    """One continual run (in this process: the parent starts one subprocess per run), its phases timed by wrapping
    the schedule's hooks on the instance; returns the figures. ``model_kind``: ``"minilm"`` (MiniLM-shaped) or
    ``"tiny"`` (the 2-layer hidden-32 BERT of ``trainers/testing.py``), both random, over the synthetic vocabulary."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    import peft_ext  # noqa: F401
    from peft_ext.trainers import ContinualSchedule, ContinualTrainingArguments
    from peft_ext.trainers.strategies import default_method_config
    from peft_ext.trainers.testing import make_tiny_bert, make_tokenizer, synthetic_vocab

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    cuda = device == "cuda"
    tokenizer = make_tokenizer(out_dir / "tokenizer")
    vocab = len(synthetic_vocab())

    def model():
        if model_kind == "tiny":
            return make_tiny_bert(seed=0)
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=vocab, **MINILM))

    args = ContinualTrainingArguments(
        output_dir=str(out_dir / f"run-{method}-{count}"),
        method=method,
        epochs=epochs,
        seed=0,
        disable_tqdm=True,
        plots=False,
        resume=False,
        overwrite=True,
        use_cpu=not cuda,
        bf16=cuda and dtype == "bfloat16",
    )
    schedule = ContinualSchedule(
        scaled_tasks(count), args, model=model, tokenizer=tokenizer, method_config=default_method_config(method, "bert")
    )
    seconds: dict[str, float] = {}
    per_task: list[dict] = []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, key):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0

        return wrapper

    hooks = {
        "_before_task": "prepare",
        "_train_task": "train",
        "_after_task": "end_task",
        "_check_learned": "check_learned",
        "_evaluate_row": "evaluate",
        "_checkpoint": "checkpoint",
        "_write_outputs": "outputs",
    }
    for hook, key in hooks.items():
        setattr(schedule, hook, timed(getattr(schedule, hook), key))
    strategy_end = schedule.strategy.end_task

    def end_task(model, *a, **k):
        if "fit_task_selector" not in vars(model):  # PeftModel delegates to the tuner; the instance attribute wins
            model.fit_task_selector = timed(model.fit_task_selector, "selector_fit")
        return strategy_end(model, *a, **k)

    schedule.strategy.end_task = end_task
    checkpoint = schedule._checkpoint

    def checkpoint_and_measure(index):
        checkpoint(index)
        per_task.append(
            {
                "rss_mb": _rss_mb(),
                "peak_rss_mb": _peak_rss_mb(),
                "cuda_mb": torch.cuda.memory_allocated() / 2**20 if cuda else None,
                "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            }
        )

    schedule._checkpoint = checkpoint_and_measure
    sync()
    t0 = time.perf_counter()
    result = schedule.run()
    sync()
    total = time.perf_counter() - t0
    seconds["end_task"] = seconds.get("end_task", 0.0) - seconds.get("selector_fit", 0.0)  # selector listed alone
    seconds["other"] = total - sum(seconds.values())
    rss = [p["rss_mb"] for p in per_task]
    return {
        "method": method,
        "tasks": count,
        "model": model_kind,
        "total_s": total,
        "seconds": seconds,
        "evaluate_share": seconds["evaluate"] / total,
        "evaluate_and_check_share": (seconds["evaluate"] + seconds["check_learned"]) / total,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_task_mb": rss,
        "rss_growth_per_task_mb": (rss[-1] - rss[0]) / (len(rss) - 1) if len(rss) > 1 else 0.0,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "last": result.scores.get("last") if isinstance(result.scores, dict) else None,
        "per_task": per_task,
    }


def time_runs(counts: list[int], methods: list[str], out_dir: Path, env: Env, args, log) -> list[dict]:
    """One subprocess per (method, task count): a fresh process gives each run its own peak RSS."""
    rows = []
    for method in methods:
        for count in counts:
            target = out_dir / f"run-{method}-{count}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--run-child",
                f"{method}:{count}:{target}",
                "--device",
                env.device.type,
                "--dtype",
                args.dtype,
                "--run-epochs",
                str(args.run_epochs),
                "--run-model",
                args.run_model,
                "--output-dir",
                str(out_dir),
            ]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                log(f"  run {method} x {count} FAILED:\n{done.stderr[-3000:]}")
                continue
            row = json.loads(target.read_text())
            rows.append(row)
            log(
                f"  run {method} x {count} tasks: {row['total_s']:.0f} s (process {time.perf_counter() - t0:.0f} s), "
                f"evaluation {100 * row['evaluate_share']:.0f}%"
            )
    return rows


def run_table(rows: list[dict], cuda: bool) -> list[str]:
    model = rows[0]["model"] if rows else ""
    shape = "MiniLM-shaped random BERT" if model == "minilm" else "tiny random BERT (2 layers, hidden 32)"
    cols = ["train", "evaluate", "check_learned", "selector_fit", "end_task", "checkpoint", "prepare", "outputs"]
    head = (
        "| method | tasks | run s | "
        + " | ".join(f"{c} s" for c in cols)
        + " | other s | evaluate share | eval+check share | peak RSS MiB | RSS growth / task MiB |"
        + (" CUDA peak MiB |" if cuda else "")
    )
    lines = [
        f"**continual runs** ({shape}, synthetic tasks of 96 train / 48 eval rows; phase seconds)",
        "",
        head,
        "|" + "---|" * (len(cols) + 8 + (1 if cuda else 0)),
    ]
    for r in rows:
        s = r["seconds"]
        cells = [r["method"], str(r["tasks"]), f"{r['total_s']:.1f}"] + [f"{s.get(c, 0.0):.1f}" for c in cols]
        cells += [
            f"{s['other']:.1f}",
            f"{100 * r['evaluate_share']:.1f}%",
            f"{100 * r['evaluate_and_check_share']:.1f}%",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['rss_growth_per_task_mb']:.1f}",
        ]
        if cuda:
            cells.append(_f(r["cuda_peak_mb"], ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------------------------
# goals
# ------------------------------------------------------------------------------------------------------------------
def _verdict(ok: Optional[bool]) -> str:
    return "n/a (not measured)" if ok is None else ("PASS" if ok else "FAIL")


def goal_lines(results: dict) -> list[str]:
    out = []
    fwd = [r for r in results.get("forward_ratios", []) if r["ana_top2_over_lora"] is not None and r["tasks"] == 30]
    if fwd:
        vals = [r["ana_top2_over_lora"] for r in fwd]
        dense = [r["ana_dense_over_lora"] for r in fwd]
        per = ", ".join(f"batch {r['batch']}: {r['ana_top2_over_lora']:.2f}" for r in fwd)
        out.append(
            f"AnA forward / LoRA r=8 at 30 tasks with gate_top_k=2 <= 1.15 ({per}; dense: "
            + ", ".join(f"{d:.2f}" for d in dense)
            + f"): {_verdict(all(v <= 1.15 for v in vals))}"
        )
    fwd = [r for r in results.get("forward_ratios", []) if r["ana_dense_over_lora_Tr"] is not None and r["tasks"] == 30]
    if fwd:
        per = ", ".join(
            f"batch {r['batch']}: AnA dense {r['ms']['ana_dense']:.1f} ms vs LoRA r=240 {r['ms']['lora_Tr']:.1f} ms "
            f"(ratio {r['ana_dense_over_lora_Tr']:.2f})"
            for r in fwd
        )
        # "no worse" with the timing noise of a shared machine: within 5 %
        ok = all(r["ana_dense_over_lora_Tr"] <= 1.05 for r in fwd)
        out.append(f"AnA dense forward at 30 tasks no worse than LoRA r=30*8 (<= 1.05x; {per}): {_verdict(ok)}")
    fwd = [r for r in results.get("forward_ratios", []) if r["tasks"] == 100 and r["moecl_over_moecl1"] is not None]
    if fwd:
        per = ", ".join(f"batch {r['batch']}: {r['moecl_over_moecl1']:.3f}" for r in fwd)
        ok = all(r["moecl_over_moecl1"] <= 1.05 for r in fwd)
        out.append(f"MoE-CL forward at 100 tasks / at 1 task <= 1.05 ({per}): {_verdict(ok)}")
    sel = results.get("selector")
    if sel:
        for variant, per_batch in sel["results"].items():
            per = ", ".join(
                f"batch {b}: {100 * r['overhead']:+.1f}% end to end, select() {100 * r['select_share']:.2f}%"
                for b, r in per_batch.items()
            )
            ok = all(r["overhead"] <= 0.02 for r in per_batch.values())
            out.append(f"DDAS overhead at {sel['tasks']} tasks <= 2% of the forward, {variant} ({per}): {_verdict(ok)}")
    for r in results.get("runs", []):
        if r["tasks"] == 20:
            out.append(
                f"{r['method']} 20-task run: evaluation {100 * r['evaluate_share']:.1f}% of the run time <= 25% "
                f"(with the training-accuracy check {100 * r['evaluate_and_check_share']:.1f}%): "
                f"{_verdict(r['evaluate_share'] <= 0.25)}"
            )
    return out


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() or None
    except OSError:
        return None


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 30, 100], help="task counts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], help=f"samples of {SEQ} tokens")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: CPU 5, CUDA 20)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke check")
    parser.add_argument("--full", action="store_true", help="on CPU too, time batch 64 for every model and step")
    parser.add_argument("--parts", default="forward,train,params,selector,run", help="comma-separated subset")
    parser.add_argument("--run-tasks", type=int, nargs="+", default=[5, 10, 20], help="task counts of whole runs")
    parser.add_argument(
        "--run-methods", default="moecl", help=f"comma-separated methods of the whole runs, of {', '.join(RUN_METHODS)}"
    )
    parser.add_argument("--run-epochs", type=float, default=3.0, help="epochs per task of the whole runs")
    parser.add_argument(
        "--run-model",
        default=None,
        choices=["tiny", "minilm"],
        help="model of the whole runs (default: minilm on CUDA, tiny on CPU)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--output-dir", default="outputs/bench_scale")
    parser.add_argument("--run-child", default=None, help=argparse.SUPPRESS)  # method:count:json (internal)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = [1, 3]
        args.batch_sizes = [1, 4]
        args.repeats = args.repeats or 2
        args.run_tasks = [2, 3]
        args.run_epochs = 1.0
    if args.repeats is None:
        args.repeats = 20 if args.device == "cuda" else 5
    if args.run_model is None:
        args.run_model = "minilm" if args.device == "cuda" else "tiny"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.run_child:
        method, count, target = args.run_child.split(":", 2)
        row = run_child(method, int(count), out_dir, args.device, args.dtype, args.run_epochs, args.run_model)
        Path(target).write_text(json.dumps(row, indent=2) + "\n")
        return row

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    import peft_ext  # noqa: F401

    hf_logging.set_verbosity_error()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available.")
    env = Env(
        device=torch.device(args.device),
        dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32,
        repeats=args.repeats,
        warmup=3 if args.device == "cuda" else 1,
        full=args.full,
    )
    parts = set(args.parts.split(","))
    unknown = parts - {"forward", "train", "params", "selector", "run"}
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}.")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    task_counts = sorted(set(args.tasks))
    device_name = torch.cuda.get_device_name(env.device) if env.cuda else platform.processor() or platform.machine()
    results: dict[str, Any] = {
        "settings": {
            "device": args.device,
            "device_name": device_name,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "tasks": task_counts,
            "batch_sizes": args.batch_sizes,
            "seq": SEQ,
            "repeats": args.repeats,
            "full": args.full,
            "quick": args.quick,
            "torch": torch.__version__,
            "commit": _git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    }
    md: list[str] = [
        f"bench_scale: {args.device} ({device_name}), {args.dtype}, {torch.get_num_threads()} thread(s), "
        f"seq {SEQ}, repeats {args.repeats}, torch {torch.__version__}",
        "",
    ]

    def save(final: bool = False) -> None:
        """Write the JSON and the markdown (tables and goals so far): a run stopped by a time limit keeps its
        finished parts."""
        goals = goal_lines(results)
        results["goals"] = goals
        results["seconds"] = time.perf_counter() - start
        text = "\n".join(md + ["**goals**", ""] + [f"- {g}" for g in goals] + ["", f"total {results['seconds']:.0f} s"])
        if not final:
            text += " (partial: still running)"
        (out_dir / "bench_scale.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
        (out_dir / "bench_scale.md").write_text(text + "\n")
        if final:
            print("\n" + text, flush=True)

    if parts & {"forward", "train", "params"}:
        log(f"building models for {task_counts} tasks")
        entries = build_models(task_counts, env, log)
        if "params" in parts:
            results["params"] = parameter_rows(entries, task_counts)
            md += parameter_table(results["params"]) + [""]
            save()
        for kind, title in (("forward", "forward"), ("train", "train step")):
            if kind in parts:
                times = time_models(entries, args.batch_sizes, kind, env, log)
                results[kind] = times
                results[f"{kind}_ratios"] = ratio_rows(times, task_counts)
                md += ratio_table(results[f"{kind}_ratios"], title) + [""]
                save()
        del entries
    if "selector" in parts:
        count = max(task_counts)
        log(f"task selector at {count} tasks")
        sel = time_selector(count, args.batch_sizes, env, log)
        results["selector"] = {"tasks": count, "results": sel}
        md += selector_table(sel, count) + [""]
        save()
    if "run" in parts:
        log(f"continual runs of {args.run_tasks} tasks")
        methods = [m for m in args.run_methods.split(",") if m]
        rows = time_runs(args.run_tasks, methods, out_dir, env, args, log)
        results["runs"] = rows
        md += run_table(rows, env.cuda) + [""]
    save(final=True)
    return results


if __name__ == "__main__":
    main()
