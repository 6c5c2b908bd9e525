"""A pool of small bottleneck experts, evaluated for per-sample top-k routes without a per-expert Python loop.

Every expert ``e`` is ``x -> relu(x @ D_e + a_e) -> dropout -> (.) @ U_e + c_e`` with ``D_e`` ``(d_in, r)`` and
``U_e`` ``(r, d_out)``. A sample routed to experts ``i_1..i_k`` with gates ``g_1..g_k`` gets

    y = sum_j g_j * expert_{i_j}(x) = [g_1 h_1, ..., g_k h_k] @ [U_{i_1}; ...; U_{i_k}] + sum_j g_j c_{i_j}

where ``h_j = dropout(relu(x @ D_{i_j} + a_{i_j}))``: the gate is folded into the hidden activations, so the k
up-projections and their weighted sum are *one* matmul. With the selected experts' weights gathered per sample,
the whole pool costs two batched matmuls (``torch.baddbmm``/``torch.bmm`` over the batch), whatever ``E`` is.

Each expert's four tensors are separate ``nn.Parameter`` s (``ParameterList`` entries). That is what makes
activate-freeze exact: a frozen expert has ``requires_grad=False``, gets no ``.grad``, and every torch optimizer
(AdamW's weight decay and momentum included) skips it, so its weights stay bit-identical. The price is one
``torch.stack`` per forward in training, of only the experts the batch selects (so unselected experts get no
gradient, as with the reference's loop); in inference the stacked pool is cached and only rebuilt when a parameter
changes (tracked by storage pointer and version counter).

Three dispatch strategies compute the same function (tests check they agree):

* ``"gather"`` (default): the batched sparse computation above; cost ``O(B * k)`` expert evaluations.
* ``"dense"``: every expert on every token, gates zero for unselected experts (``O(B * E)``; the reference point
  for "computing the pool densely"). Used automatically when ``k == E``.
* ``"loop"``: the reference implementation's dispatch -- a Python loop over experts, each on the samples routed to
  it. Kept as a correctness oracle and benchmark baseline, not for training.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from operator import attrgetter
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import nn


DISPATCH_MODES = ("gather", "dense", "loop")


_VERSION = attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def share_version_counter(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Turn the frozen parameters ``tensors`` into views of one flat buffer per dtype and device, so that they share
    one version counter: an in-place change of any of them moves the counter of all. Returns the tensors whose
    version sum covers every tensor of ``tensors``: one per buffer, plus each tensor left as it was.

    Each parameter is swapped in place (``torch.utils.swap_tensors``): the same Python object, with its attributes,
    now viewing the buffer, so optimizers and modules keep their references. ``.to()``, ``.half()`` and loading keep
    the sharing (they assign ``param.data`` or copy into it, and a tensor keeps its counter through both);
    ``load_state_dict(assign=True)`` and the swapping ``_apply`` replace the tensors, and their owner clears its
    cache on both, which collects and shares afresh. torch refuses to swap a tensor with a weak reference or one an
    autograd graph still holds: such a tensor is left as it was and returned, to be checked on its own.

    Call it only to fill an empty :class:`ParameterCache` (from :meth:`ParameterCache.groups`, which collects after
    :meth:`ParameterCache.clear`): sharing again moves the tensors to a new buffer, whose counter starts afresh and
    could repeat a version sum stored in an older entry.
    """
    unique = list({id(t): t for t in tensors}.values())
    groups: dict[tuple, list[torch.Tensor]] = {}
    covered: list[torch.Tensor] = []
    for t in unique:
        if isinstance(t, nn.Parameter) and not t.requires_grad and t.numel() and not t.is_inference():
            groups.setdefault((t.dtype, t.device), []).append(t)
        else:
            covered.append(t)
    # the buffer must be a normal tensor even when the first forward runs under torch.inference_mode(): an inference
    # tensor has no version counter and cannot enter autograd
    with torch.inference_mode(False), torch.no_grad():
        for group in groups.values():
            buffer = torch.cat([t.detach().reshape(-1) for t in group])
            shared, offset = None, 0
            for t in group:
                view = buffer[offset : offset + t.numel()].view(t.shape)
                offset += t.numel()
                replacement = nn.Parameter(view, requires_grad=False)
                replacement.__dict__.update(t.__dict__)  # swap_tensors swaps the attributes too
                try:
                    torch.utils.swap_tensors(t, replacement)
                except RuntimeError:
                    covered.append(t)
                    continue
                if shared is None:
                    shared = t  # any swapped tensor stands for the whole buffer
            if shared is not None:
                covered.append(shared)
    return covered


class ParameterCache:
    """Values derived from parameters (stacks, products), rebuilt only when one of those parameters changes.

    An entry is stored under a slot and is valid while

    * every *live* parameter it was built from (``params``: the trainable ones) has the same storage pointer
      (``.to()`` and ``p.data = ...`` change it) and the sum of their version counters is the same (a counter is
      bumped by every in-place change: optimizer steps, ``load_state_dict``, ``copy_``; counters only grow, so the
      sum moves with any of them);
    * the sum of the version counters of its *frozen* parameters (``frozen``) is the same: it moves with any
      in-place change of any of them (a hand edit, a load), and it is one C-level pass (``sum(map(...))``) instead
      of a Python-level check per parameter -- the per-forward cost that grew with the task count. An owner may
      pass, for many frozen tensors that share one counter (:func:`share_version_counter`), one of them. Their
      storage is trusted: it only moves in ``.to()`` / loading, which call :meth:`clear`;
    * the inference-mode flag is the same (a tensor made in inference mode cannot enter an autograd graph).

    ``build`` runs under ``torch.no_grad()``: entries are constants. At most ``max_entries`` value slots are kept
    (least recently used dropped first); None: no limit. :meth:`groups` keeps the parameter lists themselves (walking
    100 tasks' modules per forward costs as much as checking them), until :meth:`clear`.

    The invalidation rule, in one place: an owner clears its cache whenever the *set* of parameters or their storage
    can change -- adding, ending or removing a task, loading a state dict, ``.to()``/``_apply``
    (:class:`ParameterCacheMixin` does the last two). Value changes are seen by the version counters.
    Shared by :class:`ExpertPool` (its inference stack), AnA (its stacked task paths) and MoE-CL (stacked routers).
    """

    def __init__(self, max_entries: Optional[int] = None) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, tuple[tuple, Any]] = OrderedDict()
        self.param_groups: dict[Hashable, Any] = {}

    @staticmethod
    def key(params: Sequence[torch.Tensor], frozen: Sequence[torch.Tensor] = ()) -> tuple:
        # C-level passes (map/sum) rather than a Python loop: this runs per layer and forward
        return (
            torch.is_inference_mode_enabled(),
            sum(map(_VERSION, frozen)),
            sum(map(_VERSION, params)),
            *map(_DATA_PTR, params),
        )

    def get(
        self,
        slot: Hashable,
        params: Sequence[torch.Tensor],
        build: Callable[[], Any],
        frozen: Sequence[torch.Tensor] = (),
    ) -> Any:
        """The value of ``slot``, rebuilt by ``build()`` if ``params`` (checked one by one) or ``frozen`` (checked
        through their version sum) changed since it was built."""
        key = self.key(params, frozen)
        entry = self.entries.get(slot)
        if entry is not None and entry[0] == key:
            self.entries.move_to_end(slot)
            return entry[1]
        self.entries.pop(slot, None)  # drop the stale value before building the new one (peak memory)
        with torch.no_grad():
            value = build()
        self.entries[slot] = (key, value)
        if self.max_entries is not None:
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        return value

    def groups(self, slot: Hashable, collect: Callable[[], Any]) -> Any:
        """``collect()`` (lists of parameters), computed once per slot until :meth:`clear`."""
        value = self.param_groups.get(slot)
        if value is None:
            value = self.param_groups[slot] = collect()
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.param_groups.clear()


class ParameterCacheMixin:
    """``nn.Module`` mixin (list it before ``nn.Module``) owning a :class:`ParameterCache`, kept in ``__dict__``:
    never a buffer, never in the state dict, never copied. Clears it on ``_apply`` (``.to()``, ``.half()``, ...) and
    on ``load_state_dict`` (``assign=True`` replaces the parameter objects); owners clear it on their structural
    changes (tasks added, ended, removed)."""

    param_cache_entries: Optional[int] = None

    def param_cache(self) -> ParameterCache:
        cache = self.__dict__.get("_param_cache")
        if cache is None:  # first use, or a module unpickled from before the cache existed
            cache = self.__dict__["_param_cache"] = ParameterCache(self.param_cache_entries)
        return cache

    def _apply(self, fn, recurse=True):
        self.param_cache().clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # a copy (copy.deepcopy, pickle) starts without a cache: its tensors are new, and no longer share the
        # version counters the cached lists relied on
        state = dict(super().__getstate__())
        state.pop("_param_cache", None)
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self.param_cache().clear()
        return super()._load_from_state_dict(*args, **kwargs)


class ExpertPool(ParameterCacheMixin, nn.Module):
    """``num_experts`` bottleneck adapters ``Linear(d_in, r) + bias -> ReLU -> dropout -> Linear(r, d_out) + bias``.

    Args:
        num_experts: number of experts ``E``.
        in_features: input size ``d_in``.
        r: bottleneck size.
        out_features: output size ``d_out``.
        dropout: dropout probability on the bottleneck activations.
        init_up_zero: True: up-projections (and all biases) start at zero, so the pool's output is zero at init.
            False: the up-projections get a small random init (tests that need a non-identity adapter).

    Buffers:
        frozen_at: ``(E,)`` long; the index of the task at whose end the expert was frozen, ``-1`` = trainable.
            Saved with the adapter.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        r: int,
        out_features: int,
        dropout: float = 0.0,
        init_up_zero: bool = True,
    ) -> None:
        super().__init__()
        if num_experts <= 0 or in_features <= 0 or r <= 0 or out_features <= 0:
            raise ValueError(
                f"ExpertPool sizes must be positive, got E={num_experts}, d_in={in_features}, r={r}, "
                f"d_out={out_features}."
            )
        self.num_experts = num_experts
        self.in_features = in_features
        self.r = r
        self.out_features = out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down_weight = nn.ParameterList([nn.Parameter(torch.empty(in_features, r)) for _ in range(num_experts)])
        self.down_bias = nn.ParameterList([nn.Parameter(torch.zeros(r)) for _ in range(num_experts)])
        self.up_weight = nn.ParameterList([nn.Parameter(torch.zeros(r, out_features)) for _ in range(num_experts)])
        self.up_bias = nn.ParameterList([nn.Parameter(torch.zeros(out_features)) for _ in range(num_experts)])
        self.register_buffer("frozen_at", torch.full((num_experts,), -1, dtype=torch.long))
        self.reset_parameters(init_up_zero)

    @torch.no_grad()
    def reset_parameters(self, init_up_zero: bool = True) -> None:
        # Same distribution as nn.Linear's default (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), +).
        bound_down = 1.0 / math.sqrt(self.in_features)
        bound_up = 1.0 / math.sqrt(self.r)
        for e in range(self.num_experts):
            self.down_weight[e].uniform_(-bound_down, bound_down)
            self.down_bias[e].zero_()
            self.up_bias[e].zero_()
            if init_up_zero:
                self.up_weight[e].zero_()
            else:
                self.up_weight[e].uniform_(-bound_up, bound_up)

    # -- freezing -------------------------------------------------------------------------------------------
    @property
    def frozen_mask(self) -> torch.Tensor:
        """``(E,)`` bool: experts frozen by activate-freeze."""
        return self.frozen_at >= 0

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [self.down_weight[expert], self.down_bias[expert], self.up_weight[expert], self.up_bias[expert]]

    def freeze(self, experts: torch.Tensor, task_index: int) -> list[int]:
        """Freeze ``experts`` (indices) at the end of task ``task_index``; already frozen ones keep their task.

        Returns the indices newly frozen. Their parameters get ``requires_grad=False``.
        """
        newly = []
        for e in experts.tolist():
            if int(self.frozen_at[e]) < 0:
                self.frozen_at[e] = task_index
                newly.append(int(e))
        for e in newly:
            for p in self.expert_parameters(e):
                p.requires_grad_(False)
        return newly

    def restrict_requires_grad(self, trainable: bool) -> None:
        """Turn ``requires_grad`` off where the schedule says so (frozen experts; all if not ``trainable``).

        Never turns it on: enabling is PEFT's job (``set_adapter``), which calls this right after.
        """
        frozen = self.frozen_mask.tolist()
        for e in range(self.num_experts):
            if frozen[e] or not trainable:
                for p in self.expert_parameters(e):
                    p.requires_grad_(False)

    # -- checkpoint guard -------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        key_prefix = prefix + "down_weight."
        indices = {k[len(key_prefix) :] for k in state_dict if k.startswith(key_prefix)}
        if indices:
            found = len(indices)
            if found != self.num_experts:
                raise ValueError(
                    f"Checkpoint has {found} experts at {prefix.rstrip('.')} but the config sets num_experts="
                    f"{self.num_experts}; load with a config whose num_experts matches the checkpoint."
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    # -- stacked weights ----------------------------------------------------------------------------------------
    def _all_params(self) -> list[nn.Parameter]:
        # the ParameterLists' own dicts, in index order: cheaper than iterating them (one getattr per entry), and
        # always current (PEFT's dtype autocast replaces entries in place)
        return [
            *self.down_weight._parameters.values(),
            *self.down_bias._parameters.values(),
            *self.up_weight._parameters.values(),
            *self.up_bias._parameters.values(),
        ]

    def stacked(
        self, experts: Optional[list[int]] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(D^T (E,r,d_in), a (E,r), U (E,r,d_out), c (E,d_out))``, or only the rows of ``experts`` when given.

        The down-projections come transposed (``nn.Linear``'s layout): a sample's ``k`` selected experts are then
        one contiguous ``(k*r, d_in)`` block, used through a transposed view instead of a per-forward copy.

        With grad mode on, a fresh differentiable stack (of ``experts`` only: the others get no gradient at all,
        exactly as if they had been skipped by a loop). Without (``no_grad``/``inference_mode``), a cached copy of
        the whole pool, rebuilt only when a parameter's storage or version changes (optimizer steps, loading,
        ``.to()``).
        """
        cache = self.param_cache()
        if torch.is_grad_enabled():
            cache.clear()
            return self._stack(experts)
        pool = cache.get("pool", self._all_params(), self._stack)
        if experts is None:
            return pool
        rows = torch.tensor(experts, device=pool[0].device)
        return tuple(t.index_select(0, rows) for t in pool)

    def _stack(
        self, experts: Optional[list[int]] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = []
        for plist, transpose in (
            (self.down_weight, True),
            (self.down_bias, False),
            (self.up_weight, False),
            (self.up_bias, False),
        ):
            params = list(plist._parameters.values())
            if experts is not None:
                params = [params[e] for e in experts]
            out.append(torch.stack([p.t() for p in params] if transpose else params))
        return tuple(out)

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        top_gates: torch.Tensor,
        top_indices: torch.Tensor,
        dispatch: str = "gather",
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Mixture output for ``x`` ``(B, ..., d_in)``: sample ``b`` uses experts ``top_indices[b]`` ``(B, k)``
        with weights ``top_gates[b]`` ``(B, k)``, all times ``scale``. Returns ``(B, ..., d_out)`` in ``x.dtype``.

        All tokens of a sample use that sample's route. A sample whose gates are all zero gets an exact zero.
        ``scale`` is folded into the gates (one ``(B, k)`` multiply instead of one over the whole output).
        """
        batch = x.shape[0]
        lead_shape = x.shape[:-1]
        x3 = x.reshape(batch, -1, x.shape[-1])  # (B, T, d_in)
        weights = (top_gates * scale if scale != 1.0 else top_gates).to(x.dtype)
        if dispatch == "gather" and top_indices.shape[-1] < self.num_experts:
            y = self._forward_gather(x3, weights, top_indices)
        elif dispatch in DISPATCH_MODES:
            # the reference dispatches (and k == E) work on the dense (B, E) gates
            gates = weights.new_zeros(batch, self.num_experts).scatter(1, top_indices, weights)
            y = self._forward_loop(x3, gates) if dispatch == "loop" else self._forward_dense(x3, gates)
        else:
            raise ValueError(f"Unknown dispatch {dispatch!r}; use one of {DISPATCH_MODES}.")
        return y.reshape(*lead_shape, self.out_features)

    def _forward_gather(self, x: torch.Tensor, weights: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, d_in)``, ``weights``/``top_indices`` ``(B, k)`` -> ``(B, T, d_out)``."""
        grad = torch.is_grad_enabled()
        if grad:
            # training: stack only the experts this batch uses (one host sync), so that unused experts get no
            # gradient -- AdamW then leaves them alone, as the reference's per-expert loop does
            used, top_indices = torch.unique(top_indices, return_inverse=True)
            down_t, down_b, up_w, up_b = self.stacked(used.tolist())
        else:
            down_t, down_b, up_w, up_b = self.stacked()
        batch, k = top_indices.shape
        r, d_in, d_out = self.r, self.in_features, self.out_features
        flat = top_indices.reshape(-1)  # (B*k,)
        # Row gathers via index_select on (E, -1) views: a plain row copy, several times faster on CPU than
        # advanced indexing (down_t[top_indices]) for rows this long.
        # The k selected down-projections form one (k*r, d_in) block per sample, used transposed (a view, no copy).
        d_sel = down_t.flatten(1).index_select(0, flat).view(batch, k * r, d_in).transpose(1, 2)
        a_sel = down_b.index_select(0, flat).view(batch, 1, k * r)
        hidden = torch.baddbmm(a_sel, x, d_sel)  # (B, T, k*r)
        hidden = torch.relu(hidden) if grad else hidden.relu_()  # in place when nothing needs the pre-activation
        if self.training:
            hidden = self.dropout(hidden)
        hidden = hidden.view(batch, -1, k, r)
        gate = weights.view(batch, 1, k, 1)
        hidden = hidden * gate if grad else hidden.mul_(gate)
        # the gate is folded into the activations: the k weighted up-projections are one matmul
        u_sel = up_w.flatten(1).index_select(0, flat).view(batch, k * r, d_out)
        bias = torch.bmm(weights.unsqueeze(1), up_b.index_select(0, flat).view(batch, k, d_out))  # (B, 1, d_out)
        return torch.baddbmm(bias, hidden.view(batch, -1, k * r), u_sel)

    def _forward_dense(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        down_t, down_b, up_w, up_b = self.stacked()
        num_e, r = self.num_experts, self.r
        d_all = down_t.reshape(num_e * r, self.in_features)  # every expert's down-projection, one matmul
        hidden = self.dropout(torch.relu(x @ d_all.t() + down_b.reshape(num_e * r)))  # (B, T, E*r)
        hidden = (hidden.view(*hidden.shape[:2], num_e, r) * gates.view(-1, 1, num_e, 1)).flatten(2)
        return hidden @ up_w.reshape(num_e * r, self.out_features) + (gates @ up_b).unsqueeze(1)

    def _forward_loop(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], x.shape[1], self.out_features)
        for e in range(self.num_experts):
            rows = torch.nonzero(gates[:, e] != 0, as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            xe = x.index_select(0, rows)
            h = self.dropout(torch.relu(xe @ self.down_weight[e] + self.down_bias[e]))
            ye = (h @ self.up_weight[e] + self.up_bias[e]) * gates[rows, e].view(-1, 1, 1)
            out = out.index_add(0, rows, ye)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, r={self.r}, "
            f"out_features={self.out_features}"
        )
