"""How each PEFT method follows a task stream: a strategy per method, derived from the method's description.

A strategy builds the PEFT model for the first task, prepares it for every later task, finishes a task after
training, routes task-aware evaluation to a task, and, where it can, infers the task of an input (task-agnostic
evaluation). Every method described in :data:`peft_ext.registry.METHODS` gets one without any code here: the
continual contract's strategy when its tuner implements it (``MethodInfo.routes_tasks``), the LoRA-shaped one
otherwise, with the method's config class and default learning rate. A method whose continual behaviour needs more
(options of its own, another way to finish a task) registers a subclass with :func:`register_strategy`; so can a
variant of a method under a new name, never by editing a chain of ``if method == ...``.

* ``lora`` / ``resora``: by default **one shared adapter trained sequentially** (the baseline that forgets);
  with ``adapter_per_task=True`` one fresh adapter per task (the "separate adapters" reference), routed by task
  name, and task-agnostic prediction by **maximum confidence** over the per-task adapters and heads.
* ``ana`` / ``moecl``: the continual contract (``peft_ext.routing.tasks.ContinualTunerMixin``): one PEFT adapter
  named ``default`` holds every task; ``add_task`` before a task, ``end_task(task, batches=...)`` after it,
  ``fit_task_selector`` where ``supports_task_selector`` says the method has a task selector, ``route(task)`` for
  task-aware and ``route("auto")`` (``predict_tasks``) for task-agnostic evaluation.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn

from peft_ext.registry import METHODS, MethodInfo

from .data_files import read_json_file
from .heads import TaskHeadClassifier


# Strategies registered by name: a method's own continual behaviour, or a variant of a method under a new name.
STRATEGIES: dict[str, type["ContinualStrategy"]] = {}


def register_strategy(name: str):
    """Class decorator: make a strategy the one of ``method=name`` (CLI ``--method name``)."""

    def decorate(cls):
        if name not in METHODS and cls.described_as is None:
            cls.described_as = cls.method  # a variant of the method it subclasses the strategy of
        cls.method = name
        STRATEGIES[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Every ``--method``: the described methods, then the strategies registered under other names."""
    return list(METHODS) + [name for name in STRATEGIES if name not in METHODS]


def strategy_class(method: str) -> type["ContinualStrategy"]:
    """The strategy class of ``method``: its registered one, or the one its description implies."""
    if method in STRATEGIES:
        return STRATEGIES[method]
    info = METHODS.get(method)
    if info is None:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(available_methods())}.")
    base = _RoutedStrategy if info.routes_tasks else _LoraLikeStrategy
    return type(f"{info.display_name}Strategy", (base,), {"method": method})


def get_strategy(method: str, method_config: Optional[dict[str, Any]] = None) -> "ContinualStrategy":
    return strategy_class(method)(dict(method_config or {}))


def default_learning_rate(method: str, kind: Optional[str] = None) -> float:
    """The learning rate of a continual run of ``method`` on tasks of ``kind`` that sets none (its description's)."""
    info = strategy_class(method).info()
    return info.learning_rate(kind) if info is not None else MethodInfo.default_learning_rate


def load_method_config(source: Optional[str]) -> dict[str, Any]:
    """A method config from a JSON file path or a preset name of ``peft_ext.hub_configs`` (e.g. ``moecl-bert``):
    the config class's keyword arguments, optionally ``peft_type``, plus strategy options."""
    if not source:
        return {}
    path = Path(source)
    if not path.is_file():
        from peft_ext.hub_configs import list_presets, preset_dict

        if source not in list_presets():
            raise FileNotFoundError(
                f"Method config not found: {source} is neither a JSON file nor a preset name; presets: "
                f"{', '.join(list_presets())}."
            )
        return preset_dict(source)
    data = read_json_file(path, "Method config")  # DataFileError is a ValueError with one line naming the file
    if not isinstance(data, dict):
        raise ValueError(f"Method config {path} must hold a JSON object.")
    return data


# transformers model_type -> preset family of peft_ext.hub_configs
MODEL_FAMILIES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "vit": "vit", "gpt2": "gpt2",
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
}  # fmt: skip


def default_method_config(method: str, model_type: Optional[str]) -> dict[str, Any]:
    """The shipped preset ``<method>-<family>`` for this model type when there is one (``{}`` otherwise: the
    config class's defaults, and for LoRA PEFT's own target modules)."""
    family = MODEL_FAMILIES.get(model_type or "")
    if family is None:
        return {}
    from peft_ext.hub_configs import list_presets, preset_dict

    name = f"{method}-{family}"
    return preset_dict(name) if name in list_presets() else {}


class ContinualStrategy:
    """Base class. ``method_config`` holds the PEFT config's keyword arguments plus the strategy's own options
    (:attr:`options`, popped before the config is built).

    Attributes:
        method (`str`): registry name. options (`dict`): option name -> default.
        described_as (`str`): the described method (``peft_ext.registry.METHODS``) whose config class and default
            learning rate this strategy uses: ``method`` itself unless a variant names another.
    """

    method: str = ""
    options: dict[str, Any] = {}
    described_as: Optional[str] = None

    @classmethod
    def info(cls) -> Optional[MethodInfo]:
        """The method's description; None for a strategy registered under a name no method describes."""
        return METHODS.get(cls.described_as or cls.method)

    def __init__(self, method_config: dict[str, Any]) -> None:
        self.settings = {k: method_config.pop(k, v) for k, v in self.options.items()}
        self.config_kwargs = method_config

    # -- config -------------------------------------------------------------------------------------------------
    def config_class(self) -> type[PeftConfig]:
        info = self.info()
        if info is None:
            raise NotImplementedError(f"Strategy {self.method!r} describes no method: define its config_class().")
        return info.config_cls

    def default_config(self) -> dict[str, Any]:
        return {}

    def make_config(self, **extra) -> PeftConfig:
        cls = self.config_class()
        kwargs = {**self.default_config(), **self.config_kwargs, **extra}
        peft_type = kwargs.pop("peft_type", None)
        expected = str(cls().peft_type.value) if peft_type is not None else None
        if peft_type is not None and str(peft_type).upper() != expected:
            raise ValueError(f"The method config is for {peft_type}, but method {self.method!r} uses {expected}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known - set(self.options))
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} option(s) {unknown} in the method config.")
        try:
            return cls(**kwargs)
        except TypeError as err:  # e.g. a wrong value type deep in the config
            raise ValueError(f"Invalid {cls.__name__} options: {err}") from None

    def first_config(self, task: str) -> PeftConfig:
        """The PEFT config the first task starts with (also used to validate the method config early)."""
        return self.make_config()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, base_model: nn.Module, task: str) -> PeftModel:
        """Wrap the base model for the first task."""
        return get_peft_model(base_model, self.first_config(task), adapter_name="default")

    def begin_task(self, model: PeftModel, task: str, index: int) -> None:
        """Prepare ``model`` for task number ``index`` > 0."""

    def end_task(
        self, model: PeftModel, task: str, batches: Iterable[dict], labels: Optional[torch.Tensor] = None
    ) -> None:
        """Finish ``task`` after training; ``batches`` yields the task's training inputs (model inputs only), and
        ``labels`` ``(N,)`` their label ids in the same order."""

    def route(self, model: PeftModel, task: str) -> contextlib.AbstractContextManager:
        """Context in which forwards of ``model`` serve ``task`` (task-aware evaluation)."""
        return contextlib.nullcontext()

    def route_untrained(self, model: PeftModel) -> contextlib.AbstractContextManager:
        """Context in which forwards of ``model`` serve a task not trained yet (its accuracy before training, for
        kinds that can score it): the model as it is, for a method that shares one adapter across tasks."""
        return contextlib.nullcontext()

    def untrained_is_base(self) -> bool:
        """Whether :meth:`route_untrained` serves the untouched base model (a method with one route per task),
        whose answers do not change as tasks are trained; False when the trained adapters serve it."""
        return False

    def can_infer_tasks(self, model: PeftModel) -> bool:
        """Whether :meth:`infer_tasks` can name the task of an input for ``model`` now (classification; a model
        that picks routes itself needs no strategy for it: :meth:`picks_routes`)."""
        return False

    def picks_routes(self, model: PeftModel) -> bool:
        """Whether ``model`` itself picks each input's route (a fitted task selector: ``predict_tasks``, and
        ``route("auto")`` in a forward; the base model for an input of no learned task)."""
        return False

    def infer_tasks(
        self, classifier: TaskHeadClassifier, batch: dict, tasks: list[str]
    ) -> tuple[list[Optional[str]], torch.Tensor]:
        """Task-agnostic prediction for ``batch`` (model inputs, no labels): the task picked for each sample
        (``None``: none of ``tasks``) and the predicted label index ``(batch,)`` in that task's head (-1 for None)."""
        raise NotImplementedError

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, model: PeftModel, directory: Path) -> None:
        model.save_pretrained(str(directory))

    def load(self, base_model: nn.Module, directory: Path, tasks: list[str]) -> PeftModel:
        """Rebuild the model saved by :meth:`save` after ``tasks`` were trained (to resume)."""
        return PeftModel.from_pretrained(base_model, str(directory), is_trainable=True)


class _LoraLikeStrategy(ContinualStrategy):
    """LoRA-shaped methods: one shared adapter (default) or one adapter per task (``adapter_per_task=True``)."""

    options = {"adapter_per_task": False}

    @property
    def per_task(self) -> bool:
        return bool(self.settings["adapter_per_task"])

    def can_infer_tasks(self, model):  # max-confidence routing needs one adapter per task
        return self.per_task

    def start(self, base_model, task):
        return get_peft_model(base_model, self.first_config(task), adapter_name=task if self.per_task else "default")

    def begin_task(self, model, task, index):
        if self.per_task:
            model.add_adapter(task, self.make_config())
            model.set_adapter(task)  # active and the only trainable adapter

    def route(self, model, task):
        if not self.per_task:
            return contextlib.nullcontext()
        return _active_adapter(model, task)

    def route_untrained(self, model):
        # one adapter per task: a task not trained yet has none, so the base model serves it
        return model.disable_adapter() if self.per_task else contextlib.nullcontext()

    def untrained_is_base(self):
        return self.per_task

    def infer_tasks(self, classifier, batch, tasks):
        # Route each sample to the task whose adapter + head is most confident (max softmax probability).
        best_conf, best_task, best_pred = None, None, None
        for t_idx, task in enumerate(tasks):
            with self.route(classifier.encoder, task):
                probs = classifier.logits(classifier.features(**batch), task).softmax(-1)
            conf, pred = probs.max(-1)
            if best_conf is None:
                best_conf, best_pred = conf, pred
                best_task = torch.zeros_like(pred)
            else:
                better = conf > best_conf
                best_conf = torch.where(better, conf, best_conf)
                best_pred = torch.where(better, pred, best_pred)
                best_task = torch.where(better, torch.full_like(pred, t_idx), best_task)
        return [tasks[i] for i in best_task.tolist()], best_pred

    def save(self, model, directory):
        model.save_pretrained(str(directory))  # per-task adapters land in directory/<task>/

    def load(self, base_model, directory, tasks):
        if not self.per_task:
            return PeftModel.from_pretrained(base_model, str(directory), is_trainable=True)
        model = PeftModel.from_pretrained(
            base_model, str(directory / tasks[0]), adapter_name=tasks[0], is_trainable=True
        )
        for task in tasks[1:]:
            model.load_adapter(str(directory / task), adapter_name=task, is_trainable=True)
        return model


@contextlib.contextmanager
def _active_adapter(model: PeftModel, adapter: str) -> Iterator[None]:
    """Serve ``adapter`` inside the block; the previously active adapter (and its trainability) comes back after."""
    previous = model.active_adapter
    if previous == adapter:
        yield
        return
    model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)


@register_strategy("lora")
class LoraStrategy(_LoraLikeStrategy):
    def default_config(self):
        return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}


@register_strategy("resora")
class ReSoRAStrategy(_LoraLikeStrategy):
    def default_config(self):
        return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}


class _RoutedStrategy(ContinualStrategy):
    """Methods implementing the continual contract (``peft_ext.routing.tasks.ContinualTunerMixin``: tasks inside
    one adapter named ``default``). Every call goes through that contract, the same for every such method."""

    options = {"selector_batches": None}  # max batches of a task's inputs to fit its selector entry (None: all)

    def first_config(self, task):
        return self.make_config(task_names=[task])

    def begin_task(self, model, task, index):
        model.add_task(task)

    def end_task(self, model, task, batches, labels=None):
        batches = list(batches)  # read twice where the method recounts routes before its selector is fitted
        model.end_task(task, batches=self.end_task_batches(batches))
        if model.supports_task_selector:
            limit = self.settings["selector_batches"]
            kept = [b for i, b in enumerate(batches) if limit is None or i < limit]
            if labels is not None:  # the labels of the kept batches (a prototype selector keeps one per class)
                labels = labels[: sum(next(iter(b.values())).shape[0] for b in kept)]
            model.fit_task_selector(task, kept, labels=labels)

    def end_task_batches(self, batches: list[dict]) -> Optional[list[dict]]:
        """What the model's ``end_task`` gets as ``batches``: the task's inputs (a method that does not use them
        ignores them)."""
        return batches

    def picks_routes(self, model):
        return bool(model.has_task_selector)

    def route(self, model, task):
        return model.route(task)

    def route_untrained(self, model):
        return model.route("none")  # no route of its own yet: the untouched base model

    def untrained_is_base(self):
        return True


@register_strategy("moecl")
class MoECLStrategy(_RoutedStrategy):
    # recount_routes: activate-freeze counts the experts the trained router picks on the task's inputs (eval mode)
    # instead of the counts accumulated over training (the paper's); see MoECLModel.end_task
    options = {**_RoutedStrategy.options, "recount_routes": True}

    def end_task_batches(self, batches):
        return batches if self.settings["recount_routes"] else None  # None: the counts of the training forwards


__all__ = [
    "STRATEGIES",
    "ContinualStrategy",
    "LoraStrategy",
    "MoECLStrategy",
    "ReSoRAStrategy",
    "available_methods",
    "default_learning_rate",
    "default_method_config",
    "get_strategy",
    "load_method_config",
    "register_strategy",
    "strategy_class",
]
