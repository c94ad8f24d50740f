"""Specification of the store: instance rows, study states, the job queue and its recovery."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import sqlite3
import threading
from pathlib import Path

import pytest

from dicom_sr.enum import Status
from node.analysis.result import Result
from node.store.database import (
    PRIORITY_RETROSPECTIVE,
    SCHEMA_VERSION,
    Delivery,
    InstanceRecord,
    LeaseLost,
    SchemaError,
    Store,
    Study,
    utcnow,
    worker_identity,
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'db' / 'node.sqlite3'}")


def study_of(store: Store, study_uid: str = "1.2.3") -> Study:
    row = store.study(study_uid)
    assert row is not None, f"no study {study_uid}"
    return row


def backdate(store: Store, table: str, column: str, when: dt.datetime, where: str = "1") -> None:
    """Set a time column directly in the SQLite file, as a clock that ran earlier would have.

    The text is the UTC wall time the store writes (see node.store.schema.UTCDateTime).
    """
    text = when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    connection = sqlite3.connect(store.url.removeprefix("sqlite:///"))
    with connection:
        connection.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (text,))
    connection.close()


def record(
    study: str = "1.2.3", series: str = "1.2.3.1", sop: str = "1.2.3.1.1", **kw: object
) -> InstanceRecord:
    values: dict[str, object] = {
        "study_uid": study,
        "series_uid": series,
        "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "path": f"aa/{sop}.dcm",
        "size": 10,
        "sha256": "0" * 64,
        "calling_ae": "SCU",
        "modality": "CT",
        "analysable": True,
    }
    values.update(kw)
    return InstanceRecord(**values)  # type: ignore[arg-type]


def test_sqlite_runs_in_wal_mode_with_a_schema_version(tmp_path: Path, store: Store) -> None:
    connection = sqlite3.connect(tmp_path / "db" / "node.sqlite3")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # Higher than the release before migrations knows: that release refuses this database.
    assert connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] > (
        SCHEMA_VERSION
    )
    connection.close()


def test_a_newer_schema_is_refused(tmp_path: Path, store: Store) -> None:
    connection = sqlite3.connect(tmp_path / "db" / "node.sqlite3")
    with connection:
        connection.execute("UPDATE alembic_version SET version_num = 'ffff_from_a_newer_node'")
    connection.close()
    for mode in ("check", "create", "upgrade"):
        with pytest.raises(SchemaError, match="revision ffff_from_a_newer_node, newer than"):
            Store(store.url, schema=mode)  # type: ignore[arg-type]


def test_instances_count_once_and_replacements_are_reported(store: Store) -> None:
    assert store.record_instance(record()).outcome == "new"
    assert store.record_instance(record(sop="1.2.3.1.2")).outcome == "new"
    replaced = store.record_instance(record(sha256="1" * 64, path="aa/new.dcm"))
    # The caller deletes the previous file once this has committed, never before.
    assert (replaced.outcome, replaced.previous_path) == ("replaced", "aa/1.2.3.1.1.dcm")
    study = study_of(store)
    assert study.instance_count == 2
    assert study.state == "receiving"
    assert store.instance_sha256("1.2.3", "1.2.3.1", "1.2.3.1.1") == "1" * 64
    assert {f.path for f in store.instance_files("1.2.3")} == {"aa/new.dcm", "aa/1.2.3.1.2.dcm"}


def test_an_identical_resend_changes_nothing(store: Store) -> None:
    store.record_instance(record())
    store.complete_study("1.2.3")
    again = store.record_instance(record(path="aa/other-name.dcm"))
    assert (again.outcome, again.previous_path) == ("identical", "aa/1.2.3.1.1.dcm")
    study = study_of(store)
    assert study.state == "queued" and study.instance_count == 1
    assert [f.path for f in store.instance_files("1.2.3")] == ["aa/1.2.3.1.1.dcm"]


def test_a_reused_sop_instance_uid_never_moves_another_studys_instance(store: Store) -> None:
    for index in range(3):
        store.record_instance(record(sop=f"1.2.3.1.{index + 1}"))
    # Another study's dataset that carries one of those SOP Instance UIDs.
    reused = store.record_instance(
        record(study="7.7", series="7.7.1", sop="1.2.3.1.2", sha256="7" * 64, path="bb/x.dcm")
    )
    assert (reused.outcome, reused.also_in_studies) == ("new", 1)
    assert study_of(store, "1.2.3").instance_count == 3
    victim = store.instance_files("1.2.3")
    assert [(f.sop_instance_uid, f.path) for f in victim] == [
        (f"1.2.3.1.{n}", f"aa/1.2.3.1.{n}.dcm") for n in (1, 2, 3)
    ]
    assert [f.path for f in store.instance_files("7.7")] == ["bb/x.dcm"]
    assert store.instance_sha256("1.2.3", "1.2.3.1", "1.2.3.1.2") == "0" * 64


def _first_instances_at_once(stores: list[Store], senders: int) -> list[str]:
    """``senders`` threads record the first instances of one new study at the same moment."""
    barrier = threading.Barrier(senders)

    def send(index: int) -> str:
        barrier.wait()
        recorded = stores[index % len(stores)].record_instance(
            record(sop=f"1.2.3.1.{index + 1}", path=f"aa/{index}.dcm")
        )
        return str(recorded.outcome)

    with concurrent.futures.ThreadPoolExecutor(senders) as pool:
        return list(pool.map(send, range(senders)))


def test_parallel_first_instances_of_a_new_study_all_commit(store: Store) -> None:
    # Check-then-insert lost this race: 5 of 18 C-STOREs failed on the unique constraint.
    for attempt in range(3):
        fresh = Store(store.url.replace("node.sqlite3", f"race{attempt}.sqlite3"))
        try:
            assert _first_instances_at_once([fresh], 12) == ["new"] * 12
            assert study_of(fresh).instance_count == 12
            assert len(fresh.instance_files("1.2.3")) == 12
        finally:
            fresh.close()


def test_two_receivers_on_postgresql_create_a_new_study_once(postgres_database: str) -> None:
    receivers = [Store(postgres_database), Store(postgres_database)]
    try:
        assert _first_instances_at_once(receivers, 16) == ["new"] * 16
        study = study_of(receivers[0])
        assert study.instance_count == 16 and study.state == "receiving"
        assert len(receivers[1].instance_files("1.2.3")) == 16
        # And the same instance from both at once is one row: one new, one identical.
        both = sorted(str(r.record_instance(record(sop="1.2.3.1.99")).outcome) for r in receivers)
        assert both == ["identical", "new"]
    finally:
        for receiver in receivers:
            receiver.close()


def test_completion_queues_one_job_and_claims_it_once(store: Store) -> None:
    store.record_instance(record())
    job_id = store.complete_study("1.2.3")
    assert job_id is not None
    assert study_of(store, "1.2.3").state == "queued"
    assert store.complete_study("1.2.3") is None, "a complete study is not completed twice"
    job = store.claim_job(worker_pid=1234)
    assert job is not None and job.id == job_id and job.attempts == 1
    assert store.claim_job() is None
    assert study_of(store, "1.2.3").state == "running"
    store.finish_job(job.id, "done", pairing={"arterial": "a", "portal_venous": "p"})
    row = study_of(store)
    assert row.state == "done" and row.pairing is not None and row.pairing["arterial"] == "a"


def test_a_late_instance_reopens_the_study_and_the_new_job_supersedes(store: Store) -> None:
    store.record_instance(record())
    first = store.complete_study("1.2.3")
    store.record_instance(record(sop="1.2.3.1.9"))
    assert study_of(store, "1.2.3").state == "receiving"
    second = store.complete_study("1.2.3")
    jobs = {j.id: j for j in store.list_jobs()}
    assert first is not None and second is not None
    assert jobs[first].state == "superseded"
    assert jobs[second].state == "queued"
    assert jobs[second].supersedes == first


def test_a_running_job_that_was_superseded_does_not_overwrite_the_study(store: Store) -> None:
    store.record_instance(record())
    store.complete_study("1.2.3")
    running = store.claim_job()
    assert running is not None
    store.record_instance(record(sop="1.2.3.1.9"))  # late instance while the job runs
    store.finish_job(running.id, "done")
    assert study_of(store, "1.2.3").state == "receiving"


def test_a_timer_that_fires_late_does_not_complete_a_busy_study(store: Store) -> None:
    store.record_instance(record())
    assert store.complete_study("1.2.3", quiet_for_s=10.0) is None
    assert study_of(store, "1.2.3").state == "receiving"


def test_live_studies_run_before_retrospective_ones(store: Store) -> None:
    store.record_instance(record(study="9.9", series="9.9.1", sop="9.9.1.1"))
    store.mark_retrospective("9.9")  # a re-query asked for it: its job waits for live ones
    assert study_of(store, "9.9").priority == PRIORITY_RETROSPECTIVE
    store.complete_study("9.9")
    store.record_instance(record())
    store.complete_study("1.2.3")
    first = store.claim_job()
    assert first is not None and first.study_uid == "1.2.3"


def test_batch_mates_are_claimed_at_the_first_jobs_priority(store: Store) -> None:
    store.record_instance(record(study="9.9", series="9.9.1", sop="9.9.1.1"))
    store.reprocess("9.9", priority=PRIORITY_RETROSPECTIVE)
    store.record_instance(record())
    store.complete_study("1.2.3")
    first = store.claim_job()
    assert first is not None and first.study_uid == "1.2.3"
    # A live job's batch takes no retrospective job along; the next claim gets it.
    assert store.claim_job(priority=first.priority) is None
    later = store.claim_job()
    assert later is not None and later.study_uid == "9.9"


def test_jobs_left_running_by_a_crash_are_requeued(store: Store) -> None:
    store.record_instance(record())
    store.complete_study("1.2.3")
    assert store.claim_job(worker_pid=4321) is not None
    assert store.requeue_interrupted() == 1
    again = store.claim_job()
    assert again is not None and again.attempts == 2


def test_a_dead_workers_job_is_retried_then_failed(store: Store) -> None:
    store.record_instance(record())
    store.complete_study("1.2.3")
    store.claim_job(worker_pid=11)
    assert store.recover_worker_jobs(worker_identity(11), max_attempts=2) != []
    assert store.claim_job(worker_pid=12) is not None
    store.recover_worker_jobs(worker_identity(12), max_attempts=2)
    study = study_of(store)
    assert study.state == "failed"
    assert "worker process died" in (study.reason or "")


def test_a_dead_pid_on_one_host_leaves_the_same_pid_on_another_alone(store: Store) -> None:
    store.record_instance(record())
    store.complete_study("1.2.3")
    job = store.claim_job(worker_pid=11, worker="gpu-b:11")
    assert job is not None and job.worker == "gpu-b:11"
    assert store.recover_worker_jobs("gpu-a:11", max_attempts=3) == []
    assert store.requeue_interrupted(host="gpu-a") == 0, "another host's job is not ours"
    assert store.list_jobs()[0].state == "running"
    assert store.requeue_interrupted(host="gpu-b") == 1


def test_each_claim_takes_a_new_lease(store: Store) -> None:
    store.record_instance(record())
    store.complete_study("1.2.3")
    first = store.claim_job()
    assert first is not None and first.lease == 1 and first.heartbeat_at is not None
    store.finish_job(first.id, "queued", lease=first.lease)
    assert store.claim_job(job_id=first.id + 1) is None, "no such job"
    second = store.claim_job(job_id=first.id)
    assert second is not None and second.id == first.id and second.lease == 2
    # A wake-up naming a job that is no longer queued claims nothing.
    assert store.claim_job(job_id=first.id) is None


def lease_fencing(store: Store) -> None:
    """A takeover without timing: attempt 1 is released as stalled, attempt 2 claims the job;
    attempt 1, waking up, can record nothing; attempt 2 can."""
    store.record_instance(record())
    store.complete_study("1.2.3")
    first = store.claim_job(worker="host-a:1")
    assert first is not None
    assert store.requeue_stalled(0.0, max_attempts=3) == [first.id]  # silent "for 0 s"
    second = store.claim_job(worker="host-b:1")
    assert second is not None and second.id == first.id and second.lease == first.lease + 1
    result = Result(study_instance_uid="1.2.3", status=Status.SCORED)
    refused = f"job {first.id} attempt {first.lease} lost its lease"
    with pytest.raises(LeaseLost, match=refused), store.begin() as tx:
        store.hold_lease(first.id, first.lease, tx)
        store.record_result(first.id, "1.2.3", result, tx, attempt=first.lease)
    assert store.job_result(first.id) is None, "the refused attempt's row was rolled back"
    with pytest.raises(LeaseLost):
        store.finish_job(first.id, "done", lease=first.lease)
    assert store.heartbeat([(first.id, first.lease)]) == [first.id]
    assert store.heartbeat([(second.id, second.lease)]) == []
    with store.begin() as tx:
        store.hold_lease(second.id, second.lease, tx)
        store.record_result(second.id, "1.2.3", result, tx, attempt=second.lease)
    store.finish_job(second.id, "done", lease=second.lease)
    recorded = store.job_result(second.id)
    assert recorded is not None and recorded.attempt == second.lease
    (job,) = store.list_jobs()
    assert (job.state, job.lease, job.worker) == ("done", 2, "host-b:1")
    assert study_of(store).state == "done"


def test_a_lost_lease_refuses_the_attempts_writes(store: Store) -> None:
    lease_fencing(store)


def test_a_lost_lease_refuses_the_attempts_writes_on_postgresql(postgres_database: str) -> None:
    store = Store(postgres_database)
    try:
        lease_fencing(store)
    finally:
        store.close()


def test_the_stalled_sweep_spares_beating_workers_and_counts_attempts(store: Store) -> None:
    store.record_instance(record())
    store.complete_study("1.2.3")
    job = store.claim_job()
    assert job is not None
    old = utcnow() - dt.timedelta(seconds=600)
    backdate(store, "jobs", "heartbeat_at", old)
    backdate(store, "jobs", "started_at", old)
    assert store.heartbeat([(job.id, job.lease)]) == []  # the worker's thread beats
    assert store.requeue_stalled(300.0, max_attempts=2) == []
    backdate(store, "jobs", "heartbeat_at", old)
    assert store.requeue_stalled(300.0, max_attempts=2) == [job.id]
    again = store.claim_job()
    assert again is not None and again.attempts == 2
    backdate(store, "jobs", "heartbeat_at", old)
    # A study that stalls every worker it meets is not retried forever.
    assert store.requeue_stalled(300.0, max_attempts=2) == [job.id]
    assert store.claim_job() is None
    study = study_of(store)
    assert study.state == "failed" and "stopped answering" in (study.reason or "")


def test_cancel_only_queued_jobs(store: Store) -> None:
    store.record_instance(record())
    job_id = store.complete_study("1.2.3")
    assert job_id is not None
    assert store.cancel_job(job_id)
    assert not store.cancel_job(job_id)
    assert store.claim_job() is None


def test_own_outputs_never_reopen_and_never_make_a_study(store: Store) -> None:
    store.record_instance(record())
    store.complete_study("1.2.3")
    store.record_instance(
        record(series="1.2.3.99", sop="1.2.3.99.1", own_output=True, analysable=False)
    )
    assert study_of(store, "1.2.3").state == "queued"
    store.record_instance(record(study="7.7", series="7.7.1", sop="7.7.1.1", own_output=True))
    assert study_of(store, "7.7").state == "not_applicable"


def test_retention_selects_delivered_and_finished_studies(store: Store) -> None:
    old = utcnow() - dt.timedelta(days=40)
    for study in ("1.1", "2.2", "3.3"):
        store.record_instance(record(study=study, series=f"{study}.1", sop=f"{study}.1.1"))
        job_id = store.complete_study(study)
        job = store.claim_job()
        assert job is not None and job_id == job.id
        store.finish_job(job.id, "done")
    backdate(store, "studies", "completed_at", old)
    # 1.1: delivered long ago; 2.2: one result still pending; 3.3: nothing to deliver.
    for job_id, study, delivered in ((1, "1.1", old), (2, "2.2", None)):
        (item,) = store.enqueue_deliveries(job_id, study, [Delivery("x", "y", "p", "pacs")])
        if delivered is not None:
            store.record_delivery_attempt(
                item, attempts=1, status="ok", state="sent", next_attempt_at=None, delivered_at=old
            )
    chosen = set(store.studies_delivered_before(utcnow() - dt.timedelta(days=30)))
    assert chosen == {"1.1", "3.3"}
    assert store.delete_instances("1.1") == ["aa/1.1.1.1.dcm"]
    assert "1.1" not in store.studies_delivered_before(utcnow())


def test_the_newest_result_is_the_newest_jobs_even_when_it_finished_first(store: Store) -> None:
    store.record_instance(record())
    older = store.reprocess("1.2.3")
    newer = store.reprocess("1.2.3")
    store.record_result(newer, "1.2.3", Result(study_instance_uid="1.2.3", status=Status.SCORED))
    slow = Result(study_instance_uid="1.2.3", status=Status.NEEDS_REVIEW)
    store.record_result(older, "1.2.3", slow)  # a slow worker, later
    latest = store.latest_result("1.2.3")
    assert latest is not None and latest.job_id == newer and latest.status == "scored"


def test_times_go_in_aware_and_come_out_in_utc(store: Store) -> None:
    store.record_instance(record())
    received = study_of(store).first_received_at
    assert received is not None and received.tzinfo is dt.UTC
    assert abs((utcnow() - received).total_seconds()) < 60
    job = store.reprocess("1.2.3")
    (item,) = store.enqueue_deliveries(job, "1.2.3", [Delivery("x", "y", "p", "pacs")])
    east = dt.timezone(dt.timedelta(hours=2))
    store.record_delivery_attempt(
        item,
        attempts=1,
        status="ok",
        state="sent",
        next_attempt_at=None,
        delivered_at=dt.datetime(2024, 1, 1, 12, 0, tzinfo=east),
    )
    (row,) = store.list_outbox(include_sent=True)
    assert row.delivered_at == dt.datetime(2024, 1, 1, 10, 0, tzinfo=dt.UTC)
    assert row.delivered_at.tzinfo is dt.UTC and row.created_at.tzinfo is dt.UTC


def test_a_naive_time_is_refused(store: Store) -> None:
    store.record_instance(record())
    with pytest.raises(Exception, match="naive datetime 2030-01-01T00:00:00 given to the store"):
        store.studies_delivered_before(dt.datetime(2030, 1, 1))


def test_instance_files_name_their_series(store: Store) -> None:
    store.record_instance(record())
    store.record_instance(record(series="1.2.3.9", sop="1.2.3.9.1", own_output=True))
    files = store.instance_files("1.2.3")
    assert [(f.sop_instance_uid, f.series_uid, f.own_output) for f in files] == [
        ("1.2.3.1.1", "1.2.3.1", False),
        ("1.2.3.9.1", "1.2.3.9", True),
    ]
    assert files[0].path == "aa/1.2.3.1.1.dcm" and files[0].calling_ae == "SCU"


def test_quiet_periods_go_by_the_database_clock_on_postgresql(postgres_database: str) -> None:
    """Two receivers on hosts whose clocks differ: the quiet period is measured from the
    database's time of the last instance, so neither completes a study too early."""
    receivers = [Store(postgres_database), Store(postgres_database)]
    try:
        receivers[0].record_instance(record())
        assert receivers[1].quiet_studies(5.0) == []
        assert receivers[1].complete_study("1.2.3", quiet_for_s=5.0) is None
        assert receivers[0].quiet_studies(0.0) == ["1.2.3"]
        job_ids = [r.complete_study("1.2.3", quiet_for_s=0.0) for r in receivers]
        assert job_ids[0] is not None and job_ids[1] is None, "completed once"
    finally:
        for store in receivers:
            store.close()


def pointers(url: str) -> list[tuple[int, str]]:
    """procrastinate's jobs naming a node job: (job id, status)."""
    import psycopg

    from node.store.queue import RUN_JOB, conninfo

    with psycopg.connect(conninfo(url)) as conn:
        rows = conn.execute(
            "SELECT (args->>'job_id')::int, status::text FROM procrastinate_jobs "
            "WHERE task_name = %s ORDER BY id",
            (RUN_JOB,),
        ).fetchall()
    return [(int(job), str(status)) for job, status in rows]


def test_a_job_and_its_wake_up_commit_or_roll_back_together(postgres_database: str) -> None:
    import psycopg

    from node.store.queue import conninfo

    store = Store(postgres_database)
    try:
        store.record_instance(record())
        with psycopg.connect(conninfo(postgres_database), autocommit=True) as conn:
            # A failure after the job row and its pointer were written, in the same transaction.
            conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'disk trouble'; END $$ LANGUAGE plpgsql"
            )
            conn.execute(
                "CREATE TRIGGER refuse BEFORE UPDATE OF completed_at ON studies "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        with pytest.raises(Exception, match="disk trouble"):
            store.complete_study("1.2.3")
        assert store.list_jobs() == [] and pointers(postgres_database) == []
        with psycopg.connect(conninfo(postgres_database), autocommit=True) as conn:
            conn.execute("DROP TRIGGER refuse ON studies")
        job_id = store.complete_study("1.2.3")
        assert pointers(postgres_database) == [(job_id, "todo")]
        # A claim spends the job's waiting pointer (a polling worker, a batch-mate); the sweep's
        # re-queue defers a new one; a queued job whose pointer went is found.
        job = store.claim_job(worker="host-a:1")
        assert job is not None and pointers(postgres_database) == []
        store.requeue_stalled(0.0, max_attempts=3)
        assert pointers(postgres_database) == [(job_id, "todo")]
        with psycopg.connect(conninfo(postgres_database), autocommit=True) as conn:
            conn.execute("DELETE FROM procrastinate_jobs")
        store.requeue_stalled(300.0, max_attempts=3)
        assert pointers(postgres_database) == [(job_id, "todo")]
    finally:
        store.close()
