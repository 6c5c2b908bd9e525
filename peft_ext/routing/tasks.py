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

Per-task tensors are saved by position (task index), and ``adapter_config.json`` names the task at each position.
So that a config whose lists were cut or reordered cannot load with tasks dropped or swapped, the checkpoint also
records the names, in order (:class:`TaskRecord`, checked on load); checkpoints without that record (written before
it existed) load as they always did.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn


BASE_MODEL_TASK = "none"
AUTO_TASK = "auto"
TaskIds = Union[None, str, Sequence[Optional[str]]]
# Config lists that name per-task tensors by position: `task_names` orders every layer's per-task state (AnA's
# tasks, MoE-CL's routers), `selector_tasks` the task selector's autoencoders. A checkpoint records them.
RECORDED_TASK_LISTS = ("task_names", "selector_tasks")


def check_task_ids(task_ids) -> None:
    """Raise a one-line ``TypeError`` unless ``task_ids`` has a form routing understands: None, a string (a task
    name, ``"none"`` or ``"auto"``) or a collection with one entry per sample. The entries and names are checked
    when the forward resolves them (:meth:`RoutingState.sample_tasks`)."""
    if task_ids is None or isinstance(task_ids, str):
        return
    if isinstance(task_ids, Iterable) and not isinstance(task_ids, (bytes, bytearray)):
        return
    got = repr(task_ids)
    got = got if len(got) <= 60 else got[:57] + "..."
    raise TypeError(
        f"task_ids takes a task name, a list of task names (one per sample; None or {BASE_MODEL_TASK!r} for the base "
        f"model), {BASE_MODEL_TASK!r} or {AUTO_TASK!r}; got {got} ({type(task_ids).__name__})."
    )


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


# A task name also names a PEFT adapter (no '.') and, for one-adapter-per-task runs, a folder inside the run's
# output folder: so it is a plain identifier, never a path ('/', '..', a drive) nor a routing keyword.
_TASK_NAME = re.compile(r"[^\W_][\w-]{0,63}")


def check_task_name(name: str) -> None:
    """Raise a one-line ``ValueError`` unless ``name`` is a safe task name: 1-64 letters, digits, ``_`` or ``-``,
    starting with a letter or digit, other than the routing keywords ``none`` and ``auto``."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or name in (BASE_MODEL_TASK, AUTO_TASK):
        raise ValueError(
            f"Invalid task name {name!r}: use 1-64 letters, digits, '_' or '-' (starting with a letter or digit), "
            f"other than {BASE_MODEL_TASK!r} and {AUTO_TASK!r} (reserved for routing)."
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


class TaskRecord(nn.Module):
    """The task lists of one adapter's config (:data:`RECORDED_TASK_LISTS`), saved with the adapter's tensors so
    that a checkpoint names the tasks its per-task tensors belong to.

    Buffer ``lists``: ``(n,)`` uint8, the UTF-8 JSON of ``{list name: task names}``. It is derived from the live
    config and re-encoded whenever a state dict is taken, so ``add_task``, ``delete_task`` and ``fit_task_selector``
    need no bookkeeping; loading never copies a checkpoint's record in (the tuner compares it with the config
    instead, see :meth:`ContinualTunerMixin._remap_adapter_state_dict_for_load`), and a checkpoint without one is
    not missing anything.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config  # the adapter's live config (a plain reference, not a module)
        self._encoded = self.encode(config)
        self.register_buffer("lists", self._as_tensor(self._encoded))

    @staticmethod
    def encode(config) -> bytes:
        lists = {name: list(getattr(config, name)) for name in RECORDED_TASK_LISTS if hasattr(config, name)}
        return json.dumps(lists, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def _as_tensor(data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @classmethod
    def current(cls, config, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The record of ``config`` as a ``(n,)`` uint8 tensor (on ``like``'s device unless that is meta)."""
        tensor = cls._as_tensor(cls.encode(config))
        if like is not None and like.device.type != "meta":
            tensor = tensor.to(like.device)
        return tensor

    @staticmethod
    def decode(tensor: torch.Tensor):
        """A saved record back to ``{list name: task names}``; None if it is not JSON."""
        try:
            return json.loads(bytes(tensor.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        encoded = self.encode(self.config)
        if encoded != self._encoded:  # the task lists changed since the last state dict
            self._encoded = encoded
            self.lists = self.current(self.config, like=self.lists)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # Derived from the config, never loaded: neither missing from an older checkpoint nor unexpected.
        return


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
            check_task_ids(kwargs["task_ids"])  # before anything changes: the post hook runs after an error too
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


EndTaskReport = dict[str, list[int]]  # what end_task returns: {module name: experts frozen by this call}


class ContinualTunerMixin:
    """Task bookkeeping for a ``BaseTuner`` whose layers implement ``add_task(adapter_name, task_name)``, and the
    **continual contract** every continual method keeps, so that a caller (e.g. the continual trainer's strategies)
    drives AnA and MoE-CL the same way, without per-method keywords:

    * :meth:`add_task` ``(task_name, adapter_name=None)``: grow the adapter by one task and make it active;
    * :meth:`end_task` ``(task_name=None, adapter_name=None, *, batches=None)`` -> :data:`EndTaskReport`: finish a
      task after training. ``batches`` (dicts of model inputs, e.g. the task's training data) is offered to the
      method, which may use it (MoE-CL recounts the routes activate-freeze reads) or ignore it (AnA). Always returns
      ``{module name: experts frozen by this call}``, empty for a method without activate-freeze or a task that
      was ended already;
    * :meth:`delete_task` ``(task_name, adapter_name=None)``: remove a task, where the method can;
    * :attr:`supports_task_selector`: whether the method has a task selector at all; if so,
      :meth:`fit_task_selector` ``(task_name, batches)`` fits it after a task, :attr:`has_task_selector` says it is
      fitted and :meth:`predict_tasks` ``(batch)`` / ``route("auto")`` use it (:class:`~.selector.TaskSelectorMixin`
      implements them);
    * :meth:`route` ``(task_ids)``: a context in which forwards serve the given task(s).

    Subclasses set ``tuner_layer_cls`` (PEFT's attribute), implement :meth:`end_task` and may override
    :meth:`_on_task_added` and :meth:`delete_task`.
    """

    routing: RoutingState
    # Whether the method has a task selector (class attribute: True with TaskSelectorMixin, fitted or not).
    supports_task_selector: bool = False

    # -- construction -------------------------------------------------------------------------------------
    def _init_routing(self) -> None:
        if "routing" not in self.__dict__:
            self.__dict__["routing"] = RoutingState()

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        # The unloaded model is the plain base model: nothing may take `task_ids` out of its forwards any more.
        self._remove_routing_hook()
        return model

    def _register_adapter_tasks(self, adapter_name: str) -> None:
        """Called after injection: make sure the adapter has at least one task and the routing state knows it."""
        config = self.peft_config[adapter_name]
        if not config.task_names:
            check_task_name(adapter_name)
            config.task_names.append(adapter_name)
        self.routing.task_names[adapter_name] = config.task_names
        self.routing.routing_token[adapter_name] = config.routing_token
        self.routing.active_task.setdefault(adapter_name, config.task_names[-1])
        param = next(self.model.parameters(), None)
        record = TaskRecord(config)
        self._task_record_store()[adapter_name] = record if param is None else record.to(param.device)

    def _forget_adapter_tasks(self, adapter_name: str) -> None:
        """Drop what :meth:`_register_adapter_tasks` kept for a deleted adapter."""
        for table in (self.routing.task_names, self.routing.active_task, self.routing.routing_token):
            table.pop(adapter_name, None)
        store = self._modules.get(self._task_record_attr())
        if store is not None and adapter_name in store:
            del store[adapter_name]

    # -- checkpoint: the task record --------------------------------------------------------------------------
    @classmethod
    def _task_record_attr(cls) -> str:
        return f"{cls.prefix}task_record"

    def _task_record_store(self) -> nn.ModuleDict:
        """``{prefix}task_record``: one :class:`TaskRecord` per adapter on the tuner, saved by PEFT with the adapter
        (``base_model.<prefix>task_record.lists`` in the checkpoint)."""
        store = self._modules.get(self._task_record_attr())
        if store is None:
            store = nn.ModuleDict()
            self.add_module(self._task_record_attr(), store)
        return store

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse a checkpoint whose recorded task lists differ from the config's (one-line
        :class:`~peft_ext.tuners.checkpoint.AdapterCheckpointError`). A checkpoint without a record (written before
        records existed) loads as before; either way the loaded state holds the config's record, so that it is
        not reported missing."""
        from ..tuners.checkpoint import check_task_record

        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        name = f"{cls._task_record_attr()}.{adapter_name}"
        for module_name, module in model.named_modules():
            if isinstance(module, TaskRecord) and (module_name == name or module_name.endswith("." + name)):
                key = f"{module_name}.lists"
                if key in remapped:
                    check_task_record(TaskRecord.decode(remapped[key]), config, adapter_name)
                remapped[key] = TaskRecord.current(config, like=module.lists)
                break
        return remapped

    def _install_routing_hook(self) -> None:
        if getattr(self, "_routing_hook_handle", None) is not None:
            return
        hooks = _RoutingHooks(self.routing)
        self._routing_hook_handle = (
            self.model.register_forward_pre_hook(hooks.pre_forward, with_kwargs=True, prepend=True),
            self.model.register_forward_hook(hooks.post_forward, with_kwargs=True, always_call=True),
        )

    def _remove_routing_hook(self) -> None:
        for handle in getattr(self, "_routing_hook_handle", None) or ():
            handle.remove()
        self._routing_hook_handle = None

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

    def end_task(
        self,
        task_name: Optional[str] = None,
        adapter_name: Optional[str] = None,
        *,
        batches: Optional[Iterable] = None,
    ) -> EndTaskReport:
        """Finish task ``task_name`` (default: the last task) after training; ending a task twice is a no-op.

        ``batches``: the task's inputs (dicts of model inputs), which a method may use to finish the task (MoE-CL:
        activate-freeze counts the trained router's routes on them) or ignore (AnA). Returns ``{module name:
        experts frozen by this call}`` (empty where the method has no activate-freeze)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement end_task.")

    def delete_task(self, task_name: str, adapter_name: Optional[str] = None) -> None:
        """Delete task ``task_name`` from the adapter, where the method can (AnA: the last task)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot delete a single task; delete the whole adapter (delete_adapter) instead."
        )

    # -- task selector: none by default (TaskSelectorMixin provides one) ------------------------------------------
    @property
    def has_task_selector(self) -> bool:
        """True when a fitted task selector can route ``task_ids="auto"`` (never, for a method without one)."""
        return False

    def fit_task_selector(self, task_name: str, batches=None, adapter_name: Optional[str] = None, **kwargs):
        """Fit the task selector's entry of ``task_name``; only for methods with :attr:`supports_task_selector`."""
        raise ValueError(f"{type(self).__name__} has no task selector (supports_task_selector is False).")

    def predict_tasks(self, batch, adapter_name: Optional[str] = None) -> list[Optional[str]]:
        """The task picked for each sample of ``batch``; only for methods with :attr:`supports_task_selector`."""
        raise ValueError(f"{type(self).__name__} has no task selector (supports_task_selector is False).")

    @contextlib.contextmanager
    def route(self, task_ids: TaskIds) -> Iterator[None]:
        """Context manager: forwards (and ``generate``) inside use ``task_ids`` (see the module docstring)."""
        check_task_ids(task_ids)
        previous = self.routing.requested
        self.routing.requested = task_ids
        try:
            yield
        finally:
            self.routing.requested = previous
