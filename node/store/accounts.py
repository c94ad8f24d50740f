"""The console's accounts, logins and audit log (node.web); reached as ``Store.accounts()``.

Apart from the analysis tables: nothing the pipeline does reads them, and a console action
that changes a study goes through :class:`node.store.database.Store` like the CLI's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from node.store.schema import audit_log, users, utcnow, web_sessions
from node.store.types import Account, AuditEntry, from_row

#: The console's roles, least to most.
ROLES = ("viewer", "operator", "admin")

#: An account row without its hash (what :class:`Account` holds).
ACCOUNT = (users.c.name, users.c.role, users.c.created_at, users.c.password_changed_at)


class Accounts:
    """Accounts, sessions and the audit log on the store's engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- accounts ----------------------------------------------------------------------------

    def save_user(self, name: str, role: str, password_hash: str) -> bool:
        """Create the account, or give an existing one this role and password (its logins end).

        Returns True when the account is new.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        now = utcnow()
        with self._engine.begin() as conn:
            changed = conn.execute(
                update(users)
                .where(users.c.name == name)
                .values(role=role, password_hash=password_hash, password_changed_at=now)
            ).rowcount
            if changed:
                conn.execute(delete(web_sessions).where(web_sessions.c.user_name == name))
                return False
            conn.execute(
                insert(users).values(
                    name=name,
                    role=role,
                    password_hash=password_hash,
                    created_at=now,
                    password_changed_at=now,
                )
            )
        return True

    def user(self, name: str) -> Account | None:
        """An account, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(select(*ACCOUNT).where(users.c.name == name)).first()
        return from_row(Account, row._mapping) if row is not None else None

    def password_hash(self, name: str) -> str | None:
        """The account's argon2 hash, or None without such an account."""
        with self._engine.connect() as conn:
            value = conn.execute(
                select(users.c.password_hash).where(users.c.name == name)
            ).scalar_one_or_none()
        return str(value) if value is not None else None

    def set_password_hash(self, name: str, password_hash: str) -> None:
        """Replace a hash without ending logins (argon2's rehash on login)."""
        with self._engine.begin() as conn:
            conn.execute(
                update(users).where(users.c.name == name).values(password_hash=password_hash)
            )

    def list_users(self) -> list[Account]:
        """Every account, by name."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(*ACCOUNT).order_by(users.c.name))
            return [from_row(Account, row._mapping) for row in rows]

    def remove_user(self, name: str) -> bool:
        """Delete an account and its logins; False when there is none."""
        with self._engine.begin() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.user_name == name))
            return bool(conn.execute(delete(users).where(users.c.name == name)).rowcount)

    # -- logins ------------------------------------------------------------------------------

    def open_session(self, token_sha256: str, user_name: str, client: str | None) -> None:
        """Record a login under the hash of its cookie token."""
        now = utcnow()
        with self._engine.begin() as conn:
            conn.execute(
                insert(web_sessions).values(
                    token_sha256=token_sha256,
                    user_name=user_name,
                    created_at=now,
                    last_seen_at=now,
                    client=client,
                )
            )

    def session_user(
        self,
        token_sha256: str,
        *,
        idle: dt.timedelta,
        lifetime: dt.timedelta,
        touch: bool = True,
    ) -> Account | None:
        """The account of a live login, or None.

        A login unused for ``idle``, or older than ``lifetime``, is over (deleted here, with
        every other such login). ``touch``: this request restarts the idle clock (a page's own
        polling does not).
        """
        now = utcnow()
        with self._engine.begin() as conn:
            conn.execute(
                delete(web_sessions).where(
                    (web_sessions.c.last_seen_at < now - idle)
                    | (web_sessions.c.created_at < now - lifetime)
                )
            )
            row = conn.execute(
                select(*ACCOUNT)
                .join(web_sessions, web_sessions.c.user_name == users.c.name)
                .where(web_sessions.c.token_sha256 == token_sha256)
            ).first()
            if row is None:
                return None
            if touch:
                conn.execute(
                    update(web_sessions)
                    .where(web_sessions.c.token_sha256 == token_sha256)
                    .values(last_seen_at=now)
                )
        return from_row(Account, row._mapping)

    def close_session(self, token_sha256: str) -> None:
        """End a login (logout)."""
        with self._engine.begin() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.token_sha256 == token_sha256))

    # -- audit log ---------------------------------------------------------------------------

    def log(
        self,
        action: str,
        outcome: str,
        *,
        user_name: str | None,
        role: str | None,
        client: str | None,
        target: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one line to the audit log."""
        with self._engine.begin() as conn:
            conn.execute(
                insert(audit_log).values(
                    at=utcnow(),
                    user_name=user_name,
                    role=role,
                    client=client,
                    action=action,
                    target=target,
                    outcome=outcome,
                    detail=detail,
                )
            )

    def audit_entries(
        self, limit: int = 200, *, actions: Sequence[str] = (), user_name: str | None = None
    ) -> list[AuditEntry]:
        """The newest audit-log lines first."""
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if actions:
            query = query.where(audit_log.c.action.in_(list(actions)))
        if user_name is not None:
            query = query.where(audit_log.c.user_name == user_name)
        with self._engine.connect() as conn:
            return [from_row(AuditEntry, row._mapping) for row in conn.execute(query)]
