"""Registering peft-ext's methods with HF PEFT.

PEFT knows its methods through the :class:`peft.PeftType` enum and four mappings filled by
:func:`peft.utils.register_peft_method`. A plugin therefore has to (1) add a member to a ``str`` enum after the
class was built, and (2) register its config/tuner classes once. Both steps live here, in one place, and are
idempotent: importing :mod:`peft_ext` twice or calling :func:`importlib.reload` on it changes nothing.

Each method is also *described* once, by the call that registers it: a :class:`MethodInfo` (config and tuner class,
the name shown on model cards, a one-sentence summary, the default learning rate of a continual run, a function that
describes a config's settings in words). The command line's method choices, the training arguments' validation, the
continual strategies, the Hub model card and the preset catalogue all read :data:`METHODS`, so adding a method is
its package plus one :func:`register_method` call. PEFT's own LoRA is described here too, as the baseline every
continual run can be compared with.

The few places where peft-ext turns an obscure error of PEFT's loaders into a one-line one (unknown or absent
``peft_type``, an adapter folder without its weights file) live here too: :func:`install_peft_type_check`,
:func:`install_weights_file_check`.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from peft import PeftType
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, register_peft_method


def extend_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case, e.g. ``"RESORA"``) to :class:`peft.PeftType` and return the member.

    ``PeftType`` is a ``str`` enum; a member must be reachable as an attribute (``PeftType.RESORA``), by name
    (``PeftType["RESORA"]``), by value (``PeftType("RESORA")``, used when configs are unpickled), in iteration
    order (``list(PeftType)``) and must compare/sort like PEFT's own members. Python 3.11+ keeps that in
    ``_member_map_``, ``_value2member_map_``, ``_member_names_`` and a per-member ``_sort_order_``.
    """
    if name != name.upper() or not name.isidentifier():
        raise ValueError(f"PeftType member names are upper-case identifiers, got {name!r}.")
    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing

    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # type.__setattr__ bypasses EnumType.__setattr__, which refuses to (re)bind member names.
    type.__setattr__(PeftType, name, member)
    return member


def _check_prefix_is_unique(name: str, prefix: str) -> None:
    """PEFT only rejects identical prefixes; a prefix that starts another one (``"moe_"`` vs ``"moecl_"``) would
    let one method's state-dict filter pick up the other's tensors, so reject that too."""
    for peft_type, other in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if peft_type == name.upper():
            continue
        if other.startswith(prefix) or prefix.startswith(other):
            raise ValueError(
                f"Prefix {prefix!r} of method {name!r} clashes with prefix {other!r} of {peft_type}: a parameter "
                "prefix must not start another method's prefix."
            )


@dataclass(frozen=True)
class MethodInfo:
    """What peft-ext's tools know of one adapter method (see the module docstring).

    Attributes:
        name (`str`): lower-case name, the ``--method`` of the command line (``"moecl"``); ``name.upper()`` is its
            :class:`peft.PeftType`.
        config_cls (`type`), model_cls (`type`): the PEFT config class and tuner (``BaseTuner``) class.
        display_name (`str`): the name shown on model cards and tables (``"MoE-CL"``).
        summary (`str`): one sentence for model cards: what the method does, with its paper.
        default_learning_rate (`float`): the learning rate of a continual run that sets none.
        kind_learning_rates (`dict[str, float]`): where a task kind's runs need another rate (their default epochs
            differ: generation trains 1 epoch per task, the other kinds 3), that kind's rate, e.g.
            ``{"generation": 3e-2}``.
        describe (`Callable[[PeftConfig], str]`, *optional*): a config's main settings in a few words (``"r=8, 2
            subspaces"``), for the preset catalogue; without it presets show the method's name only.
    """

    name: str
    config_cls: type
    model_cls: type
    display_name: str
    summary: str
    default_learning_rate: float = 3e-3
    describe: Optional[Callable[[Any], str]] = None
    kind_learning_rates: dict[str, float] = field(default_factory=dict, hash=False)

    def learning_rate(self, kind: Optional[str] = None) -> float:
        """The learning rate of a continual run of tasks of ``kind`` that sets none."""
        return self.kind_learning_rates.get(kind, self.default_learning_rate)

    @property
    def peft_type(self) -> str:
        return self.name.upper()

    @property
    def routes_tasks(self) -> bool:
        """Whether one adapter holds every task behind the continual contract (``add_task``/``end_task``/``route``
        of :class:`peft_ext.routing.tasks.ContinualTunerMixin`); otherwise a continual run trains one adapter on each
        task in turn, or one adapter per task."""
        from .routing.tasks import ContinualTunerMixin

        return issubclass(self.model_cls, ContinualTunerMixin)

    @property
    def needs_peft_ext(self) -> bool:
        """Whether loading a saved adapter of this method needs ``import peft_ext`` (PEFT alone knows its own)."""
        return not self.config_cls.__module__.startswith("peft.")


# name -> description of every method peft-ext's tools know: its own, PEFT's LoRA, and any registered later.
METHODS: dict[str, MethodInfo] = {}


def method_info(name: str) -> MethodInfo:
    """The description of method ``name``; a one-line ``ValueError`` naming the known methods otherwise."""
    info = METHODS.get(name)
    if info is None:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown method {name!r}.{hint} Known methods: {', '.join(METHODS)}.")
    return info


def method_of_peft_type(peft_type: str) -> Optional[MethodInfo]:
    """The description of the method whose ``PeftType`` value is ``peft_type`` (``"MOECL"``), or None."""
    return next((info for info in METHODS.values() if info.peft_type == str(peft_type)), None)


def register_method(
    name: str,
    config_cls: type,
    model_cls: type,
    *,
    display_name: Optional[str] = None,
    summary: Optional[str] = None,
    default_learning_rate: float = 3e-3,
    describe: Optional[Callable[[Any], str]] = None,
    kind_learning_rates: Optional[dict[str, float]] = None,
) -> PeftType:
    """Make method ``name`` (lower case) usable through ``get_peft_model``/``PeftModel.from_pretrained``, and
    describe it in :data:`METHODS` (the keyword arguments are :class:`MethodInfo`'s fields).

    Idempotent: a second call with the same classes (a re-import) is a no-op, and a call after
    :func:`importlib.reload` re-points the mappings to the reloaded classes. A method of another package (a plugin
    of this plugin) registers the same way; its parameter prefix is its tuner class's ``prefix``. For one of PEFT's
    own methods (LoRA) PEFT's registration is left as it is and only the description is added.
    """
    METHODS[name] = MethodInfo(
        name=name,
        config_cls=config_cls,
        model_cls=model_cls,
        display_name=display_name or name,
        summary=summary or f"the {name} adapter method",
        default_learning_rate=default_learning_rate,
        describe=describe,
        kind_learning_rates=dict(kind_learning_rates or {}),
    )
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.__members__.get(name.upper())) is model_cls:
        return PeftType[name.upper()]
    return _register_with_peft(name, config_cls, model_cls)


def _register_with_peft(name: str, config_cls: type, model_cls: type) -> PeftType:
    # the prefix names the method's parameters in state dicts; it must not collide with any other method's
    prefix = getattr(model_cls, "prefix", None)
    if not isinstance(prefix, str) or not prefix.endswith("_"):
        raise ValueError(f"{model_cls.__name__}.prefix must name the method's parameters, e.g. {name + '_'!r}.")
    install_peft_type_check()
    install_weights_file_check()
    peft_type = extend_peft_type(name.upper())
    _check_prefix_is_unique(name, prefix)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        # Already registered (re-import or reload): refresh the classes, which may be new objects after a reload.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def check_peft_type(peft_type, source: str) -> None:
    """Raise a one-line ``ValueError`` if ``peft_type`` (read from ``source``) is not a registered method."""
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    known = sorted(str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
    close = difflib.get_close_matches(str(peft_type).upper(), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{source} has peft_type {peft_type!r}, which is not a registered PEFT method.{hint} "
        "(peft-ext's RESORA, ANA and MOECL register on `import peft_ext`.)"
    )


def install_peft_type_check() -> None:
    """Make loading an adapter with an unknown or absent ``peft_type`` fail with a one-line ``ValueError``.

    PEFT looks the type read from ``adapter_config.json`` up in a plain dict, so a misspelled or unregistered type
    surfaces as a bare ``KeyError: 'RESORAX'``, and a config without the entry as ``KeyError: 'peft_type'``. This
    wraps the two classmethods through which PEFT's loaders turn that name into a class
    (``PeftConfigMixin._get_peft_type`` for ``PeftModel.from_pretrained``/``load_adapter`` and
    ``PeftConfigMixin.from_peft_type`` for ``PeftConfig.from_pretrained``) to validate it first. Together with
    :func:`install_weights_file_check` these are the only changes peft-ext makes to PEFT's behaviour; idempotent,
    and valid types pass through untouched.
    """
    from peft.config import PeftConfigMixin

    get_type = PeftConfigMixin.__dict__["_get_peft_type"].__func__
    if getattr(get_type, "_peft_ext_checked", False):
        return
    from_type = PeftConfigMixin.__dict__["from_peft_type"].__func__

    @functools.wraps(get_type)
    def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):
        try:
            peft_type = get_type(cls, model_id, **hf_hub_download_kwargs)
        except KeyError as err:
            if err.args != ("peft_type",):
                raise
            # PEFT reads the file and indexes its dict with "peft_type"; nothing else there raises this KeyError
            subfolder = hf_hub_download_kwargs.get("subfolder")
            where = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
            raise ValueError(
                f"Adapter at {where!r} has no 'peft_type' in its {CONFIG_NAME}, so PEFT cannot tell which method "
                "saved it; use the adapter_config.json written by save_pretrained (it names the type, e.g. "
                '"peft_type": "MOECL").'
            ) from None
        check_peft_type(peft_type, f"Adapter at {model_id!r}")
        return peft_type

    @functools.wraps(from_type)
    def from_peft_type(cls, **kwargs):
        if "peft_type" in kwargs:
            check_peft_type(kwargs["peft_type"], "Adapter config")
        return from_type(cls, **kwargs)

    _get_peft_type._peft_ext_checked = True
    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)
    PeftConfigMixin.from_peft_type = classmethod(from_peft_type)


def check_adapter_weights_file(model_id, subfolder: str | None = None) -> None:
    """Raise a one-line ``ValueError`` naming the missing file if the local adapter folder ``model_id`` (or its
    ``subfolder``) has an ``adapter_config.json`` but no weights file.

    PEFT looks for the weights in a local folder first; when they are not there it takes the folder's *path* for a
    Hub repository id, which fails with ``huggingface_hub``'s ``HFValidationError`` about the id, not about the file.
    Hub ids and folders without a config are left to PEFT's own resolution and errors.
    """
    path = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return
    if any(os.path.isfile(os.path.join(path, name)) for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        return
    raise ValueError(
        f"Adapter folder {path!r} has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME} (nor {WEIGHTS_NAME}): the "
        "adapter's weights are missing; copy the weights file saved with this config there (save_pretrained writes "
        "both)."
    )


def install_weights_file_check() -> None:
    """Make loading from a local adapter folder without its weights file fail with a one-line ``ValueError``
    (:func:`check_adapter_weights_file`).

    Wraps ``PeftModel.load_adapter``, through which ``PeftModel.from_pretrained`` (with or without ``config=``) and
    :func:`peft_ext.trainers.hub.load_continual_run` read every adapter's weights. Idempotent; folders with weights
    and Hub ids pass through untouched.
    """
    from peft import PeftModel

    load = PeftModel.__dict__["load_adapter"]
    if getattr(load, "_peft_ext_checked", False):
        return

    @functools.wraps(load)
    def load_adapter(self, *args, **kwargs):
        model_id = args[0] if args else kwargs.get("model_id")
        if model_id is not None:
            check_adapter_weights_file(model_id, kwargs.get("subfolder"))
        return load(self, *args, **kwargs)

    load_adapter._peft_ext_checked = True
    PeftModel.load_adapter = load_adapter


def registered_methods() -> dict[str, PeftType]:
    """The :class:`peft.PeftType` of every described method (:data:`METHODS`), by lower-case name."""
    return {name: PeftType[info.peft_type] for name, info in METHODS.items()}


__all__ = [
    "METHODS",
    "MethodInfo",
    "extend_peft_type",
    "check_adapter_weights_file",
    "check_peft_type",
    "install_peft_type_check",
    "install_weights_file_check",
    "method_info",
    "method_of_peft_type",
    "register_method",
    "registered_methods",
]
