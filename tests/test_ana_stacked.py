"""AnA's task paths as one stacked computation, and the sparse gate ``gate_top_k``.

The oracle is the per-path computation AnA used before (one small adapter per earlier task, a Python loop over
the paths), kept here as :func:`reference_task_output` and swapped in for ``AnALayer.task_output``; with the same
random state (the noisy gate draws its noise from it) both must give the same outputs.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import MLP

import peft_ext  # noqa: F401  (registers the methods)
from peft_ext import AnAConfig
from peft_ext.tuners.ana import AnALayer, AnALinear
from peft_ext.tuners.ana import layer as ana_layer


def tiny_base():
    torch.manual_seed(0)
    return MLP().eval()


def ana_layers(model):
    return [m for m in model.modules() if isinstance(m, AnALinear)]


def reference_task_output(self, adapter_name, task_index, x):
    """The per-path computation: ``sum_e g_e * s_e * up_e(F_e^t(down_e(x)))``, one path at a time."""
    tasks = self.ana_tasks[adapter_name]
    gates = self.task_gates(adapter_name, task_index, x).to(x.dtype)  # (N, E), 0 for unselected paths
    out = 0
    for e in range(task_index + 1):
        h = tasks[e].down(x)
        if e < task_index:
            h = tasks[task_index].in_adapter(e, h)
        out = out + gates[:, e : e + 1] * tasks[e].scale * tasks[e].up(h)
    return out


def multi_task_model(num_tasks: int, **kwargs):
    names = [f"t{i}" for i in range(num_tasks)]
    torch.manual_seed(1)
    config = AnAConfig(target_modules=["lin0", "lin1"], init_weights=False, r=3, **kwargs)
    model = get_peft_model(tiny_base(), config, "t0")
    for name in names[1:]:
        model.add_task(name)
    torch.manual_seed(2)
    with torch.no_grad():  # non-trivial in-adapters and scales everywhere (frozen ones included)
        for layer in ana_layers(model):
            for task in layer.ana_tasks["t0"]:
                task.scale.uniform_(0.5, 1.5)
                if task.in_weight is not None:
                    task.in_weight.normal_(std=0.5)
                    task.in_bias.normal_(std=0.1)
    return model, names


def outputs_both_ways(model, run, monkeypatch, seed=0):
    torch.manual_seed(seed)
    stacked = run()
    with monkeypatch.context() as m:
        m.setattr(AnALayer, "task_output", reference_task_output)
        torch.manual_seed(seed)
        reference = run()
    return stacked, reference


@pytest.mark.parametrize("num_tasks", [1, 3, 10])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("gate_top_k", [None, 2])
def test_stacked_paths_equal_the_per_path_computation(num_tasks, mode, gate_top_k, monkeypatch):
    model, names = multi_task_model(num_tasks, gate_top_k=gate_top_k)
    model.train(mode == "train")
    x = torch.randn(6, 5, 6)
    ids = [names[-1], names[0], None, names[len(names) // 2], names[-1], names[0]]
    for run in (
        lambda: model(X=x),  # the active (last, trainable) task
        lambda: model(X=x, task_ids=names[0]),
        lambda: model(X=x, task_ids=ids),  # mixed per-sample routing
    ):
        stacked, reference = outputs_both_ways(model, run, monkeypatch)
        torch.testing.assert_close(stacked, reference, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the cached (inference) path too
            stacked, reference = outputs_both_ways(model, run, monkeypatch)
        torch.testing.assert_close(stacked, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_top_k", [None, 2])
def test_stacked_gradients_equal_the_per_path_computation(gate_top_k, monkeypatch):
    model, _ = multi_task_model(4, gate_top_k=gate_top_k, noisy_gating=False)
    model.train()
    x = torch.randn(4, 5, 6)
    grads = []
    for patched in (False, True):
        with monkeypatch.context() as m:
            if patched:
                m.setattr(AnALayer, "task_output", reference_task_output)
            model.zero_grad()
            model(X=x).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)
    # only the last task is trainable: the frozen ones got no gradient
    assert all(".ana_tasks.t0.3." in n for n in grads[0])


def test_auto_routing_equals_the_per_path_computation(monkeypatch):
    torch.manual_seed(0)
    ddas = {"selector": "autoencoder", "selector_features": "shallow"}  # features are the inputs themselves
    centers = {"t0": torch.full((6,), -3.0), "t1": torch.full((6,), 3.0), "t2": torch.zeros(6)}
    centers["t1"][::2] = -3.0

    def sample(task, n, spread=0.3):
        return centers[task] + spread * torch.randn(n, 6)

    model, names = multi_task_model(3, selector_epochs=30, gate_top_k=2, **ddas)
    for task in names:
        model.fit_task_selector(task, [{"X": sample(task, 64)}, {"X": sample(task, 64)}])
    model.eval()
    # inputs near their task's center (the thresholds send the outer 1 % of a task's own inputs to the base model)
    x = torch.cat([*(sample(task, 2, spread=0.1) for task in names), torch.full((1, 6), 40.0)])
    stacked, reference = outputs_both_ways(model, lambda: model(X=x, task_ids="auto"), monkeypatch)
    torch.testing.assert_close(stacked, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked, model(X=x, task_ids=["t0"] * 2 + ["t1"] * 2 + ["t2"] * 2 + [None]))


def test_sparse_kernel_with_every_path_selected_is_the_dense_gate():
    model, _ = multi_task_model(5)
    model.eval()
    layer = ana_layers(model)[0]
    x = torch.randn(37, 6)  # not a multiple of the block size
    with torch.no_grad():
        w, b, up = layer._task_paths("t0", 4)
        gates = layer._gate("t0", 4, x, 5)
        sparse = layer._sparse_paths(x, w, b, up, gates.top_gates, gates.top_indices)
        dense = layer.task_output("t0", 4, x)
        # the same selection in a shuffled order (gates follow their paths)
        perm = torch.randperm(5)
        shuffled = layer._sparse_paths(x, w, b, up, gates.top_gates[:, perm], gates.top_indices[:, perm])
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled, dense, rtol=1e-5, atol=1e-6)


def reference_sparse_paths(x, w_down, b_down, up, top_gates, top_indices):
    """``sum_j g_nj * [W_p x_n + b_p, 1] @ U_p`` for ``p = top_indices[n, j]``, one token and path at a time."""
    num_paths, r1, _ = up.shape
    w, b = w_down.view(num_paths, r1 - 1, -1), b_down.view(num_paths, r1 - 1)
    rows = []
    for n in range(x.shape[0]):
        rows.append(
            sum(
                top_gates[n, j] * torch.cat([w[p] @ x[n] + b[p], x.new_ones(1)]) @ up[p]
                for j, p in enumerate(top_indices[n].tolist())
            )
        )
    return torch.stack(rows)


@pytest.mark.skipif(ana_layer._GROUPED_MM is None, reason="this torch has no grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_block_dispatch_agree_with_their_gradients(monkeypatch, dtype):
    torch.manual_seed(0)
    num_paths, r, d_in, d_out, k = 5, 8, 8, 16, 2
    x = torch.randn(37, d_in)  # 74 rows: not a multiple of the block size
    w_down, b_down, up = (
        torch.randn(num_paths * r, d_in),
        torch.randn(num_paths * r),
        torch.randn(num_paths, r + 1, d_out),
    )
    logits = torch.randn(37, num_paths)
    logits[:, 3] = -1e9  # a path with no rows
    top = logits.topk(k, dim=-1)
    assert ana_layer._grouped_mm_fits(x.to(dtype), r)
    assert not ana_layer._grouped_mm_fits(x[:, :6], r)  # rows of 24 bytes
    assert not ana_layer._grouped_mm_fits(x.bfloat16(), 4)  # gradient rows of 8 bytes
    results = {}
    for dispatch in ("grouped", "blocks", "reference"):
        monkeypatch.setattr(ana_layer, "_grouped_mm_fits", lambda *args, grouped=dispatch == "grouped": grouped)
        leaves = [t.to(dtype).requires_grad_() for t in (x, w_down, b_down, up, top.values.softmax(-1))]
        run = reference_sparse_paths if dispatch == "reference" else AnALayer._sparse_paths
        out = run(*leaves, top.indices)
        out.float().sum().backward()  # an expanded gradient, the layout most likely to trip a kernel
        results[dispatch] = (out.detach().float(), [leaf.grad.float() for leaf in leaves])
    # bf16: the dispatches sum in different orders; outputs and gradients are of order 10
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.25)
    for dispatch in ("grouped", "blocks"):
        torch.testing.assert_close(results[dispatch][0], results["reference"][0], **tol)
        for a, b in zip(results[dispatch][1], results["reference"][1]):
            torch.testing.assert_close(a, b, **tol)
        grads = results[dispatch][1]
        assert grads[1].view(num_paths, r, d_in)[3].abs().sum() == 0  # the unused path got no gradient
        assert grads[2].view(num_paths, r)[3].abs().sum() == 0 and grads[3][3].abs().sum() == 0


@pytest.mark.parametrize("grouped", [True, False])
def test_the_sparse_paths_take_a_batch_without_tokens(monkeypatch, grouped):
    monkeypatch.setattr(ana_layer, "_grouped_mm_fits", lambda *args: grouped)
    x, w, b, up = torch.randn(0, 8), torch.randn(3 * 8, 8), torch.randn(3 * 8), torch.randn(3, 9, 16)
    top = torch.randn(0, 3).topk(2, dim=-1)
    out = AnALayer._sparse_paths(x, w, b, up, top.values.softmax(-1), top.indices)
    assert out.shape == (0, 16)
    monkeypatch.undo()
    model, _ = multi_task_model(4, gate_top_k=2)
    assert model.eval()(X=torch.randn(0, 5, 6)).shape[:2] == (0, 5)


def test_a_torch_without_the_cpu_grouped_kernel_uses_the_blocks(monkeypatch):
    torch.manual_seed(0)
    x, w, b, up = torch.randn(9, 8), torch.randn(3 * 8, 8), torch.randn(3 * 8), torch.randn(3, 9, 16)
    top = torch.randn(9, 3).topk(2, dim=-1)
    expected = AnALayer._sparse_paths(x, w, b, up, top.values.softmax(-1), top.indices)

    def cuda_only(*args, **kwargs):
        raise NotImplementedError("grouped_mm: no CPU kernel")

    monkeypatch.setattr(ana_layer, "_GROUPED_MM", cuda_only)
    ana_layer._cpu_grouped_mm_runs.cache_clear()
    try:
        assert not ana_layer._grouped_mm_fits(x, 8)
        torch.testing.assert_close(AnALayer._sparse_paths(x, w, b, up, top.values.softmax(-1), top.indices), expected)
    finally:
        ana_layer._cpu_grouped_mm_runs.cache_clear()


def test_gate_top_k_equal_to_the_number_of_paths_is_the_dense_gate():
    dense, _ = multi_task_model(4)
    sparse, _ = multi_task_model(4, gate_top_k=4)
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(sparse.eval()(X=x), dense.eval()(X=x))
        # a larger k than a task's paths: that task uses all of them
        assert sparse.peft_config["t0"].gate_top_k == 4
        torch.testing.assert_close(sparse(X=x, task_ids="t1"), dense(X=x, task_ids="t1"))


def test_gate_top_k_one_takes_the_argmax_path():
    model, _ = multi_task_model(6, gate_top_k=1)
    model.eval()
    layer = ana_layers(model)[0]
    tasks = layer.ana_tasks["t0"]
    x = torch.randn(50, 6)
    with torch.no_grad():
        out = layer.task_output("t0", 5, x)
        best = (x @ tasks[5].gate).argmax(-1)
        assert best.unique().numel() > 1  # the tokens really use different paths
        for n in range(x.shape[0]):
            e = int(best[n])
            h = tasks[e].down(x[n])
            if e < 5:
                h = tasks[5].in_adapter(e, h)
            torch.testing.assert_close(out[n], tasks[e].scale * tasks[e].up(h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate_top_k", [None, 2])
def test_sparse_gate_computes_only_the_selected_paths(gate_top_k):
    model, _ = multi_task_model(10, gate_top_k=gate_top_k)
    model.eval()
    layer = ana_layers(model)[0]
    tasks = layer.ana_tasks["t0"]
    x = torch.rand(64, 6) + 0.1  # positive inputs
    with torch.no_grad():
        tasks[9].gate[:, 4] = -100.0  # path 4 never makes the top 2
        tasks[4].up.weight.fill_(float("nan"))  # a path that is computed poisons the output
        out = layer.task_output("t0", 9, x)
    if gate_top_k is None:
        assert out.isnan().all()  # the dense gate computes every path (gate ~0 times NaN)
    else:
        assert out.isfinite().all()


def test_training_task_3_with_sparse_gate_leaves_earlier_tasks_bit_identical():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = get_peft_model(BertModel(cfg).eval(), AnAConfig(r=4, gate_top_k=2), adapter_name="t0")
    ids = torch.randint(0, 50, (4, 7))
    tasks = ["t0", "t1", "t2", "t3"]
    snapshots, params = {}, {}
    for t, name in enumerate(tasks):
        if t:
            model.add_task(name)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            snapshots[name] = model(input_ids=ids, task_ids=name).last_hidden_state.clone()
        params[name] = {n: p.detach().clone() for n, p in model.named_parameters() if f".ana_tasks.t0.{t}." in n}
    with torch.no_grad():
        for t, name in enumerate(tasks[:3]):
            assert torch.equal(model(input_ids=ids, task_ids=name).last_hidden_state, snapshots[name]), name
            now = dict(model.named_parameters())
            assert all(torch.equal(now[n], p) for n, p in params[name].items()), name
    assert not torch.allclose(snapshots["t3"], snapshots["t2"])


def test_cache_follows_parameter_changes():
    model, _ = multi_task_model(3)
    model.eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = model(X=x)
        assert torch.equal(model(X=x), before)  # served from the cache
        layer = ana_layers(model)[0]
        layer.ana_tasks["t0"][0].up.weight.add_(0.5)  # a frozen task's tensor, changed in place
        changed = model(X=x)
        assert not torch.allclose(changed, before)
        layer.ana_tasks["t0"][0].up.weight.sub_(0.5)
        torch.testing.assert_close(model(X=x), before)
        # a state dict loaded into the model is seen as well
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[next(k for k in state if "ana_tasks.t0.2.in_weight" in k)] += 1.0
        model.load_state_dict(state)
        assert not torch.allclose(model(X=x), before)


def test_save_load_round_trip_with_gate_top_k(tmp_path):
    model, names = multi_task_model(4, gate_top_k=2)
    model.eval()
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        expected = {name: model(X=x, task_ids=name) for name in names}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "t0").eval()
    assert loaded.peft_config[loaded.active_adapter].gate_top_k == 2
    with torch.no_grad():
        for name in names:
            torch.testing.assert_close(loaded(X=x, task_ids=name), expected[name])


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_gate_top_k_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="gate_top_k must be None or a positive integer"):
        AnAConfig(target_modules=["lin0"], gate_top_k=value)


def test_gate_top_k_and_top_k_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        AnAConfig(target_modules=["lin0"], gate_top_k=2, top_k=2)


def test_a_state_dict_with_one_module_per_in_adapter_loads_in_index_order():
    """The layout before the in-adapters were stacked (``in_adapters.<i>.weight``), loaded by torch's
    ``load_state_dict`` (PEFT's loading: tests/test_hardening_api.py, on a checkpoint of that layout)."""
    model, _ = multi_task_model(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    legacy = {}
    for key, value in state.items():
        head, _, name = key.rpartition(".in_")
        if not head:
            legacy[key] = value
            continue
        for i in range(value.shape[0]):  # in-adapter i moved by i + 1: the order is visible after loading
            legacy[f"{head}.in_adapters.{i}.{name}"] = value[i] + (i + 1)
    model.load_state_dict(legacy, strict=True)  # strict: no key left over, none missing
    loaded = model.state_dict()
    stacked = [k for k in state if k.endswith((".in_weight", ".in_bias"))]
    assert stacked and any(state[k].shape[0] == 2 for k in stacked)
    for key in stacked:
        for i in range(state[key].shape[0]):
            torch.testing.assert_close(loaded[key][i], state[key][i] + (i + 1))
