"""pytest plugin of the PEFT battery: PEFT's own tests, re-parametrized with the cases of this project only.

Loaded by the runner (``python -m pytest -p peft_battery.plugin --battery-cases ... --battery-tests ...``), in a
pytest session of its own: rootdir and ini file are the battery's cache folder, not this repository.

1. ``pytest_configure`` loads and checks the cases module (importing the project registers its methods with PEFT),
   imports PEFT's upstream test modules and swaps their case tables for ours (see ``upstream.py``).
2. Collection keeps the rewritten tests (plus a few global invariants that a new ``PeftType`` can break), deselects
   the rest (tests of PEFT's built-in methods), applies ``--battery-quick``, skips tests that need the Hub with a
   ``[needs-hub]`` reason (skipped, never passed), and marks tests matching ``EXPECTED_FAILURES`` ``xfail(strict)``:
   a declared failure that starts passing fails the run, so declarations cannot go stale.
3. A ``peft_battery`` section before pytest's summary line says what was deselected, skipped or declared; the exit
   status is 5 when no test passed at all, so that an empty run never reads as a success.
"""

from __future__ import annotations

import fnmatch
import traceback
from pathlib import Path

import pytest

from . import cases as cases_module
from . import upstream


# Not parametrized over the case tables, but checks of global invariants that registering a new PeftType can break
# (every PeftType member must map to a config constructible without arguments).
INVARIANT_TESTS = {"test_config.py::TestPeftConfig::test_from_peft_type"}

# --battery-quick: a representative subset of test functions (any parameters) covering config round-trips,
# injection, training, save/load (safetensors, pickle, direct injection), multiple adapters, merge/unmerge (safe,
# bf16), disable/delete adapters, dtypes, requires_grad and the multi-adapter class.
QUICK_TESTS = {
    # test_config.py::TestPeftConfig
    "test_from_peft_type",
    "test_save_pretrained",
    "test_from_pretrained_forward_compatible_load_from_peft_config",
    "test_config_pickle_roundtrip",
    # test_custom_models.py::TestPeftCustomModel
    "test_attributes_parametrized",
    "test_save_load_roundtrip_direct_injection",
    "test_load_model_low_cpu_mem_usage",
    "test_load_multiple_adapters",
    "test_merge_layers",
    "test_safe_merge",
    "test_training_custom_models",
    "test_forward_output_finite",
    "test_forward_bfloat16",
    "test_only_params_are_updated",
    "test_parameters_after_loading_model",
    "test_disable_adapters_with_merging",
    "test_active_adapter",
    "test_delete_adapter",
    "test_delete_adapter_properly_cleans_up_after_itself",
    "test_set_adapter_non_overlapping_modules",
    "test_set_requires_grad",
    "test_get_base_model_state_dict",
    # test_custom_models.py::TestRequiresGrad
    "test_loading_model_requires_grad_set_correctly",
    # test_custom_models.py::TestMultipleActiveAdapters
    "test_multiple_active_adapters_forward",
    "test_merge_layers_multi",
}

HUB_REASON = "[needs-hub] needs the Hugging Face Hub; this run is offline (HF_HUB_OFFLINE=1), not counted as passed"

_EMPTY_TABLE_REASONS = {
    "multi": "MULTI_ADAPTER_CASES is not given (TestMultipleActiveAdapters)",
    "mixed": "MIXED_BATCH_CASES is not given (TestMixedAdapterBatches)",
    "layer_indexing": "no config class accepts layers_to_transform + layers_pattern",
}


def pytest_addoption(parser):
    group = parser.getgroup("peft_battery", "PEFT battery (PEFT's own tests against this project's methods)")
    group.addoption("--battery-cases", help="cases module: a .py file or an importable module path")
    group.addoption("--battery-tests", help="PEFT's tests folder (peft_upstream_tests) as set up by the runner")
    group.addoption("--battery-quick", action="store_true", help="run a representative subset of test functions")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{upstream.MARKER}: test re-parametrized with the battery's cases")
    spec = config.getoption("--battery-cases")
    tests_dir = config.getoption("--battery-tests")
    if not spec:
        raise pytest.UsageError("peft_battery: --battery-cases is required (use: python -m tests.peft_battery.runner)")
    if not tests_dir or not Path(tests_dir).is_dir():
        raise pytest.UsageError(f"peft_battery: PEFT's tests folder not found: {tests_dir!r} (use the runner)")
    tests_dir = Path(tests_dir).resolve()

    try:
        tables = cases_module.read(cases_module.load(spec))
    except pytest.UsageError:
        raise
    except Exception as error:
        message = f"peft_battery: importing the cases module {spec!r} failed:\n{traceback.format_exc()}"
        raise pytest.UsageError(message) from error

    modules = upstream.import_modules(tests_dir)
    known = upstream.known_model_ids(modules["test_custom_models"])
    unknown = sorted({case[1] for case in tables.cases.values} - set(known))
    if known and unknown:
        raise pytest.UsageError(
            f"peft_battery: unknown model_id(s) {unknown} in CASES; PEFT's test_custom_models.py knows: {known}"
        )
    if sum(upstream.swap_tables(module, tables) for module in modules.values()) == 0:
        # rather than passing vacuously, stop: a PEFT release changed how its tests are parametrized
        raise pytest.UsageError(
            "peft_battery: found no test functions parametrized over PEFT's case tables; the layout of PEFT's tests "
            "changed and tests/peft_battery needs an update"
        )
    config.pluginmanager.register(Battery(spec, tests_dir, tables, config.getoption("--battery-quick")), "battery")


class Battery:
    """State of one battery session and the hooks that use it."""

    def __init__(self, spec: str, tests_dir: Path, tables: cases_module.CaseTables, quick: bool):
        self.spec = spec
        self.tests_dir = tests_dir
        self.tables = tables
        self.quick = quick
        self.passed = 0
        self.deselected_other = 0  # tests of PEFT's built-in methods
        self.deselected_empty: dict[tuple[str, ...], int] = {}  # fed by a table the cases module leaves out
        self.hub_skipped: list[str] = []  # node ids
        self.expected_used: dict[str, int] = {}  # EXPECTED_FAILURES pattern -> number of tests it marked

    # ---------------------------------------------------------------------------------------------------- selection

    def pytest_collection_modifyitems(self, config, items):
        keep, deselected = [], []
        for item in items:
            marker = item.get_closest_marker(upstream.MARKER)
            if marker is None:
                if item.nodeid.split("[", 1)[0].split("/")[-1] in INVARIANT_TESTS:
                    keep.append(item)
                else:
                    deselected.append(item)
                    self.deselected_other += 1
            elif marker.kwargs.get("empty"):
                deselected.append(item)
                kinds = marker.kwargs.get("kinds", ())
                self.deselected_empty[kinds] = self.deselected_empty.get(kinds, 0) + 1
            elif self.quick and _function_name(item) not in QUICK_TESTS:
                deselected.append(item)
            else:
                keep.append(item)

        for item in keep:
            if upstream.needs_hub(item):
                item.add_marker(pytest.mark.skip(reason=HUB_REASON))
                self.hub_skipped.append(item.nodeid)
                continue
            pattern = self._expected_failure(item)
            if pattern is not None:
                reason = f"[declared-unsupported] {self.tables.expected_failures[pattern]}"
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
                self.expected_used[pattern] = self.expected_used.get(pattern, 0) + 1

        if deselected:
            config.hook.pytest_deselected(items=deselected)
        items[:] = keep

    def _expected_failure(self, item) -> str | None:
        name = _function_name(item)
        tail = item.nodeid.split("::", 1)[-1]  # "TestClass::test_fn[case name]"
        for pattern in self.tables.expected_failures:
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(tail, pattern):
                return pattern
        return None

    # ---------------------------------------------------------------------------------------------------- reporting

    def pytest_collection_finish(self, session):
        # -k / -m and other plugins deselect after us: report only the Hub skips that are still selected
        selected = {item.nodeid for item in session.items}
        self.hub_skipped = [nodeid for nodeid in self.hub_skipped if nodeid in selected]
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        import peft

        t = self.tables
        reporter.write_line(
            f"peft_battery: PEFT {peft.__version__}'s own tests ({self.tests_dir}) with {len(t.cases.values)} CASES, "
            f"{len(t.multi.values)} MULTI_ADAPTER_CASES, {len(t.mixed.values)} MIXED_BATCH_CASES, "
            f"{len(t.config_kwargs.values)} config classes from {self.spec}" + (" [quick]" if self.quick else "")
        )
        for kinds, n in self.deselected_empty.items():
            reason = "; ".join(_EMPTY_TABLE_REASONS.get(kind, f"no {kind} cases") for kind in kinds)
            reporter.write_line(f"peft_battery: {n} test(s) deselected: {reason}")

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed += 1

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        tr = terminalreporter
        tr.write_sep("-", "peft_battery")
        if self.deselected_other:
            tr.write_line(
                f"{self.deselected_other} upstream tests deselected: not parametrized over the given cases "
                "(tests of PEFT's built-in methods)"
            )
        if self.hub_skipped:
            verb = "will be SKIPPED" if config.option.collectonly else "SKIPPED"
            tr.write_line(f"{len(self.hub_skipped)} test(s) {verb} because they need the Hugging Face Hub (offline):")
            for nodeid in self.hub_skipped:
                tr.write_line(f"  {nodeid}")
        else:
            tr.write_line("0 tests skipped for needing the Hugging Face Hub")
        for pattern, reason in self.tables.expected_failures.items():
            n = self.expected_used.get(pattern, 0)
            if n:
                tr.write_line(f"EXPECTED_FAILURES {pattern!r}: {n} test(s) marked xfail(strict) ({reason})")
            else:
                # a declaration for a test that no longer exists (or was renamed): worth a look, not a failure
                tr.write_line(f"EXPECTED_FAILURES {pattern!r} matched no selected test", yellow=True)
        if self.passed == 0 and not config.option.collectonly:
            tr.write_line("no test passed: exit status 5 (nothing ran)", red=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.passed == 0 and session.exitstatus == pytest.ExitCode.OK and not session.config.option.collectonly:
            session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


def _function_name(item) -> str:
    return getattr(item, "originalname", None) or item.name
