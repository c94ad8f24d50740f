"""Who is asking, and may they: passwords, login cookies, CSRF tokens, the login rate limit.

- Passwords are kept as argon2id hashes (argon2-cffi's defaults, rehashed on login when those
  change); a password is never logged or stored.
- A login is a random token in an HTTP-only, SameSite=Strict cookie (Secure unless
  ``web.secure_cookies`` is off); the store keeps only its SHA-256 and ends it after
  ``web.session_idle_minutes`` without use.
- Single sign-on: ``web.trusted_user_header`` names the user, believed only from an address in
  ``web.trusted_proxies``; the name must be a local account, whose role applies.
- Every form carries a CSRF token: an HMAC of the login's cookie token (or, before a login and
  under single sign-on, of a random ``mvi_csrf`` cookie), checked on every POST together with
  the Origin header when the browser sends one. Nothing server-side to keep in step across
  several consoles.
- Failed logins are counted in this process (the console is one process) per user name *and*
  address, per user name and per address: past ``web.login_attempts`` for a name from one
  address, or four times that for a name from anywhere or for an address (a reading room behind
  one NAT), within ``web.login_window_s``, the answer is 429. Someone guessing from one address
  locks out that address's tries at the name, not the account's owner at their own desk.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

#: The login cookie and the pre-login CSRF cookie.
SESSION_COOKIE = "mvi_session"
CSRF_COOKIE = "mvi_csrf"
#: The form field and the header (htmx requests) that carry the CSRF token.
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

_hasher = PasswordHasher()
# Verifying against this when the account does not exist takes as long as a real check, so the
# answer's timing does not tell which accounts exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class Role(enum.IntEnum):
    """The console's roles; each may do what the ones below it may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def named(cls, name: str) -> Role:
        """The role of a stored name (``viewer``, ``operator``, ``admin``)."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}") from None

    @property
    def label(self) -> str:
        """The role's name as configuration and the store spell it."""
        return self.name.lower()


@dataclass(frozen=True)
class User:
    """The user of one request."""

    name: str
    role: Role
    #: How they came in: ``session`` (login cookie) or ``header`` (single sign-on).
    via: str
    #: What the request's CSRF token is bound to.
    csrf_binding: str

    def may(self, role: Role) -> bool:
        """Whether this user holds ``role`` or a higher one."""
        return self.role >= role


def hash_password(password: str) -> str:
    """The argon2id hash of a new password."""
    if not password:
        raise ValueError("the password is empty")
    return _hasher.hash(password)


def check_password(stored_hash: str | None, password: str) -> tuple[bool, str | None]:
    """Whether ``password`` matches; and a new hash when the stored one's parameters are old."""
    try:
        _hasher.verify(stored_hash or _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return False, None
    if stored_hash is None:
        return False, None
    return True, _hasher.hash(password) if _hasher.check_needs_rehash(stored_hash) else None


def new_token() -> str:
    """A login (or CSRF cookie) token: 256 random bits."""
    return secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    """What the store keeps of a login token."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(binding: str) -> str:
    """The CSRF token of forms shown to the holder of ``binding`` (a cookie's token)."""
    return hmac.new(binding.encode(), b"mvi-node csrf", hashlib.sha256).hexdigest()


def csrf_valid(binding: str | None, given: str | None) -> bool:
    """Whether a POST's token belongs to its cookie."""
    if not binding or not given:
        return False
    return hmac.compare_digest(csrf_token(binding), given)


def from_trusted_proxy(client: str | None, proxies: Iterable[str]) -> bool:
    """Whether ``client`` (an address) lies in one of ``proxies`` (addresses or networks)."""
    if not client:
        return False
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack listener reports 10.0.0.5 as ::ffff:10.0.0.5.
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(net, strict=False) for net in proxies)


#: How many more failures a user name (from all addresses) or an address (for all names) may
#: have than one name from one address.
WIDE_FACTOR = 4

#: A console account's name: what a login form or a proxy's header may carry.
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def valid_user_name(name: str) -> bool:
    """Whether ``name`` can be an account's (checked before any query)."""
    return USER_NAME.fullmatch(name) is not None


def login_keys(name: str, client: str) -> list[str]:
    """The limiter's keys of a login: the name from this address first, then the wide ones."""
    name = name.lower()[:64]
    return [f"pair:{name}@{client}", f"user:{name}", f"client:{client}"]


class LoginLimiter:
    """Failed logins per key of :func:`login_keys` within a sliding window (``pair:`` keys get
    ``attempts``, the others :data:`WIDE_FACTOR` times as many)."""

    def __init__(self, attempts: int, window_s: float) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, keys: Iterable[str]) -> int | None:
        """Seconds until a key is below the limit again; None when none is at it."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                limit = self.attempts * (1 if key.startswith("pair:") else WIDE_FACTOR)
                if len(times) >= limit:
                    wait = max(wait, times[0] + self.window_s - now)
        return max(1, int(wait + 0.999)) if wait > 0 else None

    def failed(self, keys: Iterable[str]) -> None:
        """Count one failed login against each key."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)

    def forget(self, key: str) -> None:
        """A successful login clears its own key's failures (not the wide keys')."""
        with self._lock:
            self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times
