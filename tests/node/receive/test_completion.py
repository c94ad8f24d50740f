"""Specification of study completion: quiet timers that survive a restart of the node."""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.nodeproc import (
    dcmtk_env,
    running_node,
    start_node_process,
    storescu_command,
    wait_for,
)


def test_a_study_completes_only_after_the_quiet_period(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=51, size=48, slices=16)
    with (cohort / "truth.csv").open() as handle:
        row = next(csv.DictReader(handle))
    study = cohort / row["study_folder"]
    series_dirs = sorted(p for p in study.iterdir() if p.is_dir())

    def send(folder: Path, port: int) -> None:
        subprocess.run(
            storescu_command(port, folder),
            env=dcmtk_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )

    with running_node(tmp_path, {"completion": {"quiet_seconds": 4.0}}) as node:
        store = node.store()
        # Series arrive with pauses shorter than the quiet period: the study stays receiving.
        for folder in series_dirs:
            send(folder, node.port)
            time.sleep(1.0)
            assert store.study(row["study_instance_uid"]).state == "receiving"  # type: ignore[union-attr]
        # The node dies before the timer fires; on restart the timer is restored from the store.
        node.kill()
        restarted = start_node_process(node.config_path, node.log_path)
        try:
            final = wait_for(
                lambda: (s := store.study(row["study_instance_uid"])) and s.state == "done" and s,
                timeout=60,
            )
            assert final.pairing["arterial"] == row["arterial_series_uid"]
            assert '"timers_restored": 1' in restarted.log()
            assert len(store.list_jobs()) == 1
        finally:
            restarted.stop()
            store.close()


def test_a_study_that_never_falls_quiet_is_complete_when_its_window_ends(tmp_path: Path) -> None:
    """One slice every 0.2 s against a 0.5 s quiet period: the study would stay receiving for
    ever; the receive window (here 2 s) ends it with what has arrived."""
    import datetime as dt

    from apscheduler.schedulers.background import BackgroundScheduler

    from node.receive.completion import Assembler
    from node.store.database import Store
    from tests.node.store.test_database import record

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    scheduler = BackgroundScheduler(timezone=dt.UTC)
    scheduler.start()
    assembler = Assembler(store, scheduler, quiet_seconds=0.5, max_receive_s=2.0)
    try:
        for index in range(50):  # up to 10 s of trickle
            study = store.study("1.2.3")
            if study is not None and study.state != "receiving":
                break
            store.record_instance(record(sop=f"1.2.3.1.{index + 1}", path=f"aa/{index}.dcm"))
            assembler.on_instance("1.2.3", own_output=False)
            time.sleep(0.2)
        assert study is not None and study.state == "queued", "the window ends the trickle"
        assert len(store.list_jobs()) == 1
        # Completed although it never fell quiet: the last instance came less than the quiet
        # period before.
        assert study.completed_at is not None and study.last_received_at is not None
        assert study.completed_at - study.last_received_at < dt.timedelta(seconds=0.5)
        assert 5 < index < 49
    finally:
        scheduler.shutdown(wait=False)
        store.close()


def test_a_receiver_completes_a_study_another_receiver_left_behind(postgres_database: str) -> None:
    """Receiver A stored a study and died before its timer fired; receiver B's sweep completes
    it once it is quiet by the database's clock, and a second sweep queues nothing more."""
    import datetime as dt

    from apscheduler.schedulers.background import BackgroundScheduler

    from node.receive.completion import Assembler
    from node.store.database import Store
    from tests.node.store.test_database import record

    gone, survivor = Store(postgres_database), Store(postgres_database)
    scheduler = BackgroundScheduler(timezone=dt.UTC)
    try:
        gone.record_instance(record())  # receiver A's instance; A's timer dies with A
        assembler = Assembler(survivor, scheduler, quiet_seconds=0.5, max_receive_s=60.0)
        assert assembler.sweep() == 0, "not quiet yet"
        time.sleep(0.6)
        assert assembler.sweep() == 1
        assert assembler.sweep() == 0
        study = survivor.study("1.2.3")
        assert study is not None and study.state == "queued"
        assert len(survivor.list_jobs()) == 1
    finally:
        gone.close()
        survivor.close()


def test_a_queued_job_is_announced_once(tmp_path: Path) -> None:
    """The completion timer and the sweep tell the worker pool when they queued a job
    (``on_queued``, the pool's wake-up): once per job."""
    import datetime as dt

    from apscheduler.schedulers.background import BackgroundScheduler

    from node.receive.completion import Assembler
    from node.store.database import Store
    from tests.node.store.test_database import record

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    scheduler = BackgroundScheduler(timezone=dt.UTC)
    scheduler.start()
    announced: list[int] = []
    assembler = Assembler(
        store, scheduler, quiet_seconds=0.3, on_queued=lambda: announced.append(1)
    )
    try:
        store.record_instance(record(sop="1.2.3.1.1", path="aa/1.dcm"))
        assembler.on_instance("1.2.3", own_output=False)
        assembler.on_instance("1.2.3", own_output=True)  # our own output: no timer
        wait_for(lambda: announced, timeout=30)
        assert len(store.list_jobs()) == 1
        time.sleep(1.0)  # a second announcement would have come by now
        assert announced == [1]
        # A study another receiver left without a timer: the sweep queues and announces it;
        # once queued it is not complete again, and nothing more is announced.
        store.record_instance(record(study="1.2.4", series="1.2.4.1", sop="1.2.4.1.1"))
        time.sleep(0.5)  # quiet by the database's clock
        assert assembler.sweep() == 1 and announced == [1, 1]
        assert assembler.sweep() == 0 and announced == [1, 1]
    finally:
        scheduler.shutdown(wait=False)
        store.close()
