"""Specification of a worker process's memory between jobs: held for the next job, given back
above the ceiling. Each case runs in a fresh interpreter: the allocator settings are the
process's own, and the test runner's must stay as they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from node.core.settings import Settings
from node.jobs import runner
from node.store.database import Store
from tests.nodeproc import node_settings

#: A job's volume, as a worker allocates and frees it (bytearray: written through, no huge pages).
_JOB = """
import ctypes, json, resource
from node.jobs.memory import hold_freed_memory, release, resident_mb

# 4 KB pages whatever the host's transparent huge pages setting ("always" would fault 2 MB).
ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

held = hold_freed_memory(KEEP)
counts = []
for _ in range(2):
    before = faults()
    volume = bytearray(200 * 2**20)
    counts.append(faults() - before)
    del volume
kept = resident_mb()
release(False, KEEP)
print(json.dumps({"held": held, "faults": counts, "kept": kept, "after": resident_mb()}))
"""


class Job(NamedTuple):
    held: bool  # what hold_freed_memory() answered
    faults: list[int]  # page faults of the first job's volume, then the second's
    kept: float  # resident MB after both jobs
    after: float  # resident MB after release()


def run_jobs(keep_mb: int) -> Job:
    """Two jobs of 200 MB each in a worker process whose ceiling is ``keep_mb``."""
    code = _JOB.replace("KEEP", str(keep_mb))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return Job(**json.loads(done.stdout))


def test_freed_memory_is_reused_by_the_next_job_instead_of_faulted_in_again() -> None:
    held = run_jobs(keep_mb=4096)
    assert held.held is True
    first, second = held.faults
    assert first > 40_000  # 200 MB in 4 KB pages, touched for the first time
    assert second < first / 10


def test_memory_under_the_ceiling_stays_with_the_process() -> None:
    held = run_jobs(keep_mb=4096)
    assert held.kept > 200
    assert held.after > 200


def test_memory_over_the_ceiling_is_given_back() -> None:
    given = run_jobs(keep_mb=100)
    assert given.held is True
    assert given.kept > 200
    assert given.after < given.kept - 150


def test_at_zero_the_allocator_keeps_its_defaults() -> None:
    default = run_jobs(keep_mb=0)
    assert default.held is False
    # glibc's own way: the freed block went back to the kernel and is faulted in again.
    assert min(default.faults) > 40_000
    assert default.kept < 200


def test_the_ceiling_is_a_setting_with_a_default_and_a_floor() -> None:
    assert Settings().pipeline.worker_keep_memory_mb == 4096
    zero = Settings.model_validate({"pipeline": {"worker_keep_memory_mb": 0}})
    assert zero.pipeline.worker_keep_memory_mb == 0
    with pytest.raises(ValueError, match="worker_keep_memory_mb"):
        Settings.model_validate({"pipeline": {"worker_keep_memory_mb": -1}})


def test_a_worker_of_its_own_process_releases_after_each_batch_under_its_ceiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bool, int]] = []
    monkeypatch.setattr(runner, "release", lambda freeze, keep: calls.append((freeze, keep)))
    extra = {"pipeline": {"worker_keep_memory_mb": 1234}}
    settings = Settings.model_validate(node_settings(tmp_path / "data", extra=extra))
    store = Store(settings.database_url)
    own = runner.Worker(store, settings, "cpu", run_batch=lambda jobs: [], freeze=True)
    own.run([])
    assert calls == [(True, 1234), (True, 1234)]  # after loading, after the batch
    calls.clear()
    guest = runner.Worker(store, settings, "cpu", run_batch=lambda jobs: [])
    guest.run([])
    assert calls == [(False, 1234)]  # release() gives it all back: this process holds nothing
