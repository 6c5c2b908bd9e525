"""PEFT's own unit tests, run against every method of peft-ext (../shared/tools/peft_battery).

The battery is a separate pytest session (it swaps PEFT's case tables for ours), so it runs as a subprocess here.
Outside the team's checkout (no ../shared) it is skipped with that reason; on CI it must run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT.parent / "shared" / "tools" / "peft_battery" / "run"


def test_peft_battery_passes_for_all_methods():
    if not BATTERY.exists():
        if os.environ.get("CI"):
            pytest.fail(f"PEFT battery not found at {BATTERY}")
        pytest.skip(f"PEFT battery not found at {BATTERY} (it ships beside the team's checkout)")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(BATTERY), str(ROOT / "tests" / "peft_battery_cases.py"), "-p", "no:randomly"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    tail = "\n".join(proc.stdout.splitlines()[-40:]) + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed > 400, summary
    assert " failed" not in summary, summary
    print(summary)
