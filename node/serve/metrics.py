"""Prometheus ``/metrics`` and ``/healthz`` for the hospital's monitoring.

Jobs run in worker processes, so nothing here counts in memory what another process does: the
receiver's counters live in this process (it is the receiving process), and everything about
studies, jobs and the outbox is read from the store when Prometheus scrapes.

``/healthz`` answers 200 only when the AE listens, the store accepts a write transaction, free
disk is above ``node.free_disk_floor_mb``, the scheduler runs and the workers' last load of each
model succeeded; otherwise 503. Each check is reported as ``{"ok": bool, "detail": str}``.
Whether the AE listens is read from its own socket, never by connecting to the DICOM port:
every poll used to hold one of the node's association slots until the ACSE timeout, and 16
monitors polling locked PACS out. The answer is reused for
:data:`HEALTH_CACHE_S`. The server binds ``metrics.host`` (loopback by default): neither page asks
who is calling.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from node.analysis.result import Result
from node.core.logging import get_logger
from node.receive.receiver import ReceiverState
from node.receive.spool import free_megabytes
from node.store.database import STUDY_STATES, Store, store_writable, utcnow

log = get_logger("node.serve.metrics")

#: Job duration buckets in seconds (pairing takes well under a second; a full job tens of seconds).
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Finished jobs older than this do not feed the duration histogram (keeps scrapes cheap).
DURATION_WINDOW = dt.timedelta(days=7)


@dataclass(frozen=True)
class HealthCheck:
    """One named check of ``/healthz``: returns None when healthy, else what is wrong."""

    name: str
    check: Callable[[], str | None]


class NodeCollector:
    """Reads the receiver's counters and the store at scrape time."""

    def __init__(self, receiver: ReceiverState, store: Store) -> None:
        self.receiver = receiver
        self.store = store

    def collect(self) -> Iterator[Any]:
        """Metric families for one scrape (prometheus-client's collector protocol)."""
        with self.receiver.lock:
            counters = dict(self.receiver.counters)
        yield from self._receiver_metrics(counters)
        try:
            yield from self._store_metrics()
        except Exception:
            # A scrape must not fail because the database does; /healthz says what is wrong.
            log.exception("metrics: the store could not be read")

    def _receiver_metrics(self, counters: dict[str, int]) -> Iterator[Any]:
        associations = CounterMetricFamily(
            "mvi_associations",
            "DICOM associations by outcome and rejection reason",
            labels=["result", "reason"],
        )
        associations.add_metric(["accepted", ""], counters.get("associations_accepted", 0))
        failures = CounterMetricFamily(
            "mvi_store_failures", "C-STORE requests answered with a failure", labels=["status"]
        )
        for key, value in counters.items():
            if key.startswith("associations_rejected:"):
                associations.add_metric(["rejected", key.split(":", 1)[1]], value)
            elif key.startswith("store_failures:"):
                failures.add_metric([key.split(":", 1)[1]], value)
        yield associations
        yield failures
        simple = {
            "mvi_echoes": ("C-ECHO requests answered", "echoes"),
            "mvi_store_requests": ("C-STORE requests received", "store_requests"),
            "mvi_instances_received": ("instances stored (new or replaced)", "instances_received"),
            "mvi_instances_duplicate": (
                "identical instances received again",
                "instances_duplicate",
            ),
            "mvi_instances_not_analysed": (
                "instances stored but not analysed (not CT/SEG, or the node's own)",
                "instances_not_analysed",
            ),
            "mvi_received_bytes": ("bytes of instances stored", "bytes_received"),
        }
        for name, (documentation, key) in simple.items():
            yield CounterMetricFamily(name, documentation, value=counters.get(key, 0))

    def _store_metrics(self) -> Iterator[Any]:
        snapshot = self.store.snapshot(utcnow() - DURATION_WINDOW)
        by_state = snapshot.studies_by_state
        job_states = snapshot.jobs_by_state
        outbox_states = snapshot.outbox_by_state
        requeried = snapshot.retrospective_by_state
        oldest = snapshot.oldest_undelivered_at
        gauge = GaugeMetricFamily("mvi_studies", "studies by state", labels=["state"])
        for state in STUDY_STATES:
            gauge.add_metric([state], by_state.get(state, 0))
        yield gauge
        job_gauge = GaugeMetricFamily("mvi_jobs", "jobs by state", labels=["state"])
        for state, count in sorted(job_states.items()):
            job_gauge.add_metric([state], count)
        yield job_gauge
        yield _histogram(
            "mvi_job_duration_seconds",
            f"duration of jobs finished in the last {DURATION_WINDOW.days} days",
            snapshot.job_durations_s,
        )
        yield from _analysis_metrics(snapshot.recent_results)
        delivered = CounterMetricFamily(
            "mvi_results", "result objects by delivery state", labels=["state"]
        )
        for state, count in sorted(outbox_states.items()):
            delivered.add_metric([state], count)
        yield delivered
        pending = sum(n for state, n in outbox_states.items() if state not in {"sent", "failed"})
        yield GaugeMetricFamily("mvi_outbox_depth", "result objects waiting", value=pending)
        retro = GaugeMetricFamily(
            "mvi_retrospective_studies",
            "studies asked for by a re-query, by how far it got",
            labels=["state"],
        )
        for state in ("requested", "moved", "move_failed", "done"):
            retro.add_metric([state], requeried.get(state, 0))
        yield retro
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "mvi_outbox_oldest_age_seconds", "age of the oldest undelivered object", value=age
        )


def _analysis_metrics(recent: list[Result]) -> Iterator[Any]:
    """Stage durations, inference latency and device, GPU memory, from recent result rows."""
    stages: dict[str, list[float]] = {}
    devices: dict[str, int] = {}
    gpu_peak = 0
    for result in recent:
        for stage, seconds in result.timings_s.items():
            stages.setdefault(stage, []).append(seconds)
        ran_on = result.device
        kind = ran_on.type if ran_on is not None else "unknown"
        devices[kind] = devices.get(kind, 0) + 1
        if ran_on is not None:
            gpu_peak = max(gpu_peak, ran_on.gpu_memory_peak_bytes or 0)
    family = HistogramMetricFamily(
        "mvi_stage_duration_seconds",
        f"job stage durations of the last {DURATION_WINDOW.days} days",
        labels=["stage"],
    )
    for stage, values in sorted(stages.items()):
        buckets = [(str(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", len(values)))
        family.add_metric([stage], buckets, sum(values))
    yield family
    device_gauge = GaugeMetricFamily(
        "mvi_inference_device_jobs",
        f"analyses of the last {DURATION_WINDOW.days} days by the device the models ran on",
        labels=["device"],
    )
    for device, count in sorted(devices.items()):
        device_gauge.add_metric([device], count)
    yield device_gauge
    yield GaugeMetricFamily(
        "mvi_gpu_memory_peak_bytes",
        "peak GPU memory a worker allocated in a recent analysis (0 on CPU)",
        value=gpu_peak,
    )


def _histogram(name: str, documentation: str, values: list[float]) -> HistogramMetricFamily:
    buckets = []
    for bound in DURATION_BUCKETS:
        buckets.append((str(bound), sum(1 for v in values if v <= bound)))
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum(values))


#: Seconds a ``/healthz`` answer is reused: a monitor polling every second costs one round of
#: checks (a write transaction among them) every few seconds, not one per poll.
HEALTH_CACHE_S: float = 5.0


def listening(server_socket: socket.socket) -> str | None:
    """None when ``server_socket`` is a listening socket, else what it is not."""
    try:
        if server_socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
    except OSError as exc:
        return f"the DICOM port is closed: {exc.strerror or exc}"
    return "the DICOM port does not listen"


def health_checks(
    receiver: ReceiverState, server_socket: socket.socket, scheduler_running: Callable[[], bool]
) -> list[HealthCheck]:
    """The checks ``/healthz`` runs; ``server_socket`` is the DICOM listener's."""
    settings = receiver.settings

    def disk() -> str | None:
        free = free_megabytes(receiver.spool_root)
        floor = settings.node.free_disk_floor_mb
        return None if free >= floor else f"free disk {free:.0f} MB below the floor {floor} MB"

    def scheduler() -> str | None:
        return None if scheduler_running() else "the scheduler is not running"

    def models() -> str | None:
        from node.analysis.models import model_load_problem

        return model_load_problem(settings)

    return [
        HealthCheck("ae", lambda: listening(server_socket)),
        HealthCheck("store", lambda: store_writable(settings.database_url)),
        HealthCheck("disk", disk),
        HealthCheck("scheduler", scheduler),
        # The workers' last load of each model (a model folder removed under a running node).
        HealthCheck("models", models),
    ]


class CachedChecks:
    """:func:`run_checks` whose answer is reused for ``ttl_s`` seconds (thread-safe)."""

    def __init__(self, checks: list[HealthCheck], ttl_s: float = HEALTH_CACHE_S) -> None:
        self._checks = checks
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._results: dict[str, str | None] = {}

    def __call__(self) -> dict[str, str | None]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self._ttl_s:
                self._results = run_checks(self._checks)
                self._at = now
            return dict(self._results)


def run_checks(checks: list[HealthCheck]) -> dict[str, str | None]:
    """Run every check; an exception in a check counts as its failure."""
    results: dict[str, str | None] = {}
    for item in checks:
        try:
            results[item.name] = item.check()
        except Exception as exc:
            results[item.name] = f"{type(exc).__name__}: {exc}"
    return results


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry, checks: list[HealthCheck]
) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` from a daemon thread; returns the server."""
    health = CachedChecks(checks)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path.split("?")[0] == "/healthz":
                results = health()
                failing = {k: v for k, v in results.items() if v is not None}
                checks = {
                    name: {"ok": problem is None, "detail": problem or "ok"}
                    for name, problem in results.items()
                }
                body = {"status": "fail" if failing else "ok", "checks": checks}
                self._send(
                    503 if failing else 200,
                    json.dumps(body, indent=1).encode(),
                    "application/json",
                )
            else:
                self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every few seconds would flood the log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics listening", host=host, port=port)
    return server


def build_registry(receiver: ReceiverState, store: Store) -> CollectorRegistry:
    """A registry holding only the node's collector (no process/platform defaults)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(receiver, store))
    return registry
