"""Specification of the console's credentials: hashes, tokens, the login limit, the proxy."""

from __future__ import annotations

import time

import pytest

from node.web.auth import (
    LoginLimiter,
    Role,
    User,
    check_password,
    csrf_token,
    csrf_valid,
    from_trusted_proxy,
    hash_password,
    login_keys,
    new_token,
    token_sha256,
)


def test_a_password_is_kept_as_an_argon2id_hash_only() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert check_password(stored, "correct horse battery") == (True, None)
    assert check_password(stored, "correct horse battery!")[0] is False
    assert check_password(None, "anything")[0] is False
    assert check_password("not a hash", "anything")[0] is False
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


def test_an_old_hash_is_replaced_at_the_next_login() -> None:
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("pw-of-old")
    ok, rehash = check_password(weak, "pw-of-old")
    assert ok and rehash is not None and rehash != weak


def test_login_tokens_are_random_and_stored_as_hashes() -> None:
    first, second = new_token(), new_token()
    assert first != second and len(first) >= 43
    assert token_sha256(first) != first and len(token_sha256(first)) == 64


def test_a_csrf_token_fits_only_its_own_cookie() -> None:
    binding = new_token()
    token = csrf_token(binding)
    assert csrf_valid(binding, token)
    assert not csrf_valid(new_token(), token)
    assert not csrf_valid(binding, "")
    assert not csrf_valid(None, token)
    assert not csrf_valid("", csrf_token(""))


def test_roles_are_ordered() -> None:
    user = User("otto", Role.named("operator"), "session", "x")
    assert user.may(Role.VIEWER) and user.may(Role.OPERATOR) and not user.may(Role.ADMIN)
    with pytest.raises(ValueError, match="unknown role"):
        Role.named("root")


def test_the_limiter_counts_per_key_within_its_window() -> None:
    limiter = LoginLimiter(attempts=2, window_s=0.5)
    keys = login_keys("Otto", "10.0.0.1")
    assert keys[0] == "pair:otto@10.0.0.1"
    assert limiter.retry_after(keys) is None
    limiter.failed(keys)
    limiter.failed(keys)
    assert limiter.retry_after(keys) == 1
    # Only that address's tries at that name wait: the name from another address, and other
    # names from this address, have four times the attempts.
    assert limiter.retry_after(login_keys("otto", "10.0.0.2")) is None
    assert limiter.retry_after(login_keys("vera", "10.0.0.1")) is None
    time.sleep(0.6)
    assert limiter.retry_after(keys) is None
    limiter.failed(keys)
    limiter.forget(keys[0])
    assert limiter.retry_after(keys) is None


def test_guessing_from_many_addresses_still_stops_at_the_name() -> None:
    limiter = LoginLimiter(attempts=2, window_s=60)
    for address in range(8):
        limiter.failed(login_keys("ada", f"10.0.0.{address}"))
    assert limiter.retry_after(login_keys("ada", "10.9.9.9")) is not None


@pytest.mark.parametrize(
    ("client", "proxies", "trusted"),
    [
        ("10.0.0.5", ["10.0.0.5"], True),
        ("10.0.0.5", ["10.0.0.0/24"], True),
        ("10.0.1.5", ["10.0.0.0/24"], False),
        ("::1", ["::1"], True),
        ("::ffff:10.0.0.5", ["10.0.0.5"], True),
        ("testclient", ["10.0.0.0/8"], False),
        (None, ["10.0.0.0/8"], False),
        ("10.0.0.5", [], False),
    ],
)
def test_only_listed_proxies_are_trusted(
    client: str | None, proxies: list[str], trusted: bool
) -> None:
    assert from_trusted_proxy(client, proxies) is trusted
