"""PEFT's upstream test modules: importing them, swapping their case tables for ours, spotting tests that need the Hub.

PEFT parametrizes its generic tests over module-level tables (``TEST_CASES``, ...). The swap rewrites every
``pytest.mark.parametrize`` whose argvalues *is* one of those table objects, so only tests that PEFT runs for every
method are affected; tests hard-wired to its built-in methods keep their marks and are deselected by the plugin.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest

from .cache import UPSTREAM_PACKAGE
from .cases import CaseTables


# Which tables of which upstream module get replaced, and by which table of the cases module ("kind").
TABLES = {
    "test_custom_models": {
        "TEST_CASES": "cases",
        "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES": "multi",
        "ALL_PEFT_CONFIG_CLASSES": "config_classes",
        "MIXED_ADAPTER_TEST_CASES": "mixed",
    },
    "test_config": {
        "ALL_CONFIG_CLASSES": "config_kwargs",
        "LAYER_INDEXING_CONFIG_CLASSES": "layer_indexing",
    },
}

MARKER = "peft_battery"  # put on every rewritten test function, with kinds=(...) and empty=bool

# A test needs the Hub when its source (or that of a ``self._test_*`` helper it calls) names a Hub repo: an
# "org/name" literal of a well-known Hub org outside a comparison (``model_id == "org/x"`` only adapts tolerances),
# or one of PEFT's tables of Hub checkpoints / downloaders below.
_HUB_REPO_ID = re.compile(
    r"(?:hf-internal-testing|peft-internal-testing|trl-internal-testing|ybelkada|facebook|google|"
    r"openai-community|microsoft|HuggingFaceM4|HuggingFaceH4|HuggingFaceTB|meta-llama|Qwen|BAAI|bigscience|"
    r"EleutherAI|fxmarty|echarlaix|stas|sshleifer|hf-tiny-model-private|trl-lib|gpt2)/[\w.\-]+"
)
_HUB_NAMES = {"PEFT_MODELS_TO_TEST", "load_dataset", "load_dataset_english_quotes", "load_cat_image", "hf_hub_download"}
_HELPER_CALL = re.compile(r"self\.(_test_\w+)\(")
_HUB_MEMO: dict = {}


class _Stub(types.ModuleType):
    """Stand-in for an optional dependency that PEFT's helpers import at module level but only unselected tests use."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__module__": self.__name__})


def import_modules(tests_dir: Path) -> dict[str, types.ModuleType]:
    """Import the upstream test modules named in TABLES from ``<cache>/<version>/peft_upstream_tests``."""
    parent = str(tests_dir.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    pytest.register_assert_rewrite(UPSTREAM_PACKAGE)  # readable assertion messages from PEFT's helper modules

    # testing_common.py imports diffusers' StableDiffusionPipeline at import time, for the stable diffusion tests
    # only. Without diffusers, stub it during the import, then drop the stub so that
    # peft.import_utils.is_diffusers_available() still tells the truth.
    stubbed = [name for name in ("diffusers",) if importlib.util.find_spec(name) is None]
    for name in stubbed:
        sys.modules[name] = _Stub(name)
    try:
        return {name: importlib.import_module(f"{UPSTREAM_PACKAGE}.{name}") for name in TABLES}
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)


def known_model_ids(test_custom_models: types.ModuleType) -> list[str]:
    """The small models PEFT's ``MockTransformerWrapper`` can build (``CASES``' model_id must be one of them)."""
    wrapper = getattr(test_custom_models, "MockTransformerWrapper", None)
    if wrapper is None:
        return []
    return re.findall(r'model_id == "([^"]+)"', inspect.getsource(wrapper))


def swap_tables(module: types.ModuleType, tables: CaseTables) -> int:
    """Re-parametrize the module's test functions over our tables; return how many functions were rewritten."""
    names = TABLES[module.__name__.rsplit(".", 1)[-1]]
    originals = [(getattr(module, name), kind) for name, kind in names.items() if hasattr(module, name)]

    rewritten = 0
    for cls_name, cls in vars(module).items():
        if not (inspect.isclass(cls) and cls_name.startswith("Test") and cls.__module__ == module.__name__):
            continue
        for fn_name, fn in list(vars(cls).items()):
            marks = getattr(fn, "pytestmark", None) if fn_name.startswith("test") and callable(fn) else None
            if not marks:
                continue
            new_marks, kinds, empty = [], [], False
            for mark in marks:
                kind = _table_kind(mark, originals)
                if kind is not None:
                    table = tables.table(kind)
                    argnames = mark.args[0] if mark.args else mark.kwargs["argnames"]
                    kwargs = {k: v for k, v in mark.kwargs.items() if k not in ("argnames", "argvalues", "ids")}
                    mark = pytest.mark.parametrize(argnames, list(table.values), ids=list(table.ids), **kwargs).mark
                    kinds.append(kind)
                    empty = empty or not table.values
                new_marks.append(mark)
            if kinds:
                new_marks.append(getattr(pytest.mark, MARKER)(kinds=tuple(kinds), empty=empty).mark)
                fn.pytestmark = new_marks
                rewritten += 1
    return rewritten


def _table_kind(mark, originals: list[tuple[object, str]]) -> str | None:
    if mark.name != "parametrize":
        return None
    argvalues = mark.args[1] if len(mark.args) > 1 else mark.kwargs.get("argvalues")
    # identity, not equality: the mark must be over PEFT's table object itself
    return next((kind for obj, kind in originals if argvalues is obj), None)


def needs_hub(item: pytest.Item) -> bool:
    """Whether the test item's source (or its ``self._test_*`` helpers') downloads from the Hugging Face Hub."""
    fn = getattr(item, "function", None)
    if fn is None:
        return False
    cls = getattr(item, "cls", None)
    key = (cls, fn)
    if key not in _HUB_MEMO:  # one parse per test function, not per parametrized case
        sources = []
        try:
            source = inspect.getsource(fn)
            sources.append(source)
            for helper in set(_HELPER_CALL.findall(source)):
                target = getattr(cls, helper, None)
                if target is not None:
                    sources.append(inspect.getsource(target))
        except (OSError, TypeError):
            pass
        _HUB_MEMO[key] = any(_names_hub(s) for s in sources)
    return _HUB_MEMO[key]


def _names_hub(source: str) -> bool:
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return False
    in_comparison = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.Compare) for sub in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in in_comparison:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _HUB_REPO_ID.fullmatch(node.value):
            return True
        if isinstance(node, ast.Name) and node.id in _HUB_NAMES:
            return True
        if isinstance(node, ast.Attribute) and node.attr in _HUB_NAMES:
            return True
    return False
