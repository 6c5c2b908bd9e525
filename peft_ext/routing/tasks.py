"""Task bookkeeping and per-forward routing, shared by the continual methods (AnA, MoE-CL).

Design: **one PEFT adapter holds a whole continual learner**, and tasks are named *inside* it
(``config.task_names``, in training order). One ``save_pretrained`` therefore writes every task, router, frozen
mask and the task selector, and ``PeftModel.from_pretrained`` rebuilds them all from ``adapter_config.json``.
If ``task_names`` is empty when the adapter is created, it starts with one task named after the adapter, so
``get_peft_model(base, MoECLConfig(...), adapter_name="task0")`` is ready to train task ``"task0"``.

Which task a forward uses:

* default: the adapter's active task (the last one added, or :meth:`ContinualTunerMixin.set_task`);
* ``model(**batch, task_ids=...)`` or ``with model.route(task_ids): ...``, where ``task_ids`` is one task name,
  a list with one entry per sample (``None`` or ``"none"``: the untouched base model for that sample), or
  ``"auto"``: the task selector (DDAS) decides per sample. ``generate`` takes the context manager form; its
  decoding steps (forwards that continue a KV cache) keep the task decisions made on the prompt.

The decision is resolved once per forward into a ``(batch,)`` tensor of task indices (``-1`` = base model) that
every layer reads from the shared :class:`RoutingState`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn


BASE_MODEL_TASK = "none"
AUTO_TASK = "auto"
TaskIds = Union[None, str, Sequence[Optional[str]]]


@dataclass
class ContinualConfigMixin:
    """Config fields shared by the continual methods (mixed into their ``PeftConfig`` dataclasses)."""

    task_names: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Names of the tasks this adapter has learned, in training order. Filled by `add_task`; saved in "
            "adapter_config.json so that loading rebuilds every task. Empty: one task named after the adapter."
        },
    )
    ended_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "Tasks finished by end_task (bookkeeping filled by the tuner, saved with the adapter)."},
    )
    routing_token: str = field(
        default="first",
        metadata={
            "help": "Which token's features make per-sample decisions (routers, task selector): 'first' (CLS, "
            "encoders), 'mean' (masked mean over tokens) or 'last' (last non-padding token, decoder LMs).",
            "choices": ["first", "mean", "last"],
        },
    )

    def _validate_continual_fields(self) -> None:
        if self.routing_token not in ("first", "mean", "last"):
            raise ValueError(f"routing_token must be 'first', 'mean' or 'last', got {self.routing_token!r}.")
        # own copies: add_task/end_task grow these lists, which must not leak into a caller's kwargs
        self.task_names = list(self.task_names)
        self.ended_tasks = list(self.ended_tasks)
        names = self.task_names
        if len(set(names)) != len(names):
            raise ValueError(f"task_names must be unique, got {names}.")
        for name in names:
            check_task_name(name)
        unknown = [name for name in self.ended_tasks if name not in names]
        if unknown:
            raise ValueError(f"ended_tasks {unknown} are not in task_names {names}.")


def check_task_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name in (BASE_MODEL_TASK, AUTO_TASK):
        raise ValueError(
            f"Invalid task name {name!r}: use a non-empty string without '.', other than "
            f"{BASE_MODEL_TASK!r} and {AUTO_TASK!r} (reserved for routing)."
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode inside the block, each module's own flag restored afterwards (a plain
    ``model.train(previous)`` would flatten a model whose modules were in mixed modes)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def pool_tokens(x: torch.Tensor, mode: str, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reduce token features ``(batch, seq, dim)`` to one vector per sample ``(batch, dim)``.

    ``x`` of shape ``(batch, dim)`` is returned as is. ``attention_mask`` ``(batch, seq)`` (1 = real token) makes
    'mean' ignore padding and 'last' pick the last real token (right or left padding) -- it is used only when its shape
    matches ``x``'s first two dimensions (e.g. not inside a Q-Former's query stream).
    """
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    mask = attention_mask if attention_mask is not None and attention_mask.shape == x.shape[:2] else None
    if mode == "first":
        return x[:, 0]
    if mode == "mean":
        if mask is None:
            return x.mean(dim=1)
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if mode == "last":
        if mask is None:
            return x[:, -1]
        # position of the last real token, for right and left padding alike
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * positions).argmax(dim=1)
        return x[torch.arange(x.shape[0], device=x.device), last]
    raise ValueError(f"Unknown routing token mode {mode!r}.")


class RoutingState:
    """Routing decision of the current forward, shared (by reference) by a tuner and all of its layers.

    Not a module and holds no weights: it is rebuilt from the config whenever the tuner is built.
    """

    def __init__(self) -> None:
        self.task_names: dict[str, list[str]] = {}  # adapter -> task names (the config's own list)
        self.active_task: dict[str, str] = {}  # adapter -> task used when no task_ids are given
        self.requested: TaskIds = None  # what the caller asked for (None: the active task)
        self.attention_mask: Optional[torch.Tensor] = None
        self.selector: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None  # (adapter, x) -> (batch,)
        self._resolved: dict[str, torch.Tensor] = {}  # adapter -> (batch,) task indices, for this forward
        self._uniform: dict[str, Optional[int]] = {}  # adapter -> the one task index of the whole batch, if known
        self._resolved_request: TaskIds = None  # the request the resolved decisions answer
        self.capture: Optional[list[torch.Tensor]] = None  # when a list: collect the first layer's input
        self.routing_token: dict[str, str] = {}
        self.count_routes = False  # True: layers count the selected experts in eval mode too (MoE-CL's recount)
        self._captured_this_forward = False

    def start_forward(self, attention_mask: Optional[torch.Tensor], continues: bool = False) -> None:
        """Reset the per-forward decisions. ``continues``: the forward extends the sequences of the previous one
        (a decoding step of ``generate`` on a KV cache); the task decisions made on the prompt then stay, as long
        as the request is the same -- so ``task_ids="auto"`` picks a task once per generated sequence, not once
        per new token."""
        self.attention_mask = attention_mask
        self._captured_this_forward = False
        if continues and self._resolved and _same_request(self.requested, self._resolved_request):
            return
        self._resolved = {}
        self._uniform = {}
        self._resolved_request = self.requested

    def task_index(self, adapter_name: str, task_name: str) -> int:
        names = self.task_names.get(adapter_name, [])
        if task_name not in names:
            raise ValueError(f"Unknown task {task_name!r} for adapter {adapter_name!r}; known tasks: {names}.")
        return names.index(task_name)

    def observe(self, adapter_name: str, x: torch.Tensor) -> None:
        """Called by a routed layer on its input before any adapter output is added (feature capture)."""
        if self.capture is not None and not self._captured_this_forward:
            self._captured_this_forward = True
            mode = self.routing_token.get(adapter_name, "first")
            self.capture.append(pool_tokens(x, mode, self.attention_mask).detach().float())

    def sample_tasks(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Task index per sample, ``(batch,)`` long tensor on ``x.device``; ``-1`` means the base model.

        Resolved once per forward (by the first routed layer that asks) and reused by all later layers, so the
        task selector sees the input of the first adapted layer, which no adapter has touched yet.
        """
        cached = self._resolved.get(adapter_name)
        batch = x.shape[0]
        if cached is not None and cached.shape[0] == batch:
            return cached
        requested = self.requested
        uniform: Optional[int] = None
        if requested is None:
            uniform = self.task_index(adapter_name, self.active_task[adapter_name])
        elif isinstance(requested, str) and requested == AUTO_TASK:
            if self.selector is None:
                raise ValueError("task_ids='auto' needs a fitted task selector; call fit_task_selector(...) first.")
            idx = self.selector(
                adapter_name, pool_tokens(x, self.routing_token.get(adapter_name, "first"), self.attention_mask)
            )
        elif isinstance(requested, str):
            uniform = -1 if requested == BASE_MODEL_TASK else self.task_index(adapter_name, requested)
        else:
            names = list(requested)
            if len(names) != batch:
                raise ValueError(f"task_ids has {len(names)} entries but the batch has {batch} samples.")
            values = [-1 if n is None or n == BASE_MODEL_TASK else self.task_index(adapter_name, n) for n in names]
            if values and all(v == values[0] for v in values):
                uniform = values[0]
            else:
                idx = torch.tensor(values, dtype=torch.long)
        if uniform is not None:
            idx = torch.full((batch,), uniform, dtype=torch.long, device=x.device)
        idx = idx.to(x.device)
        self._resolved[adapter_name] = idx
        self._uniform[adapter_name] = uniform
        return idx

    def uniform_task(self, adapter_name: str) -> Optional[int]:
        """After :meth:`sample_tasks`: the task index every sample of this forward uses (``-1``: the base model),
        when that is known without reading the task tensor (a single task name, the active task, or a list of
        one repeated name); None for a mixed batch or a decision made on the device (``"auto"``).

        Lets layers take the one-router path and skip per-sample masks without a host-device sync.
        """
        return self._uniform.get(adapter_name)


def _same_request(a: TaskIds, b: TaskIds) -> bool:
    if a is b:
        return True
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b
    return list(a) == list(b)


def continues_cached_sequence(forward_kwargs: dict) -> bool:
    """True when a forward extends sequences held in a non-empty KV cache (a decoding step of ``generate``)."""
    # transformers 5 passes the cache as `cache` (`past_key_values` before, still accepted)
    past = forward_kwargs.get("cache", forward_kwargs.get("past_key_values"))
    seq_length = getattr(past, "get_seq_length", None)
    return bool(seq_length is not None and seq_length() > 0)


class _RoutingHooks:
    """Hooks on the wrapped model: take ``task_ids`` out of the forward kwargs (the model itself does not accept
    it) and reset the per-forward routing. A class rather than closures so the model stays picklable."""

    def __init__(self, routing: RoutingState) -> None:
        self.routing = routing
        self.from_kwarg = False
        self.previous: TaskIds = None

    def pre_forward(self, module: nn.Module, args, kwargs):
        if "task_ids" in kwargs:
            kwargs = dict(kwargs)
            self.previous = self.routing.requested
            self.routing.requested = kwargs.pop("task_ids")
            self.from_kwarg = True
        self.routing.start_forward(kwargs.get("attention_mask"), continues=continues_cached_sequence(kwargs))
        return args, kwargs

    def post_forward(self, module: nn.Module, args, kwargs, output):
        if self.from_kwarg:
            self.routing.requested = self.previous
            self.from_kwarg = False
        return output


class ContinualTunerMixin:
    """Task bookkeeping for a ``BaseTuner`` whose layers implement ``add_task(adapter_name, task_name)``.

    Subclasses set ``tuner_layer_cls`` (PEFT's attribute) and may override :meth:`_on_task_added`.
    """

    routing: RoutingState

    # -- construction -------------------------------------------------------------------------------------
    def _init_routing(self) -> None:
        if "routing" not in self.__dict__:
            self.__dict__["routing"] = RoutingState()

    def _register_adapter_tasks(self, adapter_name: str) -> None:
        """Called after injection: make sure the adapter has at least one task and the routing state knows it."""
        config = self.peft_config[adapter_name]
        if not config.task_names:
            check_task_name(adapter_name)
            config.task_names.append(adapter_name)
        self.routing.task_names[adapter_name] = config.task_names
        self.routing.routing_token[adapter_name] = config.routing_token
        self.routing.active_task.setdefault(adapter_name, config.task_names[-1])

    def _install_routing_hook(self) -> None:
        if getattr(self, "_routing_hook_handle", None) is not None:
            return
        hooks = _RoutingHooks(self.routing)
        self._routing_hook_handle = (
            self.model.register_forward_pre_hook(hooks.pre_forward, with_kwargs=True, prepend=True),
            self.model.register_forward_hook(hooks.post_forward, with_kwargs=True, always_call=True),
        )

    # -- public API --------------------------------------------------------------------------------------
    def _continual_adapter(self, adapter_name: Optional[str]) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; adapters: {list(self.peft_config)}.")
        return name

    def tasks(self, adapter_name: Optional[str] = None) -> list[str]:
        """Task names of ``adapter_name`` (default: the active adapter), in training order."""
        return list(self.peft_config[self._continual_adapter(adapter_name)].task_names)

    def active_task(self, adapter_name: Optional[str] = None) -> str:
        return self.routing.active_task[self._continual_adapter(adapter_name)]

    def set_task(self, task_name: str, adapter_name: Optional[str] = None) -> None:
        """Route forwards without ``task_ids`` to ``task_name`` (does not change what is trainable)."""
        adapter_name = self._continual_adapter(adapter_name)
        self.routing.task_index(adapter_name, task_name)  # validates
        self.routing.active_task[adapter_name] = task_name

    def add_task(self, task_name: str, adapter_name: Optional[str] = None) -> None:
        """Grow the adapter by one task (new router / adapter / in-adapters per method) and make it active.

        Only the new task's parameters (and whatever the method keeps shared and unfrozen) are trainable
        afterwards; earlier tasks' parameters are frozen.
        """
        adapter_name = self._continual_adapter(adapter_name)
        check_task_name(task_name)
        config = self.peft_config[adapter_name]
        if task_name in config.task_names:
            raise ValueError(f"Task {task_name!r} already exists in adapter {adapter_name!r}.")
        config.task_names.append(task_name)
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls) and adapter_name in module._all_available_adapter_names():
                module.add_task(adapter_name, task_name)
        self.routing.active_task[adapter_name] = task_name
        self._on_task_added(adapter_name, task_name)

    def _on_task_added(self, adapter_name: str, task_name: str) -> None:
        """Hook for methods (e.g. set requires_grad for the new task)."""

    @contextlib.contextmanager
    def route(self, task_ids: TaskIds) -> Iterator[None]:
        """Context manager: forwards (and ``generate``) inside use ``task_ids`` (see the module docstring)."""
        previous = self.routing.requested
        self.routing.requested = task_ids
        try:
            yield
        finally:
            self.routing.requested = previous
