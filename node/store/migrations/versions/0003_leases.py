"""Leases: fenced job attempts, worker identities, heartbeats, claimed outbox rows.

Several worker hosts share one PostgreSQL database. Every engine is at-least-once: after a
network cut the stalled-job sweep gives a job to another worker while the first one may still
finish it. Each claim now increments ``jobs.lease``; an attempt commits its result, outbox rows
and job state only while the row still carries its lease (:meth:`Store.hold_lease`), and writes
its files under ``job-<id>/attempt-<lease>/`` (``results.attempt``), so a losing attempt
neither records nor overwrites anything.

``jobs.worker`` names the worker as ``host:pid`` (a PID alone repeats across hosts);
``jobs.heartbeat_at`` is refreshed by a thread of the worker from the database's clock, and
the stalled-job sweep goes by it. ``outbox.owner`` and ``outbox.lease_until``: a dispatcher
claims the rows it sends, so two receivers never send one row at once.

Columns only, each with a default: rows of earlier revisions keep their meaning (lease 0, no
attempt folder: ``job-<id>/``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("lease", sa.Integer, nullable=False, server_default="0"))
        jobs.add_column(sa.Column("worker", sa.String(128)))
        jobs.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("results") as results:
        results.add_column(sa.Column("attempt", sa.Integer))
    with op.batch_alter_table("outbox") as outbox:
        outbox.add_column(sa.Column("owner", sa.String(128)))
        outbox.add_column(sa.Column("lease_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as outbox:
        outbox.drop_column("lease_until")
        outbox.drop_column("owner")
    with op.batch_alter_table("results") as results:
        results.drop_column("attempt")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("heartbeat_at")
        jobs.drop_column("worker")
        jobs.drop_column("lease")
