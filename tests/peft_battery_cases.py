"""Cases for PEFT's own unit tests (the battery, ``tests/peft_battery``), for every method of peft-ext.

Each method keeps its cases in ``tests/battery_cases/<method>.py``; this module concatenates them. Expected
failures are declared per method with case-specific patterns, so one method's refusals never hide another's bugs.
Formats of the tables: ``tests/peft_battery/cases.py``.
"""

import sys
from pathlib import Path


# the battery loads this file by path, from a session rooted in its cache folder: make its sibling package importable
sys.path.insert(0, str(Path(__file__).resolve().parent))

from battery_cases import ana, moecl, resora  # noqa: E402


_METHODS = (resora, moecl, ana)

CASES: list = [case for method in _METHODS for case in method.CASES]
MULTI_ADAPTER_CASES: list = [case for method in _METHODS for case in method.MULTI_ADAPTER_CASES]
# none of the methods has mixed-batch cases yet; empty, the battery reports TestMixedAdapterBatches as deselected
MIXED_BATCH_CASES: list = [case for method in _METHODS for case in getattr(method, "MIXED_BATCH_CASES", [])]
EXPECTED_FAILURES: dict = {}
for _method in _METHODS:
    EXPECTED_FAILURES.update(_method.EXPECTED_FAILURES)
