"""Specification of logging: JSON lines off a TTY, console lines on one, no patient identifiers."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import sqlite3
from pathlib import Path

from node.core.logging import (
    LogFile,
    configure_logging,
    exception_summary,
    get_logger,
    log_queue,
    stop_log_file,
    study_key,
    uid_key,
)
from node.store.database import InstanceRecord, Store

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_study_key_is_short_stable_and_not_the_uid() -> None:
    key = study_key(UID)
    assert key == study_key(UID)
    assert len(key) == 12 and all(c in "0123456789abcdef" for c in key)
    assert key != study_key(UID + "1")
    assert UID not in key


def test_json_lines_when_the_stream_is_not_a_tty() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    get_logger("test").info("hello", answer=42)
    record = json.loads(stream.getvalue().strip())
    assert record["event"] == "hello"
    assert record["answer"] == 42
    assert record["component"] == "test"
    assert record["level"] == "info"
    assert "timestamp" in record


def test_console_lines_on_a_tty() -> None:
    stream = FakeTTY()
    configure_logging("info", stream=stream)
    get_logger("test").info("hello", answer=42)
    text = stream.getvalue()
    assert "hello" in text and "answer" in text
    assert not text.lstrip().startswith("{")


def test_level_filters_lower_levels() -> None:
    stream = io.StringIO()
    configure_logging("warning", stream=stream)
    log = get_logger("test")
    log.info("quiet")
    log.warning("loud")
    assert "quiet" not in stream.getvalue() and "loud" in stream.getvalue()


def test_patient_identifiers_never_reach_a_log_line() -> None:
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    get_logger("test").info(
        "stored",
        PatientName="DOE^JANE",
        patient_id="PID-998877",
        PatientBirthDate="19450101",
        accession_number="ACC-55443322",
        AccessionNumber="ACC-55443322",
        study_instance_uid=UID,
    )
    text = stream.getvalue()
    for secret in ("DOE^JANE", "PID-998877", "19450101", "ACC-55443322", UID):
        assert secret not in text
    record = json.loads(text.strip())
    assert record["study_key"] == study_key(UID)


def test_series_and_instance_uids_become_keys() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    get_logger().info("x", SeriesInstanceUID="1.2.3", sop_instance_uid="1.2.3.4")
    record = json.loads(stream.getvalue().strip())
    assert record == record | {"series_key": uid_key("1.2.3"), "instance_key": uid_key("1.2.3.4")}
    assert "1.2.3" not in stream.getvalue()


def test_a_database_error_on_a_phi_laden_row_logs_no_identifier(tmp_path: Path) -> None:
    """SQLAlchemy puts a failed statement's parameters in its message, and a traceback quotes
    it: the node's log keeps the error's type and where it happened, never the row's values."""
    store = Store(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    connection = sqlite3.connect(tmp_path / "node.sqlite3")
    with connection:
        connection.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON studies "
            "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
        )
    connection.close()
    row = InstanceRecord(
        study_uid=UID,
        series_uid=UID + ".1",
        sop_instance_uid=UID + ".1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path="aa/x.dcm",
        size=10,
        sha256="0" * 64,
        calling_ae="SCU",
        modality="CT",
        analysable=True,
        patient_id="PID-998877",
        patient_name="DOE^JANE",
        accession_number="ACC-55443322",
        study_date="19450101",
    )
    for stream, on_tty in ((io.StringIO(), False), (FakeTTY(), True)):
        configure_logging("info", stream=stream)
        try:
            store.record_instance(row)
        except Exception:
            get_logger("test").exception("store failed")
            logging.getLogger("a.library").exception("job raised")
        else:
            raise AssertionError("the trigger should have refused the row")
        text = stream.getvalue()
        for secret in ("DOE^JANE", "PID-998877", "ACC-55443322", "19450101", UID):
            assert secret not in text, (on_tty, secret)
        assert "IntegrityError" in text and "record_instance" in text
        if not on_tty:
            record = json.loads(text.splitlines()[0])
            assert record["exception"].startswith("IntegrityError: ")


def test_an_exception_summary_masks_quoted_values_and_keeps_the_frames() -> None:
    try:
        raise ValueError("bad PatientName 'DOE^JANE' in \"file-of-DOE\"")
    except ValueError as exc:
        summary = exception_summary(type(exc), exc, exc.__traceback__)
    assert "DOE" not in summary
    assert summary.startswith("ValueError: bad PatientName '…' in '…'")
    assert "test_logging.py:" in summary and "in test_an_exception_summary" in summary


def test_library_records_share_the_json_stream() -> None:
    # apscheduler's and pynetdicom's lines used to be plain text inside the JSON stream.
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    logging.getLogger("apscheduler.scheduler").info("Added job %r", "quiet timer")  # noise
    logging.getLogger("apscheduler.executors.default").warning("Run of %r missed", "retention")
    logging.getLogger("sqlalchemy.engine").warning("pool overflow")
    get_logger("node.test").info("own line")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["component"], r["level"], r["event"]) for r in records] == [
        ("apscheduler.executors.default", "warning", "Run of 'retention' missed"),
        ("sqlalchemy.engine", "warning", "pool overflow"),
        ("node.test", "info", "own line"),
    ]
    assert all("timestamp" in r for r in records)


def _lines(folder: Path, name: str) -> list[dict[str, object]]:
    """Every JSON line of a log file and its rotated copies, oldest file first."""

    def age(file: Path) -> int:
        return int(file.suffix[1:]) if file.suffix[1:].isdigit() else 0

    files = sorted(folder.glob(name + "*"), key=age, reverse=True)
    return [json.loads(line) for file in files for line in file.read_text().splitlines()]


def test_a_log_file_rotates_by_size_and_keeps_the_newest_lines(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    configure_logging(
        "info", stream=io.StringIO(), log_file=LogFile(path, max_bytes=2000, backups=2)
    )
    log = get_logger("node.test")
    for number in range(100):
        log.info("line", number=number, study_instance_uid=UID)
    stop_log_file()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node.log", "node.log.1", "node.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    numbers = [r["number"] for r in _lines(tmp_path, "node.log")]
    # The oldest lines went with the deleted backups; what is kept is whole and in order.
    assert numbers == list(range(100 - len(numbers), 100)) and 20 < len(numbers) < 100
    assert UID not in "".join(p.read_text() for p in tmp_path.iterdir())


def _child_logs(queue: object, count: int) -> None:
    configure_logging("info", stream=io.StringIO(), forward_to=queue)
    for number in range(count):
        get_logger("node.jobs.runner").info("from the worker", number=number)
    logging.getLogger("a.library").warning("library line in the worker")


def test_workers_write_to_the_file_through_the_process_that_owns_it(tmp_path: Path) -> None:
    """One writer: a worker's lines reach the parent's file whole, none lost, none torn."""
    path = tmp_path / "node.log"
    configure_logging(
        "info", stream=io.StringIO(), log_file=LogFile(path, max_bytes=10**6, backups=1)
    )
    child = multiprocessing.get_context("spawn").Process(
        target=_child_logs, args=(log_queue(), 300)
    )
    child.start()
    for number in range(300):
        get_logger("node.receive").info("from the receiver", number=number)
    child.join(60)
    assert child.exitcode == 0
    stop_log_file()
    records = _lines(tmp_path, "node.log")
    worker = [r["number"] for r in records if r["event"] == "from the worker"]
    receiver = [r["number"] for r in records if r["event"] == "from the receiver"]
    assert worker == list(range(300)) and receiver == list(range(300))
    library = [r for r in records if r["component"] == "a.library"]
    assert [r["level"] for r in library] == ["warning"]
