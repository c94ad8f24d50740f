"""`mvi-node worker`: procrastinate's worker runs the node's jobs on a host of a cluster.

The receiving side defers a pointer to each job row that becomes queued, in the same
transaction (:mod:`node.store.queue`); procrastinate wakes a waiting worker with LISTEN/NOTIFY at
commit and polls its table every few seconds besides. The task claims the job row the pointer
names (with the jobs of the same priority already waiting, as one model batch) under new leases
and runs it as the pool's workers do (:class:`node.jobs.runner.Worker`). A pointer whose job is no
longer queued (a batch-mate of an earlier claim, superseded, cancelled) ends at once.

procrastinate's own bookkeeping is not the record: a pointer left ``doing`` by a killed worker
changes nothing, because the stalled-job sweep re-queues the job row (which defers a new
pointer) and the lease refuses the dead attempt's writes.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Any

from node.core.logging import get_logger
from node.core.settings import Settings
from node.jobs.runner import BatchRunner, Worker
from node.store.database import Store
from node.store.queue import JOB_QUEUE, RUN_JOB, conninfo

log = get_logger("node.jobs.queue")

#: procrastinate polls for pointers this often besides NOTIFY (a missed notification, a
#: pointer deferred while the worker was reconnecting).
POLL_S = 5.0
#: Between attempts to reach the database again after the queue's connection was lost.
RECONNECT_S = 2.0


def serve_jobs(
    store: Store,
    settings: Settings,
    device: str,
    run_batch: BatchRunner | None = None,
) -> None:
    """Run jobs as their pointers arrive until SIGTERM or SIGINT (the batch in hand finishes
    first; this function owns both signals while it runs).

    ``run_batch``: a stand-in for the pipeline (bench/cluster.py).
    """
    import procrastinate

    # The process is its own: its memory held, its collector spared, its models loaded now.
    warm_up = settings.pipeline.load_models_at_start
    worker = Worker(store, settings, device, run_batch, freeze=True, warm_up=warm_up)
    if worker.not_loaded:
        from node.analysis.models import ModelUnavailable

        # What the warm-up could not load stops this worker now, with what failed.
        raise ModelUnavailable("; ".join(worker.not_loaded))
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=conninfo(settings.database_url))
    )

    @app.task(name=RUN_JOB, queue=JOB_QUEUE)
    def run_job(job_id: int) -> None:
        jobs = worker.claim(job_id)
        if jobs:
            worker.run(jobs)

    options: dict[str, Any] = {
        "queues": [JOB_QUEUE],
        "concurrency": 1,  # one batch at a time: the batch is the parallelism on a GPU
        "listen_notify": True,
        "fetch_job_polling_interval": POLL_S,
        "delete_jobs": "always",  # a pointer is worth nothing once its job was claimed
        "install_signal_handlers": False,  # ours: a signal is the only way this loop ends
        "update_heartbeat_interval": settings.cluster.heartbeat_s,
        "stalled_worker_timeout": settings.cluster.stall_timeout_s,
    }
    stop = threading.Event()
    loop = asyncio.new_event_loop()
    task = loop.create_task(keep_working(app, options, stop.is_set, "job queue"))

    def _stop() -> None:
        # procrastinate turns the cancellation into a graceful stop: the job in hand finishes.
        log.info("worker stopping")
        stop.set()
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _stop)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()


async def keep_working(
    app: Any, options: dict[str, Any], stopping: Callable[[], bool], what: str
) -> None:
    """Run procrastinate's worker until ``stopping()``; start it again whenever it ends.

    procrastinate's worker also ends by itself, returning normally, when one of its side tasks
    fails (the listener after a database outage, its heartbeat, the periodic deferrer): a
    worker that stayed down would leave the cluster without its sweeps or this host's GPU.
    """
    while True:
        try:
            async with app.open_async():
                await app.run_worker_async(**options)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(f"{what} stopped on an error; starting again", error=type(exc).__name__)
        else:
            if not stopping():
                log.warning(f"{what} stopped by itself; starting again")
        if stopping():
            return
        await asyncio.sleep(RECONNECT_S)
