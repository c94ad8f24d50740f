"""Baseline: the schema of the release before migrations (its ``schema_version`` 1).

A database that release wrote is stamped with this revision, not migrated (node.store.migrate
recognises it); a new database gets its tables from here. Keep it byte-for-byte the release's
DDL: tests compare it with tests/node/store/fixtures/release_schema_v1.sql.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _time() -> sa.DateTime:
    # What node.store.schema.UTCDateTime renders to; migrations never import the live schema.
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    version = op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("applied_at", _time(), nullable=False),
    )
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("study_key", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("patient_name", sa.String(324)),
        sa.Column("accession_number", sa.String(16)),
        sa.Column("study_date", sa.String(8)),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("first_received_at", _time()),
        sa.Column("last_received_at", _time()),
        sa.Column("completed_at", _time()),
        sa.Column("pairing", sa.JSON),
    )
    op.create_index("ix_studies_study_key", "studies", ["study_key"])
    op.create_table(
        "retrospective",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("study_date", sa.String(8)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("requested_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
    )
    op.create_table(
        "series",
        sa.Column("series_uid", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(64), sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("sop_class_uid", sa.String(64)),
        sa.Column("series_number", sa.Integer),
        sa.Column("series_description", sa.String(64)),
        sa.Column("analysable", sa.Boolean, nullable=False),
        sa.Column("own_output", sa.Boolean, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
    )
    op.create_index("ix_series_study_uid", "series", ["study_uid"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(64), sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("pairing", sa.JSON),
        sa.Column("arterial_uid", sa.String(64)),
        sa.Column("portal_venous_uid", sa.String(64)),
        sa.Column("supersedes", sa.Integer),
        sa.Column("worker_pid", sa.Integer),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("started_at", _time()),
        sa.Column("finished_at", _time()),
    )
    op.create_index("ix_jobs_study_uid", "jobs", ["study_uid"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("series_uid", sa.String(64), sa.ForeignKey("series.series_uid"), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64)),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("received_at", _time(), nullable=False),
    )
    op.create_index("ix_instances_series_uid", "instances", ["series_uid"])
    op.create_index("ix_instances_study_uid", "instances", ["study_uid"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", sa.JSON, nullable=False),
        sa.Column("created_at", _time(), nullable=False),
    )
    op.create_index("ix_results_study_uid", "results", ["study_uid"])
    op.create_index("ix_results_job_id", "results", ["job_id"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", _time()),
        sa.Column("last_status", sa.Text),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("delivered_at", _time()),
    )
    op.create_index("ix_outbox_study_uid", "outbox", ["study_uid"])
    op.create_index("ix_outbox_state", "outbox", ["state"])
    op.create_index("ix_outbox_job_id", "outbox", ["job_id"])
    # An older node reads this table: version 1 is the schema it knows, so it may open this one.
    op.bulk_insert(version, [{"version": 1, "applied_at": dt.datetime.now(dt.UTC)}])


def downgrade() -> None:
    for table in (
        "outbox",
        "results",
        "instances",
        "jobs",
        "series",
        "retrospective",
        "studies",
        "schema_version",
    ):
        op.drop_table(table)
