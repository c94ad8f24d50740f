"""Engines for the store: SQLite pragmas, and a locking engine for schema changes."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import NullPool


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def shown_url(url: str) -> str:
    """The URL as it may be printed (no password)."""
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, synchronous: str = "FULL") -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the receiver write while workers read; synchronous=FULL makes a commit durable
    # when it returns; busy_timeout lets processes queue for the lock.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(
    url: str, *, synchronous: Literal["FULL", "NORMAL"] = "FULL", immediate: bool = False
) -> Engine:
    """The engine a :class:`~node.store.database.Store` runs its queries on.

    ``synchronous`` (SQLite only): ``NORMAL`` leaves a commit's WAL fsync to the next checkpoint
    or FULL commit — durable when the process dies, not when the machine loses power. Only the
    receive path's instance rows use it: their files are fsynced before the commit, and
    :func:`node.receive.recover.recover_instances` records the ones a power loss took.

    ``immediate`` (SQLite only): every transaction takes the write lock at its start (``BEGIN
    IMMEDIATE``), for transactions that read, then write — a deferred one that read before
    another connection's commit cannot upgrade and fails at once, busy handler or not.
    """
    # hide_parameters: an error's message would otherwise carry the row's values (patient names).
    options: dict[str, Any] = {}
    if make_url(url).get_backend_name() == "postgresql":
        # A server restart or a network cut leaves dead connections in the pool: test each
        # before use rather than fail the first query after the database is back.
        options["pool_pre_ping"] = True
    engine = create_engine(url, future=True, hide_parameters=True, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", partial(_sqlite_pragmas, synchronous=synchronous))
        if immediate:

            def autocommit(dbapi_connection: Any, _record: Any) -> None:
                # The driver's own BEGIN would come first; ours is the only one.
                dbapi_connection.isolation_level = None

            def begin(conn: Connection) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            event.listen(engine, "connect", autocommit)
            event.listen(engine, "begin", begin)
    return engine


def schema_engine(url: str) -> Engine:
    """An engine whose transactions hold the database's write lock from their first statement.

    SQLite: the driver's own transaction handling is switched off (it would commit before DDL)
    and every transaction starts with ``BEGIN IMMEDIATE``, so DDL is transactional and a second
    process that wants to change the schema waits (busy_timeout) until the first has committed.
    PostgreSQL: a transaction-scoped advisory lock does the same.
    """
    engine = create_engine(url, future=True, poolclass=NullPool, hide_parameters=True)
    if engine.dialect.name == "sqlite":

        def connect(dbapi_connection: Any, record: Any) -> None:
            _sqlite_pragmas(dbapi_connection, record)
            dbapi_connection.isolation_level = None

        def begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        event.listen(engine, "connect", connect)
        event.listen(engine, "begin", begin)
    elif engine.dialect.name == "postgresql":

        def lock(conn: Connection) -> None:
            # Any constant: every mvi-node upgrader takes the same one.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7346011)")

        event.listen(engine, "begin", lock)
    return engine
