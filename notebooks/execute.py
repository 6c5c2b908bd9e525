"""Execute the tutorials in notebooks/ and store them with their outputs.

    python notebooks/execute.py                # every notebook, full workload, outputs written back
    python notebooks/execute.py 02_moecl       # only the notebooks whose name starts with one of these
    python notebooks/execute.py --fast         # smoke-sized run (PEFT_EXT_NOTEBOOK_FAST=1), nothing written back

Each notebook runs in a fresh kernel (the current interpreter's ipykernel, via nbclient) whose working folder and
TMPDIR are a temporary folder, deleted afterwards: files a notebook writes never land in the repository. The kernel
runs offline (HF_HUB_OFFLINE=1) on one CPU thread unless OMP_NUM_THREADS says otherwise, with matplotlib's inline
backend. A full run writes the executed notebook back, with the digest of its code cells' sources in
``metadata["peft_ext"]["source_sha256"]``; tests/test_notebooks.py compares it with the current code cells to tell
when stored outputs are stale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


NOTEBOOK_DIR = Path(__file__).resolve().parent
REFRESH_COMMAND = "python notebooks/execute.py"


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    """The tutorials, sorted; ``names`` keeps those whose file name starts with one of them."""
    paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if names:
        wanted = [n.removesuffix(".ipynb") for n in names]
        unknown = [n for n in wanted if not any(p.stem.startswith(n) for p in paths)]
        if unknown:
            raise SystemExit(f"no notebook matches {unknown}; notebooks: {[p.name for p in paths]}")
        paths = [p for p in paths if any(p.stem.startswith(n) for n in wanted)]
    return paths


def source_digest(nb) -> str:
    """sha256 of the notebook's code cells' sources (in order): what the stored outputs were computed from."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources, ensure_ascii=False).encode("utf-8")).hexdigest()


def kernel_env(fast: bool, workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PEFT_EXT_NOTEBOOK_FAST", None)
    if fast:
        env["PEFT_EXT_NOTEBOOK_FAST"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MPLBACKEND", None)  # ipykernel's inline backend renders the plots
    env["TMPDIR"] = str(workdir)  # tempfile.mkdtemp() in a notebook lands in the working folder too
    return env


def execute(nb, workdir: Path, fast: bool, timeout: int = 1200):
    """Run ``nb`` (a NotebookNode, executed in place) top to bottom in a fresh kernel working in ``workdir``.

    Raises nbclient's CellExecutionError on the first failing cell.
    """
    import nbclient

    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",  # jupyter_client starts it with sys.executable
        record_timing=False,  # no timestamps in the stored cells' metadata
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=kernel_env(fast, workdir))
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names or prefixes (default: all)")
    parser.add_argument("--fast", action="store_true", help="smoke-sized workload; the stored notebooks are untouched")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell (default 1200)")
    args = parser.parse_args(argv)

    import nbformat

    for path in notebook_paths(args.names):
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"nb-{path.stem}-") as workdir:
            execute(nb, Path(workdir), fast=args.fast, timeout=args.timeout)
        elapsed = time.perf_counter() - start
        if args.fast:
            print(f"{path.name}: executed (fast) in {elapsed:.1f}s, not written back")
            continue
        nb.metadata["peft_ext"] = {"source_sha256": source_digest(nb)}
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"{path.name}: executed in {elapsed:.1f}s, written back ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
