"""What docs/ARCHITECTURE.md states about the package's layers, checked: the core (``peft_ext`` but its console
script) imports nothing from the training side, and every module the map names exists."""

import ast
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "peft_ext"
APPLICATION = {CORE / "cli.py"}  # the console script is the layer over trainers/, by design


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package)."""
    package = ".".join(("peft_ext", *path.relative_to(CORE).parent.parts))
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_the_core_imports_nothing_from_the_training_side():
    offenders = {
        str(path.relative_to(ROOT)): name
        for path in sorted(CORE.rglob("*.py"))
        if path not in APPLICATION
        for name in _imported_modules(path)
        if name == "peft_ext.trainers" or name.startswith("peft_ext.trainers.") or name.split(".")[0] == "trainers"
    }
    assert offenders == {}


def test_importing_the_core_and_its_presets_loads_no_training_module():
    code = (
        "import sys, peft_ext, peft_ext.hub_configs as h\n"
        "[h.preset_info(n) for n in h.list_presets()]\n"
        "print(sorted(m for m in sys.modules if m.startswith('peft_ext.trainers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_every_module_the_map_names_exists():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split("```", 2)[1]  # the map of the packages
    folder = None
    missing = []
    for line in block.splitlines():
        top = re.match(r"(\w+)/", line)
        if top:
            folder = top.group(1)
            continue
        for name in re.findall(r"\b(\w+\.py)\b", line):
            if folder and not (ROOT / folder / name).is_file() and not list((ROOT / folder).rglob(name)):
                missing.append(f"{folder}/{name}")
    assert missing == []
