"""The store's tables, its one datetime type and its clock; nothing outside node/store uses them.

Every time column is :class:`UTCDateTime`: it refuses a naive datetime on the way in (a naive
time is a bug: whose clock?) and gives back an aware UTC datetime on the way out, on every
backend. SQLite keeps no zone (it stores the UTC wall time as text, as the release before this
type did, so existing rows read back unchanged); PostgreSQL keeps ``timestamptz``. Callers
therefore never patch ``tzinfo`` themselves.

The tables here are the ORM-free description that queries use. What the database *has* is
decided by the migrations (:mod:`node.store.migrate`); a test compares the two so they cannot
drift apart.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

from node.analysis.result import Result, from_json, to_json

#: The version the release before Alembic wrote into ``schema_version``. The baseline migration
#: still writes it: an older node reads that table and refuses a database marked newer, so a
#: migration that an older release could not run against must insert a higher version.
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

#: Outbox item states (node.deliver.outbox names them PENDING, SENT, FAILED).
OUTBOX_PENDING, OUTBOX_SENT, OUTBOX_FAILED = "pending", "sent", "failed"


def utcnow() -> dt.datetime:
    """Timezone-aware now (the store keeps every time in UTC)."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A point in time: aware datetimes in, aware UTC datetimes out.

    Raises
    ------
    ValueError
        On a naive datetime given to a query (a column value or a comparison).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"UTCDateTime takes a datetime, not {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the store; use utcnow()")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        # SQLite returns the stored UTC wall time without a zone.
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class ResultDocument(TypeDecorator[Result]):
    """A :class:`~node.analysis.result.Result` kept as its result.json document (JSON).

    Rows written before the typed result (the same keys, no ``schema_version``) read back as
    version 1 results.
    """

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, Result):
            raise TypeError(f"the results column takes a Result, not {type(value).__name__}")
        return to_json(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Result | None:
        return None if value is None else from_json(value)


metadata = MetaData()

# The release before Alembic's own version table; kept so that release can tell it is too old.
schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
    Column("applied_at", UTCDateTime, nullable=False),
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
    Column("first_received_at", UTCDateTime),
    Column("last_received_at", UTCDateTime),
    Column("completed_at", UTCDateTime),
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

#: Keyed by all three UIDs, as the spool names the file: a dataset that reuses another study's
#: SOP Instance UID is another row, never an update of that study's (migration 0002).
instances = Table(
    "instances",
    metadata,
    Column("study_uid", String(64), primary_key=True, index=True),
    Column(
        "series_uid",
        String(64),
        ForeignKey("series.series_uid"),
        primary_key=True,
        index=True,
    ),
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64)),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("calling_ae", String(16)),
    Column("received_at", UTCDateTime, nullable=False),
    Index("ix_instances_sop_uid", "sop_instance_uid"),
)

#: Every object the node wrote (SEG, SR, SC): how the receiver knows its own outputs coming back
#: (strings such as the Manufacturer anyone can copy; these UIDs only this node issued).
issued = Table(
    "issued",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("series_uid", String(64), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
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
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    # Incremented at each claim: an attempt writes only while the row still carries its lease.
    Column("lease", Integer, nullable=False, default=0, server_default="0"),
    # host:pid of the worker holding the lease, and its last heartbeat (the database's clock).
    Column("worker", String(128)),
    Column("heartbeat_at", UTCDateTime),
)

results = Table(
    "results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("result", ResultDocument, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # The lease its files were written under (job-<id>/attempt-<lease>/); None: job-<id>/.
    Column("attempt", Integer),
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
    Column("next_attempt_at", UTCDateTime),
    Column("last_status", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime),
    # The dispatcher sending it now, until when (a dead one's claim lapses).
    Column("owner", String(128)),
    Column("lease_until", UTCDateTime),
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
    Column("requested_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# -- the operator console (node.web) ---------------------------------------------------------

#: Local accounts of the console; the password only as its argon2 hash.
users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("password_changed_at", UTCDateTime, nullable=False),
)

#: Console logins. The cookie carries the token; the database only its SHA-256, so a copy of the
#: database opens no session.
web_sessions = Table(
    "web_sessions",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    Column("user_name", String(64), ForeignKey("users.name"), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("client", String(64)),
)

#: Who did what when in the console: logins, failed logins, reprocess, cancel, retry, refusals.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False, index=True),
    Column("user_name", String(64)),
    Column("role", String(16)),
    Column("client", String(64)),
    Column("action", String(32), nullable=False),
    # A study key, job id or outbox ids: never an identifier of the patient.
    Column("target", String(128)),
    Column("outcome", String(16), nullable=False),
    Column("detail", JSON),
)
