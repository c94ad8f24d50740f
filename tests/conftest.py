"""Shared fixtures and helpers.

Tools from Debian packages (DCMTK, dicom3tools, gdcm, Orthanc) are real peers in these tests.
Outside CI a missing tool skips its test with the package to install; under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: Fixtures every test may ask for: a PostgreSQL server and a fresh database on it.
pytest_plugins = ["tests.postgres"]


#: The virtualenv's bin folder: pynetdicom installs Python look-alikes of DCMTK's storescu,
#: echoscu, findscu… there, which must never stand in for the real DCMTK peers.
VENV_BIN = Path(sys.executable).parent


def find_tool(name: str, *, venv: bool = False) -> str | None:
    """The path of command-line tool ``name`` on PATH (and in /usr/sbin, /usr/bin), ``None``
    when there is none. The virtualenv's bin folder is searched only with ``venv=True`` (tools
    installed by pip, such as dcmqi's), first: an activated virtualenv otherwise puts
    pynetdicom's ``storescu`` before DCMTK's."""
    venvs = {VENV_BIN.resolve()}
    if os.environ.get("VIRTUAL_ENV"):
        venvs.add((Path(os.environ["VIRTUAL_ENV"]) / "bin").resolve())
    dirs = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and Path(d).resolve() not in venvs
    ]
    dirs += ["/usr/sbin", "/usr/bin"]
    if venv:
        dirs.insert(0, str(VENV_BIN))
    return shutil.which(name, path=os.pathsep.join(dirs))


def require_tool(name: str, package: str, *, venv: bool = False) -> str:
    """Return the path of command-line tool ``name`` (:func:`find_tool`) or stop the test.

    Under ``CI=true`` a missing tool is a failure (CI installs every package the tests need);
    elsewhere the test is skipped with a message naming the Debian package.
    """
    path = find_tool(name, venv=venv)
    if path is None:
        message = f"{name} not found: apt-get install {package}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command-line tool and capture its text output."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=check, timeout=300
    )


# Small phantoms keep the suite fast: 96×96 pixels, 24 slices, generated once per session.
SMALL = {"size": 96, "slices": 24}


@pytest.fixture(scope="session")
def cohort_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write (once per session and per set of options) a small phantom cohort; returns its folder.

    Call it with fields of :class:`node.offline.phantom_study.CohortOptions`:
    ``cohort_factory(seg=True)``.
    """
    from node.offline.phantom_study import CohortOptions, write_cohort

    cache: dict[tuple[tuple[str, object], ...], Path] = {}

    def make(**fields: object) -> Path:
        merged = {**SMALL, **fields}
        key = tuple(sorted(merged.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp("cohort")
            write_cohort(folder, CohortOptions(**merged))
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def small_cohort(cohort_factory: Callable[..., Path]) -> Path:
    """Two small studies with truth masks and a manual truth SEG."""
    return cohort_factory(studies=2, seed=11, masks=True, seg=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Outside CI, say how many tests a missing Debian package skipped, and the line to run."""
    packages: set[str] = set()
    skipped = 0
    for report in terminalreporter.stats.get("skipped", []):
        text = str(getattr(report, "longrepr", ""))
        if "apt-get install " in text:
            skipped += 1
            packages.add(text.split("apt-get install ", 1)[1].split("'")[0].split(")")[0].strip())
    if skipped:
        terminalreporter.write_line(
            f"{skipped} tests skipped for want of Debian packages; as root: "
            f"apt-get install {' '.join(sorted(packages))} (or run .ci/packages)",
            yellow=True,
        )
