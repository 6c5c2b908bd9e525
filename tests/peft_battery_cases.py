"""Cases for PEFT's own unit tests (../shared/tools/peft_battery), for every method of peft-ext.

Each method keeps its cases in ``tests/battery_cases/<method>.py``; this module concatenates them. Expected
failures are declared per method with case-specific patterns, so one method's refusals never hide another's bugs.
"""

import importlib
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES: list = []
MULTI_ADAPTER_CASES: list = []
MIXED_BATCH_CASES: list = []
EXPECTED_FAILURES: dict = {}

for _method in ("resora", "moecl", "ana"):
    try:
        _module = importlib.import_module(f"battery_cases.{_method}")
    except ModuleNotFoundError as error:  # a method whose case file is not written yet
        if error.name != f"battery_cases.{_method}":
            raise
        continue
    CASES += getattr(_module, "CASES", [])
    MULTI_ADAPTER_CASES += getattr(_module, "MULTI_ADAPTER_CASES", [])
    MIXED_BATCH_CASES += getattr(_module, "MIXED_BATCH_CASES", [])
    EXPECTED_FAILURES.update(getattr(_module, "EXPECTED_FAILURES", {}))

if not MIXED_BATCH_CASES:
    del MIXED_BATCH_CASES
