"""Run PEFT's own tests against the cases of a cases module, in a pytest session of their own.

usage (from the repository root, with the project installed in this interpreter)::

    python -m tests.peft_battery.runner CASES [--quick] [--refresh] [--show-warnings] [pytest args...]

    python -m tests.peft_battery.runner tests/peft_battery_cases.py            # every method of peft-ext
    python -m tests.peft_battery.runner tests/battery_cases/ana.py -x -k merge  # one method, some tests

Other arguments go to pytest (``-x``, ``-k EXPR``, ``-v``, ``-rs``, ``--tb=long``, ``--collect-only``, ...). The
exit status is pytest's (0 only if nothing failed and at least one test passed; 5 if nothing passed), or
``EXIT_NO_REGISTRY`` / ``EXIT_FETCH_FAILED`` when PEFT's tests could not be fetched (see ``cache.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import cache


EXIT_FETCH_FAILED = 74  # sysexits' EX_IOERR
EXIT_NO_REGISTRY = 75  # sysexits' EX_TEMPFAIL: offline, try again later (or set PEFT_EXT_BATTERY_SDIST)

HERE = Path(__file__).resolve().parent
RUNNER_FLAGS = ("--quick", "--refresh", "--show-warnings")


def pytest_command(
    cases: str, version_dir: Path, pytest_args: list[str], *, quick: bool = False, show_warnings: bool = False
) -> list[str]:
    """The command line of the battery's pytest session over PEFT's tests in ``version_dir``."""
    tests_dir = version_dir / cache.UPSTREAM_PACKAGE
    cmd = [sys.executable, "-m", "pytest", "-c", str(version_dir / "pytest.ini"), "--rootdir", str(version_dir)]
    # prepend: PEFT's tests are imported as the package peft_upstream_tests, from the version folder
    cmd += ["--import-mode=prepend", "-p", "no:cacheprovider", "-p", "peft_battery.plugin", "-q"]
    if not show_warnings:
        cmd.append("--disable-warnings")  # PEFT's suite emits hundreds of expected warnings
    cmd += ["--battery-cases", cases, "--battery-tests", str(tests_dir)]
    if quick:
        cmd.append("--battery-quick")
    return cmd + [str(tests_dir / name) for name in cache.TEST_FILES] + pytest_args


def pytest_env() -> dict[str, str]:
    """This environment, plus what the battery's session needs."""
    env = dict(os.environ)
    # the plugin is imported as ``peft_battery.plugin`` from tests/ (not as ``tests.peft_battery``: a ``tests``
    # package installed in site-packages by some library would win over this repository's namespace folder)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")  # Hub tests are skipped; nothing else may touch the network
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 4  # pytest's "usage error"
    cases, rest = argv[0], argv[1:]
    flags = {flag for flag in rest if flag in RUNNER_FLAGS}
    pytest_args = [arg for arg in rest if arg not in RUNNER_FLAGS]
    if cases.endswith(".py") or os.sep in cases:
        cases = str(Path(cases).resolve())  # the session runs with another rootdir

    try:
        version_dir = cache.upstream_tests(refresh="--refresh" in flags)
    except cache.RegistryUnreachable as error:
        cache.log(str(error))
        return EXIT_NO_REGISTRY
    except cache.FetchError as error:
        cache.log(str(error))
        return EXIT_FETCH_FAILED

    cmd = pytest_command(
        cases, version_dir, pytest_args, quick="--quick" in flags, show_warnings="--show-warnings" in flags
    )
    sys.stdout.flush()
    return subprocess.call(cmd, env=pytest_env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
