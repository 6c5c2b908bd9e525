"""Property test of the task-file loader: whatever a TASKS.json and its data files hold, loading gives valid tasks
or one :class:`TaskStreamError` line -- never another exception, and never a write outside the test's folder."""

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_ext.trainers.task_stream import Task, TaskStreamError, load_task_stream


# -- what a careless or hostile task file may hold ------------------------------------------------------------------
NAMES = st.one_of(
    st.sampled_from(["t0", "colors", "a-b", "none", "auto", "", ".", "..", "a.b", "/tmp/x", "../x", "C:\\x", "a/b"]),
    st.text(min_size=0, max_size=70),
    st.integers(),
    st.none(),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=12), st.just("")
)
CELLS = st.one_of(SCALARS, st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.text(max_size=3), SCALARS))
ROWS = st.lists(
    st.dictionaries(st.sampled_from(["text", "label", "sentence", "y"]), CELLS, max_size=4), min_size=0, max_size=6
)
DATA_NAMES = st.sampled_from(["d0.jsonl", "d1.json", "d2.csv", "missing.jsonl", "folder", "d3.txt", "../up.jsonl"])


def _render(rows, name):
    """A data file's bytes for ``rows`` in the format of ``name``, sometimes broken on purpose by the caller."""
    if name.endswith(".jsonl"):
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if name.endswith(".json"):
        return json.dumps(rows).encode()
    keys = sorted({k for r in rows for k in r})
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")).replace(",", " ") for k in keys) for r in rows]
    return ("\n".join(lines) + "\n").encode()


ENTRIES = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"name": NAMES, "train": st.one_of(DATA_NAMES, SCALARS), "eval": st.one_of(DATA_NAMES, SCALARS)},
            optional={
                "text_column": st.sampled_from(["text", "sentence", "", 3]),
                "label_column": st.sampled_from(["label", "y", None]),
                "labels": st.one_of(st.lists(SCALARS, max_size=3), st.text(max_size=3)),
                "kind": st.sampled_from(["classification", "zero_shot", "weird"]),
                "extra": st.integers(),
            },
        ),
        SCALARS,
    ),
    max_size=3,
)
CORRUPTIONS = st.sampled_from(["none", "truncate", "bad-utf8", "empty", "bom"])


class _WriteWatch:
    """Records files opened for writing (and folders created, renamed or removed) outside ``allowed``."""

    def __init__(self):
        self.allowed: Path | None = None
        self.outside: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.allowed is None or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        writing = False
        if event == "open":
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            )
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"):
            writing = True
        if writing:
            path = os.path.abspath(os.fsdecode(args[0]))
            if not path.startswith(str(self.allowed)) and not path.startswith("/dev/"):
                self.outside.append(f"{event}:{path}")


WATCH = _WriteWatch()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(entries=ENTRIES, train=ROWS, eval_=ROWS, corruption=CORRUPTIONS, top=st.one_of(ENTRIES, SCALARS))
def test_any_task_file_loads_or_fails_in_one_line(entries, train, eval_, corruption, top):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "folder").mkdir()
        for i, name in enumerate(["d0.jsonl", "d1.json", "d2.csv", "d3.txt"]):
            data = _render(train if i % 2 == 0 else eval_, name)
            if corruption == "truncate":
                data = data[: len(data) // 2]
            elif corruption == "bad-utf8":
                data = data + b"\xff\xfe"
            elif corruption == "empty":
                data = b""
            elif corruption == "bom":
                data = b"\xef\xbb\xbf" + data
            (root / name).write_bytes(data)
        tasks_json = root / "tasks.json"
        tasks_json.write_text(json.dumps(entries if isinstance(top, list) else top))
        WATCH.allowed, WATCH.outside = root.resolve(), []
        try:
            tasks = load_task_stream(tasks_json)
        except TaskStreamError as err:
            message = str(err)
            assert message and "\n" not in message, repr(message)
        else:
            assert tasks and all(isinstance(t, Task) and len(t.labels) >= 2 for t in tasks)
            for task in tasks:
                assert task.label_ids(task.eval[task.label_column])  # every eval label maps to a head index
        finally:
            WATCH.allowed = None
        assert WATCH.outside == [], WATCH.outside


# -- well-formed task files over messy data: the reading and the label checks themselves ------------------------------
# Mostly plausible values (a strategy repeated in one_of is drawn more often), so many examples load.
PLAIN_LABELS = st.sampled_from([0, 1, 0.0, 1.0, "0", "1"])
LABELS = st.one_of(PLAIN_LABELS, PLAIN_LABELS, PLAIN_LABELS, st.sampled_from([2, "a", True, None, float("nan")]), CELLS)
PLAIN_TEXTS = st.text(alphabet="abc xyz\u00e9", min_size=1, max_size=10).filter(str.strip)
TEXTS = st.one_of(PLAIN_TEXTS, PLAIN_TEXTS, PLAIN_TEXTS, st.text(max_size=12), st.sampled_from(["", " ", None, 3]))
GOOD_ROWS = st.lists(
    st.fixed_dictionaries({"text": TEXTS, "label": LABELS}, optional={"other": CELLS}), min_size=0, max_size=10
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from([".jsonl", ".json", ".csv"]),
    train=GOOD_ROWS,
    eval_=GOOD_ROWS,
    labels=st.one_of(st.none(), st.lists(LABELS, max_size=4)),
)
def test_messy_rows_load_or_fail_in_one_line(fmt, train, eval_, labels):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / f"train{fmt}").write_bytes(_render(train, fmt))
        (root / f"eval{fmt}").write_bytes(_render(eval_, fmt))
        entry = {"name": "t0", "train": f"train{fmt}", "eval": f"eval{fmt}"}
        if labels is not None:
            entry["labels"] = labels
        (root / "tasks.json").write_text(json.dumps([entry]))
        WATCH.allowed, WATCH.outside = root.resolve(), []
        try:
            (task,) = load_task_stream(root / "tasks.json")
        except TaskStreamError as err:
            assert str(err) and "\n" not in str(err), repr(str(err))
        else:
            assert len(task.labels) >= 2 and len(set(task.labels)) == len(task.labels)
            ids = task.label_ids(task.train["label"]) + task.label_ids(task.eval["label"])
            assert all(0 <= i < len(task.labels) for i in ids)
        finally:
            WATCH.allowed = None
        assert WATCH.outside == [], WATCH.outside


@pytest.mark.parametrize("entries", [[{"name": "../../x", "train": "a.jsonl", "eval": "a.jsonl"}]])
def test_the_fuzzer_sees_writes_outside(tmp_path, entries):
    """The write watch itself is live: a write outside the allowed folder is recorded."""
    WATCH.allowed, WATCH.outside = (tmp_path / "inside").resolve(), []
    try:
        (tmp_path / "outside.txt").write_text("x")
    finally:
        WATCH.allowed = None
    assert WATCH.outside and WATCH.outside[0].endswith("outside.txt")
