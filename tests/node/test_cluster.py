"""Specification of the cluster: one receiver, worker processes on a shared database and data
folder, and exactly one result set per study while workers are killed, frozen and cut off.

Real PostgreSQL (started by the test), real Orthanc (counting every C-STORE with a Lua hook),
real `mvi-node serve` and `mvi-node worker` processes, a real TCP link that is cut.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from node.core.settings import load_settings, to_toml
from node.deliver.outbox import list_outbox
from node.jobs.runner import results_folder
from node.store.database import JOB_FINAL_STATES, Store
from tests.netproxy import CuttableProxy, cuttable_proxy
from tests.node.cli.test_main import mvi_node
from tests.nodeproc import (
    NODE_AET,
    dcmtk_env,
    mvi_node_script,
    node_settings,
    start_node_process,
    storescu_command,
    wait_for,
)
from tests.orthanc import Orthanc, counting_orthanc, stores_from

STUDIES = 14
WORKERS = 3
#: Short, so that the faults below cost seconds: the sweep runs every half of it.
STALL_S = 6.0
MAX_ATTEMPTS = 4


def cluster_config(
    workdir: Path, data_dir: Path, url: str, pacs: Orthanc, role: str, port: int | None = None
) -> Path:
    """A host's configuration: one shared data folder and database, its own role."""
    settings = node_settings(
        data_dir,
        port,
        extra={
            "database": {"url": url},
            "cluster": {"role": role, "stall_timeout_s": STALL_S, "heartbeat_s": 1.0},
            "peers": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
            "results": {"destinations": ["pacs"]},
            "pipeline": {"max_attempts": MAX_ATTEMPTS},
            "outbox": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0},
        },
    )
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "node.toml"
    path.write_text(to_toml(settings))
    return path


@dataclass
class Worker:
    """One `mvi-node worker` process and what the test did to it."""

    config: Path
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        scratch = self.folder / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MVI_")}
        # Each host has its own scratch space; three workers share two cores.
        env |= {"TMPDIR": str(scratch), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.starts += 1
        log = (self.folder / f"worker-{self.starts}.log").open("ab")
        self.process = subprocess.Popen(
            [mvi_node_script(), "worker", "--config", str(self.config), "--device", "cpu"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Chaos:
    """The faults injected, for the summary line."""

    kills: int = 0
    stops: int = 0
    cuts: int = 0
    #: Whether worker 0 held a job when its link was cut (it may have none by then).
    cut_while_busy: bool = False
    log: list[str] = field(default_factory=list)


@contextmanager
def running_workers(configs: list[Path], root: Path) -> Iterator[list[Worker]]:
    workers = [Worker(config, root / f"host-{i}") for i, config in enumerate(configs)]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def finished(store: Store) -> int:
    """Studies whose newest job is final."""
    newest: dict[str, Any] = {}
    for job in store.list_jobs(limit=10_000):
        newest.setdefault(job.study_uid, job)
    return sum(1 for job in newest.values() if job.state in JOB_FINAL_STATES)


def busy_worker(store: Store, workers: list[Worker], choices: list[int]) -> Worker | None:
    """One of ``choices`` that holds a running job now."""
    running = {job.worker for job in store.list_jobs(states=["running"])}
    for index in choices:
        worker = workers[index]
        if worker.process is not None and any(
            name is not None and name.endswith(f":{worker.pid}") for name in running
        ):
            return worker
    return None


def when(store: Store, done: int, condition: Callable[[], Any]) -> Any:
    """Wait until ``done`` studies are finished and ``condition`` holds (then its value)."""
    wait_for(lambda: finished(store) >= done, timeout=240, every=0.3)
    return wait_for(condition, timeout=120, every=0.1)


def test_one_result_per_study_while_workers_die_freeze_and_lose_the_database(
    tmp_path: Path, cohort_factory: Callable[..., Path], postgres_database: str
) -> None:
    cohort = cohort_factory(studies=STUDIES, seed=131, size=64, slices=16, seg=True)
    rng = random.Random(131)
    chaos = Chaos()
    data_dir = tmp_path / "shared-data"  # NFS in a real cluster: the same path on every host
    database = make_url(postgres_database)
    with ExitStack() as stack:
        pacs, received = stack.enter_context(counting_orthanc(tmp_path / "orthanc"))
        proxy: CuttableProxy = stack.enter_context(
            cuttable_proxy((database.host or "127.0.0.1", database.port or 5432))
        )
        receiver_config = cluster_config(
            tmp_path / "receiver", data_dir, postgres_database, pacs, "receiver"
        )
        upgraded = mvi_node("db", "upgrade", "--config", receiver_config)
        assert upgraded.returncode == 0, upgraded.stderr
        # Worker 0 reaches the database through a link the test cuts.
        urls = [database.set(port=proxy.port).render_as_string(hide_password=False)]
        urls += [postgres_database] * (WORKERS - 1)
        configs = [
            cluster_config(tmp_path / f"worker-{i}", data_dir, url, pacs, "worker")
            for i, url in enumerate(urls)
        ]
        receiver = start_node_process(receiver_config, tmp_path / "receiver" / "node.log")
        stack.callback(receiver.stop)
        workers = stack.enter_context(running_workers(configs, tmp_path))
        store = Store(postgres_database, schema="check")
        stack.callback(store.close)

        sent = subprocess.run(
            storescu_command(receiver.port, cohort),
            capture_output=True,
            env=dcmtk_env(),
            timeout=300,
        )
        assert sent.returncode == 0, sent.stderr.decode(errors="replace")[-2000:]

        # kill -9 of a worker in the middle of a job; systemd would start it again.
        victim = when(store, 2, lambda: busy_worker(store, workers, rng.sample([1, 2], 2)))
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        victim.start()
        chaos.kills += 1
        # SIGSTOP of a worker holding a job, for twice the stall timeout.
        frozen = when(store, 4, lambda: busy_worker(store, workers, rng.sample([1, 2], 2)))
        frozen.process.send_signal(signal.SIGSTOP)
        time.sleep(2 * STALL_S)
        frozen.process.send_signal(signal.SIGCONT)
        chaos.stops += 1
        # Worker 0 loses the database for twice the stall timeout, holding a job if it can.
        holder = when(
            store, 6, lambda: busy_worker(store, workers, [0]) or finished(store) >= STUDIES - 1
        )
        chaos.cut_while_busy = isinstance(holder, Worker)
        proxy.cut()
        time.sleep(2 * STALL_S)
        proxy.restore()
        chaos.cuts += 1

        studies = {job.study_uid for job in store.list_jobs(limit=10_000)}
        assert len(studies) == STUDIES
        wait_for(lambda: finished(store) == STUDIES, timeout=300, every=0.5)
        wait_for(
            lambda: all(
                i.state == "sent" for i in list_outbox(store, include_sent=True, limit=10_000)
            ),
            timeout=120,
            every=0.5,
        )
        time.sleep(1.0)  # a duplicate in flight would land now

        settings = load_settings(receiver_config)
        jobs = store.list_jobs(limit=10_000)
        assert not [j for j in jobs if j.state in ("running", "queued")], "nothing left running"
        assert max(j.attempts for j in jobs) <= MAX_ATTEMPTS
        results = store.list_results()
        per_job = Counter(r.job_id for r in results)
        assert all(count == 1 for count in per_job.values()), per_job
        newest = {}
        for job in jobs:
            newest.setdefault(job.study_uid, job)
        by_job = {r.job_id: r for r in results}
        for study_uid, job in newest.items():
            assert job.id in by_job, f"study {study_uid[-8:]}: its newest job has no result"
        outbox = list_outbox(store, include_sent=True, limit=10_000)
        for item in outbox:
            result = by_job[item.job_id]
            winner = results_folder(settings, result.study_uid, result.job_id, result.attempt)
            assert Path(item.path).parent == winner, "an outbox row points at a losing attempt"
            assert Path(item.path).is_file()
        delivered = stores_from(received, NODE_AET)
        duplicates = [uid for uid, n in Counter(delivered).items() if n > 1]
        assert duplicates == []
        assert sorted(delivered) == sorted(i.sop_instance_uid for i in outbox)
        leases = sum(j.lease for j in jobs)
        print(
            f"\nchaos: {STUDIES} studies, {len(jobs)} jobs, {len(results)} results, "
            f"{len(delivered)} instances delivered, duplicates {len(duplicates)}; "
            f"faults: kill -9 {chaos.kills}, SIGSTOP {chaos.stops}, database cut {chaos.cuts} "
            f"(holding a job: {chaos.cut_while_busy}); "
            f"claims {leases} (leases beyond the first: {leases - len(jobs)})"
        )


def test_each_role_runs_only_its_own_command(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"node": {"data_dir": str(tmp_path / "data")}}))
    refused = mvi_node("worker", "--config", config)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("mvi-node: mvi-node worker shares jobs through")
    url = "postgresql+psycopg://mvi@127.0.0.1:9/mvi"
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(tmp_path / "data")},
                "database": {"url": url},
                "cluster": {"role": "worker"},
            }
        )
    )
    refused = mvi_node("serve", "--config", config)
    assert refused.returncode == 2
    assert "this host runs `mvi-node worker` processes, not serve" in refused.stderr
    assert not (tmp_path / "data").exists()
