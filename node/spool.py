"""Durable instance files: what the receiver acknowledges is on disk before it says so.

Each instance is written to a temporary file inside the spool, fsynced, renamed to a name derived
from a hash of (Study, Series, SOP Instance UID) and the directory fsynced; only then may its row
be committed and the C-STORE answered with success. Paths never contain raw UIDs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpooledFile:
    """Where an instance's bytes went and what they were."""

    path: Path
    relative: str
    size: int
    sha256: str


def instance_relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """Spool-relative path of an instance: two fan-out levels, then the hash.

    The study's part of the hash comes first so that one study's files share a folder:
    ``<study hash[:2]>/<study hash[:12]>/<instance hash>.dcm``.
    """
    study_hash = hashlib.sha256(study_uid.encode()).hexdigest()
    key = f"{study_uid}\\{series_uid}\\{sop_instance_uid}".encode()
    instance_hash = hashlib.sha256(key).hexdigest()
    return f"{study_hash[:2]}/{study_hash[:12]}/{instance_hash[:32]}.dcm"


def _fsync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(root: Path, relative: str, data: bytes) -> SpooledFile:
    """Write ``data`` to ``root/relative`` so that it survives a crash once this returns.

    Raises
    ------
    OSError
        When any step fails; a partial temporary file is removed.
    """
    target = root / relative
    folder = target.parent
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(folder)
    if created:
        # A new folder's own entry lives in its parent (and so on up to the spool root).
        for parent in (folder.parent, root):
            _fsync_directory(parent)
    return SpooledFile(
        path=target, relative=relative, size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


def remove_files(root: Path, relatives: list[str]) -> int:
    """Delete spooled files (retention); returns how many were removed."""
    removed = 0
    for relative in relatives:
        path = root / relative
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def free_megabytes(folder: Path) -> float:
    """Free space for unprivileged users on the file system holding ``folder``."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize / 1e6
