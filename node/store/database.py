"""The node's one database: studies, series, instances, jobs, results and the outbox.

SQLAlchemy Core over SQLite in WAL mode by default (several processes on one host: the receiver
and the workers), PostgreSQL by URL. Every arrow of the data flow that crosses a process restart
goes through here: an instance is acknowledged only after its row is committed, and a job or an
outbox item is never only in memory.

This is the only module that runs SQL. Callers get named, frozen rows (:mod:`node.store.types`)
with aware UTC datetimes, never a table, a connection or a positional tuple. Work that must
commit together across modules (a job's result row and its outbox rows) joins one
:class:`Transaction` from :meth:`Store.begin`, an opaque handle that only Store methods use.

Opening a store checks (or creates, or upgrades) the schema per its ``schema`` mode; who uses
which mode is decided in :mod:`node.store.migrate`.

Study states: ``receiving`` (instances arriving, quiet timer running) → ``queued`` (complete, a
job waits) → ``running`` → ``done`` | ``failed`` | ``needs_review`` | ``not_applicable``.
Job states: ``queued``, ``running``, ``done``, ``failed``, ``needs_review``, ``not_applicable``,
``superseded`` (a later job of the same study replaced it), ``cancelled``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Engine,
    Table,
    bindparam,
    create_engine,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from node.analysis.result import Result
from node.core.locks import FileLock
from node.store.accounts import Accounts
from node.store.engine import make_engine, sqlite_path
from node.store.migrate import SchemaError, SchemaMode, ensure
from node.store.queue import announce, retire, unannounced
from node.store.schema import (
    JOB_FINAL_STATES,
    OUTBOX_FAILED,
    OUTBOX_PENDING,
    OUTBOX_SENT,
    PRIORITY_LIVE,
    PRIORITY_RETROSPECTIVE,
    SCHEMA_VERSION,
    STUDY_STATES,
    instances,
    issued,
    jobs,
    outbox,
    results,
    retrospective,
    series,
    studies,
    utcnow,
)
from node.store.types import (
    Delivery,
    InstanceFile,
    InstanceOutcome,
    InstanceRecord,
    Job,
    OutboxItem,
    Recorded,
    RetrospectiveRow,
    Series,
    StoredResult,
    StoreSnapshot,
    Study,
    StudyResult,
    from_row,
)

__all__ = [
    "JOB_FINAL_STATES",
    "OUTBOX_FAILED",
    "OUTBOX_PENDING",
    "OUTBOX_SENT",
    "PRIORITY_LIVE",
    "PRIORITY_RETROSPECTIVE",
    "SCHEMA_VERSION",
    "STUDY_STATES",
    "Delivery",
    "InstanceFile",
    "InstanceOutcome",
    "InstanceRecord",
    "Job",
    "LeaseLost",
    "OutboxItem",
    "Recorded",
    "RetrospectiveRow",
    "SchemaError",
    "Series",
    "Store",
    "StoreSnapshot",
    "StoredResult",
    "Study",
    "StudyResult",
    "Transaction",
    "database_file",
    "store_writable",
    "utcnow",
    "worker_identity",
]


# Statements of the receive path, built once: constructing a statement per instance cost more
# than executing it (SQLAlchemy caches the compiled form, not the Python construction).
# Bind names carry a "b_" prefix: an UPDATE reserves its columns' own names.
_STUDY_EXISTS = select(studies.c.study_uid).where(studies.c.study_uid == bindparam("b_study"))
_SERIES_EXISTS = select(series.c.series_uid).where(series.c.series_uid == bindparam("b_series"))
_RETRIEVE_REQUESTED = select(retrospective.c.study_uid).where(
    retrospective.c.study_uid == bindparam("b_study"), retrospective.c.state == "requested"
)
_INSTANCE_MATCH = (
    instances.c.study_uid == bindparam("b_study"),
    instances.c.series_uid == bindparam("b_series"),
    instances.c.sop_instance_uid == bindparam("b_sop"),
)
_STORED_INSTANCE = select(instances.c.sha256, instances.c.path).where(*_INSTANCE_MATCH)
_SERIES_COUNT_UP = (
    update(series)
    .where(series.c.series_uid == bindparam("b_series"))
    .values(instance_count=series.c.instance_count + 1)
)
_SOP_UID_ELSEWHERE = select(func.count(func.distinct(instances.c.study_uid))).where(
    instances.c.sop_instance_uid == bindparam("b_sop"),
    instances.c.study_uid != bindparam("b_study"),
)
_ISSUED = select(issued.c.sop_instance_uid).where(issued.c.sop_instance_uid == bindparam("b_sop"))
_INSTANCE_KEY = frozenset({"study_uid", "series_uid", "sop_instance_uid"})
_INSERT_NEW: dict[tuple[str, str], Any] = {}
_INSTANCE_UPDATES: dict[tuple[str, bool, bool], Any] = {}


def _insert_new(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """``INSERT … ON CONFLICT (primary key) DO NOTHING``; True when the row was new.

    Check-then-insert raced: two associations that both found no row both inserted, and the
    second's C-STORE failed on the unique constraint after its file was written. One statement
    per dialect and table, the values bound at execution.
    """
    dialect = conn.dialect.name
    statement = _INSERT_NEW.get((dialect, table.name))
    if statement is None:
        if dialect == "postgresql":
            base: Any = postgresql_insert(table)
        elif dialect == "sqlite":
            base = sqlite_insert(table)
        else:  # pragma: no cover - the store runs on SQLite and PostgreSQL only
            raise NotImplementedError(f"no upsert for {dialect}")
        key = [column.name for column in table.primary_key.columns]
        # RETURNING, not rowcount: psycopg's rowcount for this statement is not the rows
        # inserted.
        statement = base.on_conflict_do_nothing(index_elements=key).returning(
            *table.primary_key.columns
        )
        _INSERT_NEW[(dialect, table.name)] = statement
    return conn.execute(statement, values).first() is not None


def _study_update(dialect: str, new_instance: bool, reopen: bool) -> Any:
    """The UPDATE of a study that received an instance (built once per variant)."""
    variant = (dialect, new_instance, reopen)
    statement = _INSTANCE_UPDATES.get(variant)
    if statement is None:
        # The database's clock on a shared database: receivers on several hosts compare one
        # study's quiet period on one clock.
        values: dict[str, Any] = {
            "last_received_at": func.now() if dialect == "postgresql" else bindparam("b_now")
        }
        if new_instance:
            values["instance_count"] = studies.c.instance_count + 1
        if reopen:
            values["state"] = "receiving"
            values["reason"] = None
        statement = (
            update(studies).where(studies.c.study_uid == bindparam("b_study")).values(**values)
        )
        _INSTANCE_UPDATES[variant] = statement
    return statement


class LeaseLost(RuntimeError):
    """A job attempt's lease was taken over (the stalled-job sweep gave the job to another
    worker, or an operator cancelled it): its result, outbox rows and job state are refused."""

    def __init__(self, job_id: int, lease: int, now: int | None, state: str | None) -> None:
        super().__init__(
            f"job {job_id} attempt {lease} lost its lease (the job is at attempt {now}, {state})"
        )
        self.job_id = job_id
        self.lease = lease


def worker_identity(pid: int | None = None) -> str:
    """``host:pid`` of a worker process: what its job rows name it by (a PID alone repeats on
    every host of a cluster)."""
    return f"{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def _clock(conn: Connection) -> dt.datetime:
    """The database's time: every host of a cluster compares heartbeats on one clock."""
    if conn.dialect.name == "postgresql":
        now = conn.execute(text("SELECT now()")).scalar_one()
        return now.astimezone(dt.UTC)
    return utcnow()  # SQLite: one host, its clock


def _hold(conn: Connection, job_id: int, lease: int) -> None:
    """Raise :class:`LeaseLost` unless the job is running under ``lease``.

    A write, not a read: it takes the row's lock on PostgreSQL and the database's write lock on
    SQLite (whose driver starts the transaction only at the first write) until the transaction
    ends, so no claim or sweep slips in between this check and the caller's writes.
    """
    held = conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.lease == lease, jobs.c.state == "running")
        .values(lease=jobs.c.lease)
    ).rowcount
    if held != 1:
        row = conn.execute(select(jobs.c.lease, jobs.c.state).where(jobs.c.id == job_id)).first()
        raise LeaseLost(
            job_id, lease, row.lease if row else None, row.state if row else "no such job"
        )


class Transaction:
    """An open transaction of a :class:`Store`; Store methods given it join it.

    Callers only pass it on: the connection inside is the store's.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn


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
    superseded = conn.execute(
        update(jobs)
        .where(jobs.c.study_uid == study_uid, jobs.c.state == "queued")
        .values(state="superseded", finished_at=now, reason="a newer job replaced it")
        .returning(jobs.c.id)
    ).scalars()
    for job_id in list(superseded):
        retire(conn, job_id)  # its wake-up would claim nothing
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
    announce(conn, int(key[0]), priority)
    return int(key[0])


class Store:
    """Access to the database; one per process (workers open their own).

    Parameters
    ----------
    url
        SQLAlchemy URL. SQLite files get WAL mode and durable commits.
    schema
        What opening does about the schema (:data:`node.store.migrate.SchemaMode`): ``create``
        a new database and check any other, only ``check``, or ``upgrade`` to head.

    Raises
    ------
    SchemaError
        The schema is not at head and ``schema`` may not bring it there, or it is newer.
    """

    def __init__(self, url: str, *, schema: SchemaMode = "create") -> None:
        self.url = url
        ensure(url, schema)
        self._engine: Engine = make_engine(url)
        # Instance rows: committed without waiting for the disk on SQLite, because the file
        # each one names is already fsynced and `recover_instances` can rebuild the row from it.
        self._receive_engine: Engine = (
            make_engine(url, synchronous="NORMAL", immediate=True)
            if sqlite_path(url) is not None
            else self._engine
        )
        # SQLite lets one connection write at a time; the others wait in its busy handler,
        # which sleeps between tries (1, 2, 5 … up to 100 ms): eight associations committing at
        # once in two receiving processes took less than one association alone. Instance rows
        # pass this gate first, so the next one starts the moment the last one commits.
        database = sqlite_path(url)
        self._write_gate: FileLock | contextlib.nullcontext[None] = (
            FileLock(database.with_name(database.name + ".write-lock"))
            if database is not None
            else contextlib.nullcontext()
        )

    @contextmanager
    def begin(self) -> Iterator[Transaction]:
        """A transaction (committed on exit, rolled back on error) that Store methods join."""
        with self._engine.begin() as conn:
            yield Transaction(conn)

    @contextmanager
    def _write(self, tx: Transaction | None) -> Iterator[Connection]:
        """The caller's transaction, or a new one committed on exit."""
        if tx is not None:
            yield tx._conn
            return
        with self._engine.begin() as conn:
            yield conn

    @property
    def lazy_instance_commits(self) -> bool:
        """Whether instance rows are committed without waiting for the disk (SQLite)."""
        return self._receive_engine is not self._engine

    def close(self) -> None:
        """Release the connection pools."""
        self._engine.dispose()
        self._receive_engine.dispose()
        if isinstance(self._write_gate, FileLock):
            self._write_gate.close()

    def accounts(self) -> Accounts:
        """The console's accounts, logins and audit log (node.web), on this store's engine."""
        return Accounts(self._engine)

    # -- instances ---------------------------------------------------------------------------

    def instance_paths_of_study_key(self, key: str) -> set[str]:
        """The spool paths the instance rows name in the studies whose ``study_key`` is ``key``
        (the spool's folder of a study; both indexed lookups)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(instances.c.path)
                .join(studies, studies.c.study_uid == instances.c.study_uid)
                .where(studies.c.study_key == key)
            )
            return {row[0] for row in rows}

    def make_instance_rows_durable(self) -> None:
        """Make every instance row committed so far durable (SQLite: fsync of the WAL file, which
        holds the lazy commits; a checkpoint syncs it before moving them into the database)."""
        database = sqlite_path(self.url)
        if database is None or not self.lazy_instance_commits:
            return
        wal = database.with_name(database.name + "-wal")
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed and removed: the rows are in the database file, synced
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def instance_sha256(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str | None:
        """The stored hash of an instance's bytes, or None when it is new."""
        with self._engine.connect() as conn:
            return conn.execute(
                select(instances.c.sha256).where(
                    instances.c.study_uid == study_uid,
                    instances.c.series_uid == series_uid,
                    instances.c.sop_instance_uid == sop_instance_uid,
                )
            ).scalar()

    def record_instance(
        self, record: InstanceRecord, *, reopen: bool = True, durable: bool = False
    ) -> Recorded:
        """Commit an instance row (and its series and study); safe under concurrent callers.

        An instance is keyed by its study, series and SOP Instance UID. The outcome is
        :attr:`~InstanceOutcome.NEW`, :attr:`~InstanceOutcome.REPLACED` (same key, another
        dataset: the row now names ``record.path``) or :attr:`~InstanceOutcome.IDENTICAL` (same
        dataset hash: nothing changes). Rows are created with ``ON CONFLICT DO NOTHING``, so two
        associations (or two receivers on one PostgreSQL database) delivering the first instances
        of a new study at once both succeed; the loser of a race reads the winner's row.

        A new instance of an own-output series never changes the study's state; any other
        instance puts the study back to ``receiving`` when ``reopen`` (the quiet timer restarts).

        On SQLite the commit does not wait for the disk unless ``durable`` (the receive path:
        the file is fsynced first, and :mod:`node.receive.recover` rebuilds rows a power loss
        took); any other commit of the store makes it durable.
        """
        now = utcnow()
        key = {
            "b_study": record.study_uid,
            "b_series": record.series_uid,
            "b_sop": record.sop_instance_uid,
        }
        row = {
            "study_uid": record.study_uid,
            "series_uid": record.series_uid,
            "sop_instance_uid": record.sop_instance_uid,
            "sop_class_uid": record.sop_class_uid,
            "transfer_syntax_uid": record.transfer_syntax_uid,
            "path": record.path,
            "size": record.size,
            "sha256": record.sha256,
            "calling_ae": record.calling_ae,
            "received_at": now,
        }
        engine = self._engine if durable else self._receive_engine
        with self._write_gate, engine.begin() as conn:
            self._ensure_study(conn, record, now)
            self._ensure_series(conn, record)
            previous = None
            new_instance = _insert_new(conn, instances, row)
            if new_instance:
                conn.execute(_SERIES_COUNT_UP, key)
                outcome = InstanceOutcome.NEW
            else:
                stored = conn.execute(_STORED_INSTANCE, key).one()
                previous = stored.path
                if stored.sha256 == record.sha256:
                    # The same dataset again (a PACS retrying a move): the study is not
                    # re-opened, and the row keeps naming the file it named.
                    return Recorded(InstanceOutcome.IDENTICAL, previous_path=previous)
                conn.execute(
                    update(instances)
                    .where(*_INSTANCE_MATCH)
                    .values({k: v for k, v in row.items() if k not in _INSTANCE_KEY}),
                    key,
                )
                outcome = InstanceOutcome.REPLACED
            reopen = reopen and not record.own_output
            conn.execute(
                _study_update(conn.dialect.name, new_instance, reopen), {**key, "b_now": now}
            )
            elsewhere = conn.execute(_SOP_UID_ELSEWHERE, key).scalar_one()
        return Recorded(outcome, previous_path=previous, also_in_studies=int(elsewhere))

    def _ensure_study(self, conn: Connection, record: InstanceRecord, now: dt.datetime) -> None:
        exists = conn.execute(_STUDY_EXISTS, {"b_study": record.study_uid}).first()
        if exists is not None:
            return
        from node.core.logging import study_key

        # Only a retrieve in progress: a study asked for long ago and received live now is live.
        requested = conn.execute(_RETRIEVE_REQUESTED, {"b_study": record.study_uid}).first()
        # Another association may create it between the look and the insert: then its row wins.
        _insert_new(
            conn,
            studies,
            {
                "study_uid": record.study_uid,
                "study_key": study_key(record.study_uid),
                # A study first seen through the node's own outputs is not one to analyse.
                "state": "not_applicable" if record.own_output else "receiving",
                "reason": "only the node's own outputs" if record.own_output else None,
                "priority": PRIORITY_RETROSPECTIVE if requested is not None else PRIORITY_LIVE,
                "patient_id": record.patient_id,
                "patient_name": record.patient_name,
                "accession_number": record.accession_number,
                "study_date": record.study_date,
                "instance_count": 0,
                "first_received_at": now,
            },
        )

    def _ensure_series(self, conn: Connection, record: InstanceRecord) -> None:
        exists = conn.execute(_SERIES_EXISTS, {"b_series": record.series_uid}).first()
        if exists is not None:
            return
        _insert_new(
            conn,
            series,
            {
                "series_uid": record.series_uid,
                "study_uid": record.study_uid,
                "modality": record.modality,
                "sop_class_uid": record.sop_class_uid,
                "series_number": record.series_number,
                "series_description": record.series_description[:64],
                "analysable": record.analysable,
                "own_output": record.own_output,
                "instance_count": 0,
            },
        )

    def instance_files(self, study_uid: str) -> list[InstanceFile]:
        """A study's instances with what their series is, by series and path."""
        query = (
            select(
                instances.c.sop_instance_uid,
                instances.c.series_uid,
                instances.c.path,
                instances.c.sop_class_uid,
                instances.c.calling_ae,
                series.c.analysable,
                series.c.own_output,
            )
            .join(series, series.c.series_uid == instances.c.series_uid)
            .where(instances.c.study_uid == study_uid)
            .order_by(instances.c.series_uid, instances.c.path)
        )
        with self._engine.connect() as conn:
            return [
                InstanceFile(
                    sop_instance_uid=row.sop_instance_uid,
                    series_uid=row.series_uid,
                    path=row.path,
                    sop_class_uid=row.sop_class_uid,
                    calling_ae=row.calling_ae,
                    analysable=bool(row.analysable),
                    own_output=bool(row.own_output),
                )
                for row in conn.execute(query)
            ]

    def study_series(self, study_uid: str) -> list[Series]:
        """A study's series, by series number (unnumbered last), then UID."""
        query = select(series).where(series.c.study_uid == study_uid)
        with self._engine.connect() as conn:
            rows = [from_row(Series, row._mapping) for row in conn.execute(query)]
        return sorted(
            rows,
            key=lambda r: (r.series_number is None, r.series_number or 0, r.series_uid),
        )

    def study_instance_paths(self, study_uid: str) -> list[str]:
        """A study's instance files (spool paths)."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(instances.c.path).where(instances.c.study_uid == study_uid))
            return [row[0] for row in rows]

    def delete_instances(self, study_uid: str) -> list[str]:
        """Forget a study's instance rows (retention, after their files); returns their paths."""
        with self._engine.begin() as conn:
            paths = [
                row[0]
                for row in conn.execute(
                    select(instances.c.path).where(instances.c.study_uid == study_uid)
                )
            ]
            conn.execute(instances.delete().where(instances.c.study_uid == study_uid))
        return paths

    # -- studies -----------------------------------------------------------------------------

    def study(self, study_uid: str) -> Study | None:
        """A study, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first()
        return from_row(Study, row._mapping) if row is not None else None

    def list_studies(self, limit: int = 100) -> list[Study]:
        """The most recently received studies first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(studies).order_by(studies.c.last_received_at.desc()).limit(limit)
            )
            return [from_row(Study, row._mapping) for row in rows]

    def search_studies(
        self,
        *,
        states: Sequence[str] = (),
        reason: str | None = None,
        received_since: dt.datetime | None = None,
        received_until: dt.datetime | None = None,
        limit: int = 100,
    ) -> list[Study]:
        """Studies by state, words of their reason (case-insensitive) and when they last
        received an instance (``received_until`` exclusive); the newest first."""
        query = select(studies).order_by(studies.c.last_received_at.desc()).limit(limit)
        if states:
            query = query.where(studies.c.state.in_(list(states)))
        if reason:
            query = query.where(
                func.lower(studies.c.reason).contains(reason.lower(), autoescape=True)
            )
        if received_since is not None:
            query = query.where(studies.c.last_received_at >= received_since)
        if received_until is not None:
            query = query.where(studies.c.last_received_at < received_until)
        with self._engine.connect() as conn:
            return [from_row(Study, row._mapping) for row in conn.execute(query)]

    def studies_in_state(self, *states: str) -> list[str]:
        """UIDs of the studies in any of ``states``."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(studies.c.study_uid).where(studies.c.state.in_(states)))
            return [row[0] for row in rows]

    def set_study_state(self, study_uid: str, state: str, reason: str | None = None) -> None:
        """Move a study to ``state``."""
        if state not in STUDY_STATES:
            raise ValueError(f"unknown study state {state!r}")
        with self._engine.begin() as conn:
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
        with self._engine.connect() as conn:
            return bool(conn.execute(query).scalar())

    # -- jobs --------------------------------------------------------------------------------

    def complete_study(self, study_uid: str, *, quiet_for_s: float | None = None) -> int | None:
        """Mark a receiving study complete and queue its job; returns the job id.

        Earlier jobs of the study that have not started are superseded; a running one finishes
        but its result is superseded by the new job's. With ``quiet_for_s``, nothing happens
        when an instance arrived less than that long ago by the database's clock (the timer
        fired late, or another receiver got an instance meanwhile).
        """
        now = utcnow()
        with self._engine.begin() as conn:
            only_if_quiet_since = None
            if quiet_for_s is not None:
                only_if_quiet_since = _clock(conn) - dt.timedelta(seconds=quiet_for_s)
            row = conn.execute(
                select(studies.c.state, studies.c.last_received_at, studies.c.priority).where(
                    studies.c.study_uid == study_uid
                )
            ).first()
            if row is None or row.state != "receiving":
                return None
            last = row.last_received_at
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

    def quiet_studies(self, quiet_for_s: float) -> list[str]:
        """Studies still receiving whose last instance is ``quiet_for_s`` old (database clock):
        what the completion sweep of a receiver completes when no timer of its own did."""
        with self._engine.connect() as conn:
            cutoff = _clock(conn) - dt.timedelta(seconds=quiet_for_s)
            return list(
                conn.execute(
                    select(studies.c.study_uid).where(
                        studies.c.state == "receiving", studies.c.last_received_at <= cutoff
                    )
                ).scalars()
            )

    def find_study(self, key_or_uid: str) -> str | None:
        """The StudyInstanceUID for a UID or a study key (as logs and `studies list` show)."""
        with self._engine.connect() as conn:
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
        with self._engine.begin() as conn:
            return _queue_job(conn, study_uid, priority, pairing, now)

    def claim_job(
        self,
        worker_pid: int | None = None,
        *,
        priority: int | None = None,
        worker: str | None = None,
        job_id: int | None = None,
    ) -> Job | None:
        """Take the most urgent queued job (lowest priority value, then oldest) for a worker.

        With ``priority``, only a job of that priority (batch-mates of a claimed job: a live
        study never waits in a batch of retrospective ones, nor the other way round). The job
        comes with a new ``lease``: what the attempt writes is refused once another claim has
        taken it (:meth:`hold_lease`). ``worker`` names the claimant (:func:`worker_identity`
        of ``worker_pid`` by default). With ``job_id``, that job only, if it is queued.
        """
        name = worker or worker_identity(worker_pid)
        for _ in range(5):
            with self._engine.begin() as conn:
                query = select(jobs.c.id).where(jobs.c.state == "queued")
                if priority is not None:
                    query = query.where(jobs.c.priority == priority)
                if job_id is not None:
                    query = query.where(jobs.c.id == job_id)
                query = query.order_by(jobs.c.priority, jobs.c.id).limit(1)
                if conn.dialect.name == "postgresql":
                    # Workers on several hosts: each passes over rows another is claiming.
                    query = query.with_for_update(skip_locked=True)
                row = conn.execute(query).first()
                if row is None:
                    return None
                now = _clock(conn)
                # Compare-and-set: another worker may have taken it between select and update.
                taken = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == row.id, jobs.c.state == "queued")
                    .values(
                        state="running",
                        started_at=now,
                        heartbeat_at=now,
                        attempts=jobs.c.attempts + 1,
                        lease=jobs.c.lease + 1,
                        worker_pid=worker_pid,
                        worker=name,
                    )
                ).rowcount
                if taken != 1:
                    continue
                job = from_row(
                    Job, conn.execute(select(jobs).where(jobs.c.id == row.id)).one()._mapping
                )
                retire(conn, job.id)
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid == job.study_uid, studies.c.state == "queued")
                    .values(state="running")
                )
                return job
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
        lease: int | None = None,
    ) -> None:
        """Record a job's outcome; the study follows unless a newer job superseded this one.

        With ``lease`` (a worker's attempt), only while the job still runs under it.

        Raises
        ------
        LeaseLost
            ``lease`` is no longer the job's: nothing is changed.
        """
        if state not in ("queued", *JOB_FINAL_STATES):
            raise ValueError(f"unknown job state {state!r}")
        now = utcnow()
        with self._engine.begin() as conn:
            if lease is not None:
                _hold(conn, job_id, lease)
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
            if state == "queued":
                announce(conn, job_id, job.priority)
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

    def requeue_interrupted(self, host: str | None = None) -> int:
        """On start: jobs left running by a crash go back to the queue. Returns how many.

        With ``host``, only the jobs of that host's workers (a cluster: the other hosts' workers
        are alive, and the stalled-job sweep looks after the dead ones).
        """
        with self._engine.begin() as conn:
            query = update(jobs).where(jobs.c.state == "running")
            if host is not None:
                query = query.where(jobs.c.worker.startswith(f"{host}:", autoescape=True))
            requeued = conn.execute(
                query.values(state="queued", started_at=None).returning(jobs.c.id, jobs.c.priority)
            ).all()
            for job_id, priority in requeued:
                announce(conn, job_id, priority)
            count = len(requeued)
            running = select(jobs.c.study_uid).where(jobs.c.state == "running")
            conn.execute(
                update(studies)
                .where(studies.c.state == "running", studies.c.study_uid.not_in(running))
                .values(state="queued")
            )
        return int(count)

    def recover_worker_jobs(self, worker: str, max_attempts: int) -> list[int]:
        """A worker (``host:pid``) died: its running jobs go back to the queue, or fail past
        max_attempts."""
        with self._engine.begin() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.attempts, jobs.c.lease).where(
                    jobs.c.state == "running", jobs.c.worker == worker
                )
            ).all()
        return self._release(rows, max_attempts, "the worker process died")

    def _release(self, rows: Sequence[Any], max_attempts: int, why: str) -> list[int]:
        """Jobs (id, attempts, lease) whose worker is gone: queued again, or failed past
        ``max_attempts``; each only if its lease is still the one seen (a fenced write)."""
        released = []
        for job_id, attempts, lease in rows:
            try:
                if attempts >= max_attempts:
                    self.finish_job(job_id, "failed", reason=f"{why} during the job", lease=lease)
                else:
                    self.finish_job(job_id, "queued", reason=f"{why}; retrying", lease=lease)
            except LeaseLost:
                continue  # its worker finished it, or someone else released it, meanwhile
            released.append(job_id)
        return released

    def heartbeat(self, leases: Sequence[tuple[int, int]]) -> list[int]:
        """A worker is alive: refresh its jobs' ``heartbeat_at`` (the database's clock).

        ``leases`` are (job id, lease) pairs; returns the ids whose lease is no longer held.
        """
        lost = []
        with self._engine.begin() as conn:
            now = _clock(conn)
            for job_id, lease in leases:
                count = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.lease == lease, jobs.c.state == "running")
                    .values(heartbeat_at=now)
                ).rowcount
                if count != 1:
                    lost.append(job_id)
        return lost

    def requeue_stalled(self, stall_timeout_s: float, max_attempts: int) -> list[int]:
        """Running jobs without a heartbeat for ``stall_timeout_s``: queued again (a new lease
        fences the silent attempt), or failed past ``max_attempts``. Returns their ids."""
        with self._engine.connect() as conn:
            cutoff = _clock(conn) - dt.timedelta(seconds=stall_timeout_s)
            rows = conn.execute(
                select(jobs.c.id, jobs.c.attempts, jobs.c.lease).where(
                    jobs.c.state == "running",
                    func.coalesce(jobs.c.heartbeat_at, jobs.c.started_at) < cutoff,
                )
            ).all()
        released = self._release(rows, max_attempts, "the worker stopped answering")
        with self._engine.begin() as conn:
            for job_id, priority in unannounced(conn):
                announce(conn, job_id, priority)
        return released

    def hold_lease(self, job_id: int, lease: int, tx: Transaction) -> None:
        """Refuse the transaction unless the job still runs under ``lease``; call it first.

        Raises
        ------
        LeaseLost
            Another attempt holds the job (or it is no longer running).
        """
        _hold(tx._conn, job_id, lease)

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job; False when it is not queued."""
        with self._engine.begin() as conn:
            count = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == "queued")
                .values(state="cancelled", finished_at=utcnow(), reason="cancelled by operator")
            ).rowcount
            if count:
                retire(conn, job_id)
        return bool(count)

    def list_jobs(
        self, limit: int = 100, states: Sequence[str] = (), *, study_uid: str | None = None
    ) -> list[Job]:
        """The newest jobs first (of one study with ``study_uid``)."""
        query = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if states:
            query = query.where(jobs.c.state.in_(states))
        if study_uid is not None:
            query = query.where(jobs.c.study_uid == study_uid)
        with self._engine.connect() as conn:
            return [from_row(Job, row._mapping) for row in conn.execute(query)]

    def newest_job(self, study_uid: str) -> Job | None:
        """The study's most recent job, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(jobs).where(jobs.c.study_uid == study_uid).order_by(jobs.c.id.desc())
            ).first()
        return from_row(Job, row._mapping) if row is not None else None

    # -- results -----------------------------------------------------------------------------

    def record_result(
        self,
        job_id: int,
        study_uid: str,
        result: Result,
        tx: Transaction | None = None,
        *,
        attempt: int | None = None,
    ) -> int:
        """Keep a job's result (the content of its result.json); in ``tx`` when given.

        ``attempt``: the lease its files were written under (``job-<id>/attempt-<lease>/``).
        """
        row = insert(results).values(
            job_id=job_id,
            study_uid=study_uid,
            status=str(result.status),
            result=result,
            created_at=utcnow(),
            attempt=attempt,
        )
        with self._write(tx) as conn:
            key = conn.execute(row).inserted_primary_key
        return int(key[0]) if key is not None else -1

    def job_result(self, job_id: int) -> StoredResult | None:
        """The result a job already recorded (an attempt the node died after), or None."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(results).where(results.c.job_id == job_id).order_by(results.c.id).limit(1)
            ).first()
        return from_row(StoredResult, row._mapping) if row is not None else None

    def latest_result(self, study_uid: str) -> StoredResult | None:
        """The result of the study's newest job, or None.

        By job, not by row: with several workers an older job can finish after a newer one.
        """
        with self._engine.connect() as conn:
            row = conn.execute(
                select(results)
                .where(results.c.study_uid == study_uid)
                .order_by(results.c.job_id.desc(), results.c.id.desc())
                .limit(1)
            ).first()
        return from_row(StoredResult, row._mapping) if row is not None else None

    def list_results(self, study_uid: str | None = None) -> list[StoredResult]:
        """Every recorded result (of one study with ``study_uid``), oldest first."""
        query = select(results).order_by(results.c.id)
        if study_uid is not None:
            query = query.where(results.c.study_uid == study_uid)
        with self._engine.connect() as conn:
            return [from_row(StoredResult, row._mapping) for row in conn.execute(query)]

    def iter_newest_results(
        self, since: dt.date | None = None, until: dt.date | None = None
    ) -> Iterator[StudyResult]:
        """Every study with a result, with its newest, by study date then UID.

        ``since`` / ``until`` filter on StudyDate (inclusive); studies without a date are left
        out when either is given.
        """
        # The newest result is that of the newest job (a later request), not the last written:
        # with several workers an older job can finish after a newer one.
        ranked = select(
            *results.c,
            func.row_number()
            .over(
                partition_by=results.c.study_uid,
                order_by=(results.c.job_id.desc(), results.c.id.desc()),
            )
            .label("rank"),
        ).subquery()
        result_columns = [ranked.c[column.name] for column in results.c]
        query = (
            select(studies, *[c.label(f"result_{c.name}") for c in result_columns])
            .join(ranked, ranked.c.study_uid == studies.c.study_uid)
            .where(ranked.c.rank == 1)
            .order_by(studies.c.study_date, studies.c.study_uid)
        )
        if since is not None:
            query = query.where(studies.c.study_date >= f"{since:%Y%m%d}")
        if until is not None:
            query = query.where(studies.c.study_date <= f"{until:%Y%m%d}")
        with self._engine.connect() as conn:
            for row in conn.execute(query):
                data = row._mapping
                yield StudyResult(
                    study=from_row(Study, {c.name: data[c.name] for c in studies.c}),
                    result=from_row(
                        StoredResult, {c.name: data[f"result_{c.name}"] for c in results.c}
                    ),
                )

    # -- outbox ------------------------------------------------------------------------------

    def record_issued(
        self,
        job_id: int,
        study_uid: str,
        objects: Sequence[tuple[str, str]],
        tx: Transaction | None = None,
    ) -> None:
        """Remember the ``(SOP Instance UID, Series UID)`` of objects a job wrote; in ``tx``."""
        now = utcnow()
        with self._write(tx) as conn:
            for sop_instance_uid, series_uid in objects:
                _insert_new(
                    conn,
                    issued,
                    {
                        "sop_instance_uid": sop_instance_uid,
                        "series_uid": series_uid,
                        "study_uid": study_uid,
                        "job_id": job_id,
                        "created_at": now,
                    },
                )

    def is_issued(self, sop_instance_uid: str) -> bool:
        """Whether the node wrote the object with this SOP Instance UID (its own output)."""
        with self._engine.connect() as conn:
            found = conn.execute(_ISSUED, {"b_sop": sop_instance_uid}).first()
        return found is not None

    def enqueue_deliveries(
        self,
        job_id: int,
        study_uid: str,
        deliveries: Sequence[Delivery],
        tx: Transaction | None = None,
    ) -> list[int]:
        """Outbox rows for a job's files, due now; in ``tx`` when given. Returns their ids."""
        now = utcnow()
        ids = []
        with self._write(tx) as conn:
            for item in deliveries:
                key = conn.execute(
                    insert(outbox).values(
                        job_id=job_id,
                        study_uid=study_uid,
                        sop_instance_uid=item.sop_instance_uid,
                        series_uid=item.series_uid,
                        path=item.path,
                        destination=item.destination,
                        state=OUTBOX_PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                ).inserted_primary_key
                if key is not None:
                    ids.append(int(key[0]))
        return ids

    def claim_deliveries(self, owner: str, lease_s: float, limit: int = 500) -> list[OutboxItem]:
        """Claim the pending items due now for one dispatcher, by destination then id.

        A claimed item is another dispatcher's until its ``lease_until`` passes (its owner
        died): two receivers never send one item at once.
        """
        with self._engine.begin() as conn:
            now = _clock(conn)
            query = (
                select(outbox.c.id)
                .where(
                    outbox.c.state == OUTBOX_PENDING,
                    outbox.c.next_attempt_at <= now,
                    (outbox.c.owner.is_(None)) | (outbox.c.lease_until < now),
                )
                .order_by(outbox.c.destination, outbox.c.id)
                .limit(limit)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            ids = list(conn.execute(query).scalars())
            if not ids:
                return []
            conn.execute(
                update(outbox)
                .where(outbox.c.id.in_(ids))
                .values(owner=owner, lease_until=now + dt.timedelta(seconds=lease_s))
            )
            rows = conn.execute(
                select(outbox)
                .where(outbox.c.id.in_(ids))
                .order_by(outbox.c.destination, outbox.c.id)
            )
            return [from_row(OutboxItem, row._mapping) for row in rows]

    def release_deliveries(self, host: str) -> int:
        """On start: claims of this host's dispatchers (a process that is gone) lapse now."""
        with self._engine.begin() as conn:
            count = conn.execute(
                update(outbox)
                .where(outbox.c.owner.startswith(f"{host}:", autoescape=True))
                .values(owner=None, lease_until=None)
            ).rowcount
        return int(count)

    def record_delivery_attempt(
        self,
        item_id: int,
        *,
        attempts: int,
        status: str,
        next_attempt_at: dt.datetime | None,
        state: str | None = None,
        delivered_at: dt.datetime | None = None,
        owner: str | None = None,
    ) -> bool:
        """The outcome of one try of an outbox item (``state`` None: it stays as it is).

        With ``owner`` (a dispatcher's claim), only while that dispatcher still owns the item;
        the claim ends with it. Returns whether the outcome was recorded.
        """
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_status": status,
            "next_attempt_at": next_attempt_at,
            "owner": None,
            "lease_until": None,
        }
        if state is not None:
            values["state"] = state
        if delivered_at is not None:
            values["delivered_at"] = delivered_at
        query = update(outbox).where(outbox.c.id == item_id)
        if owner is not None:
            query = query.where(outbox.c.owner == owner)
        with self._engine.begin() as conn:
            return bool(conn.execute(query.values(**values)).rowcount == 1)

    def list_outbox(
        self, *, include_sent: bool = False, limit: int = 200, study_uid: str | None = None
    ) -> list[OutboxItem]:
        """Outbox items, newest first (pending and failed unless ``include_sent``; of one study
        with ``study_uid``)."""
        query = select(outbox).order_by(outbox.c.id.desc()).limit(limit)
        if not include_sent:
            query = query.where(outbox.c.state != OUTBOX_SENT)
        if study_uid is not None:
            query = query.where(outbox.c.study_uid == study_uid)
        with self._engine.connect() as conn:
            return [from_row(OutboxItem, row._mapping) for row in conn.execute(query)]

    def retry_failed_deliveries(self, ids: Sequence[int] = ()) -> int:
        """Put failed items (all, or those in ``ids``) back in the queue, due now."""
        now = utcnow()
        query = update(outbox).where(outbox.c.state == OUTBOX_FAILED)
        if ids:
            query = query.where(outbox.c.id.in_(list(ids)))
        with self._engine.begin() as conn:
            # A fresh start for the give-up clock, too: the operator decided to try again.
            count = conn.execute(
                query.values(state=OUTBOX_PENDING, next_attempt_at=now, created_at=now)
            ).rowcount
        return int(count)

    # -- retrospective re-query --------------------------------------------------------------

    def mark_retrospective(self, study_uid: str, study_date: str | None = None) -> None:
        """Record that a re-query asks for a study: its jobs get the retrospective priority.

        Instances that arrive later create the study row with that priority; a study the node
        already holds is switched over now.
        """
        now = utcnow()
        with self._engine.begin() as conn:
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
        with self._engine.begin() as conn:
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

    def retrospective_rows(self, limit: int = 500) -> list[RetrospectiveRow]:
        """The studies re-queries asked for, the most recently updated first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(retrospective).order_by(retrospective.c.updated_at.desc()).limit(limit)
            )
            return [from_row(RetrospectiveRow, row._mapping) for row in rows]

    def retrospective_row(self, study_uid: str) -> RetrospectiveRow | None:
        """The re-query's record of a study, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(retrospective).where(retrospective.c.study_uid == study_uid)
            ).first()
        return from_row(RetrospectiveRow, row._mapping) if row is not None else None

    # -- retention ---------------------------------------------------------------------------

    def studies_delivered_before(self, cutoff: dt.datetime) -> list[str]:
        """Studies whose results were all delivered before ``cutoff`` and that still hold files.

        Also studies that ended without results to deliver (not_applicable, needs_review) and
        were completed before ``cutoff``.
        """
        with self._engine.connect() as conn:
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

    # -- monitoring --------------------------------------------------------------------------

    def snapshot(self, since: dt.datetime) -> StoreSnapshot:
        """Counts by state, and the jobs and results since ``since`` (one ``/metrics`` scrape)."""
        with self._engine.connect() as conn:

            def by_state(column: Any) -> dict[str, int]:
                rows = conn.execute(select(column, func.count()).group_by(column)).all()
                return {str(state): int(count) for state, count in rows}

            durations = conn.execute(
                select(jobs.c.started_at, jobs.c.finished_at).where(
                    jobs.c.finished_at.is_not(None),
                    jobs.c.started_at.is_not(None),
                    jobs.c.finished_at > since,
                )
            ).all()
            recent = [
                row[0]
                for row in conn.execute(
                    select(results.c.result)
                    .where(results.c.created_at > since)
                    .order_by(results.c.id)
                )
            ]
            oldest = conn.execute(
                select(func.min(outbox.c.created_at)).where(outbox.c.delivered_at.is_(None))
            ).scalar()
            return StoreSnapshot(
                studies_by_state=by_state(studies.c.state),
                jobs_by_state=by_state(jobs.c.state),
                job_durations_s=[(end - start).total_seconds() for start, end in durations],
                recent_results=recent,
                outbox_by_state=by_state(outbox.c.state),
                oldest_undelivered_at=oldest,
                retrospective_by_state=by_state(retrospective.c.state),
            )


def database_file(url: str) -> Path | None:
    """The SQLite file of a database URL (None for a server database or in-memory SQLite)."""
    return sqlite_path(url)


def store_writable(url: str) -> str | None:
    """None when a fresh connection can open the database and take its write lock."""
    path = sqlite_path(url)
    if path is not None:
        # mode=rw: a missing file is an error here, not a new empty database.
        engine = create_engine(
            f"sqlite:///file:{path}?mode=rw&uri=true", poolclass=NullPool, hide_parameters=True
        )
    else:
        engine = create_engine(url, poolclass=NullPool, hide_parameters=True)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                conn.execute(text("SELECT count(*) FROM schema_version"))
                conn.exec_driver_sql("ROLLBACK")
            else:
                conn.execute(text("SELECT count(*) FROM schema_version"))
    except Exception as exc:
        return f"store unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        engine.dispose()
    return None
