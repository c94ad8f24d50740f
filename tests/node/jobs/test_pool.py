"""Specification of the worker pool: workers apart from the receiver, replaced, never orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.nodeproc import children, running_node, wait_for


def workers_of(pid: int) -> set[int]:
    """The node's worker processes (multiprocessing spawn children, not its resource tracker)."""
    found = set()
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.add(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat  # a zombie has stopped working


def test_workers_die_with_a_killed_node(tmp_path: Path) -> None:
    with running_node(tmp_path, {"pipeline": {"workers": 2}}) as node:
        wait_for(lambda: len(workers_of(node.process.pid)) >= 2)
        workers = workers_of(node.process.pid)
        node.kill()
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout=20)


def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    with running_node(tmp_path) as node:
        (worker,) = wait_for(lambda: workers_of(node.process.pid))
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: workers_of(node.process.pid) - {worker}, timeout=30)
        time.sleep(0.5)
        assert node.process.poll() is None
        assert "worker died; replacing it" in node.log()


def test_a_shutdown_that_signals_every_process_logs_no_error(tmp_path: Path) -> None:
    # systemd stops a unit by signalling all its processes: a worker gone first is no death.
    with running_node(tmp_path, {"pipeline": {"workers": 2}}) as node:
        wait_for(lambda: len(workers_of(node.process.pid)) >= 2)
        workers = workers_of(node.process.pid)
        for worker in workers:
            os.kill(worker, signal.SIGTERM)
        time.sleep(1.5)  # longer than the monitor's round
        node.process.send_signal(signal.SIGTERM)
        node.process.wait(30)
        log = node.log()
        assert "worker died" not in log
        assert '"level": "error"' not in log


def test_the_receiving_process_does_not_import_torch(tmp_path: Path) -> None:
    with running_node(tmp_path) as node:
        maps = Path(f"/proc/{node.process.pid}/maps").read_text()
        assert "libtorch" not in maps


def test_importing_the_pool_imports_no_model_library() -> None:
    # The receiving process imports the pool; torch and SimpleITK load in the workers only.
    code = (
        "import sys, node.jobs.pool; "
        "print(sorted(m for m in ('torch', 'SimpleITK', 'monai') if m in sys.modules))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert found.stdout.strip() == "[]"
