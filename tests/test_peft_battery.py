"""PEFT's own unit tests, run against every method of peft-ext (the battery: ``tests/peft_battery``).

The battery is a separate pytest session (it swaps PEFT's case tables for ours), so it runs as a subprocess here,
through the same command line a developer uses. PEFT's tests come from the sdist of the installed peft version,
fetched into a cache on the first run. The one reason to skip is an offline machine (no package registry reachable
to fetch them); on CI that is a failure.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peft_battery import cache


ROOT = Path(__file__).resolve().parents[1]
CASES = "tests/peft_battery_cases.py"


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def test_peft_battery_passes_for_all_methods(capsys):
    # fetched here first, so that "offline" is told apart from a broken fetch (which fails the test)
    try:
        cache.upstream_tests()
    except cache.RegistryUnreachable as error:
        if _on_ci():
            pytest.fail(f"CI is set, so the battery must run: {error}")
        pytest.skip(f"PEFT's tests could not be fetched: {str(error).splitlines()[0]}")

    proc = subprocess.run(
        [sys.executable, "-m", "tests.peft_battery.runner", CASES, "-p", "no:randomly"],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    tail = "\n".join(proc.stdout.splitlines()[-40:]) + "\n" + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 400, summary
    assert " failed" not in summary and " error" not in summary, summary
    with capsys.disabled():  # the battery's own summary line, visible in a passing run too
        print(f"\nPEFT battery: {summary}")
