"""Specification of durable files: a file and every folder above it survive a crash once written.

The file system is real; ``os.fsync`` is observed (and still called) to see which directories were
made durable, since a crash cannot be staged in a test.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.receive import spool


@pytest.fixture
def fsynced_folders(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every directory fsynced while the test runs, in order."""
    seen: list[Path] = []
    real_fsync = os.fsync

    def observing_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(spool.os, "fsync", observing_fsync)
    spool._known_folders.clear()
    yield seen


def test_every_new_folder_is_made_durable_in_its_parent(
    tmp_path: Path, fsynced_folders: list[Path]
) -> None:
    job = tmp_path / "data" / "results" / "5f2a9c" / "job-7"
    spool.make_folder_durably(job)
    assert job.is_dir()
    # Each created folder's name is durable in its parent, from the top down.
    assert fsynced_folders == [
        tmp_path,
        tmp_path / "data",
        tmp_path / "data" / "results",
        job.parent,
    ]


def test_a_durable_file_in_a_new_results_folder_makes_the_whole_path_durable(
    tmp_path: Path, fsynced_folders: list[Path]
) -> None:
    (tmp_path / "results").mkdir()
    job = tmp_path / "results" / "5f2a9c" / "job-7"
    spool.make_folder_durably(job)
    written = spool.write_durably(job, "result.json", [b"{}"])
    assert written.path.read_bytes() == b"{}"
    for folder in (tmp_path / "results", job.parent, job):
        assert folder in fsynced_folders, folder


def test_a_spool_file_in_new_fan_out_folders(tmp_path: Path, fsynced_folders: list[Path]) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    written = spool.write_durably(root, "ab/abcdef012345/x-0123.dcm", [b"DICM", b"data"])
    assert written.size == 8 and written.path.read_bytes() == b"DICMdata"
    for folder in (root, root / "ab", root / "ab" / "abcdef012345"):
        assert folder in fsynced_folders, folder
    assert not list(root.rglob("*.tmp"))


def test_an_incoming_file_is_adopted_by_rename(tmp_path: Path, fsynced_folders: list[Path]) -> None:
    root = tmp_path / "spool"
    incoming = root / spool.INCOMING
    incoming.mkdir(parents=True)
    source = incoming / "tmp123.dcm"
    source.write_bytes(b"x" * 1000)
    inode = source.stat().st_ino
    adopted = spool.adopt_durably(root, "cd/cdef/y.dcm", source)
    assert not source.exists() and adopted.size == 1000
    assert adopted.path.stat().st_ino == inode, "renamed, not copied"
    assert root / "cd" / "cdef" in fsynced_folders
