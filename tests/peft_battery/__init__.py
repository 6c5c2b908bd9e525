"""The PEFT battery: Hugging Face PEFT's own unit tests, run against the adapter methods of peft-ext.

PEFT parametrizes its generic tests (save/load, merge/unmerge, several adapters, dtypes, deletion, requires_grad,
FSDP state dict, config round-trips, ...) over module-level case tables. The battery swaps those tables for this
project's cases (``tests/peft_battery_cases.py``, gathering ``tests/battery_cases/<method>.py``), so every contract
PEFT checks for its built-in methods is checked for ours. ``tests/test_peft_battery.py`` runs it on every test run.

PEFT's tests (Apache-2.0, © HuggingFace) are not part of this repository: they come from the sdist of the installed
peft version, fetched once into a cache (``~/.cache/peft-ext/peft_battery/<version>/``).

- ``cache.py``: fetching the sdist and extracting its tests, atomically, into the cache;
  ``PEFT_EXT_BATTERY_CACHE`` moves the cache, ``PEFT_EXT_BATTERY_SDIST`` names a local ``peft-X.tar.gz`` (offline).
- ``runner.py``: the command line (``python -m tests.peft_battery.runner CASES [--quick] [pytest args]``), which
  runs pytest on PEFT's ``test_custom_models.py`` and ``test_config.py`` with the plugin.
- ``plugin.py``: the pytest plugin of that session: selection, Hub skips, expected failures, reporting.
- ``cases.py`` (loading and checking a cases module; its docstring gives the tables' formats) and ``upstream.py``
  (importing PEFT's test modules, swapping their tables, spotting tests that need the Hub).

What runs: every test function of those two files that PEFT parametrizes over one of the case tables, with our
cases only, plus ``TestPeftConfig::test_from_peft_type`` (every ``PeftType`` member, ours included, must map to a
config constructible without arguments). Everything else there tests PEFT's built-in methods and is deselected.
Tests that download from the Hub are skipped with a ``[needs-hub]`` reason; a method that cannot honour a contract
declares it in ``EXPECTED_FAILURES`` (strict xfail: a declaration that starts passing fails the run).

None of these modules is collected by the project's pytest run (no ``test_*`` names); ``plugin.py`` is only loaded
into the battery's own session.
"""
