"""The node's database: studies, instances, jobs, results, outbox; the only code that runs SQL.

- :mod:`node.store.database` — :class:`~node.store.database.Store`, every query behind a
  method; callers import from here only (the row types and constants are re-exported).
- :mod:`node.store.types` — the frozen named rows Store methods take and return.
- :mod:`node.store.schema` — the tables, :class:`~node.store.schema.UTCDateTime` (the one
  time type: aware in, aware UTC out) and :func:`~node.store.schema.utcnow`.
- :mod:`node.store.migrate` — Alembic migrations run from code, and who may create or change
  the schema (``serve`` upgrades the embedded database, workers only check, ``mvi-node db
  upgrade`` for any other); the revisions are in node/store/migrations/versions.
- :mod:`node.store.engine` — engines: SQLite pragmas, and the locking one for schema changes.
"""
