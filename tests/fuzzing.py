"""Mutated CT datasets for fuzzing the receive path over a real association.

:func:`mutated_datasets` is a hypothesis strategy of ``(transfer syntax, encoded dataset)``: a
small valid CT image, re-encoded in one of the accepted uncompressed syntaxes, then changed at
the attribute level (UIDs, pixel attributes, VRs, nested sequences, odd text) and/or at the byte
level (truncation, overwritten and inserted bytes, lengths). :func:`send_raw` sends such bytes as
they are, and :func:`check_acknowledged` says whether an acknowledged one is on disk and in the
store byte for byte. tests/node/receive/test_fuzz.py runs a bounded number of examples in CI;
bench/fuzz.py runs many more and prints the figures.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import zlib
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


#: Root of the fuzz UIDs (pydicom's example root); each UID ends in 20 drawn digits, so that a
#: mutant's length, and hypothesis's replay of it, never depends on chance.
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def base_dataset(serial: int) -> Dataset:
    """A valid 32 × 32 CT image whose UIDs derive from ``serial`` (20 digits)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{UID_ROOT}1.{serial}"
    ds.StudyInstanceUID = f"{UID_ROOT}2.{serial}"
    ds.SeriesInstanceUID = f"{UID_ROOT}3.{serial}"
    ds.Modality = "CT"
    ds.PatientName = "FUZZ^PATIENT"
    ds.PatientID = "FUZZ-1"
    ds.SeriesDescription = "arterial"
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * 8
    ds["PixelData"].VR = "OW"
    return ds


def encode(ds: Dataset, syntax: str) -> bytes:
    """The dataset's bytes as a sender puts them on the wire (no file meta)."""
    buffer = io.BytesIO()
    implicit = syntax == ImplicitVRLittleEndian
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    raw = buffer.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = packer.compress(raw) + packer.flush()
    return raw


_ATTRIBUTE_CHANGES = st.sampled_from(
    [
        ("delete", "SOPInstanceUID"),
        ("delete", "StudyInstanceUID"),
        ("delete", "Rows"),
        ("delete", "PixelData"),
        ("delete", "BitsAllocated"),
        ("set", "Rows", 0),
        ("set", "Rows", 65535),
        ("set", "BitsAllocated", 7),
        ("set", "NumberOfFrames", "999999"),
        ("set", "SamplesPerPixel", 3),
        ("set", "StudyInstanceUID", "../../x"),
        ("set", "SeriesInstanceUID", "1." + "9" * 70),
        ("set", "SeriesDescription", "ärt\x00\x1b[31m" * 20),
        ("set", "PatientName", "\udcff"),
        ("sequence", "ReferencedImageSequence", 0),
        ("sequence", "ReferencedImageSequence", 6),
        ("vr", "Rows", "UL"),
        ("vr", "SeriesDescription", "OB"),
    ]
)


@dataclass(frozen=True)
class Mutant:
    """One fuzz input: the syntax it is sent in and its (possibly broken) dataset bytes."""

    syntax: str
    sop_instance_uid: str
    payload: bytes
    how: str


def _apply(ds: Dataset, change: tuple[object, ...]) -> None:
    kind, keyword = str(change[0]), str(change[1])
    if kind == "delete" and keyword in ds:
        delattr(ds, keyword)
    elif kind == "set":
        setattr(ds, keyword, change[2])
    elif kind == "sequence":
        depth = int(change[2])  # type: ignore[call-overload]
        item = Dataset()
        item.ReferencedSOPInstanceUID = f"{UID_ROOT}4.{depth}"
        for _ in range(depth):
            outer = Dataset()
            outer.ReferencedImageSequence = Sequence([item])
            item = outer
        setattr(ds, keyword, Sequence([item]))
    elif kind == "vr" and keyword in ds:
        ds[keyword].VR = str(change[2])


@st.composite
def mutated_datasets(draw: st.DrawFn) -> Mutant:
    """A CT dataset changed by attributes and/or bytes (see the module docstring)."""
    serial = draw(st.integers(10**19, 10**20 - 1))
    ds = base_dataset(serial)
    syntax = draw(st.sampled_from(SYNTAXES))
    changes = draw(st.lists(_ATTRIBUTE_CHANGES, max_size=3))
    for change in changes:
        _apply(ds, change)
    try:
        payload = encode(ds, syntax)
    except Exception:  # pydicom refused to write it: send the valid one, broken below
        changes = []
        payload = encode(base_dataset(serial), syntax)
    how = [f"{c[0]} {c[1]}" for c in changes]
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
        at = draw(st.integers(1, max(1, len(payload) - 1)))
        if action == "truncate":
            payload = payload[:at]
        elif action == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            payload = payload[:at] + chunk + payload[at + len(chunk) :]
        else:
            payload = payload[:at] + draw(st.binary(min_size=1, max_size=16)) + payload[at:]
        how.append(f"{action}@{at}")
    uid = str(ds.get("SOPInstanceUID", "") or f"{UID_ROOT}5.{serial}")
    return Mutant(syntax=syntax, sop_instance_uid=uid, payload=payload, how=", ".join(how))


def send_raw(
    port: int, calling_ae: str, called_ae: str, mutant: Mutant, folder: Path
) -> int | None:
    """C-STORE ``mutant`` exactly as it is; the status, or None when no response came."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = mutant.sop_instance_uid
    meta.TransferSyntaxUID = mutant.syntax
    buffer = io.BytesIO()
    from pydicom.filewriter import write_file_meta_info

    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    path = folder / "mutant.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + mutant.payload)
    _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes go out untouched
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, mutant.syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status and "Status" in status else None


def check_acknowledged(database: Path, spool: Path, mutant: Mutant) -> str | None:
    """Why an acknowledged mutant is not stored byte for byte (None: it is)."""
    connection = sqlite3.connect(database)
    try:
        rows = connection.execute(
            "SELECT path, sha256 FROM instances WHERE sop_instance_uid = ?",
            (mutant.sop_instance_uid,),
        ).fetchall()
    finally:
        connection.close()
    if len(rows) != 1:
        return f"{len(rows)} rows for the acknowledged instance"
    path, stored_hash = rows[0]
    sent_hash = hashlib.sha256(mutant.payload).hexdigest()
    if stored_hash != sent_hash:
        return "the row's hash is not the sent dataset's"
    file = spool / path
    if not file.is_file():
        return "no file"
    if not file.read_bytes().endswith(mutant.payload):
        return "the file's dataset differs from what was sent"
    return None


def spool_files(spool: Path) -> int:
    """Stored instance files (not those still arriving)."""
    return sum(1 for p in spool.rglob("*.dcm") if ".incoming" not in p.parts)


def instance_rows(database: Path) -> int:
    connection = sqlite3.connect(database)
    try:
        return int(connection.execute("SELECT count(*) FROM instances").fetchone()[0])
    finally:
        connection.close()
