"""The node's front door: a pynetdicom AE serving C-ECHO and C-STORE.

Every storage SOP class is accepted (a whole-study C-MOVE also carries dose reports, key objects
and presentation states; refusing them makes the PACS report a failed move). CT, Enhanced CT and
Segmentation instances are kept for analysis; the rest are stored and counted, never analysed.
Instances are stored exactly as received — decoding happens when a job loads them.

Each handler does one thing:

- :func:`handle_requested` — access control on association request;
- :func:`handle_echo` — C-ECHO;
- :func:`handle_store` — C-STORE: check, spool durably, commit the row, then answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    RE_VALID_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import MANUFACTURER, MODEL_NAME
from node.core.dicom import (
    ANALYSABLE_SOP_CLASSES,
    CANNOT_UNDERSTAND,
    CANNOT_UNDERSTAND_INVALID_UID,
    CANNOT_UNDERSTAND_MISSING_UID,
    CANNOT_UNDERSTAND_PIXEL_LENGTH,
    DATASET_SOP_CLASS_MISMATCH,
    DATASET_SOP_INSTANCE_MISMATCH,
    OUT_OF_RESOURCES_DISK_FLOOR,
    OUT_OF_RESOURCES_PERSISTENCE,
    OUT_OF_RESOURCES_TOO_LARGE,
    SUCCESS,
)
from node.core.locks import FileLock
from node.core.logging import get_logger, uid_key
from node.core.settings import Settings
from node.core.tls import association_socket, peer_fingerprint
from node.receive.server import NodeServer
from node.receive.spool import (
    INCOMING,
    adopt_durably,
    free_megabytes,
    instance_relative_path,
    read_blocks,
    remove_files,
)
from node.store.database import InstanceOutcome, InstanceRecord, Store

log = get_logger("node.receive.receiver")

#: FailureReason / status for a transfer syntax the node does not take (PS3.18 Table I.2-1).
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
]

#: Transfer syntaxes whose pixel data is the raw image, so its length is known from the header.
NATIVE_SYNTAXES = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)

# Only the attributes the receive path needs (the pixel data's value stays deferred on disk).
_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "NumberOfFrames",
    "BitsAllocated",
    "PixelData",
]


@dataclass
class ReceiverState:
    """What the handlers share: configuration, the store, the spool and the counters."""

    settings: Settings
    store: Store
    spool_root: Path
    on_instance: Callable[[str, bool], None] = lambda study_uid, own: None
    counters: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Striped locks that serialise the write-commit-cleanup of one instance (by its path's
    #: folder and UID hash, the part of the name before the dataset hash).
    #: Held across threads and processes: several receiving processes (and a `requery`
    #: retrieving beside `serve`) write one spool. Files in the spool's lock folder.
    instance_locks: tuple[FileLock, ...] = ()

    def __post_init__(self) -> None:
        folder = self.spool_root / INCOMING / LOCK_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.instance_locks = tuple(FileLock(folder / f"{i:02d}") for i in range(64))

    def instance_lock(self, relative: str) -> FileLock:
        """The lock of the instance stored at spool path ``relative``."""
        identity = relative.rsplit("-", 1)[0]
        return self.instance_locks[zlib.crc32(identity.encode()) % len(self.instance_locks)]

    #: What each open association has done so far (by ``id`` of pynetdicom's association).
    associations: dict[int, AssociationSummary] = field(default_factory=dict)

    def count(self, key: str, amount: int = 1) -> None:
        """Thread-safe counter increment (handlers run in one thread per association)."""
        with self.lock:
            self.counters[key] += amount

    def summary(self, assoc: Any) -> AssociationSummary | None:
        """The open association's summary (None for one the node called: a C-GET)."""
        with self.lock:
            return self.associations.get(id(assoc))


@dataclass
class AssociationSummary:
    """One association as its closing log line reports it (no patient data)."""

    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    failed: int = 0
    bytes: int = 0
    sop_classes: Counter[str] = field(default_factory=Counter)
    outcome: str = "closed"


def allowed_caller(settings: Settings, calling_ae: str, address: str) -> str | None:
    """None when the caller may associate, else the reason it may not.

    A caller is allowed when its AE title is a configured peer's (and, if that peer names a
    host, it comes from that address), or when ``security.allow_unknown_callers`` is on.
    """
    if settings.security.allow_unknown_callers:
        return None
    matching = [p for p in settings.peers.values() if p.ae_title.strip() == calling_ae]
    if not matching:
        return "unknown calling AE title"
    if any(p.host is None or p.host == address for p in matching):
        return None
    return "calling AE title not allowed from this address"


def _reject(assoc: Any, diagnostic: int) -> None:
    """A-ASSOCIATE-RJ (rejected-permanent, by the service user) with ``diagnostic``.

    Waits, as pynetdicom's own rejections do, until the PDU is sent and the peer has closed:
    returning at once let the server close the socket first, and the caller read an A-ABORT.
    """
    assoc.acse.send_reject(0x01, 0x01, diagnostic)
    assoc.kill()


def handle_requested(event: evt.Event, state: ReceiverState) -> None:
    """Reject an association from an unknown caller, or addressed to another AE title."""
    assoc = event.assoc
    request: Any = assoc.requestor.primitive
    calling = str(request.calling_ae_title).strip()
    called = str(request.called_ae_title).strip()
    address = str(assoc.requestor.address)
    summary = AssociationSummary(calling_ae=calling, address=address)
    with state.lock:
        state.associations[id(assoc)] = summary
    # Every return below is a rejection until the last line says otherwise.
    summary.outcome = "rejected"
    if called != state.settings.node.ae_title:
        state.count("associations_rejected:called_ae")
        log.warning(
            "association rejected: called AE title is not the node's",
            calling_ae=calling,
            called_ae=called,
            address=address,
            allow_with=f"node.ae_title = {called!r} (the node's title is "
            f"{state.settings.node.ae_title!r}; configure the sender instead)",
        )
        _reject(assoc, 0x07)
        return
    reason = allowed_caller(state.settings, calling, address)
    if reason is not None:
        state.count(
            "associations_rejected:"
            + ("unknown_calling_ae" if reason.startswith("unknown") else "calling_ae_host")
        )
        log.warning(
            f"association rejected: {reason}",
            calling_ae=calling,
            address=address,
            allow_with=f'[peers.NAME] ae_title = "{calling}" host = "{address}"',
        )
        _reject(assoc, 0x03)
        return
    pins = {
        p.tls_fingerprint
        for p in state.settings.peers.values()
        if p.ae_title.strip() == calling and p.tls_fingerprint is not None
    }
    presented = peer_fingerprint(association_socket(assoc)) if pins else None
    if pins and presented not in pins:
        state.count("associations_rejected:certificate_pin")
        log.warning(
            "association rejected: the caller's certificate is not the one pinned for its AE title",
            calling_ae=calling,
            address=address,
            presented=presented,
        )
        _reject(assoc, 0x03)
        return
    state.count("associations_accepted")
    summary.outcome = "accepted"


def handle_released(event: evt.Event, state: ReceiverState) -> None:
    """The caller released the association (the normal end)."""
    summary = state.summary(event.assoc)
    if summary is not None:
        summary.outcome = "released"


def handle_aborted(event: evt.Event, state: ReceiverState) -> None:
    """The association was aborted (by either side)."""
    summary = state.summary(event.assoc)
    if summary is not None:
        summary.outcome = "aborted"


def handle_closed(event: evt.Event, state: ReceiverState) -> None:
    """One line per association: who, what, how much, how long, how it ended."""
    with state.lock:
        summary = state.associations.pop(id(event.assoc), None)
    if summary is None:
        return
    log.info(
        "association ended",
        calling_ae=summary.calling_ae,
        address=summary.address,
        outcome=summary.outcome,
        instances=summary.instances,
        failed=summary.failed,
        sop_classes=dict(summary.sop_classes),
        bytes=summary.bytes,
        seconds=round(time.monotonic() - summary.started, 3),
    )


def handle_echo(event: evt.Event, state: ReceiverState) -> int:
    """C-ECHO: the node is up."""
    state.count("echoes")
    return SUCCESS


def handle_store(event: evt.Event, state: ReceiverState) -> int:
    """C-STORE: acknowledge only what is fsynced on disk and committed in the store."""
    state.count("store_requests")
    incoming: Path | None = None
    received = 0
    try:
        incoming = _incoming_file(event, state)
        received = incoming.stat().st_size
        status = _store(event, state, incoming, received)
    except OSError:
        log.exception("store failed: could not write the incoming instance")
        status = OUT_OF_RESOURCES_PERSISTENCE
    finally:
        # Adopted into the spool, or refused: either way nothing stays in the incoming folder
        # (pynetdicom deletes its file only when the node is the association's acceptor).
        if incoming is not None:
            incoming.unlink(missing_ok=True)
    if status != SUCCESS:
        state.count(f"store_failures:{status:#06x}")
    summary = state.summary(event.assoc)
    if summary is not None:
        if status == SUCCESS:
            summary.instances += 1
            name = UID(str(event.request.AffectedSOPClassUID))
            summary.sop_classes[name.name if name.is_valid else "other"] += 1
            summary.bytes += received
        else:
            summary.failed += 1
    return status


#: Where pynetdicom writes a C-STORE's dataset as it arrives (set by :func:`receive_into_files`).
_incoming_folder: Path | None = None
#: An incoming file untouched this long belongs to no live association.
STALE_INCOMING_S = 3600.0
#: The instance locks' files, shared by every process writing the spool (in its incoming folder).
LOCK_FOLDER = ".locks"


def _named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    folder = _incoming_folder
    if folder is not None and folder.is_dir():
        kwargs["dir"] = folder
    # Not ".dcm" as pynetdicom names them: a file still arriving is not an instance.
    kwargs["suffix"] = ".part"
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def receive_into_files(spool_root: Path) -> None:
    """Have pynetdicom write every received dataset to a file in ``spool_root/.incoming``.

    Decoded in memory, a 400 MB instance raised the receiver's RSS from 124 MB to 1.63 GB, and
    ten such associations at once would exhaust any host. pynetdicom's chunked receive streams
    each P-DATA fragment to a file instead; it names no folder, so its temporary-file factory is
    pointed at one inside the spool: the same file system, so a stored instance is renamed into
    place rather than copied, and patient data never lands in the system's /tmp. Process-wide
    (pynetdicom's switch is); a folder that is gone falls back to the system's temp folder.
    """
    global _incoming_folder
    folder = spool_root / INCOMING
    folder.mkdir(parents=True, exist_ok=True)
    # Left by a process that died mid-transfer (nothing names them). Only old ones: a C-GET of
    # `mvi-node requery` may be receiving into the same folder right now.
    cutoff = time.time() - STALE_INCOMING_S
    for stale in folder.iterdir():
        if stale.name == LOCK_FOLDER:
            continue
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()
    _incoming_folder = folder
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _named_temporary_file


def _incoming_file(event: evt.Event, state: ReceiverState) -> Path:
    """The file holding the request's dataset (written now if pynetdicom kept it in memory)."""
    try:
        return Path(event.dataset_path)
    except AttributeError:
        pass
    folder = state.spool_root / INCOMING
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"memory-{threading.get_ident()}-{id(event)}.dcm"
    path.write_bytes(event.encoded_dataset(include_meta=True))
    return path


def dataset_offset(path: Path) -> int:
    """Where the dataset starts in a DICOM file: after the preamble and the file meta group."""
    with path.open("rb") as handle:
        head = handle.read(144)
    # (0002,0000) UL, explicit VR little endian: tag, "UL", length 4, the group's length.
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("no DICOM file meta with a group length")
    offset = 144 + int.from_bytes(head[140:144], "little")
    # A sender writes the meta itself over STOW-RS: a group length past the end of the file
    # would make every size check below pass.
    if offset > path.stat().st_size:
        raise ValueError("the file meta's group length runs past the end of the file")
    return offset


def _inflated_within(path: Path, offset: int, limit: int) -> bool:
    """Whether a deflated dataset inflates to at most ``limit`` bytes (streamed, never whole)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    for block in read_blocks(path, offset):
        data = block
        while data:
            total += len(inflater.decompress(data, 1 << 20))
            if total > limit:
                return False
            data = inflater.unconsumed_tail
    return True


def _store(event: evt.Event, state: ReceiverState, incoming: Path, size: int) -> int:
    request: Any = event.request
    return store_incoming(
        state,
        incoming,
        size,
        transfer_syntax=str(event.context.transfer_syntax),
        sop_class=str(request.AffectedSOPClassUID),
        sop_instance=str(request.AffectedSOPInstanceUID),
        calling_ae=_peer_ae_title(event),
    )


def store_incoming(
    state: ReceiverState,
    incoming: Path,
    size: int,
    *,
    transfer_syntax: str,
    sop_class: str,
    sop_instance: str,
    calling_ae: str,
    expected_study: str | None = None,
) -> int:
    """Check one received Part 10 file and adopt it into the spool and the store; returns the
    DIMSE status. C-STORE (the request's UIDs) and STOW-RS (the file meta's) both end here, so
    an instance is accepted, refused and made durable the same way whichever way it came.

    ``incoming`` is left where it is; the caller removes it (adopted files are moved away).
    ``expected_study``: refuse (``0xA900``) an instance of another study (STOW-RS to a study's
    URL); checked on the header, after the size limits.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        # C-STORE negotiates it; STOW-RS and WADO-RS bring whatever the sender chose.
        log.warning("store refused: transfer syntax not taken", transfer_syntax=transfer_syntax)
        return TRANSFER_SYNTAX_NOT_SUPPORTED
    try:
        if free_megabytes(state.spool_root) < state.settings.node.free_disk_floor_mb:
            log.error("store refused: free disk below node.free_disk_floor_mb")
            return OUT_OF_RESOURCES_DISK_FLOOR
    except OSError:
        log.exception("store refused: cannot read free disk space of the spool")
        return OUT_OF_RESOURCES_PERSISTENCE

    limit = state.settings.node.max_instance_mb * 1_000_000
    syntax = transfer_syntax
    try:
        offset = dataset_offset(incoming)
        if size - offset > limit or (
            syntax == DeflatedExplicitVRLittleEndian
            and not _inflated_within(incoming, offset, limit)
        ):
            log.warning("store refused: instance larger than node.max_instance_mb")
            return OUT_OF_RESOURCES_TOO_LARGE
        # The dataset exactly as the peer encoded it, behind the file meta pynetdicom derives
        # from the presentation context: never decoded whole, never re-encoded. The pixel data's
        # value is left on disk (deferred); only its length is read.
        header = pydicom.dcmread(incoming, defer_size=4096, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, zlib.error) as exc:
        log.warning("store failed: dataset cannot be parsed", error=type(exc).__name__)
        return CANNOT_UNDERSTAND

    uids = header_uids(header)
    missing = [key for key, value in uids.items() if not value]
    if missing:
        log.warning("store failed: dataset lacks UIDs", missing=missing)
        return CANNOT_UNDERSTAND_MISSING_UID
    invalid = [k for k, v in uids.items() if len(v) > 64 or not RE_VALID_UID.match(v)]
    if invalid:
        # Only the keys: a bad UID may carry anything the sender put there.
        log.warning("store failed: dataset has invalid UIDs", invalid=invalid)
        return CANNOT_UNDERSTAND_INVALID_UID
    if expected_study is not None and uids["StudyInstanceUID"] != expected_study:
        log.warning("store failed: instance of another study than asked for")
        return DATASET_SOP_CLASS_MISMATCH
    if uids["SOPClassUID"] != sop_class:
        log.warning("store failed: SOP class differs from the request")
        return DATASET_SOP_CLASS_MISMATCH
    if uids["SOPInstanceUID"] != sop_instance:
        log.warning("store failed: SOP instance differs from the request")
        return DATASET_SOP_INSTANCE_MISMATCH
    if syntax in NATIVE_SYNTAXES:
        problem = pixel_length_problem(header)
        if problem is not None:
            log.warning(f"store failed: {problem}")
            return CANNOT_UNDERSTAND_PIXEL_LENGTH

    return _persist(state, incoming, size, offset, header, uids, syntax, calling_ae)


def header_uids(header: Any) -> dict[str, str]:
    """SOPClassUID, SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID of a header ("" when
    absent), as the receive path checks and records them."""
    return {
        key: str(header.get(key, "") or "").strip()
        for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    }


def dataset_sha256(path: Path, offset: int) -> str:
    """SHA-256 of a Part 10 file's dataset (from ``offset``, :func:`dataset_offset`): the file
    meta names the sender and the negotiated syntax, which differ between two sends of one
    instance."""
    digest = hashlib.sha256()
    for block in read_blocks(path, offset):
        digest.update(block)
    return digest.hexdigest()


def pixel_length_problem(header: Any) -> str | None:
    """Why native pixel data cannot be the image its header describes, or None.

    ``header`` is read with the pixel data deferred: the element's length is compared with
    Rows × Columns × Samples per Pixel × Number of Frames × Bits Allocated / 8 (padded to even).
    """
    element = header.get_item("PixelData", keep_deferred=True) if "PixelData" in header else None
    if element is None:
        return None
    length = element.length if hasattr(element, "length") else len(element.value or b"")
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        frames = int(header.get("NumberOfFrames", 1) or 1)
        bits = int(header.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return "pixel data without usable Rows, Columns and Bits Allocated"
    expected_bits = rows * columns * samples * frames * bits
    expected = (expected_bits + 7) // 8
    if length not in (expected, expected + (expected % 2)):
        return (
            f"pixel data holds {length} bytes, Rows × Columns × Samples × Frames × Bits "
            f"Allocated / 8 is {expected}"
        )
    return None


def _persist(
    state: ReceiverState,
    incoming: Path,
    size: int,
    offset: int,
    header: Any,
    uids: dict[str, str],
    transfer_syntax: str,
    calling_ae: str,
) -> int:
    study_uid = uids["StudyInstanceUID"]
    sop_uid = uids["SOPInstanceUID"]
    sha256 = dataset_sha256(incoming, offset)
    try:
        own = state.store.is_issued(sop_uid)
    except Exception:
        log.exception("store failed: could not read the store", instance_key=uid_key(sop_uid))
        return OUT_OF_RESOURCES_PERSISTENCE
    if not own and _claims_to_be_ours(header):
        # The strings are anyone's to write; only a UID this node issued makes an output ours.
        log.info(
            "instance carries the node's manufacturer and model but was not issued by it: "
            "handled as any other instance",
            study_key=uid_key(study_uid),
        )
    relative = instance_relative_path(study_uid, uids["SeriesInstanceUID"], sop_uid, sha256)
    record = instance_record(
        header,
        uids,
        transfer_syntax=transfer_syntax,
        path=relative,
        size=size,
        sha256=sha256,
        calling_ae=calling_ae,
        own=own,
    )
    target = state.spool_root / relative
    # One instance at a time per key: two associations sending two versions of one instance must
    # not decide about each other's files halfway.
    with state.instance_lock(relative):
        existed = target.exists()
        try:
            adopt_durably(state.spool_root, relative, incoming)
        except Exception:
            log.exception(
                "store failed: could not write the instance", instance_key=uid_key(sop_uid)
            )
            return OUT_OF_RESOURCES_PERSISTENCE
        try:
            recorded = state.store.record_instance(record)
        except Exception:
            log.exception(
                "store failed: could not commit the instance", instance_key=uid_key(sop_uid)
            )
            if not existed:
                # Nothing names the new file: the sender keeps its copy and sends it again.
                target.unlink(missing_ok=True)
            return OUT_OF_RESOURCES_PERSISTENCE
        if recorded.previous_path not in (None, relative):
            # Committed, so exactly one of the two files is named by the row: a replacement's
            # row names the new file, an identical resend's still names the file it had (one
            # written under an older naming).
            stale = relative if recorded.outcome is InstanceOutcome.IDENTICAL else None
            if stale is None:
                # The old file goes: the row naming the new one must survive a power loss first
                # (a lazy commit lost would name a file no longer there).
                state.store.make_instance_rows_durable()
            remove_files(state.spool_root, [stale or str(recorded.previous_path)])
    if recorded.also_in_studies:
        log.warning(
            "SOP Instance UID also used in another study: both kept apart",
            study_key=uid_key(study_uid),
            instance_key=uid_key(sop_uid),
            other_studies=recorded.also_in_studies,
        )
        state.count("instances_uid_reused")
    if recorded.outcome is InstanceOutcome.IDENTICAL:
        # A resend of the same dataset (a PACS retrying a move): safe, and nothing changes.
        state.count("instances_duplicate")
        return SUCCESS
    if recorded.outcome is InstanceOutcome.REPLACED:
        log.info(
            "instance replaced by a different dataset with the same SOP Instance UID",
            study_key=uid_key(study_uid),
            instance_key=uid_key(sop_uid),
        )
    state.count("instances_received")
    state.count("bytes_received", size)
    if not record.analysable:
        state.count("instances_not_analysed")
    state.on_instance(study_uid, own)
    return SUCCESS


def _peer_ae_title(event: evt.Event) -> str:
    """The AE title of the peer that sent the instance.

    The caller of a C-STORE association; on a C-GET the node itself called, and the instance
    comes from the peer it called.
    """
    assoc: Any = event.assoc
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return str(peer.ae_title).strip()


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def instance_record(
    header: Dataset,
    uids: Mapping[str, str],
    *,
    transfer_syntax: str,
    path: str,
    size: int,
    sha256: str,
    calling_ae: str,
    own: bool = False,
) -> InstanceRecord:
    """The row of a stored instance, from its header and its StudyInstanceUID,
    SeriesInstanceUID, SOPInstanceUID and SOPClassUID (``uids``)."""
    return InstanceRecord(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=transfer_syntax,
        path=path,
        size=size,
        sha256=sha256,
        calling_ae=calling_ae,
        modality=str(header.get("Modality", "") or ""),
        series_number=_int_or_none(header.get("SeriesNumber")),
        series_description=str(header.get("SeriesDescription", "") or ""),
        analysable=uids["SOPClassUID"] in ANALYSABLE_SOP_CLASSES and not own,
        own_output=own,
        patient_id=str(header.get("PatientID", "") or ""),
        patient_name=str(header.get("PatientName", "") or ""),
        accession_number=str(header.get("AccessionNumber", "") or ""),
        study_date=str(header.get("StudyDate", "") or ""),
    )


def record_spooled_file(store: Store, spool_root: Path, path: Path, calling_ae: str) -> str:
    """Record a DICOM file already under ``spool_root`` as if received; returns its study UID.

    For tools and benchmarks that lay out a spool themselves (no C-STORE, no copy).
    """
    header = pydicom.dcmread(path, stop_before_pixels=True)
    uids = {
        name: str(header[name].value)
        for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    }
    size = path.stat().st_size
    store.record_instance(
        instance_record(
            header,
            uids,
            transfer_syntax=str(header.file_meta.TransferSyntaxUID),
            path=str(path.relative_to(spool_root)),
            size=size,
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            calling_ae=calling_ae,
        )
    )
    return uids["StudyInstanceUID"]


def _claims_to_be_ours(header: Any) -> bool:
    """True for an instance that names this node as its maker (which proves nothing)."""
    return (
        str(header.get("Manufacturer", "") or "") == MANUFACTURER
        and str(header.get("ManufacturerModelName", "") or "") == MODEL_NAME
    )


def build_ae(settings: Settings) -> AE:
    """The node's AE with its contexts and limits from ``[node]``."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_associations = settings.node.max_associations
    ae.maximum_pdu_size = settings.node.max_pdu
    ae.acse_timeout = settings.node.acse_timeout
    ae.dimse_timeout = settings.node.dimse_timeout
    ae.network_timeout = settings.node.network_timeout
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
    # Access control is ours (peers and hosts), done in handle_requested.
    ae.require_called_aet = False
    return ae


def start_receiver(
    state: ReceiverState,
    tls: ssl.SSLContext | None = None,
    *,
    listening: socket.socket | None = None,
) -> Any:
    """Start listening (non-blocking); returns pynetdicom's server (call ``shutdown()``).

    ``tls`` is the server context from :func:`node.core.tls.server_context` (None: plain DICOM).
    ``listening``: accept from this socket, bound and listening in another process, instead of
    binding ``node.host``:``node.port`` (:mod:`node.receive.processes`).
    """
    settings = state.settings
    receive_into_files(state.spool_root)
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, handle_requested, [state]),
        (evt.EVT_C_ECHO, handle_echo, [state]),
        (evt.EVT_C_STORE, handle_store, [state]),
        (evt.EVT_RELEASED, handle_released, [state]),
        (evt.EVT_ABORTED, handle_aborted, [state]),
        (evt.EVT_CONN_CLOSE, handle_closed, [state]),
    ]
    # pynetdicom's start_server(block=False), with the node's server class: TLS, the wait for
    # the first bytes and the per-host limit happen in each connection's thread (server.py).
    server = ae.make_server(
        (settings.node.host, settings.node.port),
        evt_handlers=handlers,
        server_class=NodeServer,
        tls=tls,
        request_timeout_s=settings.node.request_timeout_s,
        max_per_host=settings.node.max_associations_per_host,
        count=state.count,
        listening=listening,
    )
    threading.Thread(target=server.serve_forever, name="node-acceptor", daemon=True).start()
    ae._servers.append(server)  # where start_server keeps it: server.shutdown() removes it
    log.info(
        "listening",
        tls=tls is not None,
        ae_title=settings.node.ae_title,
        host=settings.node.host,
        port=settings.node.port,
        peers=sorted(settings.peers),
    )
    return server
