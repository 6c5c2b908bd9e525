"""The cached stacks (AnA's task paths, MoE-CL's routers) never change a result (issue #17).

Every check runs the same model state twice: with the :class:`~peft_ext.routing.experts.ParameterCache` as it is,
and cache-free (``get`` builds afresh on every call, ``groups`` collects afresh), and compares outputs and
gradients -- before and after optimizer steps (the open task's tensors change under a warm cache), after
``add_task`` / ``end_task`` / ``delete_task``, a loaded state dict, an in-place edit of a frozen task and ``.to()``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import get_peft_model
from tiny_models import MLP, Tiny

import peft_ext  # noqa: F401  (registers the methods)
from peft_ext import AnAConfig, MoECLConfig
from peft_ext.routing.experts import ParameterCache
from peft_ext.tuners.ana import layer as ana_layer_module
from peft_ext.tuners.moecl import layer as moecl_layer_module


@contextlib.contextmanager
def cache_free():
    patch = pytest.MonkeyPatch()
    patch.setattr(ParameterCache, "get", lambda self, slot, params, build, frozen=(): build())
    patch.setattr(ParameterCache, "groups", lambda self, slot, collect: collect())
    # collecting afresh must not share the frozen tensors again behind the real cache's back (see
    # share_version_counter: only a cleared cache may)
    for layer_module in (ana_layer_module, moecl_layer_module):
        patch.setattr(layer_module, "share_version_counter", list)
    try:
        yield
    finally:
        patch.undo()


def grads_and_outputs(model, x, task_ids, seed=0):
    """``(eval outputs per task name, training loss, grads of the trainable tensors)`` for inputs ``x`` (a dict of
    model inputs)."""
    model.eval()
    with torch.no_grad():
        outputs = {name: model(**x, task_ids=name) for name in task_ids}
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the noisy gates draw from the global generator
    loss = model(**x).pow(2).mean()
    if loss.requires_grad:  # (nothing trains after end_task)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, loss.detach(), grads


def assert_cache_exact(model, x, task_ids):
    cached = grads_and_outputs(model, x, task_ids)
    with cache_free():
        fresh = grads_and_outputs(model, x, task_ids)
    for name in task_ids:
        torch.testing.assert_close(cached[0][name], fresh[0][name], msg=name)
    torch.testing.assert_close(cached[1], fresh[1])
    assert cached[2].keys() == fresh[2].keys()
    assert cached[2] or not any(p.requires_grad for p in model.parameters())
    for n in cached[2]:
        torch.testing.assert_close(cached[2][n], fresh[2][n], msg=n)
    # leave the cached run's gradients for the optimizer step
    params = dict(model.named_parameters())
    for n, g in cached[2].items():
        params[n].grad = g


def train_and_check(model, x, names, steps=2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        assert_cache_exact(model, x, names)
        optimizer.step()
    assert_cache_exact(model, x, names)


def ana_model(**kwargs):
    torch.manual_seed(0)
    config = AnAConfig(target_modules=["lin0", "lin1"], init_weights=False, r=3, **kwargs)
    return get_peft_model(MLP().eval(), config, "t0")


@pytest.mark.parametrize("gate_top_k", [None, 2])
def test_ana_cached_paths_match_cache_free(gate_top_k):
    model = ana_model(gate_top_k=gate_top_k)
    x = {"X": torch.randn(4, 5, 6)}
    names = ["t0"]
    train_and_check(model, x, names)
    for name in ["t1", "t2", "t3"]:
        model.add_task(name)
        names.append(name)
        train_and_check(model, x, names)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".ana_tasks.t0.0." in n}
    model.end_task()
    assert_cache_exact(model, x, names)
    model.add_task("t4")
    train_and_check(model, x, [*names, "t4"])
    model.delete_task("t4")
    assert_cache_exact(model, x, names)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)

    # a loaded state dict (frozen and open tasks alike), and a frozen task edited in place by hand
    model.eval()
    with torch.no_grad():
        before = model(**x, task_ids="t3")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if "ana_tasks.t0.1.up.weight" in key or "ana_tasks.t0.3.in_weight" in key:
            state[key] += 0.5
    model.load_state_dict(state)
    assert_cache_exact(model, x, names)
    model.eval()
    with torch.no_grad():
        loaded = model(**x, task_ids="t3")
        assert not torch.allclose(loaded, before)
        next(p for n, p in model.named_parameters() if "lin0.ana_tasks.t0.0.up.weight" in n).add_(1.0)
        edited = model(**x, task_ids="t3")
        assert not torch.allclose(edited, loaded)
    assert_cache_exact(model, x, names)
    model.to(torch.float64)
    assert_cache_exact(model, {"X": x["X"].double()}, names)


def test_ana_nothing_cached_is_saved():
    model = ana_model()
    model.add_task("t1")
    keys = set(model.state_dict())
    model.eval()
    with torch.no_grad():
        model(X=torch.randn(2, 6))
    assert set(model.state_dict()) == keys
    assert not any("cache" in k for k in keys)


def moecl_model():
    torch.manual_seed(0)
    config = MoECLConfig(
        target_modules=["lin0"],
        num_experts=4,
        r=4,
        top_k=2,
        freeze_top_k=2,
        init_weights=False,
        scaling=1.0,
        isolate_finished_tasks=True,
    )
    return get_peft_model(Tiny(), config, adapter_name="task0")


def test_moecl_cached_routers_match_cache_free():
    model = moecl_model()
    x = {"x": torch.randn(6, 5, 8)}
    names = ["task0"]
    train_and_check(model, x, names)
    for name in ["task1", "task2", "task3"]:
        model.add_task(name)  # ends the previous task (activate-freeze)
        names.append(name)
        train_and_check(model, x, names)
    mixed = ["task0", "task3", "none", "task1", "task2", "task3"]

    def mixed_outputs():
        model.eval()
        with torch.no_grad():
            return model(**x, task_ids=mixed)

    def check_mixed():
        cached = mixed_outputs()
        with cache_free():
            torch.testing.assert_close(cached, mixed_outputs())
        return cached

    # per-sample routers (the stacked path), before and after the open router trains
    before = check_mixed()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    model(**x, task_ids=mixed).pow(2).mean().backward()
    optimizer.step()
    after = check_mixed()
    assert not torch.allclose(after[1], before[1])  # task3's router trained
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)  # task0's did not
    # loading and an in-place edit of a frozen router
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if "moecl_router.task0.w_gate.0" in k)
    state[key] += torch.randn_like(state[key])  # (a constant shift of a router moves no softmax)
    model.load_state_dict(state)
    loaded = check_mixed()
    assert not torch.allclose(loaded, after)
    router = next(p for n, p in model.named_parameters() if "moecl_router.task0.w_gate.1" in n)
    with torch.no_grad():
        router.add_(torch.randn_like(router))
    edited = check_mixed()
    assert not torch.allclose(edited, loaded)
    # the finished routers share one version counter: one tensor is read, and an edit of another is seen
    routers = next(m for n, m in model.named_modules() if n.endswith("moecl_router.task0"))
    frozen, _ = routers.param_cache().groups("params", routers._router_params)
    assert len(frozen) == 1 and not any(p is frozen[0] for p in (routers.w_noise[2], routers.w_gate[-1]))
    with torch.no_grad():
        routers.w_noise[2].add_(torch.randn_like(routers.w_noise[2]))
    model.train()  # the noise routers only act while training: compare the stacks themselves
    with torch.no_grad():
        torch.testing.assert_close(routers.w_noise[2], routers.stacked()[1][2])


def ana_layers(model):
    from peft_ext.tuners.ana import AnALinear

    return [m for m in model.modules() if isinstance(m, AnALinear)]


def frozen_tensors(layer, adapter="t0"):
    """A layer's frozen tensors: per frozen task its projections, scale and in-adapters (5 or 7)."""
    tensors = []
    for task in list(layer.ana_tasks[adapter])[: layer.ana_num_frozen[adapter]]:
        tensors += [task.down.weight, task.down.bias, task.up.weight, task.up.bias, task.scale]
        if task.num_in_adapters:
            tensors += [task.in_weight, task.in_bias]
    return tensors


def four_tasks():
    model = ana_model(gate_top_k=2)
    for name in ["t1", "t2", "t3"]:
        model.add_task(name)
    assert ana_layers(model)[0].ana_num_frozen["t0"] == 3
    return model


def test_ana_frozen_tasks_share_one_version_counter():
    model = four_tasks()
    layer = ana_layers(model)[0]
    frozen = frozen_tensors(layer)
    ids, values = [id(p) for p in frozen], [p.detach().clone() for p in frozen]
    frozen[3]._custom_tag = "kept"
    x = {"X": torch.randn(4, 5, 6)}
    model.eval()
    with torch.no_grad():
        before = model(**x)
    probe = layer._frozen_probe("t0")
    assert len(frozen) == 19 and len(probe) == 1  # one buffer: every frozen tensor, in-adapters included
    assert [id(p) for p in frozen_tensors(layer)] == ids  # the same parameter objects (optimizers keep them)
    assert all(torch.equal(p, v) for p, v in zip(frozen, values)) and frozen[3]._custom_tag == "kept"
    for p in frozen:  # an in-place edit of any frozen tensor moves the one counter read
        version = probe[0]._version
        with torch.no_grad():
            p.mul_(1.0)
        assert probe[0]._version > version, p.shape
    with torch.no_grad():
        frozen[-4].add_(0.5)  # the last frozen task's up bias, far from the probe
        assert not torch.allclose(model(**x), before)
    assert_cache_exact(model, x, ["t0", "t2", "t3"])
    model.to(torch.float64)  # .to() assigns param.data: the counter stays shared
    x64 = {"X": x["X"].double()}
    model.eval()
    with torch.no_grad():
        moved = model(**x64)
        frozen_tensors(ana_layers(model)[1])[7].add_(0.5)
        assert not torch.allclose(model(**x64), moved)
    assert_cache_exact(model, x64, ["t0", "t3"])


def test_ana_shared_frozen_tensors_save_load_and_copy(tmp_path):
    import copy

    from peft import PeftModel

    model = four_tasks()
    x = {"X": torch.randn(4, 5, 6)}
    model.eval()
    with torch.no_grad():
        out = model(**x)  # shares the frozen tensors' storage
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP().eval(), tmp_path / "t0", adapter_name="t0").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), out)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(**x), out)
        frozen_tensors(ana_layers(twin)[0])[9].add_(0.5)  # the copy's tensors share nothing with each other yet
        assert not torch.allclose(twin(**x), out)
        torch.testing.assert_close(model(**x), out)


def test_ana_frozen_tensor_torch_cannot_swap_is_checked_on_its_own():
    import weakref

    model = four_tasks()
    layer = ana_layers(model)[0]
    held = frozen_tensors(layer)[6]
    ref = weakref.ref(held)  # swap_tensors refuses a tensor with a weak reference
    x = {"X": torch.randn(4, 5, 6)}
    model.eval()
    with torch.no_grad():
        before = model(**x)
        probe = layer._frozen_probe("t0")
        assert any(p is held for p in probe) and len(probe) == 2
        ref().add_(0.5)
        assert not torch.allclose(model(**x), before)


def test_ana_frozen_tensors_shared_under_inference_mode_still_train():
    model = four_tasks()
    x = {"X": torch.randn(4, 5, 6)}
    model.eval()
    with torch.inference_mode():
        before = model(**x)  # the first forward after the tasks were added: it shares the frozen tensors
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(**x).pow(2).mean().backward()
    model.eval()
    with torch.inference_mode():
        frozen_tensors(ana_layers(model)[0])[2].add_(0.5)
        assert not torch.allclose(model(**x), before)
