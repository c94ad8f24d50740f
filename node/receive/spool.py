"""Durable instance files: what the receiver acknowledges is on disk before it says so.

Each instance is written to a temporary file inside the spool, fsynced, renamed to a name derived
from a hash of (Study, Series, SOP Instance UID) and of the dataset, and the directory fsynced;
only then may its row be committed and the C-STORE answered with success. Paths never contain
raw UIDs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: The spool's folder for datasets still arriving (see ``receiver.receive_into_files``).
INCOMING = ".incoming"


@dataclass(frozen=True)
class SpooledFile:
    """Where an instance's bytes went and what they were."""

    path: Path
    relative: str
    size: int


def instance_relative_path(
    study_uid: str, series_uid: str, sop_instance_uid: str, sha256: str
) -> str:
    """Spool-relative path of one dataset of an instance: two fan-out levels, then the hashes.

    The study's part of the hash comes first so that one study's files share a folder:
    ``<study hash[:2]>/<study hash[:12]>/<instance hash[:32]>-<dataset sha256[:16]>.dcm``. The
    dataset's own hash is part of the name so that a replacement (same UIDs, other bytes) is
    written beside the acknowledged file, never over it: the old file goes only once the store
    has committed the new one.
    """
    study_hash = hashlib.sha256(study_uid.encode()).hexdigest()
    key = f"{study_uid}\\{series_uid}\\{sop_instance_uid}".encode()
    instance_hash = hashlib.sha256(key).hexdigest()
    return f"{study_hash[:2]}/{study_hash[:12]}/{instance_hash[:32]}-{sha256[:16]}.dcm"


def _fsync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Folders known to exist (and to be durable in their parent): skips a stat and a mkdir per file.
_known_folders: set[Path] = set()


def make_folder_durably(folder: Path) -> None:
    """Create ``folder`` and any missing parent, each made durable in its own parent.

    A new folder's name lives in its parent's directory entries: without an fsync of the parent a
    crash can lose the folder and every durable file in it (a new ``results/<study>/job-N`` or a
    new spool fan-out folder). A folder another thread created is fsynced in its parent too: that
    thread may not have done so yet.
    """
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        with contextlib.suppress(FileExistsError):
            created.mkdir()
        _fsync_directory(created.parent)


def _prepare_folder(folder: Path) -> bool:
    """Make ``folder``; True when this process had not written there before."""
    first = folder not in _known_folders
    if first:
        make_folder_durably(folder)
    return first


def _settle_folder(root: Path, folder: Path, first: bool) -> None:
    """fsync ``folder`` (a rename into it is durable) and, the first time, its parent and root."""
    _fsync_directory(folder)
    if first:
        # A folder's own entry lives in its parent (and so on up to the root).
        for parent in {folder.parent, root}:
            _fsync_directory(parent)
    _known_folders.add(folder)


def write_durably(root: Path, relative: str, chunks: Iterable[bytes]) -> SpooledFile:
    """Write ``chunks`` (concatenated) to ``root/relative``; durable once this returns.

    Temp file in the target folder, ``fdatasync``, rename over the target, ``fsync`` of the
    folder (and, the first time this process writes there, of its parent and the root).

    Raises
    ------
    OSError
        When any step fails; a partial temporary file is removed.
    """
    target = root / relative
    folder = target.parent
    # The first write of this process into a folder makes the folder's own entry durable too,
    # whoever created it: a second thread that found it made by the first used to acknowledge
    # before the first had fsynced the parent.
    first = _prepare_folder(folder)
    temp = folder / f".incoming-{target.stem}-{threading.get_ident()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    size = 0
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                    size += written
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _settle_folder(root, folder, first)
    return SpooledFile(path=target, relative=relative, size=size)


def adopt_durably(root: Path, relative: str, source: Path) -> SpooledFile:
    """Move the complete file ``source`` to ``root/relative``; durable once this returns.

    The receiver's files arrive whole in the spool's incoming folder (same file system): one
    ``fdatasync`` and a rename, no second copy. From another file system the bytes are copied
    (:func:`write_durably`) and ``source`` is left for its owner to delete.
    """
    target = root / relative
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    folder = target.parent
    first = _prepare_folder(folder)
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return write_durably(root, relative, read_blocks(source))
    _settle_folder(root, folder, first)
    return SpooledFile(path=target, relative=relative, size=size)


def read_blocks(path: Path, offset: int = 0, block: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of ``path`` from ``offset`` on, ``block`` at a time."""
    with path.open("rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(block):
            yield chunk


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
