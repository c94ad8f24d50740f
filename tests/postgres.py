"""PostgreSQL as a real database server on loopback for the node's tests.

:func:`running_postgres` runs Debian's ``initdb`` in a temporary folder, starts ``postgres`` on a
free loopback port (no Unix socket anywhere but that folder, trust authentication for loopback
only) and always stops it again. PostgreSQL refuses to run as root: when the tests do, the
cluster belongs to the ``postgres`` system user the Debian package creates, and the server runs
as that user through ``runuser``.

Typical use from a test::

    from tests.postgres import postgres_server  # noqa: F401  (the session fixture)

    def test_something(postgres_database: str) -> None:
        store = Store(postgres_database)  # a new, empty database for this test
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.orthanc import free_port

#: The role the tests connect as (the cluster's superuser).
USER = "mvi"
#: How long :func:`running_postgres` waits for the server to accept connections.
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Postgres:
    """A running test server."""

    port: int
    folder: Path

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server (psycopg 3)."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def postgres_bin() -> Path:
    """Folder of Debian's PostgreSQL server programs (newest major version), or stop the test."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if not found:
        message = "PostgreSQL server not found: apt-get install postgresql"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return Path(found[-1]).parent


def _major(path: str) -> int:
    try:
        return int(Path(path).parents[1].name)
    except ValueError:
        return 0


def _as_owner(command: list[str]) -> list[str]:
    """``command`` run as the cluster's owner: this user, or ``postgres`` when that is root."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on a free loopback port, in a temporary folder removed afterwards."""
    binaries = postgres_bin()
    # Not under pytest's tmp_path: that is private to the user running the tests, and the
    # server may run as another.
    folder = Path(tempfile.mkdtemp(prefix="mvi-postgres-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            _as_owner(
                [
                    str(binaries / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed with the server
        server = subprocess.Popen(
            _as_owner(
                [
                    str(binaries / "postgres"),
                    "-D",
                    str(data),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-k",
                    str(folder),
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=100",
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        _wait_until_ready(binaries, port, server, folder)
        yield Postgres(port=port, folder=folder)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_until_ready(
    binaries: Path, port: int, server: subprocess.Popen[bytes], folder: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"postgres exited at start: {(folder / 'server.log').read_text()[-2000:]}"
            )
        ready = subprocess.run(
            [str(binaries / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", USER],
            capture_output=True,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"postgres did not accept connections within {START_TIMEOUT_S:.0f} s")


_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL server for the whole test session."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_database(postgres_server: Postgres) -> str:
    """URL of a new, empty database on the session's server."""
    return postgres_server.create_database(f"test_{os.getpid()}_{next(_names)}")
