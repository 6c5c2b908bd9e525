"""The cases module: loading it and checking its tables before any of PEFT's tests is touched.

A cases module (``tests/peft_battery_cases.py`` here) defines, in the formats of PEFT's own tables in
``test_custom_models.py`` / ``test_config.py``:

- ``CASES`` (required): ``(test_name, model_id, config_cls, config_kwargs)``, like PEFT's ``TEST_CASES``;
- ``MULTI_ADAPTER_CASES``: ``(test_name, tuner_method, config_cls, kwargs_1, kwargs_2)``
  (PEFT's ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``);
- ``MIXED_BATCH_CASES``: ``(test_name, config_0, config_1)`` with config instances (``MIXED_ADAPTER_TEST_CASES``);
- ``CONFIG_CASES``: ``(config_cls, mandatory_kwargs)`` (``ALL_CONFIG_CLASSES``), default ``(cls, {})`` per class of
  ``CASES``;
- ``EXPECTED_FAILURES``: ``{pattern: reason}``, fnmatch patterns on a test function name or on
  ``"TestClass::test_fn[case name]"``, turned into strict xfails.

Importing the module imports the project, which registers its methods with PEFT.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Table:
    """Values for one of PEFT's parametrize tables, with the test ids they get (our test names)."""

    values: list
    ids: list[str]


@dataclass(frozen=True)
class CaseTables:
    """Everything the plugin takes from a cases module; table attributes are named by "kind" (see upstream.TABLES)."""

    cases: Table
    multi: Table
    mixed: Table
    config_classes: Table
    config_kwargs: Table
    layer_indexing: Table
    expected_failures: dict[str, str]

    def table(self, kind: str) -> Table:
        return getattr(self, kind)


def load(spec: str) -> types.ModuleType:
    """Import the cases module from a ``.py`` path or an importable module path."""
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        path = path.resolve()
        if not path.is_file():
            raise pytest.UsageError(f"peft_battery: cases file not found: {path}")
        name = "_peft_battery_cases"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        # appended, so that the cases file can import its siblings without ever shadowing the installed project
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _instance_of(cls):
    return lambda value: isinstance(value, cls)


def _check_entries(name: str, entries: list[tuple], fmt: str, *fields) -> None:
    """Every entry must be a tuple with one value per predicate in ``fields``, each accepted by its predicate."""
    for entry in entries:
        if len(entry) != len(fields) or not all(accepts(value) for accepts, value in zip(fields, entry)):
            raise pytest.UsageError(f"peft_battery: each {name} entry must be {fmt}, got {entry!r}")


def read(module: types.ModuleType) -> CaseTables:
    """Validate the tables of a cases module (a clear usage error beats a confusing failure deep in PEFT's tests)."""
    from peft import PeftConfig

    def is_config_cls(value) -> bool:
        return inspect.isclass(value) and issubclass(value, PeftConfig)

    is_str, is_dict, is_config = _instance_of(str), _instance_of(dict), _instance_of(PeftConfig)

    where = getattr(module, "__file__", None) or module.__name__
    if not getattr(module, "CASES", None):
        raise pytest.UsageError(f"peft_battery: {where} defines no CASES (or an empty one)")

    cases = [tuple(c) for c in module.CASES]
    fmt = "(test_name: str, model_id: str, config_cls: PeftConfig subclass, config_kwargs: dict)"
    _check_entries("CASES", cases, fmt, is_str, is_str, is_config_cls, is_dict)
    names = [c[0] for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise pytest.UsageError(f"peft_battery: duplicate test names in CASES: {duplicates}")

    multi = [tuple(c) for c in getattr(module, "MULTI_ADAPTER_CASES", [])]
    fmt = "(test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2)"
    _check_entries("MULTI_ADAPTER_CASES", multi, fmt, is_str, is_str, is_config_cls, is_dict, is_dict)

    mixed = [tuple(c) for c in getattr(module, "MIXED_BATCH_CASES", [])]
    fmt = "(test_name, config_0, config_1) with PeftConfig instances"
    _check_entries("MIXED_BATCH_CASES", mixed, fmt, is_str, is_config, is_config)

    config_classes = sorted({c[2] for c in cases}, key=lambda cls: cls.__name__)
    if hasattr(module, "CONFIG_CASES"):
        config_kwargs = [tuple(c) for c in module.CONFIG_CASES]
        _check_entries("CONFIG_CASES", config_kwargs, "(config_cls, mandatory_kwargs)", inspect.isclass, is_dict)
    else:
        config_kwargs = [(cls, {}) for cls in config_classes]
    # PEFT's layer-indexing tests only apply to configs that take both arguments
    layer_indexing = [
        (cls, kwargs)
        for cls, kwargs in config_kwargs
        if {"layers_to_transform", "layers_pattern"} <= set(inspect.signature(cls).parameters)
    ]

    expected = getattr(module, "EXPECTED_FAILURES", None) or {}
    if not (isinstance(expected, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in expected.items())):
        raise pytest.UsageError("peft_battery: EXPECTED_FAILURES must be a dict {test pattern: reason}")

    return CaseTables(
        cases=Table(cases, [c[0] for c in cases]),
        multi=Table(multi, [c[0] for c in multi]),
        mixed=Table(mixed, [c[0] for c in mixed]),
        config_classes=Table(config_classes, [cls.__name__ for cls in config_classes]),
        config_kwargs=Table(config_kwargs, [cls.__name__ for cls, _ in config_kwargs]),
        layer_indexing=Table(layer_indexing, [cls.__name__ for cls, _ in layer_indexing]),
        expected_failures=dict(expected),
    )
