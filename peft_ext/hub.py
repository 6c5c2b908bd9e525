"""Sharing continual runs on the Hugging Face Hub: a model card, a safetensors-only upload, and loading back.

A continual run folder (what :class:`peft_ext.trainers.ContinualSchedule` or ``peft-ext continual`` writes) holds one
PEFT adapter with every task inside it (routers, experts, in-adapters and the DDAS selector are all tensors of that
adapter), the per-task classification heads, and ``metrics.json``. This module

* writes a model card (``README.md``) from those files: method, base model, task list and label sets, the accuracy
  matrix (task-aware and task-agnostic), Avg/Last/BWT/Forgetting and task identification, trainable-parameter
  counts, and how to load it (``import peft_ext`` first) -- :func:`build_model_card`;
* stages exactly the files worth publishing (safetensors weights, JSON configs, the card, the plots; never pickles,
  optimizer states or the resume checkpoints) -- :func:`prepare_upload`;
* uploads them with ``huggingface_hub``'s ordinary ``HfApi.create_repo`` + ``HfApi.upload_folder`` --
  :func:`push_continual_run_to_hub`, or, for a model in memory, :func:`push_to_hub`;
* loads a run back from a Hub id or a local folder through the same calls (``PeftModel.from_pretrained`` resolves
  both; the heads are resolved like PEFT resolves ``adapter_config.json``) -- :func:`load_continual_run`.

Why ``import peft_ext`` matters: ``adapter_config.json`` names ``"peft_type": "MOECL"`` (or ``ANA``/``RESORA``).
PEFT only knows those types once :mod:`peft_ext` registered them. Without the import PEFT fails inside its own
lookup with a bare ``KeyError: 'MOECL'``; after the import, an unknown or misspelled type is a one-line
``ValueError`` naming the registered types (:func:`peft_ext.registry.check_peft_type`). The card says so.
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


PathLike = Union[str, os.PathLike]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.json"
METRICS_FILE = "metrics.json"
CARD_NAME = "README.md"
# Published beside the adapter when present (a run's outputs). Resume checkpoints, trainer folders, run_state.json
# (local paths and timings) and anything pickled stay home.
OPTIONAL_FILES = (HEADS_WEIGHTS, HEADS_CONFIG, METRICS_FILE, "accuracy_heatmap.png", "accuracy_curves.png")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

METHOD_NAMES = {
    "MOECL": (
        "MoE-CL",
        "mixture-of-experts adapters for continual learning (MoE-Adapters4CL, arXiv 2403.11549): a pool of "
        "bottleneck experts beside each adapted block, one router per task, activate-freeze of the most used experts "
        "after each task, and the DDAS autoencoder task selector for task-agnostic inference",
    ),
    "ANA": (
        "AnA",
        "Adapter-in-Adapter with an MoE gate (PathWeave, arXiv 2410.20178): one linear adapter per task, earlier "
        "tasks' adapters reused as experts through small in-adapters, mixed by a per-token gate",
    ),
    "RESORA": (
        "ReSoRA",
        "LoRA split into equivalent rank subspaces, trained with a de-redundancy regularizer (arXiv 2507.20745); "
        "merges like LoRA",
    ),
}


class HubExportError(ValueError):
    """A folder cannot be published as it is (missing adapter, pickled weights, unreadable metrics); one line."""


# ----------------------------------------------------------------------------------------------------------------
# reading a run folder
# ----------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HubExportError(f"{path} is not valid JSON: {err}") from None


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


def _looks_like_hub_id(value: str | None) -> bool:
    return (
        bool(value)
        and not os.path.isabs(value)
        and not os.path.exists(value)
        and bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value))
    )


# ----------------------------------------------------------------------------------------------------------------
# the model card
# ----------------------------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _matrix_table(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str]) -> str:
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, row in zip(tasks, matrix):
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
    return "\n".join(lines)


def _load_snippet(
    repo: str, peft_type: str, base_model: str, has_heads: bool, per_task: bool, tasks: Sequence[str]
) -> str:
    first = tasks[0] if tasks else "task0"
    lines = [
        "import peft_ext  # first: registers RESORA, ANA and MOECL with PEFT",
        "from transformers import AutoModel",
        "from peft_ext.hub import load_continual_run",
        "",
        f'base = AutoModel.from_pretrained("{base_model}")',
        f'model, classifier = load_continual_run(base, "{repo}")',
    ]
    if peft_type in ("MOECL", "ANA"):
        lines += [
            f'with model.route("{first}"):  # task-aware: name the task',
            f'    logits = classifier.logits(classifier.features(**batch), "{first}")',
        ]
        if peft_type == "MOECL":
            lines += [
                "tasks = model.predict_tasks(batch)  # task-agnostic: the DDAS selector picks (None = base model)"
            ]
    elif per_task:
        lines += [f'model.set_adapter("{first}")  # one adapter per task']
    lines += [
        "",
        "# or with PEFT alone (same files; the heads are plain safetensors):",
        "from peft import PeftModel",
        f'model = PeftModel.from_pretrained(base, "{repo}"{", subfolder=" + repr(first) if per_task else ""})',
    ]
    if not has_heads:
        lines = [line for line in lines if "classifier" not in line]
    return "\n".join(lines)


def build_model_card(
    run_dir: PathLike,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    description: str | None = None,
) -> ModelCard:
    """The model card of the run in ``run_dir`` (metadata + markdown), built from its files.

    Args:
        run_dir: folder with the adapter(s) and, when it comes from a continual run, ``metrics.json``, ``heads.json``.
        repo_id: where it will live (used in the loading snippet); default ``"<user>/<repo>"``.
        base_model: Hub id of the base model. Default: the adapter config's ``base_model_name_or_path`` when that is
            a Hub id (a local path is shown in the text but left out of the metadata, which must name a Hub model).
        license, datasets, tags: card metadata. description: a paragraph placed under the title.
    """
    root = Path(run_dir)
    folders = adapter_folders(root)
    if not folders:
        raise HubExportError(f"No {CONFIG_NAME} in {root} (nor in one sub-folder per task): nothing to describe.")
    config = _read_json(root / folders[0] / CONFIG_NAME) or {}
    peft_type = str(config.get("peft_type", "?")).upper()
    metrics = _read_json(root / METRICS_FILE)
    heads = _read_json(root / HEADS_CONFIG)
    per_task = folders != [Path(".")]

    config_base = config.get("base_model_name_or_path")
    base = base_model or (config_base if _looks_like_hub_id(config_base) else None)
    method_name, method_text = METHOD_NAMES.get(peft_type, (peft_type, f"PEFT method {peft_type}"))
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
    repo = repo_id or "<user>/<repo>"
    text: list[str] = [
        f"# {repo.split('/')[-1]}: {method_name} continual adapter"
        if repo_id
        else f"# {method_name} continual adapter",
        "",
    ]
    if description:
        text += [description, ""]
    text += [
        f"A [peft-ext](https://pypi.org/project/peft-ext/) **{method_name}** adapter (`peft_type: {peft_type}`): "
        f"{method_text}.",
        "",
        f"- **Base model:** `{base or config_base or 'unknown'}`",
        f"- **Tasks ({len(tasks)}, in training order):** " + (", ".join(f"`{t}`" for t in tasks) or "–"),
        "- **Adapter layout:** "
        + ("one adapter per task (sub-folders)" if per_task else "one PEFT adapter holding every task"),
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
        text += [
            "Accuracy (%) after training the task of each row, evaluated on the task of each column (task id given):",
            "",
            _matrix_table(metrics["accuracy"], tasks),
            "",
        ]
        if metrics.get("accuracy_task_agnostic"):
            text += [
                "Task-agnostic accuracy (%) (the task inferred from the input by the task selector):",
                "",
                _matrix_table(metrics["accuracy_task_agnostic"], tasks),
                "",
            ]
        text += ["| metric | value |", "|---|---|"]
        for key, label in (
            ("avg", "Avg (average incremental accuracy)"),
            ("last", "Last"),
            ("bwt", "BWT"),
            ("forgetting", "Forgetting"),
        ):
            if metrics.get(key) is not None:
                text.append(f"| {label} | {100 * metrics[key]:.2f} |")
        if metrics.get("task_identification") is not None:
            text.append(f"| Task identification (selector) | {100 * metrics['task_identification']:.1f}% |")
        if metrics.get("train_seconds") is not None:
            text.append(f"| Training time | {metrics['train_seconds']:.1f} s |")
        if (root / "accuracy_heatmap.png").is_file():
            text += ["", "![accuracy matrix](accuracy_heatmap.png)"]
    else:
        text += ["No `metrics.json` in this folder: no evaluation recorded."]

    text += ["", "## Parameters", "", "| | count |", "|---|---|"]
    if metrics and metrics.get("trainable_params") is not None:
        total = metrics.get("total_params") or 0
        share = f" ({100 * metrics['trainable_params'] / total:.2f}% of {total:,})" if total else ""
        text.append(f"| trained over the whole sequence (adapter + heads) | {metrics['trainable_params']:,}{share} |")
    text.append(f"| stored adapter tensors (`{WEIGHTS_NAME}`) | {adapter_params:,} |")
    if head_params:
        text.append(f"| stored head tensors (`{HEADS_WEIGHTS}`) | {head_params:,} |")

    text += [
        "",
        "## How to load",
        "",
        "`pip install peft-ext`, then **import `peft_ext` before loading**: it registers its methods with PEFT.",
        "",
        "```python",
        _load_snippet(repo, peft_type, base or config_base or "<base model>", bool(heads), per_task, tasks),
        "```",
        "",
        f'Without `import peft_ext`, PEFT cannot map `"peft_type": "{peft_type}"` to a class and stops with '
        f"`KeyError: '{peft_type}'`. Install peft-ext, add `import peft_ext`, and load again.",
        "",
        "## Files",
        "",
        f"`{CONFIG_NAME}`, `{WEIGHTS_NAME}` (PEFT adapter; safetensors only)"
        + (f", `{HEADS_WEIGHTS}` + `{HEADS_CONFIG}` (task heads)" if heads else "")
        + (f", `{METRICS_FILE}` (accuracy matrix and scores)" if metrics else "")
        + ".",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(text) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# staging and uploading
# ----------------------------------------------------------------------------------------------------------------
def prepare_upload(run_dir: PathLike, staging_dir: PathLike, **card_kwargs) -> list[str]:
    """Copy what should be published from ``run_dir`` into ``staging_dir`` and write the card; returns the
    staged paths (POSIX, relative, sorted).

    Staged: every adapter folder's ``adapter_config.json`` + ``adapter_model.safetensors``, the heads, metrics and
    plots when present, and ``README.md`` (the card from :func:`build_model_card` with ``card_kwargs``). Raises
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
    for rel in staged:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
    build_model_card(root, **card_kwargs).save(staging / CARD_NAME)
    staged.append(CARD_NAME)
    return sorted(staged)


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
    from .trainers import TaskHeadClassifier

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
    "adapter_folders",
    "build_model_card",
    "count_safetensors_parameters",
    "load_continual_run",
    "prepare_upload",
    "push_continual_run_to_hub",
    "push_to_hub",
    "save_continual_run",
]
