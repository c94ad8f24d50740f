"""Specification of the schema migrations: a release database upgrades in place, intact.

The release database is tests/node/store/fixtures/release_schema_v1.sql, dumped from the
release before migrations; `mvi-node db upgrade` and `mvi-node serve` run as an operator runs
them (subprocesses on a configuration file).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from node.core.settings import to_toml
from node.store import migrate
from node.store.database import SchemaError, Store
from node.store.engine import schema_engine
from tests.node.cli.test_main import mvi_node
from tests.nodeproc import start_node_process
from tests.orthanc import free_port

FIXTURE = Path(__file__).parent / "fixtures" / "release_schema_v1.sql"
STUDY = "1.2.826.0.1.3680043.8.498.1"
ARTERIAL, PORTAL = "1.2.826.0.1.3680043.8.498.2.1", "1.2.826.0.1.3680043.8.498.2.2"


def release_database(path: Path) -> str:
    """A copy of the release's database at ``path``; returns its URL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    connection.executescript(FIXTURE.read_text())
    connection.close()
    return f"sqlite:///{path}"


def dump(path: Path) -> list[str]:
    connection = sqlite3.connect(path)
    try:
        return list(connection.iterdump())
    finally:
        connection.close()


def schema_of(path: Path) -> list[tuple[str, str, str]]:
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name != 'alembic_version' "
            "AND name NOT LIKE 'sqlite_autoindex_alembic%' ORDER BY name"
        ).fetchall()
    finally:
        connection.close()
    return [(kind, name, sql) for kind, name, sql in rows]


def node_config(tmp_path: Path, database_url: str | None = None) -> Path:
    """A node on loopback with lazy models (nothing here runs a job)."""
    data: dict[str, object] = {
        "node": {
            "data_dir": str(tmp_path / "data"),
            "host": "127.0.0.1",
            "port": free_port(),
            "free_disk_floor_mb": 1,
        },
        "pipeline": {"workers": 1, "device": "cpu"},
    }
    if database_url is not None:
        data["database"] = {"url": database_url}
    config = tmp_path / "node.toml"
    config.write_text(to_toml(data))
    return config


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def test_head_is_the_newest_revision_of_the_package() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert script.get_heads() == [migrate.HEAD]
    assert script.get_base() == migrate.BASELINE


def upgrade_to(url: str, revision: str) -> None:
    """Run the migrations of an empty database up to ``revision`` only."""
    from alembic import command

    engine = schema_engine(url)
    try:
        with engine.begin() as conn:
            config = migrate.alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def rows_of(url: str) -> dict[str, list[tuple[tuple[str, object], ...]]]:
    """Every row of every table, as sorted (column, value) pairs: a rebuilt table compares."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                table: sorted(
                    tuple(sorted(row._mapping.items()))
                    for row in conn.execute(text(f"SELECT * FROM {table}"))
                )
                for table in inspect(conn).get_table_names()
                if table != "alembic_version"
            }
    finally:
        engine.dispose()


def test_the_baseline_is_the_release_schema_and_head_is_the_tables(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.sqlite3"
    upgrade_to(f"sqlite:///{baseline}", migrate.BASELINE)
    release_database(tmp_path / "release.sqlite3")
    # The same DDL, statement for statement, as the release's create_all wrote.
    assert schema_of(baseline) == schema_of(tmp_path / "release.sqlite3")

    new = tmp_path / "new.sqlite3"
    assert migrate.upgrade(f"sqlite:///{new}").describe() == (
        f"sqlite:///{new}: upgraded from an empty database to revision {migrate.HEAD} (head)"
    )
    assert migrate.drift(f"sqlite:///{new}") == []


def test_instances_are_keyed_by_study_series_and_sop_uid_on_both_databases(
    tmp_path: Path, postgres_database: str
) -> None:
    for url in (f"sqlite:///{tmp_path / 'node.sqlite3'}", postgres_database):
        upgrade_to(url, migrate.BASELINE)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies VALUES ('1.2', 'k', 'done', NULL, 0, "
                    "NULL, NULL, NULL, NULL, 1, NULL, NULL, NULL, NULL)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO series VALUES ('1.2.1', '1.2', 'CT', '1.2.840', "
                    "1, 'A', true, false, 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO instances VALUES ('1.2.1.1', '1.2.1', '1.2', "
                    "'1.2.840', NULL, 'aa/1.dcm', 10, 'ab', 'PACS', "
                    "'2026-12-01 10:00:00')"
                )
            )
        before = rows_of(url)
        assert migrate.upgrade(url).after == migrate.HEAD
        after = rows_of(url)
        assert after["instances"] == before["instances"]
        assert [r for r in after["schema_version"] if r not in before["schema_version"]]
        with engine.connect() as conn:
            key = inspect(conn).get_pk_constraint("instances")
        engine.dispose()
        assert key["constrained_columns"] == ["study_uid", "series_uid", "sop_instance_uid"]
        assert migrate.drift(url) == []


def test_db_upgrade_brings_a_release_database_to_head_with_every_row(tmp_path: Path) -> None:
    path = tmp_path / "data" / "mvi-node.sqlite3"  # the embedded database of the config
    url = release_database(path)
    config = node_config(tmp_path)
    before = rows_of(url)

    done = mvi_node("db", "upgrade", "--config", config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"{url}: upgraded from the release schema (schema_version 1) to revision "
        f"{migrate.HEAD} (head)"
    )
    assert migrate.current_revision(url) == migrate.HEAD
    # Every row of the release is still there, value for value; the only new row is the
    # schema_version that makes the release refuse this database now.
    after = rows_of(url)
    # Columns later revisions added hold their defaults on the release's rows (0003: leases).
    added = {
        "jobs": {"lease": 0, "worker": None, "heartbeat_at": None},
        "results": {"attempt": None},
        "outbox": {"owner": None, "lease_until": None},
    }
    for table, defaults in added.items():
        for row in after[table]:
            assert {k: v for k, v in row if k in defaults} == defaults, table
        after[table] = [tuple((k, v) for k, v in row if k not in defaults) for row in after[table]]
    # Tables later revisions added start empty (0005: the console's accounts and audit log).
    new_tables = ("users", "web_sessions", "audit_log")
    assert all(after[table] == [] for table in new_tables)
    assert {
        t: r for t, r in after.items() if t not in ("schema_version", "issued", *new_tables)
    } == {t: r for t, r in before.items() if t != "schema_version"}
    assert len(after["schema_version"]) == len(before["schema_version"]) + 1
    # What the release delivered is known as the node's own output from now on.
    assert [dict(r)["sop_instance_uid"] for r in after["issued"]] == [
        dict(r)["sop_instance_uid"] for r in before["outbox"]
    ]

    store = Store(url, schema="check")  # what a worker of `serve` does
    try:
        study = store.study(STUDY)
        assert study is not None
        assert (study.study_key, study.state, study.instance_count) == ("6dadc91b850d", "done", 3)
        assert (study.patient_id, study.accession_number, study.study_date) == (
            "PID-1",
            "ACC1",
            "20240102",
        )
        assert study.pairing == {"arterial": ARTERIAL, "portal_venous": PORTAL}
        assert study.last_received_at == utc("2026-12-01 22:17:26.377460")
        files = store.instance_files(STUDY)
        assert [(f.series_uid, f.analysable, f.own_output) for f in files] == [
            (ARTERIAL, True, False),
            (ARTERIAL, True, False),
            (PORTAL, True, False),
        ]
        assert {f.calling_ae for f in files} == {"PACS"}
        assert store.instance_sha256(STUDY, ARTERIAL, "1.2.826.0.1.3680043.8.498.3.2") == "b" * 64
        (job,) = store.list_jobs()
        assert (job.id, job.state, job.attempts, job.worker_pid) == (1, "done", 1, 4242)
        assert (job.arterial_uid, job.portal_venous_uid) == (ARTERIAL, PORTAL)
        assert job.created_at == utc("2026-12-01 22:17:26.382435")
        assert job.finished_at is not None and job.finished_at.tzinfo is dt.UTC
        result = store.latest_result(STUDY)
        assert result is not None and result.job_id == 1 and result.status == "scored"
        # A result.json of the release (no schema_version) reads as a typed version-1 result.
        assert result.result.schema_version == 1 and result.result.risk_category == "high"
        assert result.result.tumor is not None and result.result.tumor.max_diameter_mm == 41.5
        (item,) = store.list_outbox()
        assert (item.destination, item.state, item.path) == ("pacs", "pending", "/spool/out/1.dcm")
        assert item.next_attempt_at == utc("2026-12-01 22:17:26.401762")
        retro = store.retrospective_row(STUDY)
        assert retro is not None and (retro.state, retro.study_date) == ("done", "20240102")
        assert retro.requested_at == utc("2026-12-01 22:17:26.359398")
        # And the upgraded database takes new rows.
        assert store.reprocess(STUDY) == 2
    finally:
        store.close()

    written = dump(path)
    again = mvi_node("db", "upgrade", "--config", config)
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout.strip() == f"{url}: already at revision {migrate.HEAD} (head); nothing to do"
    )
    assert dump(path) == written


def test_serve_refuses_an_out_of_date_database_that_is_not_embedded(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "node.sqlite3"
    url = release_database(path)
    config = node_config(tmp_path, url)
    before = dump(path)

    refused = mvi_node("serve", "--config", config)
    assert refused.returncode == 2
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("mvi-node:")]
    assert line.endswith(f"run `mvi-node db upgrade --config {config}`"), refused.stderr
    assert "schema_version 1" in line and f"revision {migrate.HEAD}" in line
    # Offline commands refuse it the same way, and nobody changed it.
    listed = mvi_node("studies", "list", "--config", config)
    assert listed.returncode == 2 and f"db upgrade --config {config}" in listed.stderr
    assert dump(path) == before

    assert mvi_node("db", "upgrade", "--config", config).returncode == 0
    node = start_node_process(config, tmp_path / "node.log")  # serve accepts it now
    try:
        shown = mvi_node("studies", "list", "--config", config)
        assert shown.returncode == 0 and "6dadc91b850d" in shown.stdout
    finally:
        node.stop()


def test_serve_upgrades_the_embedded_database_itself(tmp_path: Path) -> None:
    url = release_database(tmp_path / "data" / "mvi-node.sqlite3")
    config = node_config(tmp_path)
    with pytest.raises(SchemaError, match="run `mvi-node db upgrade`"):
        Store(url, schema="check")
    node = start_node_process(config, tmp_path / "node.log")
    try:
        assert migrate.current_revision(url) == migrate.HEAD
        store = node.store()
        assert store.study(STUDY) is not None
        store.close()
    finally:
        node.stop()


def test_db_upgrade_refuses_what_it_cannot_read_or_does_not_know(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all " * 100)
    refused = mvi_node("db", "upgrade", "--config", node_config(tmp_path, f"sqlite:///{garbage}"))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "cannot read the database" in refused.stderr

    newer = tmp_path / "newer.sqlite3"
    Store(f"sqlite:///{newer}").close()
    connection = sqlite3.connect(newer)
    with connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    connection.close()
    before = dump(newer)
    refused = mvi_node("db", "upgrade", "--config", node_config(tmp_path, f"sqlite:///{newer}"))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert (
        f"schema revision 0099, newer than this node's ({migrate.HEAD}): upgrade mvi-node"
        in refused.stderr
    )
    assert dump(newer) == before


def test_a_worker_only_checks_and_never_creates_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "data" / "mvi-node.sqlite3"
    with pytest.raises(SchemaError, match="no database at"):
        Store(f"sqlite:///{missing}", schema="check")
    assert not missing.exists()


def _open(url: str) -> None:
    Store(url).close()


def test_processes_opening_a_new_database_at_once_create_it_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'mvi-node.sqlite3'}"
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        pool.map(_open, [url] * 8)  # raises here if any of them failed
    connection = sqlite3.connect(tmp_path / "data" / "mvi-node.sqlite3")
    assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
        (migrate.HEAD,)
    ]
    # One row per revision that an older release must refuse (the baseline's and 0002's).
    assert connection.execute("SELECT count(*) FROM schema_version").fetchone() == (2,)
    connection.close()


def _open_as(args: tuple[str, str]) -> str:
    url, mode = args
    Store(url, schema=mode).close()  # type: ignore[arg-type]
    return mode


def test_four_processes_on_a_new_postgresql_database(postgres_database: str) -> None:
    """Before `db upgrade` every worker refuses (naming it); four upgraders at once serialize
    on the advisory lock; after it, four workers and receivers open it at once."""
    context = multiprocessing.get_context("spawn")
    with pytest.raises(SchemaError, match="db upgrade"):
        Store(postgres_database, schema="check")
    with context.Pool(4) as pool:
        assert pool.map(_open_as, [(postgres_database, "upgrade")] * 4) == ["upgrade"] * 4
        assert pool.map(_open_as, [(postgres_database, "check")] * 4) == ["check"] * 4
    assert migrate.current_revision(postgres_database) == migrate.HEAD
