"""Alembic's environment: runs the migrations on the connection node.store.migrate hands it.

Only the online mode exists: node.store.migrate opens the connection (with the SQLite write
lock held, see there) and passes it as ``config.attributes["connection"]``; there is no
alembic.ini and no URL here.
"""

from __future__ import annotations

from alembic import context

from node.store.schema import metadata

if context.is_offline_mode():
    raise RuntimeError("the store's migrations run online only (node.store.migrate.upgrade)")

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things: later revisions use op.batch_alter_table.
    render_as_batch=True,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
