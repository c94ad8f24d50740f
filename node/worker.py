"""Jobs run in worker processes, never in the receiving process.

A native crash or an out-of-memory kill inside a job takes down one worker, not the front door:
the pool notices, puts the dead worker's job back in the queue (or fails it after
``pipeline.max_attempts``) and starts a new worker. Workers die with the node: each asks the
kernel for SIGKILL when its parent dies, and also checks its parent between jobs.

Until the pipeline lands, a job pairs the study's phases, records the pairing and ends.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from node.logging import configure_logging, get_logger, study_key
from node.settings import Settings
from node.store import Job, Store

log = get_logger("node.worker")

_PR_SET_PDEATHSIG = 1
_IDLE_SLEEP_S = 0.25


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended."""

    state: str
    reason: str | None = None
    pairing: dict[str, Any] | None = None
    arterial_uid: str | None = None
    portal_venous_uid: str | None = None


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(0)


def run_job(store: Store, spool_root: Path, settings: Settings, job: Job) -> JobOutcome:
    """Run one job: today, pair the arterial and portal-venous phases of the study."""
    from node.pairing import pair_phases, series_info

    rows = store.instance_paths(job.study_uid)
    by_series: dict[str, list[Path]] = {}
    for series_uid, path, _sop_class, analysable, own_output in rows:
        if analysable and not own_output:
            by_series.setdefault(series_uid, []).append(spool_root / path)
    infos = [series_info(paths) for paths in by_series.values()]
    working = settings.pipeline.working_spacing_mm or 2.0
    pairing = pair_phases(
        infos, settings.phases.model_dump(), working_spacing_mm=working, image_check="auto"
    )
    record = pairing.to_json()
    if pairing.status == "paired":
        return JobOutcome(
            "done",
            None,
            record,
            arterial_uid=pairing.arterial,
            portal_venous_uid=pairing.portal_venous,
        )
    return JobOutcome(pairing.status, pairing.reason, record)


JobRunner = Callable[[Store, Path, Settings, Job], JobOutcome]


def worker_main(
    settings_data: dict[str, Any], parent_pid: int, runner: JobRunner = run_job
) -> None:
    """Entry point of a worker process: claim jobs until the parent goes away."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    settings = Settings.model_validate(settings_data)
    configure_logging(settings.node.log_level)
    store = Store(settings.database_url)
    spool_root = settings.node.data_dir / "spool"
    pid = os.getpid()
    while os.getppid() == parent_pid:
        job = store.claim_job(worker_pid=pid)
        if job is None:
            time.sleep(_IDLE_SLEEP_S)
            continue
        key = study_key(job.study_uid)
        started = time.perf_counter()
        log.info("job started", job_id=job.id, study_key=key, attempt=job.attempts)
        try:
            outcome = runner(store, spool_root, settings, job)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            final = job.attempts >= settings.pipeline.max_attempts
            log.exception("job failed", job_id=job.id, study_key=key, final=final)
            store.finish_job(job.id, "failed" if final else "queued", reason=reason)
            continue
        store.finish_job(
            job.id,
            outcome.state,
            reason=outcome.reason,
            pairing=outcome.pairing,
            arterial_uid=outcome.arterial_uid,
            portal_venous_uid=outcome.portal_venous_uid,
        )
        log.info(
            "job finished",
            job_id=job.id,
            study_key=key,
            state=outcome.state,
            reason=outcome.reason,
            seconds=round(time.perf_counter() - started, 3),
        )


class WorkerPool:
    """A fixed number of worker processes, replaced when one dies.

    Parameters
    ----------
    settings
        The node's settings (passed to each worker as plain data).
    store
        The parent's store, used to recover a dead worker's jobs.
    count
        Number of workers (``pipeline.workers``).
    """

    def __init__(self, settings: Settings, store: Store, count: int) -> None:
        self.settings = settings
        self.store = store
        self.count = count
        # spawn: a fresh interpreter, so nothing the receiver holds (threads, sockets) leaks in.
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[BaseProcess] = []
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def _spawn(self) -> BaseProcess:
        process = self._context.Process(
            target=worker_main,
            args=(self.settings.model_dump(mode="python"), os.getpid()),
            name="mvi-node-worker",
            daemon=True,
        )
        process.start()
        return process

    def start(self) -> None:
        """Start the workers and a thread that replaces any that die."""
        self._workers = [self._spawn() for _ in range(self.count)]
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)
        self._monitor.start()
        log.info("workers started", workers=self.count)

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for index, process in enumerate(self._workers):
                if process.is_alive() or self._stop.is_set():
                    continue
                pid = process.pid or -1
                recovered = self.store.recover_worker_jobs(pid, self.settings.pipeline.max_attempts)
                log.error(
                    "worker died; replacing it",
                    pid=pid,
                    exitcode=process.exitcode,
                    jobs_recovered=len(recovered),
                )
                self._workers[index] = self._spawn()

    def alive(self) -> int:
        """How many workers are running."""
        return sum(1 for p in self._workers if p.is_alive())

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the workers; their running jobs are re-queued at the next start."""
        self._stop.set()
        for process in self._workers:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self._workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)
