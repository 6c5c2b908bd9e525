"""A small continual run killed (SIGKILL) at 20+ random moments always resumes to the same final metrics.json and
bit-identical safetensors, or refuses with one line -- never a stuck folder (``tests/kill_anywhere.py``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_ext.trainers.testing import save_tiny_model, write_synthetic_stream


HARNESS = Path(__file__).resolve().parent / "kill_anywhere.py"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks a child per attempt (POSIX)")
@pytest.mark.parametrize("method, extra", [("lora", []), ("moecl", ["--method-config", "moecl.json"])])
def test_killed_anywhere_resumes_to_the_same_outputs(tmp_path, method, extra):
    model_dir = save_tiny_model(tmp_path / "model")
    tasks_json = write_synthetic_stream(tmp_path / "data", names=["colors", "moods"], n_train=48)
    config = {"num_experts": 4, "r": 4, "top_k": 2, "freeze_top_k": 1, "selector_hidden": 8}
    (tmp_path / "moecl.json").write_text(json.dumps(config))
    extra = [str(tmp_path / e) if e.endswith(".json") else e for e in extra]
    cli = ["--model", str(model_dir), "--tasks", str(tasks_json), "--method", method, "--epochs", "3",
           "--batch-size", "8", "--seed", "1", "--disable_tqdm", "true", "--plots", "false",
           "--save_strategy", "steps", "--save_steps", "4", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(tmp_path), "12", "0", "--", *cli],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in report, report
    assert report["kills"] >= 12, report
    assert report["failures"] == [], report["failures"]
    assert report["mismatches"] == [], report
    assert report["cycles"] >= 1
    print(report)
