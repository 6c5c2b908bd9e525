import dataclasses

import pytest
import torch

from peft_ext.routing.core import RoutingState, pool_tokens
from peft_ext.routing.gating import noisy_top_k_gating
from peft_ext.routing.tasks import check_task_name


def test_pool_tokens_modes_hand_checked():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # (batch 2, seq 3, dim 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])  # sample 0: right padded
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])  # sample 0: left padded
    torch.testing.assert_close(pool_tokens(x, "first"), x[:, 0])
    torch.testing.assert_close(pool_tokens(x, "mean", right), torch.stack([x[0, :2].mean(0), x[1].mean(0)]))
    torch.testing.assert_close(pool_tokens(x, "last", right), torch.stack([x[0, 1], x[1, 2]]))
    torch.testing.assert_close(pool_tokens(x, "last", left), torch.stack([x[0, 2], x[1, 2]]))
    torch.testing.assert_close(pool_tokens(x, "last"), x[:, -1])
    # a mask of another shape (e.g. a Q-Former's query stream) is ignored
    torch.testing.assert_close(pool_tokens(x, "mean", torch.ones(2, 7)), x.mean(1))
    with pytest.raises(ValueError, match="routing token"):
        pool_tokens(x, "cls")


def _state(scopes=("",)):
    state = RoutingState()
    state.task_names["default"] = ["t0", "t1"]
    state.active_task["default"] = "t1"
    state.scopes = list(scopes)
    return state


def test_routing_state_decides_once_per_forward():
    state = _state()
    x = torch.zeros(3, 4, 8)
    state.start_scope("", None)
    assert state.decide("default", "", x).tasks.tolist() == [1, 1, 1]
    state.set_request(["t0", None, "none"])
    assert state.decide("default", "", x).tasks.tolist() == [1, 1, 1]  # made once for this forward
    state.start_scope("", None)
    assert state.decide("default", "", x).tasks.tolist() == [0, -1, -1]
    state.start_scope("", None)
    state.set_request("t9")
    with pytest.raises(ValueError, match="Unknown task 't9'"):
        state.decide("default", "", x)
    state.start_scope("", None)
    state.set_request(["t0"])
    with pytest.raises(ValueError, match="1 entries but the batch has 3"):
        state.decide("default", "", x)
    state.start_scope("", None)
    state.set_request("auto")
    with pytest.raises(ValueError, match="task selector"):
        state.decide("default", "", x)


def test_decision_is_immutable():
    decision = _state().decide("default", "", torch.zeros(2, 8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.uniform = 0


@pytest.mark.parametrize(
    "requested, tasks, uniform",
    [
        (None, [1, 1, 1], 1),  # the active task
        ("t0", [0, 0, 0], 0),
        ("none", [-1, -1, -1], -1),
        (["t1", "t1", "t1"], [1, 1, 1], 1),  # a list of one repeated name is uniform too
        ([None, "none", None], [-1, -1, -1], -1),
        (["t0", "none", "t1"], [0, -1, 1], None),  # mixed: layers must read the tensor
        ("auto", [1, -1, 0], None),  # the selector picked several routes
    ],
)
def test_uniform_task_known_without_reading_the_tensor(requested, tasks, uniform):
    state = _state()
    state.selector = lambda adapter, pooled: torch.tensor([1, -1, 0])
    state.set_request(requested)
    state.start_scope("", None)
    decision = state.decide("default", "", torch.zeros(3, 4, 8))
    assert decision.tasks.tolist() == tasks
    assert decision.uniform == uniform
    state.start_scope("", None)
    assert state.decision("default", "") is None  # a new forward: nothing decided yet


@pytest.mark.parametrize("picked", [[1, 1, 1], [-1, -1, -1]])
def test_a_selector_picking_one_route_for_all_is_uniform(picked):
    # every layer then takes the one-task path (or skips its adapter), as when the task is named
    state = _state()
    state.selector = lambda adapter, pooled: torch.tensor(picked)
    state.set_request("auto")
    state.start_scope("", None)
    decision = state.decide("default", "", torch.zeros(3, 4, 8))
    assert decision.tasks.tolist() == picked and decision.uniform == picked[0] and decision.selected


@pytest.mark.parametrize("rows", [3, 40])  # fewer rows than routers (each row's router gathered), and more
def test_each_rows_own_router_whichever_way_it_is_computed(rows):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 6, generator=gen), torch.randn(10, 6, 4, generator=gen)
    index = torch.randint(0, 10, (rows,), generator=gen)
    expected = torch.stack([x[n] @ w[index[n]] for n in range(rows)])
    torch.testing.assert_close(noisy_top_k_gating(x, w, None, 4, False, router_index=index).logits, expected)


def test_continuing_forward_keeps_the_decisions_of_its_prompt():
    state = _state()
    picks = iter([torch.tensor([0, -1]), torch.tensor([1, 1])])
    state.selector = lambda adapter, pooled: next(picks)
    state.set_request("auto")
    state.start_scope("", None)  # the prompt
    assert state.decide("default", "", torch.zeros(2, 5, 8)).tasks.tolist() == [0, -1]
    state.start_scope("", None, continues=True)  # a decoding step on the cache
    assert state.decide("default", "", torch.zeros(2, 1, 8)).tasks.tolist() == [0, -1]
    state.set_request("t0")  # another request in a continuing forward: decided again
    state.start_scope("", None, continues=True)
    assert state.decide("default", "", torch.zeros(2, 1, 8)).tasks.tolist() == [0, 0]
    state.set_request("auto")
    state.start_scope("", None)  # a new prompt
    assert state.decide("default", "", torch.zeros(2, 5, 8)).tasks.tolist() == [1, 1]


def test_towers_have_their_own_decisions_and_follow_the_primary_one():
    # CLIP-like: images (primary) and class prompts of another batch size. Before the routing core had scopes, a
    # text batch of the image batch's size silently took the images' decision, and "auto" ran the selector on
    # text features of the wrong size.
    state = _state(("vision_model", "text_model"))
    calls = []
    state.selector = lambda adapter, pooled: calls.append(pooled.shape) or torch.tensor([1, -1, 0])
    with state.route("auto"):
        state.start_scope("vision_model", None)
        images = state.decide("default", "vision_model", torch.zeros(3, 5, 8))
        state.start_scope("text_model", None)
        same_size = state.decide("default", "text_model", torch.zeros(3, 7, 4))
        assert same_size.tasks.tolist() == images.tasks.tolist() == [1, -1, 0]
        assert calls == [torch.Size([3, 8])]  # the selector read the image side only
        state.start_scope("text_model", None)
        with pytest.raises(ValueError, match="text_model batch has 5 samples and cannot follow"):
            state.decide("default", "text_model", torch.zeros(5, 7, 4))
    with state.route("t0"):  # one task: every tower, any batch size
        state.start_scope("text_model", None)
        assert state.decide("default", "text_model", torch.zeros(5, 7, 4)).tasks.tolist() == [0] * 5
    with state.route("auto"):  # a new block: no image decision to follow yet
        state.start_scope("text_model", None)
        with pytest.raises(ValueError, match="follows the routing of vision_model"):
            state.decide("default", "text_model", torch.zeros(3, 7, 4))
    state.selector = lambda adapter, pooled: torch.tensor([1, 1, 1])
    with state.route("auto"):
        state.start_scope("vision_model", None)
        state.decide("default", "vision_model", torch.zeros(3, 5, 8))
        state.start_scope("text_model", None)
        # a selector that happens to pick one task does not broadcast (only a requested one does)
        with pytest.raises(ValueError, match="cannot follow"):
            state.decide("default", "text_model", torch.zeros(4, 7, 4))


@pytest.mark.parametrize("name", ["", "a.b", "none", "auto", 3])
def test_reserved_or_invalid_task_names(name):
    with pytest.raises(ValueError, match="Invalid task name"):
        check_task_name(name)
