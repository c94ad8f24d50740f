"""`mvi-node serve`: wire the store, the spool, the timers, the workers and the AE together.

Start order matters for restart safety: the store opens (and jobs a crash left running go back
to the queue), studies still receiving get their timers back, workers start, and only then does
the AE listen. Stop order is the reverse.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from node.core.logging import get_logger, study_key
from node.core.settings import Settings
from node.core.tls import server_context
from node.deliver.outbox import Dispatcher
from node.jobs.pool import WorkerPool
from node.receive.completion import Assembler
from node.receive.processes import ReceivingProcesses, receive_process_count
from node.receive.receiver import ReceiverState, start_receiver
from node.receive.recover import recover_in_background
from node.receive.spool import remove_files
from node.serve.periodic import ClusterTimers, Periodic, seconds_cron
from node.store.database import Store, utcnow
from node.web.process import Console, console_url

log = get_logger("node.serve.service")


@dataclass
class Node:
    """A running node: everything :func:`stop_node` must shut down."""

    settings: Settings
    store: Store
    scheduler: BackgroundScheduler
    assembler: Assembler
    workers: WorkerPool
    receiver: ReceiverState
    server: Any
    dispatcher: Dispatcher
    metrics_server: Any = None
    timers: ClusterTimers | None = None
    console: Console | None = None
    stow: Any = None
    receiving: ReceivingProcesses | None = None

    @property
    def spool_root(self) -> Path:
        """Where received instances live."""
        return self.settings.node.data_dir / "spool"


def apply_retention(store: Store, spool_root: Path, spool_days: int) -> int:
    """Delete spooled instances of studies delivered more than ``spool_days`` ago."""
    cutoff = utcnow() - dt.timedelta(days=spool_days)
    removed = 0
    for study_uid in store.studies_delivered_before(cutoff):
        # Files first, then rows: a crash between leaves rows without files (the next run
        # forgets them), never files without rows, which the recovery after a power loss would
        # take for instances whose rows were lost (receive/recover.py).
        removed += remove_files(spool_root, store.study_instance_paths(study_uid))
        store.delete_instances(study_uid)
        log.info("retention: spooled instances deleted", study_key=study_key(study_uid))
    return removed


def requeue_stalled(store: Store, stall_timeout_s: float, max_attempts: int) -> list[int]:
    """The stalled-job sweep: jobs whose worker stopped beating go back to the queue (or fail
    past ``max_attempts``). Every receiver runs it; the lease makes a second run harmless."""
    released = store.requeue_stalled(stall_timeout_s, max_attempts)
    if released:
        log.warning("stalled jobs released", jobs=released, stall_timeout_s=stall_timeout_s)
    return released


#: When the daily retention runs on a cluster (UTC; on one host: a day after each start).
RETENTION_CRON = "17 3 * * *"


def periodic_work(settings: Settings, store: Store, spool_root: Path) -> list[Periodic]:
    """The receivers' periodic work: retention, the re-query safety net, the stalled sweep."""
    cluster = settings.cluster
    work = [
        Periodic(
            "mvi.retention",
            RETENTION_CRON,
            lambda: apply_retention(store, spool_root, settings.retention.spool_days),
        ),
        Periodic(
            "mvi.stalled_jobs",
            seconds_cron(cluster.stall_timeout_s / 2),
            lambda: requeue_stalled(store, cluster.stall_timeout_s, settings.pipeline.max_attempts),
        ),
    ]
    if settings.requery.schedule:
        from node.requery.retrieve import run_safety_net

        work.append(
            Periodic("mvi.safety_net", settings.requery.schedule, lambda: run_safety_net(settings))
        )
    return work


def schedule_periodic(
    settings: Settings, store: Store, spool_root: Path, scheduler: BackgroundScheduler
) -> ClusterTimers | None:
    """Run :func:`periodic_work` once per period: across every receiver of a shared PostgreSQL
    database (procrastinate periodic tasks), or on this receiver's apscheduler (SQLite)."""
    from apscheduler.triggers.cron import CronTrigger

    work = periodic_work(settings, store, spool_root)
    if settings.shared_database:
        timers = ClusterTimers(
            settings.database_url,
            work,
            heartbeat_s=settings.cluster.heartbeat_s,
            stall_timeout_s=settings.cluster.stall_timeout_s,
        )
        timers.start()
        log.info("periodic work scheduled across the cluster", tasks=[w.name for w in work])
        return timers
    cluster = settings.cluster
    for each in work:
        if each.name == "mvi.retention":
            trigger: Any = "interval"
            options: dict[str, Any] = {
                "days": 1,
                "next_run_time": utcnow() + dt.timedelta(minutes=5),
            }
        elif each.name == "mvi.stalled_jobs":
            trigger, options = "interval", {"seconds": cluster.stall_timeout_s / 2}
        else:
            trigger, options = CronTrigger.from_crontab(each.cron, timezone=dt.UTC), {}
        job = scheduler.add_job(
            each.run, trigger=trigger, id=each.name, max_instances=1, coalesce=True, **options
        )
        if each.name == "mvi.safety_net":
            log.info(
                "re-query safety net scheduled",
                schedule=settings.requery.schedule,
                days=settings.requery.safety_net_days,
                next_run=str(job.next_run_time),
            )
    return None


def start_node(settings: Settings) -> Node:
    """Start every part of the node; returns when the AE listens."""
    # Bad TLS files must stop the start before anything else runs.
    tls = server_context(settings.security)
    data_dir = settings.node.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The spool and the database live here: the node's account alone, even if created by hand.
    data_dir.chmod(0o700)
    spool_root = data_dir / "spool"
    spool_root.mkdir(parents=True, exist_ok=True)
    # The embedded database is the node's own: serve brings it to head before the workers
    # start (they only check). Any other changes only with `mvi-node db upgrade`.
    store = Store(settings.database_url, schema="check" if settings.database.url else "upgrade")
    # Jobs a crash of this host left running. A shared database: only this host's (the other
    # hosts' workers may be alive; the stalled-job sweep looks after the dead ones).
    requeued = store.requeue_interrupted(
        host=socket.gethostname() if settings.shared_database else None
    )
    # This host's dispatcher before the restart is gone: its claims on outbox rows lapse now.
    store.release_deliveries(socket.gethostname())
    scheduler = BackgroundScheduler(timezone=dt.UTC)
    # A receiver leaves the jobs to `mvi-node worker` processes on other hosts.
    workers = WorkerPool(
        settings, store, 0 if settings.cluster.role == "receiver" else settings.pipeline.workers
    )
    assembler = Assembler(
        store,
        scheduler,
        settings.completion.quiet_seconds,
        settings.completion.max_receive_minutes * 60.0,
        on_queued=workers.jobs_queued.set,
    )
    scheduler.start()
    restored = assembler.restore()
    cluster = settings.cluster
    if settings.shared_database:
        # A shared database: studies another receiver left without a timer get completed here.
        scheduler.add_job(
            assembler.sweep,
            trigger="interval",
            seconds=max(settings.completion.quiet_seconds / 2, 0.5),
            id="completion-sweep",
            max_instances=1,
            coalesce=True,
        )
    timers = schedule_periodic(settings, store, spool_root, scheduler)
    workers.start()
    receiver = ReceiverState(
        settings=settings, store=store, spool_root=spool_root, on_instance=assembler.on_instance
    )
    dispatcher = Dispatcher(settings, store, wake=workers.results_recorded)
    dispatcher.start()
    stow = None
    if settings.dicomweb.enabled:
        from node.receive.stow import StowServer

        # Before the AE: once the DICOM port answers, every door of the node is open.
        stow = StowServer(receiver)
        stow.start()
    server = start_receiver(receiver, tls)
    # Instance rows a power loss took come back from their files (the first start after each
    # boot; SQLite only), beside the receiver, each under its instance's lock.
    recover_in_background(receiver, data_dir)
    receiving = None
    further = receive_process_count(settings) - 1
    if further > 0:
        # The listening socket itself goes to them: one port, bound once (processes.py).
        receiving = ReceivingProcesses(settings, server.socket, receiver, further)
        receiving.start()
    metrics_server = None
    if settings.metrics.port is not None:
        from node.serve.metrics import build_registry, health_checks, start_metrics_server

        checks = health_checks(receiver, server.socket, lambda: bool(scheduler.running))
        metrics_server = start_metrics_server(
            settings.metrics.host, settings.metrics.port, build_registry(receiver, store), checks
        )
    console = None
    if settings.web.enabled:
        console = Console(settings)
        console.start()
    log.info(
        "node started",
        data_dir=str(data_dir),
        jobs_requeued=requeued,
        timers_restored=restored,
        role=cluster.role,
        workers=workers.count,
        console=console_url(settings) if console is not None else None,
    )
    return Node(
        settings,
        store,
        scheduler,
        assembler,
        workers,
        receiver,
        server,
        dispatcher,
        metrics_server,
        timers,
        console,
        stow,
        receiving,
    )


def stop_node(node: Node) -> None:
    """Stop listening, stop the workers and timers, close the store."""
    node.server.shutdown()
    if node.receiving is not None:
        node.receiving.stop()
    if node.stow is not None:
        node.stow.stop()
    if node.metrics_server is not None:
        node.metrics_server.shutdown()
    if node.console is not None:
        node.console.stop()
    node.workers.stop()
    node.dispatcher.stop()
    if node.timers is not None:
        node.timers.stop()
    node.scheduler.shutdown(wait=False)
    node.store.close()
    log.info("node stopped", counters=dict(node.receiver.counters))


def serve(settings: Settings) -> None:
    """Run the node until SIGTERM or SIGINT."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    node = start_node(settings)
    # systemd (Type=notify): ready once the AE listens and the store is open; then a watchdog
    # ping at half the configured interval while the receiver and the scheduler are alive.
    sd_notify("READY=1\nSTATUS=listening")
    interval = watchdog_interval()
    try:
        while not stop.wait(interval or 1.0):
            workers_ok = node.workers.count == 0 or node.workers.alive() > 0
            timers_ok = node.timers is None or node.timers.alive()
            if interval and node.scheduler.running and workers_ok and timers_ok:
                sd_notify("WATCHDOG=1")
    finally:
        sd_notify("STOPPING=1")
        stop_node(node)


def sd_notify(message: str) -> bool:
    """Send a state line to systemd when it asked for them (``$NOTIFY_SOCKET``)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        log.warning("sd_notify failed", message=message.split("\n")[0])
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of systemd's ``WatchdogSec`` for this process, or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
