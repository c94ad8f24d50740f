"""Specification of the receivers' periodic work: once per period across the cluster."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from node.core.settings import Settings
from node.serve.periodic import ClusterTimers, Periodic, seconds_cron
from node.serve.service import periodic_work
from node.store.database import Store


def test_seconds_and_minutes_become_cron() -> None:
    assert seconds_cron(3) == "* * * * * */3"
    assert seconds_cron(150) == "*/2 * * * *"
    assert seconds_cron(0.2) == "* * * * * */1"


def test_the_receivers_periodic_work(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"node": {"data_dir": str(tmp_path)}, "requery": {"schedule": "0 2 * * *"}}
    )
    work = periodic_work(settings, Store(settings.database_url), tmp_path / "spool")
    assert [(w.name, w.cron) for w in work] == [
        ("mvi.retention", "17 3 * * *"),
        ("mvi.stalled_jobs", "*/2 * * * *"),
        ("mvi.safety_net", "0 2 * * *"),
    ]


def test_two_receivers_run_each_tick_once(postgres_database: str) -> None:
    Store(postgres_database).close()  # the schema, procrastinate's included
    calls: list[str] = []
    lock = threading.Lock()

    def count() -> None:
        with lock:
            calls.append(threading.current_thread().name)

    receivers = [
        ClusterTimers(postgres_database, [Periodic("test.tick", "* * * * * */1", count)])
        for _ in range(2)
    ]
    for timers in receivers:
        timers.start()
    time.sleep(6.0)
    for timers in receivers:
        timers.stop()
    ticks = [tick for timers in receivers for name, tick in timers.ran if name == "test.tick"]
    assert len(ticks) >= 3, "a tick per second, whichever receiver ran it"
    assert len(ticks) == len(set(ticks)), f"a tick ran twice: {sorted(ticks)}"
    assert len(calls) == len(ticks)


def test_the_timers_come_back_after_the_database_link_was_cut(postgres_database: str) -> None:
    """procrastinate's worker ends by itself when its listener loses the database; the
    receiver's timers start it again, so the sweeps do not stop for good after an outage."""
    from sqlalchemy.engine import make_url

    from tests.netproxy import cuttable_proxy

    Store(postgres_database).close()
    database = make_url(postgres_database)
    with cuttable_proxy((database.host or "127.0.0.1", database.port or 5432)) as proxy:
        url = database.set(port=proxy.port).render_as_string(hide_password=False)
        timers = ClusterTimers(
            url, [Periodic("test.tick", "* * * * * */1", lambda: None)], heartbeat_s=1.0
        )
        timers.start()
        time.sleep(3.0)
        proxy.cut()
        time.sleep(5.0)
        proxy.restore()
        back = time.time()
        time.sleep(8.0)
        after = [tick for name, tick in timers.ran if name == "test.tick" and tick > back + 1]
        alive = timers.alive()
        timers.stop()
    assert alive, "the timers' thread ended"
    assert after, "no tick ran after the link came back"
