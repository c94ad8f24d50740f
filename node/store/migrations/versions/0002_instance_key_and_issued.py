"""Instances keyed by (study, series, SOP Instance UID); the objects the node issued.

Instances: keyed by all three UIDs, not by the SOP Instance UID alone.

Keyed on the SOP Instance UID alone, a dataset that reused another study's UID (a sender's bug,
or a hostile one) updated the other study's row: that study then showed one row fewer than its
files and the earlier file was orphaned. The spool already names a file by all three UIDs; the
row now does too. A lookup by SOP Instance UID alone keeps an index.

``issued``: every object the node wrote (SEG, SR, SC), by SOP Instance UID. The receiver knows
its own outputs coming back by these UIDs; it used to go by the Manufacturer and model name,
which anyone can write into a CT study to keep it from being analysed. Filled from the outbox
for what earlier releases delivered.

An older node (which knows only revision 0001) refuses this database by its revision; the
release before migrations reads ``schema_version``, which gets version 2 here.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = (
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "path",
    "size",
    "sha256",
    "calling_ae",
    "received_at",
)


def _instances(name: str, primary_key: tuple[str, ...]) -> sa.Table:
    key = set(primary_key)
    return op.create_table(
        name,
        sa.Column("study_uid", sa.String(64), nullable=False, primary_key="study_uid" in key),
        sa.Column(
            "series_uid",
            sa.String(64),
            sa.ForeignKey("series.series_uid"),
            nullable=False,
            primary_key="series_uid" in key,
        ),
        sa.Column(
            "sop_instance_uid", sa.String(64), nullable=False, primary_key="sop_instance_uid" in key
        ),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64)),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )


def _rebuild(primary_key: tuple[str, ...]) -> None:
    # A new table, the rows copied, the old one dropped: a primary key cannot be altered in
    # place on SQLite, and the same steps serve PostgreSQL.
    for index in ("ix_instances_series_uid", "ix_instances_study_uid", "ix_instances_sop_uid"):
        op.execute(f"DROP INDEX IF EXISTS {index}")
    _instances("instances_rebuilt", primary_key)
    columns = ", ".join(_COLUMNS)
    op.execute(f"INSERT INTO instances_rebuilt ({columns}) SELECT {columns} FROM instances")
    op.drop_table("instances")
    op.rename_table("instances_rebuilt", "instances")
    if op.get_bind().dialect.name == "postgresql":
        # PostgreSQL keeps the constraints' names from the table they were made with.
        op.execute(
            "ALTER TABLE instances RENAME CONSTRAINT instances_rebuilt_pkey TO instances_pkey"
        )
        op.execute(
            "ALTER TABLE instances RENAME CONSTRAINT instances_rebuilt_series_uid_fkey "
            "TO instances_series_uid_fkey"
        )
    op.create_index("ix_instances_series_uid", "instances", ["series_uid"])
    op.create_index("ix_instances_study_uid", "instances", ["study_uid"])


def upgrade() -> None:
    _rebuild(("study_uid", "series_uid", "sop_instance_uid"))
    op.create_index("ix_instances_sop_uid", "instances", ["sop_instance_uid"])
    op.create_table(
        "issued",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute(
        "INSERT INTO issued (sop_instance_uid, series_uid, study_uid, job_id, created_at) "
        "SELECT sop_instance_uid, min(series_uid), min(study_uid), min(job_id), min(created_at) "
        "FROM outbox GROUP BY sop_instance_uid"
    )
    version = sa.table(
        "schema_version",
        sa.column("version", sa.Integer),
        sa.column("applied_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(version, [{"version": 2, "applied_at": dt.datetime.now(dt.UTC)}])


def downgrade() -> None:
    op.drop_table("issued")
    # Only possible while no SOP Instance UID is in two studies (the old key cannot hold both).
    _rebuild(("sop_instance_uid",))
    op.execute("DELETE FROM schema_version WHERE version = 2")
