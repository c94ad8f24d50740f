"""The named rows :class:`node.store.database.Store` takes and returns (frozen, typed).

Every time is an aware UTC datetime (:class:`node.store.schema.UTCDateTime`). Rows are built
from a table row by name (:func:`from_row`), so a column added by a migration must be added to
its type here too, or the read fails loudly in the tests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from node.analysis.result import Result


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver knows about one stored instance (the input of ``record_instance``)."""

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


class InstanceOutcome(enum.StrEnum):
    """What :meth:`~node.store.database.Store.record_instance` did with an instance."""

    #: A new row.
    NEW = "new"
    #: Same study, series and SOP Instance UID, another dataset: the row now names the new file.
    REPLACED = "replaced"
    #: The same dataset as the stored one (hash equal): nothing changed.
    IDENTICAL = "identical"


@dataclass(frozen=True)
class Recorded:
    """:meth:`~node.store.database.Store.record_instance`'s answer."""

    outcome: InstanceOutcome
    #: The file the row named before (a replacement or an identical resend), else None. The
    #: caller deletes it once the row names another file: never before the commit.
    previous_path: str | None = None
    #: Other studies that hold an instance with this SOP Instance UID (a sender reusing UIDs).
    also_in_studies: int = 0


@dataclass(frozen=True)
class Study:
    """A study row: its state, identifiers (never logged) and the pairing its last job chose."""

    study_uid: str
    study_key: str
    state: str
    reason: str | None
    priority: int
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    instance_count: int
    first_received_at: dt.datetime | None
    last_received_at: dt.datetime | None
    completed_at: dt.datetime | None
    pairing: dict[str, Any] | None


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
    arterial_uid: str | None
    portal_venous_uid: str | None
    supersedes: int | None
    worker_pid: int | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    lease: int = 0
    worker: str | None = None
    heartbeat_at: dt.datetime | None = None


@dataclass(frozen=True)
class Series:
    """A series row: what `studies reprocess` and `studies show` name a series by."""

    series_uid: str
    study_uid: str
    modality: str | None
    sop_class_uid: str | None
    series_number: int | None
    series_description: str | None
    analysable: bool
    own_output: bool
    instance_count: int


@dataclass(frozen=True)
class InstanceFile:
    """One instance of a study as a job reads it: its file and what its series is."""

    sop_instance_uid: str
    series_uid: str
    path: str
    sop_class_uid: str
    calling_ae: str | None
    analysable: bool
    own_output: bool


@dataclass(frozen=True)
class StoredResult:
    """A job's recorded result: its result.json as the typed :class:`Result`."""

    id: int
    job_id: int
    study_uid: str
    status: str
    result: Result
    created_at: dt.datetime
    attempt: int | None = None


@dataclass(frozen=True)
class StudyResult:
    """A study with its newest result (the results export)."""

    study: Study
    result: StoredResult


@dataclass(frozen=True)
class Delivery:
    """One result file to send to one destination (the input of ``Store.enqueue_deliveries``)."""

    sop_instance_uid: str
    series_uid: str
    path: str
    destination: str


@dataclass(frozen=True)
class OutboxItem:
    """An outbox row: one result file for one destination, and how its delivery goes."""

    id: int
    job_id: int
    study_uid: str
    sop_instance_uid: str
    series_uid: str
    path: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_status: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None
    owner: str | None = None
    lease_until: dt.datetime | None = None


@dataclass(frozen=True)
class RetrospectiveRow:
    """How far a retrospective re-query got with one study."""

    study_uid: str
    study_date: str | None
    state: str
    reason: str | None
    requested_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class StoreSnapshot:
    """What ``/metrics`` reads from the store at one scrape."""

    studies_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    #: Durations (seconds) of the jobs finished since the snapshot's ``since``.
    job_durations_s: list[float]
    #: The result.json documents recorded since ``since``, oldest first.
    recent_results: list[Result]
    outbox_by_state: dict[str, int]
    oldest_undelivered_at: dt.datetime | None
    retrospective_by_state: dict[str, int]


@dataclass(frozen=True)
class Account:
    """A console account (node.web): its name and role; the hash stays in the store."""

    name: str
    role: str
    created_at: dt.datetime
    password_changed_at: dt.datetime


@dataclass(frozen=True)
class AuditEntry:
    """One line of the console's audit log: who did what when, and how it ended."""

    id: int
    at: dt.datetime
    user_name: str | None
    role: str | None
    client: str | None
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any] | None


Row = TypeVar("Row")


def from_row(kind: type[Row], row: Mapping[Any, Any]) -> Row:
    """A named row from a table row's mapping (by column name; extra columns are an error)."""
    names = {field.name for field in dataclasses.fields(kind)}  # type: ignore[arg-type]
    extra = set(row) - names
    if extra:
        raise TypeError(f"{kind.__name__} has no field for column(s) {sorted(extra)}")
    return kind(**row)
