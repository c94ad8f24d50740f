"""Specification of how the tests and benchmarks find their command-line peers: DCMTK's tools,
never the Python look-alikes pynetdicom installs under the same names in the virtualenv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, find_tool, require_tool, run_tool


def test_an_activated_virtualenv_does_not_put_pynetdicoms_storescu_in_dcmtks_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What `source .venv/bin/activate` does: the virtualenv's bin folder first on PATH. There
    # pynetdicom's storescu refused DCMTK's options and bench/ingest.py stopped.
    for name in ("storescu", "storescp", "echoscu"):
        require_tool(name, "dcmtk")
    monkeypatch.setenv("PATH", os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    for name in ("storescu", "storescp", "echoscu"):
        found = find_tool(name)
        assert found is not None
        assert Path(found).parent != VENV_BIN, found
        version = run_tool(found, "--version", check=False)
        assert "dcmtk" in (version.stdout + version.stderr).lower(), found
    if (VENV_BIN / "storescu").exists():
        # Asked for, the virtualenv's tools come first (dcmqi's are installed by pip).
        assert find_tool("storescu", venv=True) == str(VENV_BIN / "storescu")


def test_a_tool_that_is_nowhere_is_none() -> None:
    assert find_tool("mvi-node-no-such-tool") is None
