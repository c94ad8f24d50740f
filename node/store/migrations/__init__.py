"""Alembic's script directory for the store (env.py and versions/); run by node.store.migrate."""
