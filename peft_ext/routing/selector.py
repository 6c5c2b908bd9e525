"""DDAS, the Distribution-Discriminative Auto-Selector (MoE-Adapters4CL), shared by the continual tuners.

One small autoencoder per task, ``Linear(F, h) -> ReLU -> Linear(h, F) -> Sigmoid`` trained with MSE, models the
distribution of that task's inputs. At inference without a task id (``task_ids="auto"``) every autoencoder
reconstructs the input's features; the task whose autoencoder does best wins, and when even the winner's error is
above that task's threshold the sample bypasses all adapters (task index ``-1``: the untouched base model).

Features. The paper's (``selector_features="shallow"``): the pooled input (``routing_token``: first / mean / last
token) of the *first routed layer* of the primary scope (:mod:`~peft_ext.routing.core`; the image tower of CLIP),
captured by a forward pre-hook while the model runs as the base model, i.e. a frozen base-model feature. At
inference the first routed layer's input is the same tensor (no adapter runs before it), so the selector costs only
its own autoencoders, no extra model pass. ``"deep"`` reads the base model's mean-pooled last hidden state instead
(one extra base pass per ``"auto"`` forward), ``"deep+shallow"`` (the default) both. Each
task's features are standardized with that task's mean/std and squashed by a sigmoid (the paper feeds
sigmoid-squashed CNN features), so an input from another distribution lands far out and reconstructs badly.

Improvements over the paper (which uses one hand-set threshold and decides per batch):

* per-task thresholds: the ``selector_quantile`` quantile of reconstruction errors on a held-out part
  (``selector_holdout``) of the task's own data. The quantile is the share of a task's own inputs that stay
  routed to it (the rest bypass to the base model); the default 0.99 keeps false bypasses near 1 %, a lower
  value sends more unfamiliar inputs to the base model (0.95: about 5 % of in-task inputs bypass too);
* decisions per sample, so a batch can mix tasks and unknown inputs;
* ``selector_compare="raw"`` (default) picks the lowest raw error, as the paper does; ``"normalized"`` compares
  errors in units of each task's threshold (error / threshold), for tasks whose data are intrinsically harder to
  reconstruct. With a few hundred samples per task the threshold is a noisy estimate, and dividing by it costs
  accuracy: on the embedded en/it/es sequence (MiniLM, 4 autoencoder seeds, quantile 0.99) "raw" identifies
  93-96 % of eval inputs, "normalized" 76-96 %. Either way a sample goes to the base model iff the winner's
  error exceeds the winner's threshold;
* an optional reference autoencoder fitted on out-of-task data (``fit_reference_selector``) decides per batch, as
  in the paper: if it reconstructs the batch better (mean score) than the per-sample winners, the whole batch
  bypasses the adapters.

Storage: ``{prefix}selector`` (``nn.ModuleDict`` keyed by adapter name) on the tuner, saved by PEFT with the
adapter. All autoencoders of an adapter are stacked into buffers (one ``bmm`` evaluates every task at once); their
shapes are rebuilt from the config (``selector_feature_dim``, ``selector_hidden``, ``selector_tasks``,
``selector_reference``), which ``fit_*`` keep up to date.

Layer contract (for any tuner using :class:`TaskSelectorMixin`): its layers take their decision from
``routing.decide(adapter, layer.routing_scope, x)``, have ``routing_input(args, kwargs)``, the tensor that
decision is made on (what feature capture reads), and ``follows_previous_scope`` (see
:func:`~peft_ext.routing.core.assign_scopes`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .core import AUTO_TASK, BASE_MODEL_TASK, deep_and_shallow, deep_features, pool_tokens, with_hidden_states
from .prototypes import SCORING, PrototypeSelector, fit_prototypes
from .tasks import check_task_name, eval_mode


SELECTOR_COMPARE = ("normalized", "raw")
SELECTOR_KINDS = ("autoencoder", "prototype")
SELECTOR_FEATURES = ("shallow", "deep", "deep+shallow")


class _FeaturesTaken(Exception):
    """Raised by the shallow-feature capture hook to end a forward whose features are taken."""


@dataclass
class SelectorConfigMixin:
    """Config fields of the task selector (mixed into a continual method's ``PeftConfig``).

    The last three fields are bookkeeping written by ``fit_task_selector``/``fit_reference_selector`` so that
    loading rebuilds the selector's structure before its weights are restored.
    """

    selector: str = field(
        default="prototype",
        metadata={
            "help": "How the task is picked: 'prototype' (class means of frozen features, peft_ext.routing.prototypes) "
            "or 'autoencoder' (DDAS: per-task autoencoders, the paper's).",
            "choices": list(SELECTOR_KINDS),
        },
    )
    selector_features: str = field(
        default="deep+shallow",
        metadata={
            "help": "What the selector reads: 'shallow', the input of the first routed layer (no extra cost); "
            "'deep', the frozen base model's last hidden state, mean-pooled (one extra base-model pass per "
            "task_ids='auto' forward); or 'deep+shallow', both (the shallow part mean-pooled), each of unit length, "
            "side by side: the same extra pass, better at telling tasks apart and at sending inputs of another "
            "language to the base model.",
            "choices": list(SELECTOR_FEATURES),
        },
    )
    selector_prototypes: int = field(
        default=4,
        metadata={
            "help": "Prototypes per task when it is fitted without labels (k-means); with labels: one per class."
        },
    )
    selector_scoring: str = field(
        default="cosine",
        metadata={
            "help": "How the prototype selector's classes compete: 'cosine' (nearest class mean) or 'lda' (a linear "
            "discriminant whitened by a covariance pooled over the fitted tasks, peft_ext.routing.prototypes). "
            "Either way an input goes to the base model when its cosine similarity to the chosen task's prototypes "
            "is below that task's threshold.",
            "choices": list(SCORING),
        },
    )
    selector_shrinkage: float = field(
        default=0.6,
        metadata={
            "help": "selector_scoring='lda': weight of the average variance in the pooled covariance, in (0, 1] "
            "(tasks have fewer samples than features)."
        },
    )
    selector_hidden: int = field(default=100, metadata={"help": "Code size h of each task's autoencoder (paper: 100)."})
    selector_quantile: float = field(
        default=0.99,
        metadata={
            "help": "Quantile of held-out reconstruction errors used as a task's threshold, in (0, 1]: the share of "
            "a task's own inputs expected to stay routed to it (the rest bypass to the base model)."
        },
    )
    selector_holdout: float = field(
        default=0.2,
        metadata={"help": "Fraction of a task's selector data held out to calibrate its threshold, in [0, 1)."},
    )
    selector_epochs: int = field(default=100, metadata={"help": "Training epochs of each autoencoder."})
    selector_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the autoencoders."})
    selector_batch_size: int = field(default=128, metadata={"help": "Minibatch size when fitting an autoencoder."})
    selector_compare: str = field(
        default="raw",
        metadata={
            "help": "How tasks compete: 'raw' (lowest error wins, the paper's rule) or 'normalized' "
            "(error / threshold).",
            "choices": list(SELECTOR_COMPARE),
        },
    )
    selector_feature_dim: Optional[int] = field(
        default=None, metadata={"help": "Feature size F (bookkeeping, set by the first fit)."}
    )
    selector_tasks: list[str] = field(
        default_factory=list, metadata={"help": "Tasks with a fitted autoencoder, in fitting order (bookkeeping)."}
    )
    selector_reference: bool = field(
        default=False, metadata={"help": "Whether a reference autoencoder was fitted (bookkeeping)."}
    )
    selector_classes: list[int] = field(
        default_factory=list,
        metadata={"help": "Prototypes of each task of selector_tasks (bookkeeping of the prototype selector)."},
    )

    def _validate_selector_fields(self) -> None:
        if self.selector not in SELECTOR_KINDS:
            raise ValueError(f"selector must be one of {SELECTOR_KINDS}, got {self.selector!r}.")
        if self.selector_features not in SELECTOR_FEATURES:
            raise ValueError(f"selector_features must be one of {SELECTOR_FEATURES}, got {self.selector_features!r}.")
        if not isinstance(self.selector_prototypes, int) or self.selector_prototypes <= 0:
            raise ValueError(f"selector_prototypes must be a positive integer, got {self.selector_prototypes!r}.")
        if self.selector_scoring not in SCORING:
            raise ValueError(f"selector_scoring must be one of {SCORING}, got {self.selector_scoring!r}.")
        if not 0.0 < self.selector_shrinkage <= 1.0:
            raise ValueError(f"selector_shrinkage must be in (0, 1], got {self.selector_shrinkage!r}.")
        self.selector_classes = list(self.selector_classes)
        if self.selector_tasks and not self.selector_classes and self.selector == "prototype":
            # fitted tasks without prototype counts: a checkpoint written before the prototype selector existed
            # (its config has no `selector` key), whose selector is the autoencoders on shallow features
            self.selector, self.selector_features = "autoencoder", "shallow"
        if self.selector == "prototype" and len(self.selector_classes) != len(self.selector_tasks):
            raise ValueError("selector_classes must give the prototypes of each task of selector_tasks.")
        if not isinstance(self.selector_hidden, int) or self.selector_hidden <= 0:
            raise ValueError(f"selector_hidden must be a positive integer, got {self.selector_hidden!r}.")
        if not 0.0 < self.selector_quantile <= 1.0:
            raise ValueError(f"selector_quantile must be in (0, 1], got {self.selector_quantile!r}.")
        if not 0.0 <= self.selector_holdout < 1.0:
            raise ValueError(f"selector_holdout must be in [0, 1), got {self.selector_holdout!r}.")
        if not isinstance(self.selector_epochs, int) or self.selector_epochs <= 0:
            raise ValueError(f"selector_epochs must be a positive integer, got {self.selector_epochs!r}.")
        if self.selector_lr <= 0:
            raise ValueError(f"selector_lr must be > 0, got {self.selector_lr!r}.")
        if not isinstance(self.selector_batch_size, int) or self.selector_batch_size <= 0:
            raise ValueError(f"selector_batch_size must be a positive integer, got {self.selector_batch_size!r}.")
        if self.selector_compare not in SELECTOR_COMPARE:
            raise ValueError(f"selector_compare must be one of {SELECTOR_COMPARE}, got {self.selector_compare!r}.")
        if self.selector_feature_dim is not None and self.selector_feature_dim <= 0:
            raise ValueError(f"selector_feature_dim must be positive, got {self.selector_feature_dim!r}.")
        self.selector_tasks = list(self.selector_tasks)  # own copy: fit_task_selector grows it
        if len(set(self.selector_tasks)) != len(self.selector_tasks):
            raise ValueError(f"selector_tasks must be unique, got {self.selector_tasks}.")
        for name in self.selector_tasks:
            check_task_name(name)
        if self.selector_tasks and self.selector_feature_dim is None:
            raise ValueError("selector_tasks is set but selector_feature_dim is missing; the config is inconsistent.")


# ------------------------------------------------------------------------------------------------------------------
# autoencoders
# ------------------------------------------------------------------------------------------------------------------
class Autoencoder(nn.Module):
    """``Linear(F, h) -> ReLU -> Linear(h, F) -> Sigmoid`` (the paper's DDAS autoencoder)."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(features, hidden)
        self.decoder = nn.Linear(hidden, features)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(torch.relu(self.encoder(s))))


class AutoencoderFit(NamedTuple):
    """One fitted selector entry: autoencoder weights, feature standardization and calibrated threshold."""

    enc_weight: torch.Tensor  # (F, h)
    enc_bias: torch.Tensor  # (h,)
    dec_weight: torch.Tensor  # (h, F)
    dec_bias: torch.Tensor  # (F,)
    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
    threshold: torch.Tensor  # () quantile of held-out errors
    holdout_errors: torch.Tensor  # (n_holdout,)


def squash(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``sigmoid((x - mean) / std)``, the autoencoder's input space (broadcasts over leading dims)."""
    return torch.sigmoid((features - mean) / std)


def fit_autoencoder(
    features: torch.Tensor,
    hidden: int,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 128,
    holdout: float = 0.2,
    quantile: float = 0.99,
    seed: int = 0,
) -> AutoencoderFit:
    """Fit one DDAS entry on ``features`` ``(N, F)`` (float32, any device) and calibrate its threshold.

    A random ``holdout`` fraction (at least one sample) is kept out of training; the threshold is the ``quantile``
    of its per-sample reconstruction errors. With ``holdout=0`` the training errors are used (optimistic).
    """
    if features.dim() != 2:
        raise ValueError(f"Selector features must be (N, F), got shape {tuple(features.shape)}.")
    n, num_features = features.shape
    if n < 4:
        raise ValueError(f"Fitting a task selector needs at least 4 samples, got {n}.")
    features = features.detach().float()
    device = features.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(device)
    n_hold = max(1, int(round(n * holdout))) if holdout > 0 else 0
    n_hold = min(n_hold, n - 2)
    held, train = (perm[:n_hold], perm[n_hold:]) if n_hold else (perm, perm)
    x_train = features[train]
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0).clamp_min(1e-6)
    s_train = squash(x_train, mean, std)
    s_held = squash(features[held], mean, std)

    ae = Autoencoder(num_features, hidden).to(device)
    with torch.no_grad():
        for lin in (ae.encoder, ae.decoder):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.empty(lin.weight.shape).uniform_(-bound, bound, generator=gen))
            lin.bias.copy_(torch.empty(lin.bias.shape).uniform_(-bound, bound, generator=gen))
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(s_train.shape[0], generator=gen).to(device)
            for start in range(0, s_train.shape[0], batch_size):
                batch = s_train[order[start : start + batch_size]]
                loss = F.mse_loss(ae(batch), batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        held_errors = ((ae(s_held) - s_held) ** 2).mean(dim=-1)
        threshold = torch.quantile(held_errors, quantile)
    return AutoencoderFit(
        ae.encoder.weight.detach().t().contiguous(),
        ae.encoder.bias.detach().clone(),
        ae.decoder.weight.detach().t().contiguous(),
        ae.decoder.bias.detach().clone(),
        mean,
        std,
        threshold,
        held_errors,
    )


class AutoencoderBank(nn.Module):
    """``T`` fitted autoencoders stacked into buffers, evaluated together.

    Buffers: ``enc_weight (T, F, h)``, ``enc_bias (T, h)``, ``dec_weight (T, h, F)``, ``dec_bias (T, F)``,
    ``mean (T, F)``, ``std (T, F)``, ``threshold (T,)``.
    """

    _names = ("enc_weight", "enc_bias", "dec_weight", "dec_bias", "mean", "std", "threshold")

    def __init__(self, features: int, hidden: int, size: int = 0) -> None:
        super().__init__()
        self.features, self.hidden = features, hidden
        shapes = self._shapes(size)
        for name in self._names:
            init = torch.ones if name in ("std", "threshold") else torch.zeros
            self.register_buffer(name, init(shapes[name]))

    def _shapes(self, size: int) -> dict[str, tuple[int, ...]]:
        f, h = self.features, self.hidden
        return {
            "enc_weight": (size, f, h),
            "enc_bias": (size, h),
            "dec_weight": (size, h, f),
            "dec_bias": (size, f),
            "mean": (size, f),
            "std": (size, f),
            "threshold": (size,),
        }

    def __len__(self) -> int:
        return self.threshold.shape[0]

    @torch.no_grad()
    def set_entry(self, position: int, fit: AutoencoderFit) -> None:
        """Write ``fit`` at ``position`` (``position == len(self)`` appends)."""
        if not 0 <= position <= len(self):
            raise IndexError(f"Selector entry {position} out of range 0..{len(self)}.")
        for name in self._names:
            current = getattr(self, name)
            value = getattr(fit, name).to(device=current.device, dtype=current.dtype)
            if position == len(self):
                setattr(self, name, torch.cat([current, value.unsqueeze(0)], dim=0))
            else:
                current[position] = value

    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction MSE of every entry: features ``(B, F)`` -> ``(T, B)`` float32."""
        x = features.float().unsqueeze(0)  # (1, B, F)
        s = squash(x, self.mean.float().unsqueeze(1), self.std.float().unsqueeze(1))  # (T, B, F)
        code = torch.relu(torch.baddbmm(self.enc_bias.float().unsqueeze(1), s, self.enc_weight.float()))
        rec = torch.sigmoid(torch.baddbmm(self.dec_bias.float().unsqueeze(1), code, self.dec_weight.float()))
        return ((rec - s) ** 2).mean(dim=-1)


class TaskSelector(nn.Module):
    """The DDAS state of one adapter: one autoencoder per fitted task plus an optional reference autoencoder."""

    def __init__(self, features: int, hidden: int, num_tasks: int = 0, has_reference: bool = False) -> None:
        super().__init__()
        self.tasks = AutoencoderBank(features, hidden, num_tasks)
        self.reference = AutoencoderBank(features, hidden, 1 if has_reference else 0)

    @property
    def feature_dim(self) -> int:
        return self.tasks.features

    def __len__(self) -> int:
        return len(self.tasks)

    @torch.no_grad()
    def select(self, features: torch.Tensor, compare: str = "raw") -> torch.Tensor:
        """Per-sample choice for features ``(B, F)``: position in the fitted task list, or ``-1`` (base model)."""
        if len(self.tasks) == 0:
            raise ValueError("The task selector has no fitted task; call fit_task_selector(...) first.")
        if features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"Task selector expects {self.feature_dim} features but got {features.shape[-1]}: it was fitted on "
                "another layer or model."
            )
        thresholds = self.tasks.threshold.float().clamp_min(1e-12).unsqueeze(1)  # (T, 1)
        errors = self.tasks.errors(features)  # (T, B)
        scores = errors / thresholds if compare == "normalized" else errors
        best_score, best = scores.min(dim=0)
        best_error = errors.gather(0, best.unsqueeze(0)).squeeze(0)
        over = best_error > thresholds.squeeze(1)[best]
        choice = torch.where(over, torch.full_like(best, -1), best)
        if len(self.reference) > 0:
            ref_error = self.reference.errors(features)[0]
            ref_score = (
                ref_error / self.reference.threshold.float().clamp_min(1e-12)[0]
                if compare == "normalized"
                else ref_error
            )
            if ref_score.mean() < best_score.mean():  # the reference decides for the whole batch (paper)
                choice = torch.full_like(best, -1)
        return choice


# ------------------------------------------------------------------------------------------------------------------
# tuner mixin
# ------------------------------------------------------------------------------------------------------------------
class TaskSelectorMixin:
    """DDAS for a ``BaseTuner`` that also uses :class:`~peft_ext.routing.tasks.ContinualTunerMixin`.

    Call :meth:`_init_task_selector` for every injected adapter (after ``_register_adapter_tasks``). The config
    must mix in :class:`SelectorConfigMixin`. Implements the selector part of the continual contract
    (:class:`~peft_ext.routing.tasks.ContinualTunerMixin`): :attr:`supports_task_selector` is True,
    :meth:`fit_task_selector`, :attr:`has_task_selector` and :meth:`predict_tasks`. Comes before
    ``ContinualTunerMixin`` in a tuner's bases, whose selector-less defaults it overrides.
    """

    supports_task_selector: bool = True  # the method has a selector (fitted or not: see has_task_selector)

    # -- storage ------------------------------------------------------------------------------------------
    @property
    def _selector_attr(self) -> str:
        return f"{self.prefix}selector"

    def _selector_store(self) -> nn.ModuleDict:
        store = self._modules.get(self._selector_attr)
        if store is None:
            store = nn.ModuleDict()
            self.add_module(self._selector_attr, store)
        return store

    def _model_device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _init_task_selector(self, adapter_name: str) -> None:
        """(Re)build the adapter's selector structure from its config and hook it into the routing state."""
        config = self.peft_config[adapter_name]
        store = self._selector_store()
        if config.selector_tasks and adapter_name not in store:
            store[adapter_name] = self._new_selector(config, config.selector_feature_dim, rebuild=True)
        self.routing.selector = self._select_for_routing
        self.routing.selector_features[adapter_name] = config.selector_features

    def _new_selector(self, config, feature_dim: int, rebuild: bool = False) -> nn.Module:
        """An empty selector of the config's kind, or (``rebuild``) one shaped like the config's fitted tasks."""
        if config.selector == "prototype":
            sizes = config.selector_classes if rebuild else None
            module = PrototypeSelector(feature_dim, sizes, config.selector_scoring, config.selector_shrinkage)
        else:
            tasks = len(config.selector_tasks) if rebuild else 0
            module = TaskSelector(feature_dim, config.selector_hidden, tasks, rebuild and config.selector_reference)
        return module.to(self._model_device())

    def _delete_task_selector(self, adapter_name: str) -> None:
        store = self._modules.get(self._selector_attr)
        if store is not None and adapter_name in store:
            del store[adapter_name]

    @property
    def has_task_selector(self) -> bool:
        """True when the active adapter's selector has at least one fitted task (``task_ids="auto"`` works)."""
        name = self.active_adapters[0] if self.active_adapters else None
        store = self._modules.get(self._selector_attr)
        return name is not None and store is not None and name in store and len(store[name]) > 0

    # -- inference ------------------------------------------------------------------------------------------
    def _select_for_routing(self, adapter_name: str, pooled: torch.Tensor) -> torch.Tensor:
        """``RoutingState.selector``: pooled features ``(B, F)`` -> task indices ``(B,)`` (``-1`` = base model)."""
        store = self._modules.get(self._selector_attr)
        if store is None or adapter_name not in store:
            raise ValueError(
                f"task_ids='auto' needs a fitted task selector for adapter {adapter_name!r}; call "
                "fit_task_selector(...) first."
            )
        config = self.peft_config[adapter_name]
        choice = store[adapter_name].select(pooled, config.selector_compare)
        # selector positions -> task indices of the routing state
        to_task = torch.tensor(
            [config.task_names.index(name) if name in config.task_names else -1 for name in config.selector_tasks],
            dtype=torch.long,
            device=choice.device,
        )
        return torch.where(choice >= 0, to_task[choice.clamp_min(0)], choice)

    @torch.no_grad()
    def predict_tasks(
        self,
        batch: Optional[Mapping[str, Any]] = None,
        adapter_name: Optional[str] = None,
        *,
        features: Optional[torch.Tensor] = None,
    ) -> list[Optional[str]]:
        """The selector's choice for each sample of ``batch`` (model inputs), ``None`` = base model: one forward
        under ``task_ids="auto"`` in eval mode, read back with :meth:`routed_tasks`. Or, given ``features``
        ``(B, F)`` of :meth:`collect_selector_features` instead of a batch, the same choice without a forward:
        the base model's features of an input never change, so a caller that asks again (after more tasks were
        fitted) can keep them.

        E.g. to see (or override) what ``with model.route("auto"): model.generate(...)`` will pick: there the
        selector decides on the prompt and the decoding steps keep that task.
        """
        name = self._continual_adapter(adapter_name)
        if (batch is None) == (features is None):
            raise ValueError("predict_tasks takes either a batch or features.")
        if features is not None:
            chosen = self._select_for_routing(name, features.to(self._model_device())).tolist()
            tasks = self.peft_config[name].task_names
            return [tasks[i] if i >= 0 else None for i in chosen]
        with eval_mode(self.model), self.route(AUTO_TASK):
            self.run_inputs(batch)
        return self.routed_tasks(name)

    # -- fitting --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_selector_features(
        self, batches: Iterable[Mapping[str, Any]], adapter_name: Optional[str] = None
    ) -> torch.Tensor:
        """The selector's features of every sample of ``batches`` (dicts of model inputs) -> ``(N, F)`` float32,
        with the model running as the base model (``task_ids="none"``) in eval mode (modes restored afterwards):
        the pooled input of the primary scope's first routed layer (``selector_features="shallow"``), the
        mean-pooled last hidden state of the primary scope (``"deep"``), or both (``"deep+shallow"``,
        :func:`~peft_ext.routing.core.deep_and_shallow`). Shallow features alone end each forward once taken."""
        name = self._continual_adapter(adapter_name)
        scope = self.routing.primary_scope
        layers = self._routed_layers(scope)
        if not layers:
            raise ValueError("The model has no adapted layer to take selector features from.")
        kind = self.peft_config[name].selector_features
        deep, shallow = kind != "shallow", kind != "deep"
        # alone, the shallow part is pooled as the routers pool; beside the deep part, always by the mean
        mode = self.routing.routing_token.get(name, "first") if kind == "shallow" else "mean"
        module = self.model if scope == "" else getattr(self.model, scope)
        parts: dict[str, list[torch.Tensor]] = {"deep": [], "shallow": []}
        taken: dict[str, bool] = {}  # one capture of each part per forward

        def capture_input(layer, args, kwargs):  # shallow: the first routed layer that runs
            if not taken.get("shallow"):
                taken["shallow"] = True
                x = layer.routing_input(args, kwargs)
                mask = self.routing.attention_mask(layer.routing_scope)
                parts["shallow"].append(pool_tokens(x, mode, mask).detach().float().reshape(x.shape[0], -1))
                if not deep:
                    raise _FeaturesTaken  # the rest of the forward cannot change them: stop it (an LLM: ~all of it)

        def capture_output(module, args, kwargs, output):  # deep: what the scope's module returns
            if not taken.get("deep"):
                taken["deep"] = True
                parts["deep"].append(deep_features(output, self.routing.attention_mask(scope)).detach().float())

        handles = [module.register_forward_hook(capture_output, with_kwargs=True)] if deep else []
        if shallow:
            handles += [m.register_forward_pre_hook(capture_input, with_kwargs=True) for m in layers]
        try:
            with eval_mode(self.model), self.route(BASE_MODEL_TASK):
                for batch in batches:
                    taken.clear()
                    try:
                        self.run_inputs(with_hidden_states(module, batch) if deep else batch)
                    except _FeaturesTaken:
                        pass
                    if shallow and not taken.get("shallow"):
                        raise ValueError("No adapted layer saw the batch's input; cannot take selector features.")
        finally:
            for h in handles:
                h.remove()
        if not parts["deep" if deep else "shallow"]:
            raise ValueError("fit_task_selector got no batches.")
        if kind == "deep+shallow":
            return deep_and_shallow(torch.cat(parts["deep"]), torch.cat(parts["shallow"]))
        return torch.cat(parts["deep" if deep else "shallow"], dim=0)

    def _selector_features(self, name: str, batches, features: Optional[torch.Tensor]) -> torch.Tensor:
        config = self.peft_config[name]
        if features is None:
            features = self.collect_selector_features(batches, adapter_name=name)
        if features.dim() != 2:
            raise ValueError(f"Selector features must be (N, F), got shape {tuple(features.shape)}.")
        if config.selector_feature_dim is not None and features.shape[1] != config.selector_feature_dim:
            raise ValueError(
                f"Selector features have size {features.shape[1]} but this adapter's selector was fitted with "
                f"{config.selector_feature_dim}."
            )
        return features

    def _fit_entry(self, name: str, features: torch.Tensor, seed: int, epochs, lr) -> AutoencoderFit:
        config = self.peft_config[name]
        if config.selector_hidden >= features.shape[1]:
            warnings.warn(
                f"selector_hidden ({config.selector_hidden}) >= feature size ({features.shape[1]}): the autoencoder "
                "can learn the identity and reconstruct any input; use a smaller selector_hidden."
            )
        return fit_autoencoder(
            features,
            config.selector_hidden,
            epochs=epochs or config.selector_epochs,
            lr=lr or config.selector_lr,
            batch_size=config.selector_batch_size,
            holdout=config.selector_holdout,
            quantile=config.selector_quantile,
            seed=seed,
        )

    def _ensure_selector(self, name: str, feature_dim: int) -> nn.Module:
        config = self.peft_config[name]
        store = self._selector_store()
        if name not in store:
            config.selector_feature_dim = feature_dim
            store[name] = self._new_selector(config, feature_dim)
        self.routing.selector = self._select_for_routing
        return store[name]

    def fit_task_selector(
        self,
        task_name: str,
        batches: Optional[Iterable[Mapping[str, Any]]] = None,
        adapter_name: Optional[str] = None,
        *,
        labels: Optional[Any] = None,
        features: Optional[torch.Tensor] = None,
        seed: int = 0,
        epochs: Optional[int] = None,
        lr: Optional[float] = None,
    ) -> dict[str, float]:
        """Fit (or refit) the selector's entry of ``task_name`` on ``batches`` (dicts of model inputs, e.g. the
        task's training data) and calibrate its threshold. ``features`` ``(N, F)`` may be given instead of batches
        (precomputed with :meth:`collect_selector_features`). ``labels`` (one class id per sample, in batch order)
        give the prototype selector one prototype per class; the autoencoders do not use them. ``epochs``/``lr``:
        the autoencoders' training. Returns ``{"threshold", "num_samples"}``."""
        name = self._continual_adapter(adapter_name)
        self.routing.task_index(name, task_name)  # unknown task -> ValueError
        if features is None and batches is None:
            raise ValueError("fit_task_selector needs batches or features.")
        config = self.peft_config[name]
        features = self._selector_features(name, batches, features)
        if config.selector == "prototype":
            labels = None if labels is None else torch.as_tensor(labels).reshape(-1)
            fit = fit_prototypes(
                features,
                labels,
                num_prototypes=config.selector_prototypes,
                holdout=config.selector_holdout,
                quantile=config.selector_quantile,
                seed=seed,
            )
            held = fit.holdout_scores
        else:
            fit = self._fit_entry(name, features, seed, epochs, lr)
            held = fit.holdout_errors
        selector = self._ensure_selector(name, features.shape[1])
        known = task_name in config.selector_tasks
        position = config.selector_tasks.index(task_name) if known else len(config.selector_tasks)
        if config.selector == "prototype":
            selector.set_task(position, fit)
            config.selector_classes = selector.sizes()
        else:
            selector.tasks.set_entry(position, fit)
        if not known:
            config.selector_tasks.append(task_name)
        return {"threshold": float(fit.threshold), "num_samples": int(held.numel())}

    def fit_reference_selector(
        self,
        batches: Optional[Iterable[Mapping[str, Any]]] = None,
        adapter_name: Optional[str] = None,
        *,
        features: Optional[torch.Tensor] = None,
        seed: int = 0,
        epochs: Optional[int] = None,
        lr: Optional[float] = None,
    ) -> dict[str, float]:
        """Fit the optional reference autoencoder on out-of-task data (per batch: if it reconstructs a batch better
        than the tasks' autoencoders, the batch bypasses the adapters). Needs at least one fitted task."""
        name = self._continual_adapter(adapter_name)
        config = self.peft_config[name]
        if config.selector != "autoencoder":
            raise ValueError(f"The reference autoencoder belongs to selector='autoencoder', not {config.selector!r}.")
        if not config.selector_tasks:
            raise ValueError("Fit at least one task with fit_task_selector(...) before the reference autoencoder.")
        if features is None and batches is None:
            raise ValueError("fit_reference_selector needs batches or features.")
        fit = self._fit_entry(name, self._selector_features(name, batches, features), seed, epochs, lr)
        selector = self._ensure_selector(name, fit.mean.shape[0])
        selector.reference.set_entry(0, fit)  # appends the first time, replaces later
        config.selector_reference = True
        return {"threshold": float(fit.threshold), "num_samples": int(fit.holdout_errors.numel())}

    # -- checkpoint keys --------------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``base_model.<prefix>selector.<adapter>.tasks.mean`` -> ``base_model.<prefix>selector.tasks.mean``."""
        marker = f"{cls.prefix}selector.{adapter_name}."
        pattern = rf"(^|\.){re.escape(marker)}"
        if re.search(pattern, key):
            return re.sub(pattern, lambda m: f"{m.group(1)}{cls.prefix}selector.", key, count=1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


__all__ = [
    "Autoencoder",
    "AutoencoderBank",
    "AutoencoderFit",
    "SelectorConfigMixin",
    "TaskSelector",
    "TaskSelectorMixin",
    "fit_autoencoder",
    "squash",
]
