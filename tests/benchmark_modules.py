"""Scripts of ``benchmarks/`` imported as modules by the tests of their helpers."""

import contextlib
import importlib.util
import sys
from pathlib import Path


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module, with its folder on ``sys.path`` (it may import its neighbour
    ``sequences.py``) and itself in ``sys.modules`` (its dataclasses look their module up while the file runs); both
    undone on exit."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop(name, None)
        sys.modules.pop("sequences", None)
