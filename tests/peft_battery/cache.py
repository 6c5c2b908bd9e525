"""PEFT's own tests for the installed peft version: fetched from its sdist, extracted once into a cache.

The tests are never committed to this repository. ``upstream_tests()`` returns ``<cache>/<version>/`` holding:

- ``peft_upstream_tests/``: the sdist's ``tests/`` folder, renamed so that it cannot clash with this repository's
  ``tests`` (PEFT's test modules use relative imports, so it becomes a package: an ``__init__.py`` is added),
- ``LICENSE`` (PEFT's, Apache-2.0) and ``SOURCE.txt`` (where the files come from),
- ``pytest.ini``: the battery's own pytest configuration (the project's is not used in that session).

Where the sdist comes from: ``$PEFT_EXT_BATTERY_SDIST`` (a local ``peft-X.tar.gz``, for offline machines or a peft
installed from git), else ``pip download peft==X --no-deps --no-binary peft`` (the user's pip configuration, mirrors
included), else PyPI's JSON API (environments without pip).

Writes are atomic: a version folder is extracted and completed under a temporary name in the cache root, then renamed
into place in one step. Two concurrent runs each build their own copy and the first rename wins; a killed run leaves
at most a ``.tmp-*`` folder behind (removed by a later fetch once a day old), never a half-written version folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath


ENV_CACHE = "PEFT_EXT_BATTERY_CACHE"
ENV_SDIST = "PEFT_EXT_BATTERY_SDIST"
UPSTREAM_PACKAGE = "peft_upstream_tests"
TEST_FILES = ("test_custom_models.py", "test_config.py")
PYPI_JSON = "https://pypi.org/pypi/peft/json"

_COMPLETE = ".complete"  # written last inside the temporary folder: a version folder without it is not ours

PYTEST_INI = """\
# written by peft-ext's PEFT battery (tests/peft_battery): PEFT's own tests (Apache-2.0, see LICENSE)
[pytest]
python_files = test_*.py
filterwarnings =
    ignore:cannot collect test class:pytest.PytestCollectionWarning
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
"""

# What pip and urllib print when the network, not the index, is the problem (DNS, refused/timed-out connections,
# proxies). An index that answers "no such version" is reachable and is a real error.
_NETWORK_ERROR = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|nodename nor servname|Network is unreachable|No route to host|Connection refused|"
    r"ConnectTimeout|ReadTimeout|timed out|ProxyError|Cannot connect to proxy|Max retries exceeded|"
    r"getaddrinfo failed|ConnectionResetError|RemoteDisconnected"
)


class FetchError(RuntimeError):
    """PEFT's tests could not be obtained (no sdist for this version, broken archive, ...)."""


class RegistryUnreachable(FetchError):
    """No package registry could be reached to download the sdist (offline machine)."""


def log(message: str) -> None:
    print(f"peft_battery: {message}", file=sys.stderr, flush=True)


def peft_version() -> str:
    """Version of the peft distribution installed in this interpreter."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        raise FetchError(f"peft is not installed in {sys.executable}") from None


def cache_root() -> Path:
    """``$PEFT_EXT_BATTERY_CACHE``, else ``peft-ext/peft_battery`` in the user's cache folder."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "peft-ext" / "peft_battery"


def upstream_tests(version: str | None = None, refresh: bool = False) -> Path:
    """Return ``<cache>/<version>`` (see the module docstring), fetching and extracting it first if needed."""
    version = version or peft_version()
    root = cache_root()
    target = root / version
    if (target / _COMPLETE).is_file() and not refresh:
        return target

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    # the temporary folder lives in the cache root itself: same file system, so the final rename is atomic
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        sdist = _local_sdist() or _download_sdist(version, tmp)
        built = _extract(sdist, version, tmp / "staging")
        _publish(built, target, tmp, refresh)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"PEFT {version}'s tests are in {target}")
    return target


def _remove_stale_temporaries(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove what killed runs left behind; a day-old temporary folder belongs to no running fetch."""
    now = time.time()
    for path in root.glob(".tmp-*"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:  # a concurrent run removed it
            pass


# ---------------------------------------------------------------------------------------------------------------------
# getting the sdist
# ---------------------------------------------------------------------------------------------------------------------


def _local_sdist() -> Path | None:
    local = os.environ.get(ENV_SDIST)
    if not local:
        return None
    path = Path(local).expanduser()
    if not path.is_file():
        raise FetchError(f"{ENV_SDIST}={local} is not a file")
    return path


def _download_sdist(version: str, dest: Path) -> Path:
    errors: list[str] = []
    found = _pip_download(version, dest, errors)
    if found:
        return found
    # no pip at all tells nothing about the network; a pip that got an answer from an index does
    pip_offline = not errors or any(_NETWORK_ERROR.search(e) for e in errors)

    # last resort (no pip, or pip configured against an index without sdists): PyPI's JSON API
    pypi_offline = False
    log("pip could not fetch it; trying PyPI's JSON API ...")
    try:
        return _pypi_download(version, dest)
    except urllib.error.HTTPError as error:  # PyPI answered: reachable, the file is just not there
        errors.append(f"{PYPI_JSON}: HTTP {error.code} {error.reason}")
    except (FetchError, ValueError, KeyError, TypeError) as error:  # answered, without a usable sdist
        errors.append(f"{PYPI_JSON}: {error}")
    except (urllib.error.URLError, OSError) as error:
        errors.append(f"{PYPI_JSON}: {error!r}")
        pypi_offline = True

    details = "\n---\n".join(errors)
    if pip_offline and pypi_offline:
        raise RegistryUnreachable(
            f"no package registry is reachable to download the sdist of peft=={version} (offline?); set {ENV_SDIST} "
            f"to a local peft-{version}.tar.gz to run PEFT's tests offline. Errors:\n{details}"
        )
    raise FetchError(
        f"could not get the sdist of peft=={version} (a peft installed from git has none on the index: set "
        f"{ENV_SDIST} to a peft source tarball). Errors:\n{details}"
    )


def _pip_download(version: str, dest: Path, errors: list[str]) -> Path | None:
    """``pip download`` the sdist into dest; append what went wrong to errors."""
    pips = [[sys.executable, "-m", "pip"]]
    # environments made by uv have no pip module; any pip on PATH can download a file
    pips += [[exe] for exe in dict.fromkeys(filter(None, (shutil.which("pip3"), shutil.which("pip"))))]
    args = ["download", f"peft=={version}", "--no-deps", "--no-binary", "peft", "--disable-pip-version-check"]
    args += ["-q", "-d", str(dest)]
    for pip in pips:
        # pip prepares the sdist's metadata, which needs setuptools: in an isolated build environment (fetched from
        # the index) first, else the one installed here
        for extra in ([], ["--no-build-isolation"]):
            log(f"downloading the peft {version} sdist: {' '.join(pip[-1:] + args[:2] + extra)} ...")
            proc = subprocess.run(pip + args + extra, capture_output=True, text=True)
            found = sorted(dest.glob("peft-*.tar.gz"))
            if found:
                return found[0]
            output = (proc.stderr or proc.stdout).strip()
            if "No module named pip" in output:
                break
            errors.append(f"pip: {' '.join(pip)}: {output[-2000:]}")
            if _NETWORK_ERROR.search(output):
                return None  # the other pips would hit the same network
    return None


def _pypi_download(version: str, dest: Path) -> Path:
    with urllib.request.urlopen(PYPI_JSON, timeout=60) as response:
        meta = json.load(response)
    files = meta.get("releases", {}).get(version)
    if files is None:
        raise FetchError(f"peft {version} is not on PyPI (a dev or git install?); set {ENV_SDIST}")
    sdists = [f for f in files if f.get("packagetype") == "sdist"]
    if not sdists:
        raise FetchError(f"peft {version} has no sdist on PyPI; set {ENV_SDIST}")
    url = urllib.parse.urljoin(PYPI_JSON, sdists[0]["url"])  # mirrors answer with relative URLs
    target = dest / PurePosixPath(urllib.parse.urlparse(url).path).name
    with urllib.request.urlopen(url, timeout=300) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# extracting and publishing
# ---------------------------------------------------------------------------------------------------------------------


def _wanted_members(tar: tarfile.TarFile, top: str) -> list[tarfile.TarInfo]:
    """``<top>/tests/**`` and ``<top>/LICENSE``: regular files and folders only, no member escaping the folder."""
    members = []
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        # no links, devices or fifos, and no absolute or ".." names: nothing can land outside the staging folder
        if not (member.isfile() or member.isdir()) or path.is_absolute() or ".." in path.parts:
            continue
        if len(path.parts) < 2 or path.parts[0] != top:
            continue
        if path.parts[1] == "tests" or (path.parts[1] == "LICENSE" and len(path.parts) == 2):
            members.append(member)
    return members


def _extract(sdist: Path, version: str, staging: Path) -> Path:
    """Extract the tests of ``sdist`` into ``staging/peft-<version>`` and complete that folder; return it."""
    top = f"peft-{version}"
    try:
        tar = tarfile.open(sdist)
    except (tarfile.TarError, OSError) as error:
        raise FetchError(f"{sdist} is not a readable tar archive: {error}") from error
    with tar:
        members = _wanted_members(tar, top)
        if not any(m.name == f"{top}/tests/test_custom_models.py" for m in members):
            tops = sorted({PurePosixPath(m.name).parts[0] for m in tar.getmembers() if m.name})
            raise FetchError(
                f"{sdist.name} holds no {top}/tests/test_custom_models.py (top folders: {tops}); the installed peft is "
                f"{version}: use the sdist of that version"
            )
        staging.mkdir(parents=True)
        # the "data" filter (Python >= 3.10.12 / 3.11.4) re-checks every member: no escape, no special file, sane modes
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, members=members, **kwargs)

    built = staging / top
    (built / "tests").rename(built / UPSTREAM_PACKAGE)
    init = built / UPSTREAM_PACKAGE / "__init__.py"
    if not init.exists():
        init.write_text("# added by peft-ext's PEFT battery: PEFT's test modules use relative imports\n")
    (built / "pytest.ini").write_text(PYTEST_INI)
    (built / "SOURCE.txt").write_text(
        f"tests/ of {sdist.name} (https://github.com/huggingface/peft, Apache License 2.0: see LICENSE), renamed to "
        f"{UPSTREAM_PACKAGE}/ with an __init__.py added. Fetched by peft-ext's tests/peft_battery; not part of "
        "peft-ext.\n"
    )
    (built / _COMPLETE).write_text(version + "\n")
    return built


def _publish(built: Path, target: Path, tmp: Path, refresh: bool) -> None:
    """Rename the completed folder to ``target`` in one step, unless a complete copy is there and may stay."""
    if (target / _COMPLETE).is_file() and not refresh:
        return  # a concurrent run published first: keep its copy, a battery session may be reading it already
    if target.exists():
        # --refresh, or a folder that is not ours: moved aside in one step (removed with tmp), then replaced
        log(f"replacing {target}")
        try:
            target.rename(tmp / "previous")
        except FileNotFoundError:
            pass
    try:
        built.rename(target)
    except OSError:
        # a concurrent run published between our check and our rename: its copy is as good as ours
        if not (target / _COMPLETE).is_file():
            raise
