import pytest
import torch

from peft_ext.routing.tasks import RoutingState, check_task_name, pool_tokens


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


def test_routing_state_resolves_once_per_forward():
    state = RoutingState()
    state.task_names["default"] = ["t0", "t1"]
    state.active_task["default"] = "t1"
    x = torch.zeros(3, 4, 8)
    state.start_forward(None)
    assert state.sample_tasks("default", x).tolist() == [1, 1, 1]
    state.requested = ["t0", None, "none"]
    assert state.sample_tasks("default", x).tolist() == [1, 1, 1]  # cached for this forward
    state.start_forward(None)
    assert state.sample_tasks("default", x).tolist() == [0, -1, -1]
    state.start_forward(None)
    state.requested = "t9"
    with pytest.raises(ValueError, match="Unknown task 't9'"):
        state.sample_tasks("default", x)
    state.start_forward(None)
    state.requested = ["t0"]
    with pytest.raises(ValueError, match="1 entries but the batch has 3"):
        state.sample_tasks("default", x)
    state.start_forward(None)
    state.requested = "auto"
    with pytest.raises(ValueError, match="task selector"):
        state.sample_tasks("default", x)


@pytest.mark.parametrize(
    "requested, tasks, uniform",
    [
        (None, [1, 1, 1], 1),  # the active task
        ("t0", [0, 0, 0], 0),
        ("none", [-1, -1, -1], -1),
        (["t1", "t1", "t1"], [1, 1, 1], 1),  # a list of one repeated name is uniform too
        ([None, "none", None], [-1, -1, -1], -1),
        (["t0", "none", "t1"], [0, -1, 1], None),  # mixed: layers must read the tensor
        ("auto", [1, -1, 0], None),  # decided on the device
    ],
)
def test_uniform_task_known_without_reading_the_tensor(requested, tasks, uniform):
    state = RoutingState()
    state.task_names["default"] = ["t0", "t1"]
    state.active_task["default"] = "t1"
    state.selector = lambda adapter, pooled: torch.tensor([1, -1, 0])
    state.requested = requested
    state.start_forward(None)
    assert state.sample_tasks("default", torch.zeros(3, 4, 8)).tolist() == tasks
    assert state.uniform_task("default") == uniform
    state.start_forward(None)
    assert state.uniform_task("default") is None  # a new forward: nothing resolved yet


def test_continuing_forward_keeps_the_decisions_of_its_prompt():
    state = RoutingState()
    state.task_names["default"] = ["t0", "t1"]
    state.active_task["default"] = "t1"
    picks = iter([torch.tensor([0, -1]), torch.tensor([1, 1])])
    state.selector = lambda adapter, pooled: next(picks)
    state.requested = "auto"
    state.start_forward(None)  # the prompt
    assert state.sample_tasks("default", torch.zeros(2, 5, 8)).tolist() == [0, -1]
    state.start_forward(None, continues=True)  # a decoding step on the cache
    assert state.sample_tasks("default", torch.zeros(2, 1, 8)).tolist() == [0, -1]
    state.requested = "t0"  # another request in a continuing forward: decided again
    state.start_forward(None, continues=True)
    assert state.sample_tasks("default", torch.zeros(2, 1, 8)).tolist() == [0, 0]
    state.requested = "auto"
    state.start_forward(None)  # a new prompt
    assert state.sample_tasks("default", torch.zeros(2, 5, 8)).tolist() == [1, 1]


@pytest.mark.parametrize("name", ["", "a.b", "none", "auto", 3])
def test_reserved_or_invalid_task_names(name):
    with pytest.raises(ValueError, match="Invalid task name"):
        check_task_name(name)
