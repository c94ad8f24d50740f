"""Schema migrations (Alembic, run from code): who creates the schema, who only checks.

The revisions live in node/store/migrations/versions and ship inside the package; Alembic's
:class:`~alembic.config.Config` is built here with ``script_location`` pointing at them, so no
alembic.ini exists at run time. ``0001`` is the baseline: the schema of the release before
migrations, which marked its databases with ``schema_version`` 1 and no ``alembic_version``.

Who may change the schema (each :class:`~node.store.database.Store` opens with a ``schema``
mode, one of :data:`SchemaMode`):

``upgrade``
    ``mvi-node serve`` on the embedded SQLite database (the default one under
    ``node.data_dir``), before it starts its workers; and ``mvi-node db upgrade`` on any
    database. Creates a new database, stamps a release database as ``0001``, applies every
    revision up to :data:`HEAD`.
``check``
    Worker processes (``serve`` brought the database to head before it started them), and
    ``serve`` on any database that is not the embedded one: such a database changes only when
    an operator runs ``mvi-node db upgrade --config F``, and ``serve`` refuses to start until
    then. Never runs DDL; never creates the SQLite file.
``create`` (the default)
    Tests and library callers: a database with no tables at all gets the schema at head; any
    other database is only checked, never migrated. The operator commands (``studies``,
    ``jobs``, ``outbox``, ``results``, ``requery``) open with ``check`` and refuse a SQLite file
    that does not exist (node.cli.main): created, it showed an empty node while the service's
    database was another one.

No process runs ``create_all`` any more. Every schema change (create, stamp, upgrade) runs in
one transaction that holds the database's write lock from its first statement
(:func:`node.store.engine.schema_engine`; SQLite's DDL is transactional), and looks at the
database's revision only once it holds the lock: two processes that open a new database at
once serialize, and the second finds it at head and does nothing.

Refused, with one line (:class:`SchemaError`): a revision this node does not know (a newer
node wrote it), a release database whose ``schema_version`` is not 1, tables that are not an
mvi-node schema, and (``check``/``create``) a database that is not at head.

Adding a revision: write node/store/migrations/versions/NNNN_what.py with ``down_revision`` the
previous head (``alembic.command.revision(migrate.alembic_config(), "what")`` writes the
skeleton), set :data:`HEAD` to it, and update node/store/schema.py and node/store/types.py to
match; the store tests compare the migrated schema with the tables. A revision an older
release cannot run against also inserts a higher ``schema_version`` so that release refuses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from node.core.errors import ConfigurationError
from node.store.engine import schema_engine, shown_url, sqlite_path
from node.store.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from alembic.config import Config

SchemaMode = Literal["check", "create", "upgrade"]

#: The newest revision of node/store/migrations/versions (a test keeps the two equal). A
#: constant so that opening a store (every CLI command, every worker) does not import Alembic.
HEAD = "0005"
#: The revision a database of the release before migrations (schema_version 1) is stamped with.
BASELINE = "0001"

MIGRATIONS = Path(__file__).parent / "migrations"

# Alembic logs its plugins and each revision at INFO (from its import on): `db upgrade` says
# what happened in its own one line, and `serve` logs nothing of it.
logging.getLogger("alembic").setLevel(logging.WARNING)


class SchemaError(ConfigurationError):
    """The database's schema is not one this node can use; its message is one line.

    ``upgrade_helps``: ``mvi-node db upgrade`` would fix it (the message then says so; the
    command line names its ``--config`` with :meth:`line`).
    """

    def __init__(self, problem: str, *, upgrade_helps: bool = False) -> None:
        self.problem = problem
        self.upgrade_helps = upgrade_helps
        super().__init__(self.line())

    def line(self, config: Path | None = None) -> str:
        """The one line, naming ``config`` in the command to run."""
        if not self.upgrade_helps:
            return self.problem
        option = f" --config {config}" if config is not None else ""
        return f"{self.problem}: run `mvi-node db upgrade{option}`"


@dataclass(frozen=True)
class Upgrade:
    """What :func:`upgrade` did: the revision before (None: a new database) and after."""

    #: The database as it may be printed (no password).
    database: str
    before: str | None
    after: str
    #: The database was written by the release before migrations (it had ``schema_version``).
    from_release: bool = False

    @property
    def changed(self) -> bool:
        """Whether anything was written."""
        return self.before != self.after or self.from_release

    def describe(self) -> str:
        """One line: the database, and from which revision to which."""
        return f"{self.database}: {self._what()}"

    def _what(self) -> str:
        if not self.changed:
            return f"already at revision {self.after} (head); nothing to do"
        if self.from_release:
            start = f"the release schema (schema_version {SCHEMA_VERSION})"
        elif self.before is None:
            start = "an empty database"
        else:
            start = f"revision {self.before}"
        return f"upgraded from {start} to revision {self.after} (head)"


def alembic_config() -> Config:
    """Alembic's configuration for the store's revisions (no alembic.ini)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@cache
def _known_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(rev.revision for rev in script.walk_revisions())


def _state(conn: Connection) -> tuple[str | None, int | None, bool]:
    """(alembic revision, release schema_version, has any table) of a database."""
    tables = set(inspect(conn).get_table_names())
    revision = None
    if "alembic_version" in tables:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    legacy = None
    if "schema_version" in tables:
        legacy = conn.execute(text("SELECT max(version) FROM schema_version")).scalar()
    return revision, legacy, bool(tables - {"alembic_version"})


def _refusal(url: str, revision: str | None, legacy: int | None, tables: bool) -> str | None:
    """Why this node cannot use or migrate the database at all, or None."""
    where = shown_url(url)
    if revision is not None and revision not in _known_revisions():
        return (
            f"the database {where} has schema revision {revision}, newer than this node's "
            f"({HEAD}): upgrade mvi-node"
        )
    if revision is None and legacy is not None and legacy != SCHEMA_VERSION:
        return (
            f"the database {where} has schema_version {legacy}, which this node does not know "
            f"(it knows {SCHEMA_VERSION}): upgrade mvi-node"
        )
    if revision is None and legacy is None and tables:
        return f"the database {where} holds tables but no mvi-node schema; give another one"
    return None


def current_revision(url: str) -> str | None:
    """The database's revision (None: new, or written by the release before migrations)."""
    engine = schema_engine(url)
    try:
        with engine.connect() as conn:
            return _state(conn)[0]
    finally:
        engine.dispose()


def drift(url: str) -> list[str]:
    """How the database's schema differs from node/store/schema.py's tables (empty: not at all).

    For tests and for whoever writes a revision: a migration and the tables must agree.
    """
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from node.store.schema import metadata

    engine = schema_engine(url)
    try:
        with engine.connect() as conn:
            return [
                repr(diff)
                for diff in compare_metadata(
                    MigrationContext.configure(conn, opts={"include_name": _ours}), metadata
                )
            ]
    finally:
        engine.dispose()


def _ours(name: str | None, _kind: str, _parent: object) -> bool:
    """procrastinate's objects (revision 0004, PostgreSQL) are its own schema, not drift."""
    return not (name or "").startswith("procrastinate")


def upgrade(url: str) -> Upgrade:
    """Bring the database to :data:`HEAD` (create, stamp a release database, migrate).

    Raises
    ------
    SchemaError
        A newer or unknown schema (nothing is changed), or a database that cannot be read.
    """
    from alembic import command

    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = schema_engine(url)
    try:
        with engine.begin() as conn:
            revision, legacy, tables = _state(conn)
            refusal = _refusal(url, revision, legacy, tables)
            if refusal is not None:
                raise SchemaError(refusal)
            config = alembic_config()
            config.attributes["connection"] = conn
            from_release = revision is None and legacy is not None
            if from_release:
                # Its tables are the baseline's: record that, then migrate what follows.
                command.stamp(config, BASELINE)
            if revision != HEAD:
                command.upgrade(config, HEAD)
            return Upgrade(shown_url(url), revision, HEAD, from_release)
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(_unreadable(url, exc)) from exc
    finally:
        engine.dispose()


def ensure(url: str, mode: SchemaMode) -> None:
    """Open-time schema handling of a store (see the module docstring for the modes).

    Raises
    ------
    SchemaError
        The database is not at :data:`HEAD` and ``mode`` may not bring it there.
    """
    path = sqlite_path(url)
    if mode == "check" and path is not None and not path.is_file():
        raise SchemaError(f"no database at {path}", upgrade_helps=True)
    if mode == "create" and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "upgrade":
        upgrade(url)
        return
    engine = schema_engine(url)
    try:
        # Most opens find head: look without the write lock first.
        with engine.connect() as conn:
            revision, legacy, tables = _state(conn)
        if revision == HEAD:
            return
        if mode == "create" and not tables:
            engine.dispose()
            upgrade(url)
            return
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(_unreadable(url, exc)) from exc
    finally:
        engine.dispose()
    refusal = _refusal(url, revision, legacy, tables)
    if refusal is not None:
        raise SchemaError(refusal)
    where = shown_url(url)
    if not tables:
        raise SchemaError(f"the database {where} has no schema yet", upgrade_helps=True)
    before = f"revision {revision}" if revision else f"schema_version {legacy} (no revision)"
    raise SchemaError(
        f"the database {where} is at {before}, this node needs revision {HEAD}",
        upgrade_helps=True,
    )


def _unreadable(url: str, exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"cannot read the database {shown_url(url)}: {type(exc).__name__}: {first}"
