"""The routing core: which task each sample of a forward uses, decided once per forward and per routed scope.

A **request** (what the caller asked for) is one of: None (the adapter's active task), a task name, ``"none"``
(the untouched base model), ``"auto"`` (the task selector decides per sample) or a list with one entry per sample.
A **decision** (:class:`RoutingDecision`) is what a forward does with it: a ``(batch,)`` tensor of task indices
(``-1`` = base model), made by the first routed layer of a scope that runs and read, unchanged, by every later layer
of that scope in the same forward.

**Scopes.** A model with several towers -- CLIP's ``vision_model`` and ``text_model``, BLIP-2's ``vision_model``,
``qformer`` and ``language_model`` -- routes each adapted tower with its own decision: the towers see different
batches (a CLIP text tower embeds class prompts, not the images), so they cannot share one, and a tower can run
without the model's own forward (``get_image_features``). Any other model is one scope, ``""``. The *primary*
scope (the image side of a vision-language model: ``vision_model`` when present, else the first routed tower) is
the one a per-sample request describes and the task selector reads; every other scope
**follows** the primary scope's latest decision for the same request: unchanged when its batch has the same size,
broadcast when the primary decision is one task for the whole batch, refused with a one-line error otherwise. A
request naming one task (or none) applies to every scope directly.

Each scope's forward starts (a forward pre-hook on the scope's module) by dropping that scope's previous
decisions. A forward that continues a KV cache (a decoding step of ``generate``) keeps them, so ``task_ids="auto"``
picks a task once per generated sequence, not once per token.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn


BASE_MODEL_TASK = "none"
AUTO_TASK = "auto"
TaskIds = Union[None, str, Sequence[Optional[str]]]
WHOLE_MODEL_SCOPE = ""
# Top-level submodules that are separate towers of a multi-tower model, in order of preference for the primary
# scope (the side whose inputs identify the task).
TOWER_NAMES = ("vision_model", "text_model", "qformer", "language_model", "audio_model")


def check_task_ids(task_ids) -> None:
    """Raise a one-line ``TypeError`` unless ``task_ids`` has a form routing understands: None, a string (a task
    name, ``"none"`` or ``"auto"``) or a collection with one entry per sample. The entries and names are checked
    when a forward resolves them (:meth:`RoutingState.decide`)."""
    if task_ids is None or isinstance(task_ids, str):
        return
    if isinstance(task_ids, Iterable) and not isinstance(task_ids, (bytes, bytearray, Mapping)):
        return
    got = repr(task_ids)
    got = got if len(got) <= 60 else got[:57] + "..."
    raise TypeError(
        f"task_ids takes a task name, a list of task names (one per sample; None or {BASE_MODEL_TASK!r} for the base "
        f"model), {BASE_MODEL_TASK!r} or {AUTO_TASK!r}; got {got} ({type(task_ids).__name__})."
    )


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


def deep_features(output: Any, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean-pooled last hidden state ``(batch, dim)`` in a model's ``output``: ``last_hidden_state``, else the
    last of ``hidden_states`` (a head model called with ``output_hidden_states=True``), else a ``(batch, seq, dim)``
    first element. Padding (``attention_mask`` 0) is left out of the mean."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and getattr(output, "hidden_states", None) is not None:
        hidden = output.hidden_states[-1]
    if hidden is None and isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        hidden = output[0]
    if hidden is None and torch.is_tensor(output):
        hidden = output  # a plain module's output: (batch, dim), or (batch, seq, dim)
    if hidden is None or hidden.dim() not in (2, 3):
        raise ValueError(
            f"selector_features='deep' needs token states from the model ({type(output).__name__} has none): "
            "use selector_features='shallow'."
        )
    return pool_tokens(hidden, "mean", attention_mask)


def deep_and_shallow(deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
    """``selector_features="deep+shallow"``: the deep features ``(batch, F)`` and the mean-pooled input of the first
    routed layer ``(batch, F')``, each scaled to unit length, side by side ``(batch, F + F')``. A cosine on them is the
    mean of the two cosines: the deep part tells topics apart, the shallow one (close to the tokens) tells another
    language or vocabulary."""
    return torch.cat([F.normalize(deep.float(), dim=-1), F.normalize(shallow.float(), dim=-1)], dim=-1)


def with_hidden_states(module: nn.Module, kwargs: dict, **extra: Any) -> dict:
    """``kwargs`` plus ``output_hidden_states=True`` (a transformers model with a head returns no last hidden state
    otherwise) and the ``extra`` keywords, each only where ``module``'s forward takes it."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    wanted = {"output_hidden_states": True, **extra}
    return {**kwargs, **{k: v for k, v in wanted.items() if open_ended or k in parameters}}


@dataclass(frozen=True)
class RoutingDecision:
    """The routing of one forward of one scope, for one adapter.

    Attributes:
        tasks: ``(batch,)`` long tensor, the task index of each sample (``-1``: the base model).
        uniform: the one task index of the whole batch (a task name, the active task, a list of one repeated name,
            a selector that picked one task for every sample), else None (a mixed batch). Lets every layer take the
            one-task path without reading ``tasks`` on the host.
        selected: made by the task selector. A batch it sent to one task is uniform by chance, not by request, so
            another tower's batch of another size does not follow it (:meth:`to_batch`): the same call would fail on
            the next batch, which the selector splits.
    """

    tasks: torch.Tensor
    uniform: Optional[int] = None
    selected: bool = False

    @classmethod
    def everyone(cls, task: int, batch: int, device) -> "RoutingDecision":
        return cls(torch.full((batch,), task, dtype=torch.long, device=device), task)

    @classmethod
    def selected_by(cls, tasks: torch.Tensor) -> "RoutingDecision":
        """The task selector's decision, per-sample task indices ``tasks`` ``(batch,)``: uniform when they are all
        the same."""
        values = set(tasks.tolist())
        return cls(tasks, values.pop() if len(values) == 1 else None, selected=True)

    def to_batch(self, batch: int, device, where: str) -> "RoutingDecision":
        """This decision for a batch of ``batch`` samples of another scope: the same when the sizes agree, broadcast
        when it is one task for all; ValueError otherwise."""
        if self.tasks.shape[0] == batch:
            return RoutingDecision(self.tasks.to(device), self.uniform, self.selected)
        if self.uniform is not None and not self.selected:
            return RoutingDecision.everyone(self.uniform, batch, device)
        raise ValueError(
            f"{where} has {batch} samples and cannot follow a per-sample decision made for {self.tasks.shape[0]}; "
            "route it to one task (route(task) around that call)."
        )


def same_request(a: TaskIds, b: TaskIds) -> bool:
    if a is b:
        return True
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b
    return list(a) == list(b)


CACHE_KWARGS = ("cache", "past_key_values", "cache_position")


def continues_cached_sequence(forward_kwargs: dict) -> bool:
    """True when a forward extends sequences held in a non-empty KV cache (a decoding step of ``generate``)."""
    # transformers 5 passes the cache as `cache` (`past_key_values` before, still accepted)
    past = forward_kwargs.get("cache", forward_kwargs.get("past_key_values"))
    seq_length = getattr(past, "get_seq_length", None)
    return bool(seq_length is not None and seq_length() > 0)


def find_scopes(model: nn.Module, routed_names: Iterable[str]) -> list[str]:
    """The routed scopes of ``model``, given the module names of its routed layers: the towers of
    :data:`TOWER_NAMES` holding them, when every routed layer lies in one (a tower adapted alone is a scope too:
    ``get_image_features`` runs the image tower without the model's own forward), else ``[""]`` (the whole
    model). The primary scope comes first."""
    heads = {name.split(".", 1)[0] for name in routed_names}
    found = [t for t in TOWER_NAMES if t in heads and isinstance(getattr(model, t, None), nn.Module)]
    return found if found and heads <= set(found) else [WHOLE_MODEL_SCOPE]


def scope_of(module_name: str, scopes: Sequence[str]) -> str:
    """The scope a routed layer named ``module_name`` (relative to the model) belongs to."""
    head = module_name.split(".", 1)[0]
    return head if head in scopes else WHOLE_MODEL_SCOPE


def assign_scopes(model: nn.Module, layers: Sequence[tuple[str, bool]]) -> tuple[list[str], list[str]]:
    """The routed scopes of ``model`` and the scope of each routed layer.

    ``layers``: ``(module name, follows)`` of every routed layer in module order; ``follows`` is True for a layer
    that lies between towers and maps the output of the tower before it for the same samples (BLIP-2's
    ``language_projection`` between ``qformer`` and ``language_model``). Such a layer takes the scope of the routed
    layer before it instead of making the whole model one scope: a whole-model scope starts at the model's forward,
    which e.g. ``Blip2ForConditionalGeneration.generate`` never calls, so its decisions would outlive their forward.
    The scopes are found (:func:`find_scopes`) from the other layers, or from all of them when every layer
    follows. Returns ``(scopes, scope per layer)``.
    """
    names = [name for name, _ in layers]
    deciding = [name for name, follows in layers if not follows] or names
    scopes = find_scopes(model, deciding)
    assigned, previous = [], scopes[0]
    for name in names:
        scope = scope_of(name, scopes)
        if scope not in scopes:  # a following layer outside every tower (the others all lie in one by construction)
            scope = previous
        assigned.append(scope)
        previous = scope
    return scopes, assigned


class RoutingState:
    """Requests and per-forward decisions, shared (by reference) by a tuner and all of its layers.

    Not a module and holds no weights: it is rebuilt from the config whenever the tuner is built. Layers call
    :meth:`decide`; the tuner's hooks call :meth:`start_scope`; :meth:`route` and the ``task_ids`` keyword set the
    request.
    """

    def __init__(self) -> None:
        self.task_names: dict[str, list[str]] = {}  # adapter -> task names (the config's own list)
        self.active_task: dict[str, str] = {}  # adapter -> task used when no task_ids are given
        self.routing_token: dict[str, str] = {}  # adapter -> how a sample's features are pooled (see pool_tokens)
        self.requested: TaskIds = None  # what the caller asked for (None: the active task)
        self.scopes: list[str] = [WHOLE_MODEL_SCOPE]  # primary first
        self.selector: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None  # (adapter, x) -> (batch,)
        self.selector_features: dict[str, str] = {}  # adapter -> what its selector reads (SELECTOR_FEATURES)
        self._pending: dict[str, torch.Tensor] = {}  # scope -> deep features of its current forward's inputs
        self._base_pass = False  # True inside the extra base-model pass that computes deep features
        # (adapter, scope) -> the decision of the scope's latest forward and the request it answers
        self._decisions: dict[tuple[str, str], tuple[RoutingDecision, TaskIds]] = {}
        self._attention_mask: dict[str, Optional[torch.Tensor]] = {}  # scope -> the attention mask of its forward

    @property
    def primary_scope(self) -> str:
        return self.scopes[0]

    # -- requests --------------------------------------------------------------------------------------------
    def set_request(self, task_ids: TaskIds) -> TaskIds:
        """Make ``task_ids`` the request and return the previous one."""
        check_task_ids(task_ids)
        previous = self.requested
        self.requested = task_ids
        return previous

    @contextlib.contextmanager
    def route(self, task_ids: TaskIds) -> Iterator[None]:
        """Forwards inside use ``task_ids``. Decisions of earlier forwards are dropped on entry: a scope inside
        never follows a decision made before the block."""
        previous = self.set_request(task_ids)
        self._decisions.clear()
        try:
            yield
        finally:
            self.set_request(previous)

    # -- forwards --------------------------------------------------------------------------------------------
    def start_scope(self, scope: str, attention_mask: Optional[torch.Tensor], continues: bool = False) -> None:
        """A forward of ``scope`` begins: drop its previous decisions, unless it ``continues`` the sequences of the
        previous one (a decoding step on a KV cache) under the same request."""
        self._attention_mask[scope] = attention_mask
        self._pending.pop(scope, None)
        for key, (_, answered) in list(self._decisions.items()):
            if key[1] == scope and not (continues and same_request(answered, self.requested)):
                del self._decisions[key]

    def attention_mask(self, scope: str) -> Optional[torch.Tensor]:
        return self._attention_mask.get(scope)

    def needs_base_pass(self, scope: str) -> bool:
        """Whether a forward of ``scope`` starting now needs deep selector features (an extra base-model pass):
        the primary scope, under ``"auto"``, for an adapter whose selector reads them, outside that pass itself."""
        return (
            scope == self.primary_scope
            and isinstance(self.requested, str)
            and self.requested == AUTO_TASK
            and any(kind != "shallow" for kind in self.selector_features.values())
            and not self._base_pass
        )

    def base_pass(self, module: nn.Module, scope: str, args: tuple, kwargs: dict) -> None:
        """Run ``module`` (the scope's) once more on the same inputs as the untouched base model and keep its
        mean-pooled last hidden state as this forward's deep selector features; the outer forward's decisions
        start afresh afterwards."""
        previous = self.set_request(BASE_MODEL_TASK)
        self._base_pass = True
        try:
            with torch.no_grad():
                # the same inputs, without the generation cache the outer forward fills (this pass must not touch it)
                fresh = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
                output = module(*args, **with_hidden_states(module, fresh, use_cache=False))
            features = deep_features(output, kwargs.get("attention_mask")).float()
        finally:
            self._base_pass = False
            self.set_request(previous)
        self.start_scope(scope, kwargs.get("attention_mask"))
        self._pending[scope] = features

    def task_index(self, adapter_name: str, task_name: str) -> int:
        names = self.task_names.get(adapter_name, [])
        if task_name not in names:
            raise ValueError(f"Unknown task {task_name!r} for adapter {adapter_name!r}; known tasks: {names}.")
        return names.index(task_name)

    def decision(self, adapter_name: str, scope: str = WHOLE_MODEL_SCOPE) -> Optional[RoutingDecision]:
        """The decision of the latest forward of ``scope`` for ``adapter_name`` (None before any)."""
        made = self._decisions.get((adapter_name, scope))
        return made[0] if made is not None else None

    def decide(self, adapter_name: str, scope: str, x: torch.Tensor) -> RoutingDecision:
        """The decision of this forward of ``scope`` for ``adapter_name``, made on the first call (``x``: the input
        ``(batch, ..., dim)`` of the scope's first routed layer, which no adapter has touched yet) and returned
        unchanged to every later layer of the forward."""
        key = (adapter_name, scope)
        made = self._decisions.get(key)
        if made is None:
            made = (self._make(adapter_name, scope, x), self.requested)
            self._decisions[key] = made
        return made[0]

    def _make(self, adapter_name: str, scope: str, x: torch.Tensor) -> RoutingDecision:
        requested, batch, device = self.requested, x.shape[0], x.device
        if requested is None:
            active = self.task_index(adapter_name, self.active_task[adapter_name])
            return RoutingDecision.everyone(active, batch, device)
        if isinstance(requested, str) and requested != AUTO_TASK:
            task = -1 if requested == BASE_MODEL_TASK else self.task_index(adapter_name, requested)
            return RoutingDecision.everyone(task, batch, device)
        if scope != self.primary_scope:  # per-sample requests describe the primary scope's samples
            primary = self._decisions.get((adapter_name, self.primary_scope))
            if primary is None or not same_request(primary[1], requested):
                raise ValueError(
                    f"The {scope} forward follows the routing of {self.primary_scope}, but no {self.primary_scope} "
                    f"forward was routed under task_ids={_short(requested)} yet; run it first, or route {scope} to "
                    "one task."
                )
            return primary[0].to_batch(batch, device, f"The {scope} batch")
        if requested == AUTO_TASK:
            if self.selector is None:
                raise ValueError("task_ids='auto' needs a fitted task selector; call fit_task_selector(...) first.")
            kind = self.selector_features.get(adapter_name, "shallow")
            if kind == "shallow":
                pooled = pool_tokens(x, self.routing_token.get(adapter_name, "first"), self.attention_mask(scope))
            else:
                pooled = self._pending.get(scope)
                if pooled is None or pooled.shape[0] != batch:
                    raise ValueError(
                        f"selector_features={kind!r} needs the {scope or 'model'} forward's own inputs; this layer "
                        "was reached another way."
                    )
                if kind == "deep+shallow":  # x is what the base pass's first routed layer saw too
                    pooled = deep_and_shallow(pooled, pool_tokens(x, "mean", self.attention_mask(scope)))
            # read on the host once per forward: a batch the selector sends to one task (or to the base model) then
            # runs every layer's one-task path, as when that task is named
            return RoutingDecision.selected_by(self.selector(adapter_name, pooled).to(device))
        names = list(requested)
        if len(names) != batch:
            raise ValueError(f"task_ids has {len(names)} entries but the batch has {batch} samples.")
        values = [-1 if n is None or n == BASE_MODEL_TASK else self.task_index(adapter_name, n) for n in names]
        if values and all(v == values[0] for v in values):
            return RoutingDecision.everyone(values[0], batch, device)
        return RoutingDecision(torch.tensor(values, dtype=torch.long, device=device))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class RoutingHooks:
    """Forward hooks that drive a :class:`RoutingState`: on the wrapped model, take ``task_ids`` out of the forward
    kwargs (the model itself does not accept it); on each scope's module, start that scope's forward. A class
    rather than closures so the model stays picklable."""

    def __init__(self, routing: RoutingState) -> None:
        self.routing = routing
        self.previous: list[TaskIds] = []  # requests to restore, one per open forward that passed task_ids

    def install(self, model: nn.Module) -> list:
        """Register the hooks on ``model`` and its scopes' modules; returns the handles."""
        handles = [
            model.register_forward_pre_hook(self.model_pre_forward, with_kwargs=True, prepend=True),
            model.register_forward_hook(self.model_post_forward, with_kwargs=True, always_call=True),
        ]
        for scope in self.routing.scopes:
            module = model if scope == WHOLE_MODEL_SCOPE else getattr(model, scope)
            handles.append(module.register_forward_pre_hook(_ScopeStart(self.routing, scope), with_kwargs=True))
        return handles

    def model_pre_forward(self, module: nn.Module, args, kwargs):
        if "task_ids" in kwargs:
            check_task_ids(kwargs["task_ids"])  # before anything changes: the post hook runs after an error too
            kwargs = dict(kwargs)
            self.previous.append(self.routing.set_request(kwargs.pop("task_ids")))
        else:
            self.previous.append(_KEEP)
        return args, kwargs

    def model_post_forward(self, module: nn.Module, args, kwargs, output):
        previous = self.previous.pop() if self.previous else _KEEP
        if previous is not _KEEP:
            self.routing.set_request(previous)
        return output


_KEEP = object()  # marks a forward that did not pass task_ids: nothing to restore


class _ScopeStart:
    """Forward pre-hook of one scope's module: start that scope's routing."""

    def __init__(self, routing: RoutingState, scope: str) -> None:
        self.routing = routing
        self.scope = scope

    def __call__(self, module: nn.Module, args, kwargs):
        continues = continues_cached_sequence(kwargs)
        self.routing.start_scope(self.scope, kwargs.get("attention_mask"), continues)
        if not continues and self.routing.needs_base_pass(self.scope):
            self.routing.base_pass(module, self.scope, args, kwargs)
        return None


def forward_inputs(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """Run ``model`` (the tuner's wrapped model) on ``batch``, a dict of model inputs. A dual encoder (CLIP) takes
    one modality at a time: a batch of images only goes through ``get_image_features``, of texts only through
    ``get_text_features``; anything else through the model's forward."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"Batches must be dicts of model inputs, got {type(batch).__name__}.")
    has_images = "pixel_values" in batch
    has_texts = "input_ids" in batch
    if has_images and not has_texts and hasattr(model, "get_image_features"):
        return model.get_image_features(**batch)
    if has_texts and not has_images and hasattr(model, "get_text_features"):
        return model.get_text_features(**batch)
    return model(**batch)


__all__ = [
    "AUTO_TASK",
    "BASE_MODEL_TASK",
    "RoutingDecision",
    "RoutingHooks",
    "RoutingState",
    "TaskIds",
    "check_task_ids",
    "deep_and_shallow",
    "deep_features",
    "find_scopes",
    "forward_inputs",
    "pool_tokens",
    "scope_of",
]
