"""Structured logging for the node: JSON lines for machines, console lines for people, no PHI.

Every log line that concerns a study names it by :func:`study_key`, a short keyed hash of the
StudyInstanceUID, never by the UID or by patient identifiers. :func:`scrub_phi` is a structlog
processor that enforces it: patient name, patient ID, birth date and accession number are
dropped from every event, whatever the caller passed, and raw UIDs are replaced by their keys.

Exceptions are where identifiers slip past key-based scrubbing: a database error's message
carries the statement's parameters, a parser's error may quote a value. :func:`exception_summary`
renders an exception as its type, its message with quoted text and bracketed parameter lists
masked, and the frames (file, line, function) without their source text; engines are made with
``hide_parameters=True`` besides.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import logging.handlers
import multiprocessing
import re
import sys
import threading
import traceback
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import structlog

#: Event keys that can carry protected health information; never written to a log.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "birth_date",
        "birthdate",
        "accession_number",
        "accessionnumber",
        "accession",
        "other_patient_ids",
        "otherpatientids",
        "patient_address",
        "patientaddress",
    }
)

#: Identifier keys that are replaced by a short hash instead of being dropped.
HASHED_KEYS = {
    "study_instance_uid": "study_key",
    "studyinstanceuid": "study_key",
    "series_instance_uid": "series_key",
    "seriesinstanceuid": "series_key",
    "sop_instance_uid": "instance_key",
    "sopinstanceuid": "instance_key",
}

_KEY_LENGTH = 12


def study_key(study_instance_uid: str) -> str:
    """Short, stable hash that names a study in logs, metrics and paths.

    Parameters
    ----------
    study_instance_uid
        The StudyInstanceUID.

    Returns
    -------
    str
        12 hexadecimal characters of SHA-256 over the UID (48 bits: collisions are negligible for
        the studies one node ever sees, and the UID cannot be read back from it).
    """
    return uid_key(study_instance_uid)


def uid_key(uid: str) -> str:
    """Short hash of any DICOM UID (series, instance), as :func:`study_key` does for studies."""
    digest = hashlib.sha256(uid.strip().encode("ascii", "replace")).hexdigest()
    return digest[:_KEY_LENGTH]


def scrub_phi(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: drop patient identifiers, hash UIDs.

    Keys are compared case-insensitively and without separators, so ``PatientName``,
    ``patient_name`` and ``patient-name`` are all caught.
    """
    for key in list(event_dict):
        normal = key.lower().replace("-", "_")
        flat = normal.replace("_", "")
        if normal in PHI_KEYS or flat in PHI_KEYS:
            del event_dict[key]
            continue
        target = HASHED_KEYS.get(normal) or HASHED_KEYS.get(flat)
        if target is not None:
            value = event_dict.pop(key)
            event_dict[target] = uid_key(str(value)) if value else value
    return event_dict


#: Quoted text and the ``[parameters: …]`` a database error appends: values, not structure.
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"|\[parameters: [^\]]*\]")
_MESSAGE_LIMIT = 300


def exception_summary(
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
    _depth: int = 0,
) -> str:
    """``Type: message`` with values masked, then ``at file:line in function`` for each frame.

    Enough to find the failing line, nothing a dataset could have put there: a message's quoted
    values become ``'…'``, and the source lines of the frames are left out.
    """
    name = exc_type.__name__ if exc_type is not None else "Exception"
    message = _QUOTED.sub("'…'", str(exc) if exc is not None else "")
    message = " ".join(message.split())[:_MESSAGE_LIMIT]
    frames = [
        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
        for frame in traceback.extract_tb(tb)
    ]
    cause = exc.__cause__ if exc is not None else None
    text = f"{name}: {message}" if message else name
    if frames:
        text += " (at " + " < ".join(reversed(frames)) + ")"
    if cause is not None and _depth < 3:  # a chain can be long, or even a loop
        text += " caused by " + exception_summary(
            type(cause), cause, cause.__traceback__, _depth + 1
        )
    return text


def _component_from_logger(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """A library record names its logger as the node's lines name their component."""
    record = event.get("_record")
    if record is not None:
        event["component"] = record.name
    return event


@dataclass(frozen=True)
class LogFile:
    """``node.log_file``: a JSON-lines file beside journald, rotated by size.

    Parameters
    ----------
    path
        The file; its folder must exist.
    max_bytes
        Size at which it is renamed to ``<path>.1`` (older ones shift to ``.2`` …).
    backups
        Rotated files kept; the oldest is deleted.
    """

    path: Path
    max_bytes: int
    backups: int


class _Forward(logging.handlers.QueueHandler):
    """Sends each record, rendered to its JSON line, to the process that writes the log file.

    Only the line and the level cross the process boundary: structlog's extras (a logger
    object among them) stay behind.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return logging.makeLogRecord(
            {"msg": self.format(record), "levelno": record.levelno, "name": record.name}
        )


#: The parent's log-file writer: a queue every process of the node sends its lines to, and the
#: one thread that writes (and rotates) the file. Rotating from several processes at once
#: would lose lines or write into renamed files.
_file_writer: tuple[Any, logging.handlers.QueueListener] | None = None


def log_queue() -> Any:
    """The queue a worker process passes to :func:`configure_logging` (None: no log file)."""
    return _file_writer[0] if _file_writer is not None else None


#: How long the exit waits for the queued lines to be written.
_STOP_TIMEOUT_S = 5.0


def stop_log_file() -> None:
    """Write what is queued and close the log file (at exit, or before reconfiguring).

    Bounded: a worker killed while it held the queue's lock or was halfway through a line leaves
    the queue broken, and the exit must not wait on it for ever.
    """
    global _file_writer
    if _file_writer is not None:
        queue, listener = _file_writer
        _file_writer = None
        stopper = threading.Thread(target=listener.stop, name="log-file-stop", daemon=True)
        stopper.start()
        stopper.join(_STOP_TIMEOUT_S)
        for handler in listener.handlers:
            handler.close()
        queue.cancel_join_thread()
        queue.close()


def _formatter(renderer: Any) -> logging.Formatter:
    """The last step for every record: node lines arrive as event dicts, library records are
    brought to the same shape first (level, component, time, scrubbed, exception summarised)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            _component_from_logger,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_phi,
            structlog.processors.ExceptionRenderer(lambda info: exception_summary(*info)),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


#: The standard-library logger the node's own structlog lines go through.
_NODE_LOGGER = "mvi_node"


def configure_logging(
    level: str = "info",
    stream: TextIO | None = None,
    *,
    log_file: LogFile | None = None,
    forward_to: Any = None,
) -> None:
    """Set up structlog (and the standard library's logging) for the whole process.

    Parameters
    ----------
    level
        ``debug``, ``info``, ``warning`` or ``error``.
    stream
        Where lines go (default ``sys.stderr``). JSON lines when it is not a TTY (journald,
        files, pipes), coloured console lines when it is.
    log_file
        Also write JSON lines to this file, rotated by size (the receiving process: it writes
        its workers' lines too).
    forward_to
        A worker's :func:`log_queue` from its parent: its lines also go to the parent's file.

    Raises
    ------
    OSError
        The log file cannot be opened for appending.
    """
    global _file_writer
    out = stream if stream is not None else sys.stderr
    numeric = logging.getLevelNamesMapping()[level.upper()]
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    json_renderer = structlog.processors.JSONRenderer(sort_keys=False)
    renderer: Any = structlog.dev.ConsoleRenderer(colors=True) if is_tty else json_renderer
    # Every line, the node's and the libraries' (pynetdicom, apscheduler, SQLAlchemy,
    # highdicom), ends in the standard library's handlers: one stream, one file, one format.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_phi,
            structlog.processors.StackInfoRenderer(),
            # structlog's own renderer finds the exception; the summary formats it.
            structlog.processors.ExceptionRenderer(lambda info: exception_summary(*info)),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_args: logging.getLogger(_NODE_LOGGER),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(_formatter(renderer))
    handlers: list[logging.Handler] = [handler]
    stop_log_file()
    if log_file is not None:
        writer = logging.handlers.RotatingFileHandler(
            log_file.path,
            maxBytes=log_file.max_bytes,
            backupCount=log_file.backups,
            encoding="utf-8",
        )
        writer.setFormatter(logging.Formatter("%(message)s"))
        queue = multiprocessing.get_context("spawn").Queue()
        listener = logging.handlers.QueueListener(queue, writer)
        listener.start()
        _file_writer = (queue, listener)
        atexit.unregister(stop_log_file)
        atexit.register(stop_log_file)
        forward_to = queue
    if forward_to is not None:
        forward = _Forward(forward_to)
        forward.setFormatter(_formatter(json_renderer))
        handlers.append(forward)
    root = logging.getLogger()
    root.handlers[:] = handlers
    # Libraries never below INFO, so their per-dataset debug dumps cannot reach the log.
    root.setLevel(max(numeric, logging.INFO))
    logging.getLogger(_NODE_LOGGER).setLevel(numeric)
    # pynetdicom's debug handlers print whole datasets (patient identifiers included).
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    # apscheduler logs every add, run and removal of a job at INFO: each study's quiet timer
    # would put three lines in the log. Its warnings (a missed run) and errors stay.
    logging.getLogger("apscheduler").setLevel(max(numeric, logging.WARNING))
    # procrastinate logs each job's start and end (the node's own lines say more) and its
    # worker's life at INFO; its warnings and errors stay.
    logging.getLogger("procrastinate").setLevel(max(numeric, logging.WARNING))
    # highdicom logs the UIDs of the datasets it copies from, past the scrubber.
    logging.getLogger("highdicom").setLevel(max(numeric, logging.WARNING))
    # MONAI imports matplotlib when it is installed (the audit needs it); its font-cache notice
    # is not the operator's business.
    logging.getLogger("matplotlib").setLevel(max(numeric, logging.WARNING))


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger bound to ``component=name`` and any initial values."""
    if name is not None:
        initial = {"component": name, **initial}
    # A lazy proxy: modules create their loggers at import time, before configure_logging runs,
    # and must still follow the configuration that is in force when they log.
    return structlog.get_logger(**initial)
