"""Wake-ups for the cluster's workers: procrastinate jobs that point at the node's job rows.

On PostgreSQL, every time a row of ``jobs`` becomes ``queued`` a procrastinate job naming it is
deferred **in the same transaction** (a rollback drops both, a commit keeps both; procrastinate's
insert trigger sends NOTIFY at commit, so an idle worker starts within milliseconds instead of
polling). The jobs table stays the record: a worker's procrastinate task claims the job row with
a new lease (:meth:`node.store.database.Store.claim_job`), and a pointer whose job is no longer
queued (claimed as a batch-mate, superseded, cancelled, done) ends at once.

SQLite databases never reach this module, so the embedded node never imports procrastinate.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url

if TYPE_CHECKING:
    import procrastinate

#: The procrastinate task a worker runs for a job row, and its queue.
RUN_JOB = "mvi.run_job"
JOB_QUEUE = "mvi-jobs"


def conninfo(url: str) -> str:
    """libpq's URI for the store's ``postgresql+psycopg://`` URL (procrastinate's connector)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def require_procrastinate() -> None:
    """Refuse, in one line, a PostgreSQL store without the cluster extra installed."""
    try:
        import procrastinate  # noqa: F401
    except ImportError:
        from node.core.errors import ConfigurationError

        raise ConfigurationError(
            "a PostgreSQL database.url needs the cluster extra: pip install 'mvi-node[cluster]'"
        ) from None


@cache
def _app() -> procrastinate.App:
    require_procrastinate()
    import procrastinate

    # Deferring on a caller's connection needs no pool: the connector is never opened here.
    return procrastinate.App(connector=procrastinate.SyncPsycopgConnector())


def announce(conn: Connection, job_id: int, priority: int) -> None:
    """Defer the pointer to job ``job_id`` inside ``conn``'s transaction (PostgreSQL only)."""
    if conn.dialect.name != "postgresql":
        return
    driver: Any = conn.connection.driver_connection
    # The node's priority is "lower runs first"; procrastinate's is "higher runs first".
    task = _app().configure_task(RUN_JOB, queue=JOB_QUEUE, connection=driver, priority=-priority)
    task.defer(job_id=job_id)


def retire(conn: Connection, job_id: int) -> None:
    """A job was claimed: its waiting pointers are spent (PostgreSQL only).

    The pool's workers on a single host claim by polling, and a worker claims batch-mates
    directly; without this their pointers would wait for ever, or wake a worker for nothing.
    """
    if conn.dialect.name != "postgresql":
        return
    conn.execute(
        text(
            "DELETE FROM procrastinate_jobs WHERE task_name = :task AND status = 'todo'"
            " AND (args->>'job_id')::int = :job"
        ),
        {"task": RUN_JOB, "job": job_id},
    )


def unannounced(conn: Connection) -> list[tuple[int, int]]:
    """Queued job rows without a waiting pointer: (id, priority) of each.

    A database migrated from a release without pointers has such rows, and so does a job whose
    pointer a worker fetched but could not claim (the database went away in between: the
    pointer stays ``doing``). The stalled-job sweep announces them; a second pointer to one job
    is harmless (the claim goes to one of them).
    """
    if conn.dialect.name != "postgresql":
        return []
    rows = conn.execute(
        text(
            "SELECT j.id, j.priority FROM jobs j WHERE j.state = 'queued' AND NOT EXISTS ("
            " SELECT 1 FROM procrastinate_jobs p WHERE p.task_name = :task"
            " AND p.status = 'todo' AND (p.args->>'job_id')::int = j.id)"
        ),
        {"task": RUN_JOB},
    )
    return [(int(row.id), int(row.priority)) for row in rows]
