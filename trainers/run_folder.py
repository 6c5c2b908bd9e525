"""The folder of one continual run: its layout, who may write it, and what it may be resumed from.

A run folder is claimed before anything is written. It is either

* missing or empty: a new run starts there;
* a peft-ext run (``peft_ext_run.json``) of the same fingerprint: the run resumes from its last complete task
  checkpoint (or, with ``resume=False``, is refused unless ``overwrite=True``);
* anything else (another run's fingerprint, a folder of the user's files, a file): refused with a one-line
  :class:`ContinualRunError` naming the way out, unless ``overwrite=True``, which deletes only the files a peft-ext
  run writes (:data:`RUN_ENTRIES` and the previous run's per-task adapter folders) and never anything else.

While a run writes a folder it holds an exclusive lock on ``DIR/.peft_ext.lock`` (an OS file lock: released by the
operating system when the process ends, also on ``kill -9``), so a second run on the same folder is refused instead
of mixing its files with the first one's.

Checkpoints (``DIR/checkpoints/task-XX``) are written into ``task-XX.partial`` and renamed when complete; a
checkpoint whose ``state.json`` is missing, unreadable or of another run is skipped with a warning naming it, and the
run resumes from the last complete one before it. The Trainer's mid-task checkpoints (``DIR/trainer/task-XX``) are
checked the same way before the Trainer is asked to resume from one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

from transformers.utils import logging


logger = logging.get_logger(__name__)

MARKER_FILE = "peft_ext_run.json"
LOCK_FILE = ".peft_ext.lock"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.json"
RUN_STATE_FILE = "run_state.json"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_DIR = "trainer"
HEATMAP_FILE = "accuracy_heatmap.png"
CURVES_FILE = "accuracy_curves.png"
FINGERPRINT_VERSION = 1

# Everything a run writes at the top of its folder (besides one adapter folder per task for per-task strategies, and
# the folders of the runs it is compared with, COMPARE_PREFIX + method).
COMPARE_PREFIX = "compare-"
RUN_ENTRIES = (
    MARKER_FILE,
    LOCK_FILE,
    METRICS_FILE,
    RUN_STATE_FILE,
    CHECKPOINTS_DIR,
    TRAINER_DIR,
    HEATMAP_FILE,
    CURVES_FILE,
    "adapter_model.safetensors",
    "adapter_config.json",
    "heads.safetensors",
    "heads.json",
    "README.md",
)

_CHECKPOINT_NAME = re.compile(r"task-(\d{2,})")
_TRAINER_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")

# TrainingArguments fields that change how a run is logged, saved or reported but not what it learns; every other
# field is part of the fingerprint, so a resume with, e.g., another learning rate or batch size is refused.
NOT_IN_FINGERPRINT = frozenset(
    {
        "output_dir", "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node",
        "logging_nan_inf_filter", "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm",
        "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
        "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
        "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
        "include_for_metrics", "batch_eval_metrics", "save_only_model", "save_strategy", "save_steps",
        "save_on_each_node", "save_total_limit", "enable_jit_checkpoint", "push_to_hub", "hub_token",
        "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "skip_memory_metrics", "do_train",
        "do_eval", "do_predict", "resume_from_checkpoint", "local_rank", "ddp_timeout", "debug",
        "torch_empty_cache_steps", "restore_callback_states_from_checkpoint",
        # the continual options: file paths and switches whose effect is recorded elsewhere in the fingerprint
        "model", "method", "tasks", "method_config", "epochs", "batch_size", "lr", "max_length", "pooling",
        "task_agnostic", "resume", "plots", "overwrite", "compare_with", "kind",
    }
)  # fmt: skip


class ContinualRunError(ValueError):
    """A continual run cannot start or go on (e.g. the output folder holds a different run); one-line message."""


def training_fingerprint(args_dict: dict[str, Any]) -> dict[str, Any]:
    """The result-changing part of ``TrainingArguments.to_dict()``, JSON-normalized."""
    kept = {k: v for k, v in sorted(args_dict.items()) if k not in NOT_IN_FINGERPRINT and not k.startswith("_")}
    return json.loads(json.dumps(kept, default=str))


def fingerprint_differences(old: Any, new: dict[str, Any]) -> list[str]:
    """Names of what differs between two fingerprints (``"training.learning_rate"``, ``"task 'a' data"``, ...)."""
    if not isinstance(old, dict) or old.get("version") != new.get("version"):
        return ["the run format (written by another peft-ext version)"]
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key != "method_config" and isinstance(a, dict) and isinstance(b, dict):  # option groups: name options
            diffs += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif key == "tasks" and isinstance(a, list) and [t.get("name") for t in a] == [t["name"] for t in b]:
            for ta, tb in zip(a, b):
                diffs += [f"task {tb['name']!r} {k}" for k in ("labels", "data", "kind") if ta.get(k) != tb.get(k)]
        else:
            diffs.append(key)
    return diffs


def read_json(path: Path) -> tuple[Optional[Any], Optional[str]]:
    """(content, None), or (None, why it cannot be read)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"unreadable ({type(err).__name__})"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so that a reader (or a run killed half-way) sees the old content or the new, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class _FileLock:
    """An exclusive, non-blocking OS lock on a file; the OS drops it when the process ends (``kill -9`` included)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """None when acquired, else what holds it (the pid written by the holder)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_fd(fd)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _lock_fd(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class RunFolder:
    """The output folder of one run (see the module docstring).

    Args:
        path (`str` or `os.PathLike`): the folder the user named.
        fingerprint (`dict`): what the run's results depend on (options, model, each task's data and labels).
        task_names (`list[str]`): the run's tasks, in order (their per-task adapter folders belong to the run).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any], task_names: Iterable[str]) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.task_names = list(task_names)
        self._lock = _FileLock(self.path / LOCK_FILE)

    # -- claiming --------------------------------------------------------------------------------------------------
    def inspect(self, resume: bool, overwrite: bool) -> str:
        """Decide, without writing anything, what a run may do with the folder: ``"new"``, ``"resume"`` or
        ``"overwrite"``; raise :class:`ContinualRunError` when it must refuse."""
        where = self.path
        if where.exists() and not where.is_dir():
            raise ContinualRunError(f"--output-dir {where} is a file, not a folder; name a folder.")
        # A run killed between taking the lock and writing its marker leaves only these: the folder is still new.
        leftovers = {LOCK_FILE, MARKER_FILE + ".tmp"}
        if not where.exists() or all(entry.name in leftovers for entry in where.iterdir()):
            return "new"
        marker, problem = read_json(where / MARKER_FILE)
        if marker is not None and not isinstance(marker, dict):
            marker, problem = None, "unreadable (not a JSON object)"
        if marker is None:
            if overwrite:
                return "overwrite"
            what = "is not empty and holds no peft-ext run" if problem == "missing" else f"has an {problem} marker"
            raise ContinualRunError(
                f"--output-dir {where} {what}; name a new or empty folder, or pass --overwrite to replace "
                "peft-ext's files there (other files are left alone)."
            )
        diffs = fingerprint_differences(marker.get("fingerprint"), self.fingerprint)
        if diffs:
            if overwrite:
                return "overwrite"
            raise ContinualRunError(
                f"--output-dir {where} holds a different peft-ext run (it differs in: {', '.join(diffs[:8])}"
                f"{', ...' if len(diffs) > 8 else ''}); name a new folder, or pass --overwrite to start over there."
            )
        if resume:
            return "resume"
        if overwrite:
            return "overwrite"
        raise ContinualRunError(
            f"--output-dir {where} holds this run already; drop --no_resume to resume it, or pass --overwrite to "
            "start over."
        )

    def claim(self, decision: str) -> None:
        """Main process: create the folder, take its lock, and for ``"overwrite"`` delete the previous run's files;
        then write the marker."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            holder = self._lock.acquire()
        except OSError as err:
            raise ContinualRunError(f"Cannot write --output-dir {self.path}: {err.strerror or err}.") from None
        if holder is not None:
            raise ContinualRunError(
                f"--output-dir {self.path} is in use by another peft-ext run (pid {holder}); wait for it to end or "
                "name another folder."
            )
        if decision == "overwrite":
            self._delete_run_files()
        atomic_write_text(
            self.path / MARKER_FILE,
            json.dumps({"fingerprint": self.fingerprint, "tasks": self.task_names}, indent=2) + "\n",
        )

    def release(self) -> None:
        self._lock.release()

    def _delete_run_files(self) -> None:
        marker, _ = read_json(self.path / MARKER_FILE)
        previous = marker.get("tasks", []) if isinstance(marker, dict) else []
        names = set(RUN_ENTRIES) | {t for t in list(previous) + self.task_names if isinstance(t, str)}
        names |= {f"{name}.tmp" for name in (MARKER_FILE, METRICS_FILE, RUN_STATE_FILE, "README.md")}  # atomic writes
        names |= {entry.name for entry in self.path.iterdir() if entry.name.startswith(COMPARE_PREFIX)}
        for name in sorted(names - {LOCK_FILE}):
            entry = self.path / name
            if os.path.dirname(name) or not entry.resolve().is_relative_to(self.path.resolve()):
                continue  # a task name never names a path (check_task_name); this is a second guard
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()

    # -- task checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_dir(self, index: int) -> Path:
        return self.path / CHECKPOINTS_DIR / f"task-{index:02d}"

    def trainer_dir(self, index: int) -> Path:
        return self.path / TRAINER_DIR / f"task-{index:02d}"

    def last_checkpoint(self) -> Optional[dict[str, Any]]:
        """The state of the last complete task checkpoint of this run (with ``"path"``), or None. Incomplete,
        unreadable or foreign checkpoints are skipped with a warning naming them."""
        root = self.path / CHECKPOINTS_DIR
        if not root.is_dir():
            return None
        found = []
        for entry in root.iterdir():
            match = _CHECKPOINT_NAME.fullmatch(entry.name)
            if match is None:
                if entry.name.endswith(".partial"):
                    logger.warning(f"Skipping {entry}: a checkpoint that was being written when a run stopped.")
                continue
            state, problem = read_json(entry / STATE_FILE)
            index = int(match.group(1))
            if problem is None and not self._usable_state(state, index):
                problem = "not a complete checkpoint of this run"
            if problem is not None:
                logger.warning(f"Skipping checkpoint {entry / STATE_FILE}: {problem}.")
                continue
            found.append((index, entry, state))
        # Resume from the last of an unbroken sequence 0, 1, ..., k: a hole means a lost checkpoint.
        found.sort(key=lambda item: item[0])
        last = None
        for expected, (index, entry, state) in enumerate(found):
            if index != expected:
                break
            last = {**state, "path": entry}
        return last

    def _usable_state(self, state: Any, index: int) -> bool:
        return (
            isinstance(state, dict)
            and state.get("complete") is True
            and state.get("index") == index
            and 0 <= index < len(self.task_names)
            and state.get("task") == self.task_names[index]
            and state.get("fingerprint") == self.fingerprint
        )

    def begin_checkpoint(self, index: int) -> Path:
        """An empty ``task-XX.partial`` folder to write checkpoint ``index`` into (see :meth:`commit_checkpoint`)."""
        tmp = self.checkpoint_dir(index).with_name(f"task-{index:02d}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, index: int, tmp: Path, payload: dict[str, Any]) -> None:
        """Write ``state.json`` (marked complete, with ``payload``) last, then rename the folder into place."""
        state = {"index": index, "task": self.task_names[index], "complete": True, "fingerprint": self.fingerprint}
        state.update(payload)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        final = self.checkpoint_dir(index)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def drop_stale(self, resumed_index: Optional[int]) -> None:
        """Delete what a stopped run left behind and will not be used: ``.partial`` checkpoints, checkpoints after
        the resume point, and the Trainer folders of finished tasks."""
        root = self.path / CHECKPOINTS_DIR
        last = -1 if resumed_index is None else resumed_index
        if root.is_dir():
            for entry in root.iterdir():
                match = _CHECKPOINT_NAME.fullmatch(entry.name)
                if entry.name.endswith(".partial") or (match is not None and int(match.group(1)) > last):
                    shutil.rmtree(entry, ignore_errors=True)
        for index in range(last + 1):
            shutil.rmtree(self.trainer_dir(index), ignore_errors=True)

    def last_trainer_checkpoint(self, index: int) -> Optional[str]:
        """The Trainer's last complete mid-task checkpoint of task ``index`` (its ``trainer_state.json`` is written
        last and names the same step), or None. Incomplete ones are deleted with a warning naming them, so the
        Trainer never meets them."""
        folder = self.trainer_dir(index)
        if not folder.is_dir():
            return None
        complete = []
        for entry in folder.iterdir():
            match = _TRAINER_CHECKPOINT_NAME.fullmatch(entry.name)
            if match is None or not entry.is_dir():
                continue
            state, problem = read_json(entry / "trainer_state.json")
            step = int(match.group(1))
            if problem is None and not (isinstance(state, dict) and state.get("global_step") == step):
                problem = "names another step"
            if problem is not None:
                logger.warning(f"Skipping Trainer checkpoint {entry}: trainer_state.json {problem}; removed.")
                shutil.rmtree(entry, ignore_errors=True)
                continue
            complete.append((step, entry))
        return str(max(complete)[1]) if complete else None


def data_digest(*columns: Iterable[Any]) -> str:
    """sha256 of the values of some columns, in order (a task's texts and labels)."""
    digest = hashlib.sha256()
    for column in columns:
        for value in column:
            digest.update(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8"))
            digest.update(b"\n")
        digest.update(b"\x00")
    return digest.hexdigest()


__all__ = [
    "CHECKPOINTS_DIR",
    "COMPARE_PREFIX",
    "CURVES_FILE",
    "ContinualRunError",
    "FINGERPRINT_VERSION",
    "HEATMAP_FILE",
    "LOCK_FILE",
    "MARKER_FILE",
    "METRICS_FILE",
    "RUN_ENTRIES",
    "RUN_STATE_FILE",
    "RunFolder",
    "STATE_FILE",
    "TRAINER_DIR",
    "atomic_write_text",
    "read_json",
    "data_digest",
    "fingerprint_differences",
    "training_fingerprint",
]
