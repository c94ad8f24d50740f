"""Specification of the console's process under `serve`: its own process, never torch, replaced
when it dies, and never in the way of receiving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from node.web.process import PROCESS_NAME
from tests.nodeproc import children, running_node, wait_for
from tests.orthanc import free_port

ROOT = Path(__file__).resolve().parents[3]


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2) as page:
            return page.status == 200
    except OSError:
        return False


def console_pid(node_pid: int) -> int | None:
    """The node's child named as the console (ps shows it so)."""
    for pid in children(node_pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == PROCESS_NAME:
                return pid
        except OSError:
            continue
    return None


def test_serve_runs_the_console_in_a_process_of_its_own_and_replaces_it(tmp_path: Path) -> None:
    port = free_port()
    with running_node(tmp_path, extra={"web": {"enabled": True, "port": port}}) as node:
        wait_for(lambda: answers(port), timeout=30)
        first = console_pid(node.process.pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: console_pid(node.process.pid) not in (None, first), timeout=40)
        wait_for(lambda: answers(port), timeout=30)
        assert "the console stopped; starting it again" in node.log()
        # Receiving was never in question.
        with socket.create_connection(("127.0.0.1", node.port), timeout=2):
            pass


def test_a_taken_console_port_does_not_stop_the_node(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = {"web": {"enabled": True, "port": port}}
        with running_node(tmp_path, extra=extra) as node:
            wait_for(lambda: "the console stopped" in node.log(), timeout=30)
            assert node.process.poll() is None


def test_the_console_never_loads_torch() -> None:
    code = (
        "import json, sys, tempfile\n"
        "from node.core.settings import Settings\n"
        "from node.store.database import Store\n"
        "from node.web import app, views\n"
        "s = Settings.model_validate({'node': {'data_dir': tempfile.mkdtemp()}})\n"
        "store = Store(s.database_url)\n"
        "app.create_app(s, store)\n"
        "views.overview(s, store); views.models(s); views.requery(store); views.reports(s)\n"
        "print(json.dumps([m for m in ('torch', 'SimpleITK') if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
