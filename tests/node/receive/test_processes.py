"""Specification of several receiving processes on the node's one DICOM port.

Concurrent associations are spread over processes that accept from one listening socket; what
they store is reported to the first process, which keeps the quiet timers and the counters.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from node.core.settings import Settings
from node.receive.processes import PROCESS_NAME, receive_process_count
from tests.node.receive.test_receiver import (
    spooled,
    storescu,
    storescu_at_once,
    truth_rows,
    wait_until_final,
)
from tests.nodeproc import NodeProcess, children, running_node, wait_for
from tests.orthanc import free_port


def receiving_children(node: NodeProcess) -> list[int]:
    """The further receiving processes of a node (their name in /proc)."""
    return sorted(children(node.process.pid, PROCESS_NAME))


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_auto_is_one_receiving_process_per_core_up_to_four(tmp_path: Path) -> None:
    settings = Settings.model_validate({"node": {"data_dir": str(tmp_path)}})
    assert receive_process_count(settings) == max(1, min(os.cpu_count() or 1, 4))
    three = Settings.model_validate({"node": {"data_dir": str(tmp_path), "receive_processes": 3}})
    assert receive_process_count(three) == 3
    with pytest.raises(ValueError, match="receive_processes"):
        Settings.model_validate({"node": {"data_dir": str(tmp_path), "receive_processes": 0}})


def test_concurrent_associations_over_three_processes_lose_nothing_and_complete(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=7, seed=37, size=48, slices=16)
    first, *rows = truth_rows(cohort)
    metrics_port = free_port()
    extra = {
        "node": {"receive_processes": 3, "max_associations": 16},
        "metrics": {"port": metrics_port},
    }
    with running_node(tmp_path, extra) as node:
        children = wait_for(lambda: len(receiving_children(node)) == 2 and receiving_children(node))
        # The first process stopped: only the others can accept, and they do.
        os.kill(node.process.pid, signal.SIGSTOP)
        try:
            assert storescu(node, cohort / first["study_folder"]).returncode == 0
        finally:
            os.kill(node.process.pid, signal.SIGCONT)
        results = storescu_at_once(node, [cohort / r["study_folder"] for r in rows])
        assert [r.returncode for r in results] == [0] * len(rows)
        sent = len(list(cohort.glob("study_*/**/*.dcm")))
        assert len(spooled(node)) == sent
        # The quiet timers run in the first process, armed by what the others stored.
        for row in [first, *rows]:
            final = wait_until_final(node, row["study_instance_uid"], timeout=180)
            assert final.state == "done"
        # Every process's counters reach /metrics.
        base = f"http://127.0.0.1:{metrics_port}"
        wait_for(lambda: metric(base, "mvi_instances_received_total") == sent, timeout=10)
        assert receiving_children(node) == children


def test_a_receiving_process_that_dies_is_replaced_and_none_outlives_the_node(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=1, seed=38, size=48, slices=16)
    (row,) = truth_rows(cohort)
    with running_node(tmp_path, {"node": {"receive_processes": 2}}) as node:
        (child,) = wait_for(lambda: receiving_children(node))
        os.kill(child, signal.SIGKILL)
        (replacement,) = wait_for(
            lambda: [p for p in receiving_children(node) if p != child], timeout=20
        )
        assert replacement != child
        assert storescu(node, cohort / row["study_folder"]).returncode == 0
        assert wait_until_final(node, row["study_instance_uid"], timeout=120).state == "done"
        assert "a receiving process stopped; starting another" in node.log()
    # Stopped with the node (and killed with it: each dies with its parent).
    wait_for(lambda: not Path(f"/proc/{replacement}").exists(), timeout=10)
