"""The worker pool of the receiving process: spawn, watch, replace and stop the workers.

Jobs run in worker processes, never in the receiving process. A native crash or an
out-of-memory kill inside a job takes down one worker, not the front door: the pool notices,
puts the dead worker's job back in the queue (or fails it after ``pipeline.max_attempts``) and
starts a new worker. What a worker does is :mod:`node.jobs.runner`.

Importing this module imports neither torch nor SimpleITK: the receiving process never loads
a model.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess

from node.core.locks import Wakeup
from node.core.logging import get_logger, log_queue
from node.core.settings import Settings
from node.jobs.runner import worker_main
from node.store.database import Store, worker_identity

__all__ = ["WorkerPool"]

#: How long a worker that ended on SIGTERM may precede the node's own stop and still count as
#: part of a shutdown.
SHUTDOWN_GRACE_S = 5.0

log = get_logger("node.jobs.pool")


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
        # Wake-ups across this host's processes: a queued job wakes an idle worker, a recorded
        # result the outbox thread. Both still poll besides (another host's jobs, a retry
        # coming due): these only save the polling interval.
        self.jobs_queued = Wakeup(self._context.Semaphore(0))
        self.results_recorded = Wakeup(self._context.Semaphore(0))
        self._monitor: threading.Thread | None = None

    def _spawn(self) -> BaseProcess:
        process = self._context.Process(
            target=worker_main,
            args=(
                self.settings.model_dump(mode="python"),
                os.getpid(),
                log_queue(),
                self.jobs_queued,
                self.results_recorded,
            ),
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
                if process.exitcode in (0, -signal.SIGTERM) and self._stop.wait(SHUTDOWN_GRACE_S):
                    # systemd signals every process of the unit at once: a worker that ended on
                    # SIGTERM just before the node itself stopped is a shutdown, not a death.
                    return
                pid = process.pid or -1
                recovered = self.store.recover_worker_jobs(
                    worker_identity(pid), self.settings.pipeline.max_attempts
                )
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
