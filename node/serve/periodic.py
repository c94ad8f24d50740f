"""A receiver's periodic work: once per period across every receiver of a cluster.

Retention, the re-query safety net and the stalled-job sweep must run once per period, not once
per receiver (two active receivers would ask the PACS twice). On a PostgreSQL database they are
procrastinate periodic tasks: every receiver runs a procrastinate worker on the periodic queue
in a thread of its own, each one's deferrer tries to defer every tick, and procrastinate's
unique ``(task, periodic_id, defer_timestamp)`` lets exactly one of them do it; whichever
receiver fetches the job runs it. On SQLite (one host) the same work runs on the receiver's
apscheduler, and procrastinate is never imported.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from node.core.logging import get_logger
from node.store.queue import conninfo

log = get_logger("node.serve.periodic")

#: procrastinate queue of the receivers' periodic work (workers never listen to it).
PERIODIC_QUEUE = "mvi-periodic"


@dataclass(frozen=True)
class Periodic:
    """One piece of periodic work: a task name, its schedule and what it does.

    ``cron`` has five fields, or six with seconds last (croniter's form, which procrastinate
    uses: ``"* * * * * */3"`` is every 3 seconds).
    """

    name: str
    cron: str
    run: Callable[[], object]


def seconds_cron(every_s: float) -> str:
    """A cron for "every ``every_s`` seconds" as closely as cron allows: whole seconds up to
    a minute, whole minutes up to an hour."""
    seconds = max(1, round(every_s))
    if seconds < 60:
        return f"* * * * * */{seconds}"
    minutes = min(59, max(1, round(seconds / 60)))
    return f"*/{minutes} * * * *"


class ClusterTimers:
    """A procrastinate worker over :data:`PERIODIC_QUEUE` in a thread, with ``tasks`` as
    periodic tasks. Start it once per receiver; :meth:`stop` finishes the task in hand."""

    def __init__(
        self,
        url: str,
        tasks: Sequence[Periodic],
        *,
        heartbeat_s: float = 10.0,
        stall_timeout_s: float = 300.0,
    ) -> None:
        import procrastinate

        # Every procrastinate worker of the cluster prunes the workers whose heartbeat is older
        # than its stall timeout: these must be the cluster's, or a `mvi-node worker` starting
        # would prune this one while it runs (and it would stop on the dangling worker id).
        self._stopping = threading.Event()
        self._options: dict[str, Any] = {
            "queues": [PERIODIC_QUEUE],
            "concurrency": 1,
            "install_signal_handlers": False,  # the receiver's main thread owns them
            "delete_jobs": "always",
            "fetch_job_polling_interval": 1.0,
            "update_heartbeat_interval": heartbeat_s,
            "stalled_worker_timeout": stall_timeout_s,
        }

        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=conninfo(url)),
            # A receiver that was down does not run every tick it missed, only the last hour's.
            periodic_defaults={"max_delay": 3600},
        )
        #: (task, tick) of every run on this receiver, newest last (at most 1000).
        self.ran: list[tuple[str, int]] = []
        for task in tasks:
            self._register(task)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[Any] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cluster-timers", daemon=True)

    def _register(self, task: Periodic) -> None:
        run = task.run

        def periodic(timestamp: int) -> None:
            self.ran = [*self.ran[-999:], (task.name, timestamp)]
            try:
                run()
            except Exception:
                # The next tick tries again; a failure must not count as procrastinate's retry.
                log.exception("periodic task failed", task=task.name, tick=timestamp)

        periodic.__name__ = task.name.replace(".", "_")
        self.app.periodic(cron=task.cron, periodic_id="")(
            self.app.task(name=task.name, queue=PERIODIC_QUEUE)(periodic)
        )

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        from node.jobs.queue import keep_working

        # The database went away, or this worker's row was pruned meanwhile: keep_working
        # starts it again (a new row); the ticks wait in the database.
        self._main = loop.create_task(
            keep_working(self.app, self._options, self._stopping.is_set, "cluster timers")
        )
        self._started.set()
        try:
            loop.run_until_complete(self._main)
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    def start(self) -> None:
        """Run the periodic worker in its thread."""
        self._thread.start()
        self._started.wait(10)

    def alive(self) -> bool:
        """Whether the periodic worker's thread runs (the receiver's watchdog asks)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the task in hand (procrastinate's graceful stop on cancellation)."""
        self._stopping.set()
        loop, main = self._loop, self._main
        if loop is not None and main is not None and not loop.is_closed():
            loop.call_soon_threadsafe(main.cancel)
        self._thread.join(timeout)
