"""Specification of logging: JSON lines off a TTY, console lines on one, no patient identifiers."""

from __future__ import annotations

import io
import json

from node.core.logging import configure_logging, get_logger, study_key, uid_key

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
