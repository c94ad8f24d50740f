"""The node's one database: studies, series, instances, jobs, results and the outbox.

SQLAlchemy Core over SQLite in WAL mode by default (several processes on one host: the receiver
and the workers), PostgreSQL by URL. Every arrow of the data flow that crosses a process restart
goes through here: an instance is acknowledged only after its row is committed, and a job or an
outbox item is never only in memory.

Study states: ``receiving`` (instances arriving, quiet timer running) → ``queued`` (complete, a
job waits) → ``running`` → ``done`` | ``failed`` | ``needs_review`` | ``not_applicable``.
Job states: ``queued``, ``running``, ``done``, ``failed``, ``needs_review``, ``not_applicable``,
``superseded`` (a later job of the same study replaced it), ``cancelled``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection

SCHEMA_VERSION = 1

STUDY_STATES = (
    "receiving",
    "queued",
    "running",
    "done",
    "failed",
    "needs_review",
    "not_applicable",
)
JOB_FINAL_STATES = ("done", "failed", "needs_review", "not_applicable", "superseded", "cancelled")

#: Job priorities: lower runs first. Live studies go before retrospective re-queries.
PRIORITY_LIVE = 0
PRIORITY_RETROSPECTIVE = 10

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

studies = Table(
    "studies",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("study_key", String(16), nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("reason", Text),
    Column("priority", Integer, nullable=False, default=PRIORITY_LIVE),
    # Identifiers stay in the database (results export, `studies list --show-identifiers`),
    # never in logs.
    Column("patient_id", String(64)),
    Column("patient_name", String(324)),
    Column("accession_number", String(16)),
    Column("study_date", String(8)),
    Column("instance_count", Integer, nullable=False, default=0),
    Column("first_received_at", DateTime(timezone=True)),
    Column("last_received_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    Column("pairing", JSON),
)

series = Table(
    "series",
    metadata,
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", String(64), ForeignKey("studies.study_uid"), nullable=False, index=True),
    Column("modality", String(16)),
    Column("sop_class_uid", String(64)),
    Column("series_number", Integer),
    Column("series_description", String(64)),
    Column("analysable", Boolean, nullable=False, default=False),
    Column("own_output", Boolean, nullable=False, default=False),
    Column("instance_count", Integer, nullable=False, default=0),
)

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("series_uid", String(64), ForeignKey("series.series_uid"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64)),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("calling_ae", String(16)),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_uid", String(64), ForeignKey("studies.study_uid"), nullable=False, index=True),
    Column("state", String(16), nullable=False, index=True),
    Column("priority", Integer, nullable=False, default=PRIORITY_LIVE),
    Column("attempts", Integer, nullable=False, default=0),
    Column("reason", Text),
    Column("pairing", JSON),
    Column("arterial_uid", String(64)),
    Column("portal_venous_uid", String(64)),
    Column("supersedes", Integer),
    Column("worker_pid", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
)

results = Table(
    "results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("result", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_status", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
)


# Studies a retrospective re-query asked the PACS for: their jobs run after live ones, and the
# row says how far the re-query got with each (so an interrupted run can resume).
retrospective = Table(
    "retrospective",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("study_date", String(8)),
    Column("state", String(16), nullable=False),
    Column("reason", Text),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def utcnow() -> dt.datetime:
    """Timezone-aware now (the store keeps every time in UTC)."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver knows about one stored instance."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    calling_ae: str
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    analysable: bool = False
    own_output: bool = False
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    study_date: str = ""


@dataclass(frozen=True)
class Job:
    """A job row."""

    id: int
    study_uid: str
    state: str
    priority: int
    attempts: int
    reason: str | None
    pairing: dict[str, Any] | None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the receiver write while workers read; synchronous=FULL makes a commit durable
    # before the C-STORE response goes out; busy_timeout lets processes queue for the lock.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _queue_job(
    conn: Connection,
    study_uid: str,
    priority: int,
    pairing: dict[str, Any] | None,
    now: dt.datetime,
) -> int:
    """Queue a job for a study inside a transaction; queued earlier jobs are superseded."""
    previous = conn.execute(
        select(func.max(jobs.c.id)).where(jobs.c.study_uid == study_uid)
    ).scalar()
    conn.execute(
        update(jobs)
        .where(jobs.c.study_uid == study_uid, jobs.c.state == "queued")
        .values(state="superseded", finished_at=now, reason="a newer job replaced it")
    )
    inserted = conn.execute(
        insert(jobs).values(
            study_uid=study_uid,
            state="queued",
            priority=priority,
            attempts=0,
            pairing=pairing,
            supersedes=previous,
            created_at=now,
        )
    )
    key = inserted.inserted_primary_key
    if key is None:
        raise RuntimeError("the database returned no id for the new job")
    conn.execute(
        update(studies).where(studies.c.study_uid == study_uid).values(state="queued", reason=None)
    )
    return int(key[0])


class Store:
    """Access to the database; one per process (workers open their own).

    Parameters
    ----------
    url
        SQLAlchemy URL. SQLite files get WAL mode and durable commits.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, future=True)
        self._known_studies: set[str] = set()
        self._known_series: set[str] = set()
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_schema()

    def _create_schema(self) -> None:
        metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            current = conn.execute(select(func.max(schema_version.c.version))).scalar()
            if current is None:
                conn.execute(
                    insert(schema_version).values(version=SCHEMA_VERSION, applied_at=utcnow())
                )
            elif current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database schema version {current} is newer than this node's "
                    f"({SCHEMA_VERSION}): upgrade mvi-node"
                )

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction (committed on exit, rolled back on error)."""
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def ping(self) -> bool:
        """True when the database answers a trivial query."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
        except Exception:
            return False
        return True

    # -- instances ---------------------------------------------------------------------------

    def instance_sha256(self, sop_instance_uid: str) -> str | None:
        """The stored hash of an instance's bytes, or None when it is new."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(instances.c.sha256).where(instances.c.sop_instance_uid == sop_instance_uid)
            ).scalar()

    def record_instance(self, record: InstanceRecord, *, reopen: bool = True) -> str:
        """Commit an instance row (and its series and study).

        Returns 'new', 'replaced' (same SOP Instance UID, other dataset) or 'identical' (same
        dataset hash as the stored one: nothing changes).

        A new instance of an own-output series never changes the study's state; any other
        instance puts the study back to ``receiving`` when ``reopen`` (the quiet timer restarts).
        """
        now = utcnow()
        with self.engine.begin() as conn:
            # Study and series rows are created once; this process remembers which exist so a
            # busy C-STORE path does not look them up again for every instance.
            if record.study_uid not in self._known_studies:
                self._ensure_study(conn, record, now)
            if record.series_uid not in self._known_series:
                self._ensure_series(conn, record)
            existing = conn.execute(
                select(instances.c.sha256).where(
                    instances.c.sop_instance_uid == record.sop_instance_uid
                )
            ).first()
            if existing is not None and existing.sha256 == record.sha256:
                # The same dataset again: its file was rewritten with the same bytes, and the
                # study is not re-opened (a PACS resending a study does not trigger analysis).
                return "identical"
            values = {
                "series_uid": record.series_uid,
                "study_uid": record.study_uid,
                "sop_class_uid": record.sop_class_uid,
                "transfer_syntax_uid": record.transfer_syntax_uid,
                "path": record.path,
                "size": record.size,
                "sha256": record.sha256,
                "calling_ae": record.calling_ae,
                "received_at": now,
            }
            study_values: dict[str, Any] = {"last_received_at": now}
            if existing is None:
                conn.execute(
                    insert(instances).values(sop_instance_uid=record.sop_instance_uid, **values)
                )
                conn.execute(
                    update(series)
                    .where(series.c.series_uid == record.series_uid)
                    .values(instance_count=series.c.instance_count + 1)
                )
                study_values["instance_count"] = studies.c.instance_count + 1
                outcome = "new"
            else:
                conn.execute(
                    update(instances)
                    .where(instances.c.sop_instance_uid == record.sop_instance_uid)
                    .values(**values)
                )
                outcome = "replaced"
            if reopen and not record.own_output:
                study_values["state"] = "receiving"
                study_values["reason"] = None
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == record.study_uid)
                .values(**study_values)
            )
        return outcome

    def _ensure_study(self, conn: Connection, record: InstanceRecord, now: dt.datetime) -> None:
        exists = conn.execute(
            select(studies.c.study_uid).where(studies.c.study_uid == record.study_uid)
        ).first()
        if exists is not None:
            return
        from node.core.logging import study_key

        # Only a retrieve in progress: a study asked for long ago and received live now is live.
        requested = conn.execute(
            select(retrospective.c.study_uid).where(
                retrospective.c.study_uid == record.study_uid,
                retrospective.c.state == "requested",
            )
        ).first()
        conn.execute(
            insert(studies).values(
                study_uid=record.study_uid,
                study_key=study_key(record.study_uid),
                # A study first seen through the node's own outputs is not one to analyse.
                state="not_applicable" if record.own_output else "receiving",
                reason="only the node's own outputs" if record.own_output else None,
                priority=PRIORITY_RETROSPECTIVE if requested is not None else PRIORITY_LIVE,
                patient_id=record.patient_id,
                patient_name=record.patient_name,
                accession_number=record.accession_number,
                study_date=record.study_date,
                instance_count=0,
                first_received_at=now,
            )
        )

    def _ensure_series(self, conn: Connection, record: InstanceRecord) -> None:
        exists = conn.execute(
            select(series.c.series_uid).where(series.c.series_uid == record.series_uid)
        ).first()
        if exists is not None:
            return
        conn.execute(
            insert(series).values(
                series_uid=record.series_uid,
                study_uid=record.study_uid,
                modality=record.modality,
                sop_class_uid=record.sop_class_uid,
                series_number=record.series_number,
                series_description=record.series_description[:64],
                analysable=record.analysable,
                own_output=record.own_output,
                instance_count=0,
            )
        )

    def instance_paths(self, study_uid: str) -> list[tuple[str, str, str, bool, bool]]:
        """(series_uid, path, sop_class_uid, analysable, own_output) of a study's instances."""
        query = (
            select(
                instances.c.series_uid,
                instances.c.path,
                instances.c.sop_class_uid,
                series.c.analysable,
                series.c.own_output,
            )
            .join(series, series.c.series_uid == instances.c.series_uid)
            .where(instances.c.study_uid == study_uid)
            .order_by(instances.c.series_uid, instances.c.path)
        )
        with self.engine.connect() as conn:
            return [
                (row[0], row[1], row[2], bool(row[3]), bool(row[4])) for row in conn.execute(query)
            ]

    def delete_instances(self, study_uid: str) -> list[str]:
        """Forget a study's instance rows (retention); returns their spool paths."""
        with self.engine.begin() as conn:
            paths = [
                row[0]
                for row in conn.execute(
                    select(instances.c.path).where(instances.c.study_uid == study_uid)
                )
            ]
            conn.execute(instances.delete().where(instances.c.study_uid == study_uid))
        return paths

    # -- studies -----------------------------------------------------------------------------

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """A study row as a dict, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first()
        return dict(row._mapping) if row is not None else None

    def list_studies(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently received studies first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(studies).order_by(studies.c.last_received_at.desc()).limit(limit)
            )
            return [dict(row._mapping) for row in rows]

    def studies_in_state(self, *states: str) -> list[str]:
        """UIDs of the studies in any of ``states``."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(studies.c.study_uid).where(studies.c.state.in_(states)))
            return [row[0] for row in rows]

    def set_study_state(self, study_uid: str, state: str, reason: str | None = None) -> None:
        """Move a study to ``state``."""
        if state not in STUDY_STATES:
            raise ValueError(f"unknown study state {state!r}")
        with self.engine.begin() as conn:
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(state=state, reason=reason)
            )

    def has_analysable_instances(self, study_uid: str) -> bool:
        """True when the study holds CT, Enhanced CT or SEG instances not written by the node."""
        # Instance rows, not series rows: retention deletes the instances of a study but keeps
        # its series, and a study whose files are gone has nothing left to analyse.
        query = (
            select(func.count())
            .select_from(instances.join(series, series.c.series_uid == instances.c.series_uid))
            .where(instances.c.study_uid == study_uid, series.c.analysable.is_(True))
        )
        with self.engine.connect() as conn:
            return bool(conn.execute(query).scalar())

    # -- jobs --------------------------------------------------------------------------------

    def complete_study(
        self, study_uid: str, *, only_if_quiet_since: dt.datetime | None = None
    ) -> int | None:
        """Mark a receiving study complete and queue its job; returns the job id.

        Earlier jobs of the study that have not started are superseded; a running one finishes
        but its result is superseded by the new job's. With ``only_if_quiet_since``, nothing
        happens when an instance arrived after that time (the timer fired late).
        """
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(
                select(studies.c.state, studies.c.last_received_at, studies.c.priority).where(
                    studies.c.study_uid == study_uid
                )
            ).first()
            if row is None or row.state != "receiving":
                return None
            last = row.last_received_at
            if last is not None and last.tzinfo is None:
                last = last.replace(tzinfo=dt.UTC)
            if only_if_quiet_since is not None and last is not None and last > only_if_quiet_since:
                return None
            # Compare-and-set: the quiet timer in `serve` and a re-query process may complete
            # the same study at the same moment; only one of them queues its job.
            taken = conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid, studies.c.state == "receiving")
                .values(state="queued")
            ).rowcount
            if taken != 1:
                return None
            job_id = _queue_job(conn, study_uid, row.priority, None, now)
            conn.execute(
                update(studies).where(studies.c.study_uid == study_uid).values(completed_at=now)
            )
        return job_id

    def find_study(self, key_or_uid: str) -> str | None:
        """The StudyInstanceUID for a UID or a study key (as logs and `studies list` show)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(studies.c.study_uid).where(
                    (studies.c.study_uid == key_or_uid) | (studies.c.study_key == key_or_uid)
                )
            ).first()
        return row[0] if row is not None else None

    def reprocess(
        self,
        study_uid: str,
        forced_pair: tuple[str, str] | None = None,
        *,
        priority: int = PRIORITY_LIVE,
    ) -> int:
        """Queue a new job for a study (an operator's request); earlier queued jobs are superseded.

        With ``forced_pair`` (arterial, portal-venous SeriesInstanceUIDs) the job skips pairing.
        """
        now = utcnow()
        pairing = None
        if forced_pair is not None:
            pairing = {"forced": True, "arterial": forced_pair[0], "portal_venous": forced_pair[1]}
        with self.engine.begin() as conn:
            return _queue_job(conn, study_uid, priority, pairing, now)

    def claim_job(
        self, worker_pid: int | None = None, *, priority: int | None = None
    ) -> Job | None:
        """Take the most urgent queued job (lowest priority value, then oldest) for a worker.

        With ``priority``, only a job of that priority (batch-mates of a claimed job: a live
        study never waits in a batch of retrospective ones, nor the other way round).
        """
        for _ in range(5):
            with self.engine.begin() as conn:
                query = select(jobs.c.id).where(jobs.c.state == "queued")
                if priority is not None:
                    query = query.where(jobs.c.priority == priority)
                row = conn.execute(query.order_by(jobs.c.priority, jobs.c.id).limit(1)).first()
                if row is None:
                    return None
                # Compare-and-set: another worker may have taken it between select and update.
                taken = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == row.id, jobs.c.state == "queued")
                    .values(
                        state="running",
                        started_at=utcnow(),
                        attempts=jobs.c.attempts + 1,
                        worker_pid=worker_pid,
                    )
                ).rowcount
                if taken != 1:
                    continue
                job = conn.execute(select(jobs).where(jobs.c.id == row.id)).one()
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid == job.study_uid, studies.c.state == "queued")
                    .values(state="running")
                )
                return Job(
                    id=job.id,
                    study_uid=job.study_uid,
                    state=job.state,
                    priority=job.priority,
                    attempts=job.attempts,
                    reason=job.reason,
                    pairing=job.pairing,
                )
        return None

    def finish_job(
        self,
        job_id: int,
        state: str,
        *,
        reason: str | None = None,
        pairing: dict[str, Any] | None = None,
        arterial_uid: str | None = None,
        portal_venous_uid: str | None = None,
    ) -> None:
        """Record a job's outcome; the study follows unless a newer job superseded this one."""
        if state not in ("queued", *JOB_FINAL_STATES):
            raise ValueError(f"unknown job state {state!r}")
        now = utcnow()
        with self.engine.begin() as conn:
            job = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    state=state,
                    reason=reason,
                    pairing=pairing,
                    arterial_uid=arterial_uid,
                    portal_venous_uid=portal_venous_uid,
                    finished_at=None if state == "queued" else now,
                )
            )
            newest = conn.execute(
                select(func.max(jobs.c.id)).where(jobs.c.study_uid == job.study_uid)
            ).scalar()
            study_state = conn.execute(
                select(studies.c.state).where(studies.c.study_uid == job.study_uid)
            ).scalar()
            # A study that is receiving again, or has a newer job, keeps its own state.
            if newest == job_id and study_state in ("queued", "running"):
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid == job.study_uid)
                    .values(state=state, reason=reason, pairing=pairing)
                )

    def requeue_interrupted(self) -> int:
        """On start: jobs left running by a crash go back to the queue. Returns how many."""
        with self.engine.begin() as conn:
            count = conn.execute(
                update(jobs)
                .where(jobs.c.state == "running")
                .values(state="queued", started_at=None)
            ).rowcount
            conn.execute(update(studies).where(studies.c.state == "running").values(state="queued"))
        return int(count)

    def recover_worker_jobs(self, worker_pid: int, max_attempts: int) -> list[int]:
        """A worker died: its running jobs go back to the queue, or fail past max_attempts."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.attempts).where(
                    jobs.c.state == "running", jobs.c.worker_pid == worker_pid
                )
            ).all()
        for job_id, attempts in rows:
            if attempts >= max_attempts:
                self.finish_job(job_id, "failed", reason="the worker process died during the job")
            else:
                self.finish_job(job_id, "queued", reason="the worker process died; retrying")
        return [row[0] for row in rows]

    def record_result(
        self, job_id: int, study_uid: str, result: dict[str, Any], conn: Connection | None = None
    ) -> int:
        """Keep a job's result (the content of its result.json); in ``conn``'s transaction."""
        row = insert(results).values(
            job_id=job_id,
            study_uid=study_uid,
            status=str(result.get("status")),
            result=result,
            created_at=utcnow(),
        )
        if conn is None:
            with self.engine.begin() as own:
                inserted = own.execute(row)
        else:
            inserted = conn.execute(row)
        key = inserted.inserted_primary_key
        return int(key[0]) if key is not None else -1

    def job_result(self, job_id: int) -> dict[str, Any] | None:
        """The result a job already recorded (an attempt the node died after), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(results).where(results.c.job_id == job_id).order_by(results.c.id).limit(1)
            ).first()
        return dict(row._mapping) if row is not None else None

    def latest_result(self, study_uid: str) -> dict[str, Any] | None:
        """The result of the study's newest job (with ``job_id`` and ``result``), or None.

        By job, not by row: with several workers an older job can finish after a newer one.
        """
        with self.engine.connect() as conn:
            row = conn.execute(
                select(results)
                .where(results.c.study_uid == study_uid)
                .order_by(results.c.job_id.desc(), results.c.id.desc())
                .limit(1)
            ).first()
        return dict(row._mapping) if row is not None else None

    def list_jobs(self, limit: int = 100, states: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The newest jobs first."""
        query = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if states:
            query = query.where(jobs.c.state.in_(states))
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def newest_job(self, study_uid: str) -> dict[str, Any] | None:
        """The study's most recent job row, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(jobs).where(jobs.c.study_uid == study_uid).order_by(jobs.c.id.desc())
            ).first()
        return dict(row._mapping) if row is not None else None

    # -- retrospective re-query --------------------------------------------------------------

    def mark_retrospective(self, study_uid: str, study_date: str | None = None) -> None:
        """Record that a re-query asks for a study: its jobs get the retrospective priority.

        Instances that arrive later create the study row with that priority; a study the node
        already holds is switched over now.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            known = conn.execute(
                select(retrospective.c.study_uid).where(retrospective.c.study_uid == study_uid)
            ).first()
            if known is None:
                conn.execute(
                    insert(retrospective).values(
                        study_uid=study_uid,
                        study_date=study_date,
                        state="requested",
                        requested_at=now,
                        updated_at=now,
                    )
                )
            else:
                conn.execute(
                    update(retrospective)
                    .where(retrospective.c.study_uid == study_uid)
                    .values(state="requested", reason=None, requested_at=now, updated_at=now)
                )
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(priority=PRIORITY_RETROSPECTIVE)
            )

    def set_retrospective_state(
        self, study_uid: str, state: str, reason: str | None = None
    ) -> None:
        """How far the re-query got with a study (requested, moved, move_failed, done, ...).

        Past ``requested`` the study is live again: its retrieved job keeps the retrospective
        priority it was queued with, but instances that arrive later (a live send) are not
        held back.
        """
        with self.engine.begin() as conn:
            conn.execute(
                update(retrospective)
                .where(retrospective.c.study_uid == study_uid)
                .values(state=state, reason=reason, updated_at=utcnow())
            )
            if state != "requested":
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid == study_uid)
                    .values(priority=PRIORITY_LIVE)
                )

    def retrospective_row(self, study_uid: str) -> dict[str, Any] | None:
        """The re-query's record of a study, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(retrospective).where(retrospective.c.study_uid == study_uid)
            ).first()
        return dict(row._mapping) if row is not None else None

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job; False when it is not queued."""
        with self.engine.begin() as conn:
            count = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == "queued")
                .values(state="cancelled", finished_at=utcnow(), reason="cancelled by operator")
            ).rowcount
        return bool(count)

    # -- retention ---------------------------------------------------------------------------

    def studies_delivered_before(self, cutoff: dt.datetime) -> list[str]:
        """Studies whose results were all delivered before ``cutoff`` and that still hold files.

        Also studies that ended without results to deliver (not_applicable, needs_review) and
        were completed before ``cutoff``.
        """
        with self.engine.connect() as conn:
            delivered = (
                select(outbox.c.study_uid)
                .group_by(outbox.c.study_uid)
                .having(
                    func.count(outbox.c.delivered_at) == func.count(),
                    func.max(outbox.c.delivered_at) < cutoff,
                )
            )
            done_without = select(studies.c.study_uid).where(
                studies.c.state.in_(("not_applicable", "needs_review", "done")),
                studies.c.completed_at < cutoff,
                ~studies.c.study_uid.in_(select(outbox.c.study_uid)),
            )
            holding = select(instances.c.study_uid).distinct()
            rows = conn.execute(
                select(studies.c.study_uid).where(
                    studies.c.study_uid.in_(holding),
                    studies.c.state.notin_(("receiving", "queued", "running")),
                    studies.c.study_uid.in_(delivered) | studies.c.study_uid.in_(done_without),
                )
            )
            return [row[0] for row in rows]
