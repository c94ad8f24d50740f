"""Specification of `mvi-node users`: the console's accounts, made on the node's host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from node.core.settings import load_settings
from node.store.database import Store
from node.web.auth import check_password


def users(
    config: Path, *args: str, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`mvi-node users …` with the password on standard input (not a terminal)."""
    script = shutil.which("mvi-node", path=str(Path(sys.executable).parent)) or "mvi-node"
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("MVI_")}
    return subprocess.run(
        [script, "users", *args, "--config", str(config)],
        input=(password + "\n") if password is not None else "",
        capture_output=True,
        text=True,
        env=clean,
        timeout=120,
        check=False,
    )


def config_in(tmp_path: Path) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    return config


def test_an_account_is_added_before_the_first_start_with_its_password_hashed(
    tmp_path: Path,
) -> None:
    config = config_in(tmp_path)
    added = users(config, "add", "ada", "--role", "admin", password="a long passphrase")
    assert added.returncode == 0, added.stderr
    assert "account ada (admin) added in" in added.stdout
    store = Store(load_settings(config).database_url, schema="check")
    stored = store.accounts().password_hash("ada")
    assert stored is not None and "passphrase" not in stored
    assert check_password(stored, "a long passphrase")[0]
    listed = users(config, "list")
    assert "ada" in listed.stdout and "admin" in listed.stdout
    assert "passphrase" not in listed.stdout + listed.stderr + added.stdout + added.stderr


def test_bad_names_roles_and_passwords_change_nothing(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    cases = [
        (("add", "ada", "--role", "root"), "a long passphrase", "--role 'root': one of"),
        (("add", "bad name", "--role", "viewer"), "a long passphrase", "user name 'bad name'"),
        (("add", "ada", "--role", "viewer"), "short", "at least 10 characters"),
        (("add", "ada", "--role", "viewer"), "", "at least 10 characters"),
    ]
    for args, password, why in cases:
        done = users(config, *args, password=password)
        assert done.returncode == 2 and why in done.stderr, done.stderr
    assert users(config, "add", "ada", password="a long passphrase").returncode == 0
    again = users(config, "add", "ada", "--role", "admin", password="another passphrase")
    assert again.returncode == 2 and "--replace" in again.stderr
    store = Store(load_settings(config).database_url, schema="check")
    account = store.accounts().user("ada")
    assert account is not None and account.role == "viewer"


def test_replace_gives_a_new_role_and_password_and_ends_the_logins(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    assert users(config, "add", "otto", password="first passphrase").returncode == 0
    store = Store(load_settings(config).database_url, schema="check")
    store.accounts().open_session("f" * 64, "otto", "127.0.0.1")
    done = users(config, "add", "otto", "--role", "operator", "--replace", password="second one!")
    assert done.returncode == 0 and "replaced" in done.stdout
    account = store.accounts().user("otto")
    assert account is not None and account.role == "operator"
    assert check_password(store.accounts().password_hash("otto"), "second one!")[0]
    import datetime as dt

    hour = dt.timedelta(hours=1)
    assert store.accounts().session_user("f" * 64, idle=hour, lifetime=hour) is None


def test_remove_deletes_an_account(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    assert users(config, "add", "vera", password="a long passphrase").returncode == 0
    assert users(config, "remove", "vera").returncode == 0
    missing = users(config, "remove", "vera")
    assert missing.returncode == 1 and "no account 'vera'" in missing.stderr


def test_list_without_a_node_says_so(tmp_path: Path) -> None:
    listed = users(config_in(tmp_path), "list")
    assert listed.returncode == 2 and "no database at" in listed.stderr


def test_account_changes_are_in_the_audit_log_under_the_host_account(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    assert users(config, "add", "vera", password="a long passphrase").returncode == 0
    assert users(config, "remove", "vera").returncode == 0
    store = Store(load_settings(config).database_url, schema="check")
    entries = store.accounts().audit_entries(10)
    assert [(e.action, e.target, e.client) for e in entries] == [
        ("account_removed", "vera", "cli"),
        ("account_added", "vera", "cli"),
    ]
    assert all(e.user_name and e.user_name.startswith("cli:") for e in entries)
