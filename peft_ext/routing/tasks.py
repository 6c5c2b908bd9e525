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

How a request becomes a per-forward decision that every layer reads, and how the towers of a multi-tower model
(CLIP) are routed, is :mod:`peft_ext.routing.core`'s business.

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
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from .core import (
    AUTO_TASK,
    BASE_MODEL_TASK,
    RoutingHooks,
    RoutingState,
    TaskIds,
    assign_scopes,
    forward_inputs,
)


# Config lists that name per-task tensors by position: `task_names` orders every layer's per-task state (AnA's
# tasks, MoE-CL's routers), `selector_tasks` the task selector's autoencoders. A checkpoint records them.
RECORDED_TASK_LISTS = ("task_names", "selector_tasks")


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
    * :meth:`route` ``(task_ids)``: a context in which forwards serve the given task(s), and :meth:`routed_tasks`:
      the task each sample of the latest forward used.

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
        """Find the routed scopes (:func:`~.core.assign_scopes`, from each layer's ``follows_previous_scope``),
        tell every routed layer its scope, and (re)install the routing hooks. Called after every injection: a new
        adapter may route more towers."""
        self._remove_routing_hook()
        layers = [(key, m) for key, m in self.model.named_modules() if isinstance(m, self.tuner_layer_cls)]
        self.routing.scopes, assigned = assign_scopes(self.model, [(k, m.follows_previous_scope) for k, m in layers])
        for (_, layer), scope in zip(layers, assigned):
            layer.routing_scope = scope
        self._routing_hook_handle = RoutingHooks(self.routing).install(self.model)

    def _remove_routing_hook(self) -> None:
        for handle in getattr(self, "_routing_hook_handle", None) or ():
            handle.remove()
        self._routing_hook_handle = None

    def _routed_layers(self, scope: Optional[str] = None) -> list[nn.Module]:
        """The routed layers (of ``scope``), in module order."""
        return [
            m
            for m in self.model.modules()
            if isinstance(m, self.tuner_layer_cls) and (scope is None or m.routing_scope == scope)
        ]

    def run_inputs(self, batch: Mapping[str, Any]) -> Any:
        """Run the model on ``batch`` (a dict of model inputs; a dual encoder's images or texts alone go through
        its ``get_image_features`` / ``get_text_features``), under the current routing."""
        return forward_inputs(self.model, batch)

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

    def predict_tasks(self, batch=None, adapter_name: Optional[str] = None, *, features=None) -> list[Optional[str]]:
        """The task picked for each sample of ``batch``; only for methods with :attr:`supports_task_selector`."""
        raise ValueError(f"{type(self).__name__} has no task selector (supports_task_selector is False).")

    @contextlib.contextmanager
    def route(self, task_ids: TaskIds) -> Iterator[None]:
        """Context manager: forwards (and ``generate``) inside use ``task_ids`` (see the module docstring)."""
        with self.routing.route(task_ids):
            yield

    def routed_tasks(self, adapter_name: Optional[str] = None, scope: Optional[str] = None) -> list[Optional[str]]:
        """The task each sample of the latest forward of ``scope`` (default: the primary scope, the side a task
        selector reads) used, ``None`` for the base model; e.g. what ``task_ids="auto"`` picked."""
        name = self._continual_adapter(adapter_name)
        decision = self.routing.decision(name, self.routing.primary_scope if scope is None else scope)
        if decision is None:
            raise ValueError("No routed forward yet: run the model before asking which tasks it used.")
        tasks = self.peft_config[name].task_names
        return [tasks[i] if i >= 0 else None for i in decision.tasks.tolist()]
