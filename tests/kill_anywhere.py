"""Kill a continual run at random moments, again and again, and check what the folder resumes to.

Run as a script by ``tests/test_kill_anywhere.py``::

    python tests/kill_anywhere.py OUT_DIR KILLS SEED -- <peft-ext continual arguments, without --output-dir>

Everything heavy (torch, transformers, peft_ext) is imported once here; each attempt is a forked child that runs
``peft-ext continual`` on ``OUT_DIR/run`` and is sent SIGKILL after a random delay drawn over the reference run's
duration, so the kills land in training, evaluation, checkpoint writing and output writing rather than in imports.
A run that ends before its kill must exit 0 with the reference's results; the folder is then emptied and the next
cycle starts. Prints one JSON line: kills, completed cycles, non-zero exits (with their stderr) and mismatches.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked children must not inherit tokenizer threads

import torch  # noqa: E402

from peft_ext.cli import main  # noqa: E402
from peft_ext.trainers import ContinualSchedule  # noqa: E402, F401  (import the heavy modules before forking)


torch.set_num_threads(1)

VOLATILE = {"train_seconds"}  # wall-clock time differs between runs by nature


def attempt(cli_args: list[str], out: Path, log: Path, delay: float | None) -> tuple[str, int | None]:
    """Run the CLI in a forked child; ("killed", None) or ("exited", status)."""
    pid = os.fork()
    if pid == 0:  # child: quiet, then the real command line
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            status = main(["continual", *cli_args, "--output-dir", str(out)])
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is a failure the parent reports
            import traceback

            traceback.print_exc()
            status = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    deadline = None if delay is None else time.monotonic() + delay
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "exited", os.waitstatus_to_exitcode(status)
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "killed", None
        time.sleep(0.002)


def outputs(out: Path) -> dict[str, object]:
    """metrics.json without its volatile keys, and the bytes of every safetensors file of the run's outputs."""
    metrics = json.loads((out / "metrics.json").read_text())
    files = sorted(p for p in out.glob("**/*.safetensors") if "checkpoints" not in p.parts)
    return {
        "metrics": {k: v for k, v in metrics.items() if k not in VOLATILE},
        "files": {str(p.relative_to(out)): p.read_bytes() for p in files},
    }


def run(root: Path, kills: int, seed: int, cli_args: list[str]) -> dict[str, object]:
    rng = random.Random(seed)
    log = root / "child.log"
    start = time.monotonic()
    status = attempt(cli_args, root / "reference", log, None)
    duration = time.monotonic() - start
    if status != ("exited", 0):
        return {"error": f"reference run failed: {status}: {log.read_text()[-2000:]}"}
    reference = outputs(root / "reference")
    out = root / "run"
    report = {"kills": 0, "cycles": 0, "reference_seconds": round(duration, 2), "failures": [], "mismatches": []}
    delays: list[float] = []  # of the current cycle's kills, reported with a mismatch
    while report["kills"] < kills:
        delay = rng.uniform(0.0, 1.05 * duration)
        kind, status = attempt(cli_args, out, log, delay)
        if kind == "killed":
            report["kills"] += 1
            delays.append(round(delay, 3))
            continue
        if status != 0:
            report["failures"].append({"status": status, "stderr": log.read_text()[-1500:]})
            break
        got = outputs(out)
        if got != reference:
            report["mismatches"].append(
                {
                    "kills_at": delays,
                    "metrics": got["metrics"] != reference["metrics"],
                    "files": sorted(
                        k
                        for k in set(got["files"]) | set(reference["files"])
                        if got["files"].get(k) != reference["files"].get(k)
                    ),  # fmt: skip
                }
            )
        report["cycles"] += 1
        delays = []
        shutil.rmtree(out)
    # Whatever the last kill left must resume to the reference, too.
    kind, status = attempt(cli_args, out, log, None)
    if status != 0:
        report["failures"].append({"status": status, "stderr": log.read_text()[-1500:]})
    elif outputs(out) != reference:
        report["mismatches"].append({"final": True})
    else:
        report["cycles"] += 1
    return report


if __name__ == "__main__":
    root, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    assert sys.argv[4] == "--"
    print(json.dumps(run(root, kills, seed, sys.argv[5:])))
