"""Cluster throughput: 1 → 2 → 4 worker processes on one shared PostgreSQL database.

Two workloads, each timed from queuing the jobs (every worker process listening) to the moment
the last job is finished:

- **stub**: ``--jobs`` jobs whose stage sleeps ``--stub-seconds`` (a CPU-light stand-in for a GPU
  batch or a network wait) run through `mvi-node worker`'s loop
  (:func:`node.jobs.queue.serve_jobs`: procrastinate wake-ups, claims with ``SKIP LOCKED``,
  leases, heartbeats, fenced finish). Goals: wall(2) ≤ 0.6 × wall(1), wall(4) ≤ 0.4 × wall(1).
- **real**: ``--real`` phantom studies through the whole pipeline with the demo models (built by
  `mvi-node demo`), 1 and 2 worker processes on the CPU (each with half the cores' threads for 2)
  and, on a host with CUDA, 1 and 2 processes on the GPU; "not measured" otherwise.

PostgreSQL runs from Debian's binaries in a temporary folder (tests/postgres.py), a fresh
database per run. Prints one table; nothing is asserted.

Usage: python bench/cluster.py [--jobs 32] [--stub-seconds 0.5] [--real 6]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.core.logging import configure_logging
from node.core.settings import Settings
from node.jobs.runner import JobOutcome
from node.store.database import JOB_FINAL_STATES, Job, Store


def _settings(url: str, data_dir: Path, device: str) -> dict[str, Any]:
    from node.analysis.models import demo_fusion_dir, demo_segmenter_dir

    return {
        "node": {"data_dir": str(data_dir), "log_level": "warning"},
        "database": {"url": url},
        "cluster": {"role": "worker", "heartbeat_s": 1.0, "stall_timeout_s": 60.0},
        "pipeline": {
            "device": device,
            "segmenter_dir": str(demo_segmenter_dir()),
            "model_dir": str(demo_fusion_dir()),
            "load_models_at_start": True,  # loaded before the clock starts
        },
        "gates": {"enabled": False},
    }


def _stub(seconds: float) -> Callable[[Sequence[Job]], list[JobOutcome | Exception]]:
    def run(jobs: Sequence[Job]) -> list[JobOutcome | Exception]:
        time.sleep(seconds * len(jobs))
        return [JobOutcome("done") for _ in jobs]

    return run


def _worker(data: dict[str, Any], stub_s: float | None) -> None:
    """One `mvi-node worker` process: procrastinate's worker over the node's job rows."""
    from node.jobs.queue import serve_jobs

    configure_logging("warning")
    settings = Settings.model_validate(data)
    store = Store(settings.database_url, schema="check")
    run_batch = _stub(stub_s) if stub_s is not None else None
    serve_jobs(store, settings, settings.pipeline.device, run_batch)
    store.close()


def _finished(store: Store) -> int:
    return sum(1 for job in store.list_jobs(limit=100_000) if job.state in JOB_FINAL_STATES)


def _listening(url: str) -> int:
    """Workers procrastinate has registered (each registers once it listens)."""
    import psycopg

    from node.store.queue import conninfo

    with psycopg.connect(conninfo(url)) as conn:
        row = conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
    return int(row[0]) if row else 0


def timed_run(
    url: str,
    data_dir: Path,
    workers: int,
    queue: Callable[[Store], int],
    stub_s: float | None,
    device: str,
) -> float:
    """Seconds from queuing the jobs (every worker listening) to the last finished job."""
    context = multiprocessing.get_context("spawn")
    data = _settings(url, data_dir, device)
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned workers
    processes = [context.Process(target=_worker, args=(data, stub_s)) for _ in range(workers)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + 300
    while _listening(url) < workers and time.monotonic() < deadline:
        time.sleep(0.2)
    store = Store(url, schema="check")
    started = time.perf_counter()
    jobs = queue(store)  # each queued job wakes a worker (NOTIFY at commit)
    while _finished(store) < jobs:
        time.sleep(0.05)
    wall = time.perf_counter() - started
    for process in processes:
        process.terminate()  # SIGTERM: procrastinate stops after the job in hand
    for process in processes:
        process.join(60)
    store.close()
    return wall


def _queue_stub_jobs(store: Store, count: int) -> int:
    from node.store.database import InstanceRecord

    for index in range(count):
        uid = f"1.2.826.0.1.3680043.8.498.99.{index + 1}"
        store.record_instance(
            InstanceRecord(
                study_uid=uid,
                series_uid=f"{uid}.1",
                sop_instance_uid=f"{uid}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"{uid}.dcm",
                size=0,
                sha256=f"{index:064x}",
                calling_ae="BENCH",
                modality="CT",
                analysable=True,
            )
        )
        store.complete_study(uid)
    return count


def _record_real_studies(store: Store, spool: Path, count: int) -> list[str]:
    from node.offline.phantom_study import CohortOptions, write_cohort
    from node.receive.receiver import record_spooled_file

    if not spool.exists():
        write_cohort(spool, CohortOptions(studies=count, seed=171, size=128, slices=32))
    uids = []
    for folder in sorted(spool.glob("study_*")):
        for path in sorted(folder.rglob("*.dcm")):
            uid = record_spooled_file(store, spool, path, "BENCH")
        uids.append(uid)
    return uids


def _complete(uids: list[str]) -> Callable[[Store], int]:
    def queue(store: Store) -> int:
        for uid in uids:
            store.complete_study(uid)
        return len(uids)

    return queue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--stub-seconds", type=float, default=0.5)
    parser.add_argument("--real", type=int, default=6, help="phantom studies (0: skip)")
    args = parser.parse_args()
    configure_logging("warning")
    from tests.postgres import running_postgres

    rows: list[tuple[str, str, int, float | None]] = []
    with running_postgres() as server, tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for workers in (1, 2, 4):
            url = server.create_database(f"stub_{workers}")
            Store(url, schema="upgrade").close()
            wall = timed_run(
                url,
                root / "stub",
                workers,
                lambda store: _queue_stub_jobs(store, args.jobs),
                args.stub_seconds,
                "cpu",
            )
            rows.append(("stub", "cpu", workers, wall))
            print(f"stub, {workers} worker(s): {wall:.2f} s", flush=True)
        if args.real:
            import torch

            devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
            for device in devices:
                for workers in (1, 2):
                    url = server.create_database(f"real_{device}_{workers}")
                    store = Store(url, schema="upgrade")
                    uids = _record_real_studies(store, root / "real" / "spool", args.real)
                    store.close()
                    wall = timed_run(url, root / "real", workers, _complete(uids), None, device)
                    rows.append(("real", device, workers, wall))
                    print(f"real on {device}, {workers} worker(s): {wall:.2f} s", flush=True)
            if "cuda" not in devices:
                rows += [("real", "cuda", 1, None), ("real", "cuda", 2, None)]

    print("\n| workload | device | workers | wall s | wall / wall(1) |")
    print("|---|---|---|---|---|")
    base: dict[tuple[str, str], float] = {}
    for workload, device, workers, wall in rows:
        if wall is None:
            print(f"| {workload} | {device} | {workers} | not measured (no CUDA) | |")
            continue
        base.setdefault((workload, device), wall)
        ratio = wall / base[(workload, device)]
        print(f"| {workload} | {device} | {workers} | {wall:.2f} | {ratio:.2f} |")
    stub = {w: wall for kind, _, w, wall in rows if kind == "stub" and wall is not None}
    print(
        f"\nstub goals: wall(2)/wall(1) = {stub[2] / stub[1]:.2f} (goal ≤ 0.60), "
        f"wall(4)/wall(1) = {stub[4] / stub[1]:.2f} (goal ≤ 0.40)"
    )


if __name__ == "__main__":
    main()
