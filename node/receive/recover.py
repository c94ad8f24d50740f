"""Instance rows a power loss took, rebuilt from the spool at the first start after a boot.

On SQLite the receive path commits an instance's row without waiting for the disk (WAL,
``synchronous=NORMAL``): the row survives the process dying, and every later commit of the node
(fully synchronous) makes it durable, but a power loss or kernel crash may take the last rows
while the files they name, fsynced before the answer, remain. So the node's first start after a
boot looks for spool files no row names and records them again.

A file is recovered only when all of these hold, so nothing the node meant to forget comes back:

- its name is the one the receiver gives its dataset (UIDs and dataset hash agree with it);
- no row holds that instance (a replaced version or an identical resend waiting for removal);
- its study has no row, or is still ``receiving`` (every state change is a synchronous commit,
  which makes all earlier rows durable: a study past receiving lost none).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from node.core.logging import get_logger, study_key
from node.receive.receiver import dataset_offset, instance_record
from node.receive.spool import instance_relative_path, read_blocks, write_durably
from node.store.database import Store

log = get_logger("node.receive.recover")

#: Where Linux names the current boot.
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: The file (in the data folder, beside the spool) holding the boot the last recovery ran in.
RECOVERED_BOOT = ".recovered-boot"
#: The calling AE title recorded for a recovered instance (its sender is not known).
RECOVERED_AE = "(recovered)"


def current_boot() -> str | None:
    """This boot's identifier, or None where the system does not say."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def recover_after_boot(store: Store, spool_root: Path, data_dir: Path) -> int:
    """Run :func:`recover_instances` once per boot (at every start where boots are unknown);
    the boot it last ran in is kept in ``data_dir`` / :data:`RECOVERED_BOOT`."""
    if not store.lazy_instance_commits:
        return 0
    boot = current_boot()
    marker = data_dir / RECOVERED_BOOT
    try:
        if boot is not None and marker.read_text().strip() == boot:
            return 0
    except OSError:
        pass
    recovered = recover_instances(store, spool_root)
    if boot is not None:
        write_durably(data_dir, RECOVERED_BOOT, [boot.encode()])
    return recovered


def recover_instances(store: Store, spool_root: Path) -> int:
    """Record the spool's instance files that no row names; returns how many were recorded."""
    recovered = 0
    # The spool's layout: <study hash[:2]>/<study hash[:12]>/<instance>-<dataset>.dcm
    for folder in sorted(spool_root.glob("??/*")):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        relative_folder = f"{folder.parent.name}/{folder.name}/"
        named = store.instance_paths(relative_folder)
        for path in sorted(folder.glob("*.dcm")):
            relative = relative_folder + path.name
            if relative in named:
                continue
            if _recover(store, spool_root, path, relative):
                recovered += 1
    if recovered:
        log.warning("instances recovered from the spool after a power loss", instances=recovered)
    return recovered


def _recover(store: Store, spool_root: Path, path: Path, relative: str) -> bool:
    try:
        offset = dataset_offset(path)
        header = pydicom.dcmread(path, stop_before_pixels=True)
        uids = {
            key: str(header.get(key, "") or "").strip()
            for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
        syntax = str(header.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, ValueError, EOFError, KeyError, AttributeError, OSError) as exc:
        log.warning("spool file not recovered: unreadable", error=type(exc).__name__)
        return False
    digest = hashlib.sha256()
    for block in read_blocks(path, offset):
        digest.update(block)
    sha256 = digest.hexdigest()
    study_uid, series_uid = uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
    sop_uid = uids["SOPInstanceUID"]
    if relative != instance_relative_path(study_uid, series_uid, sop_uid, sha256):
        # Not a file the receiver named (or its bytes changed): not the node's to record.
        log.warning("spool file not recovered: its name does not match its content")
        return False
    if store.instance_sha256(study_uid, series_uid, sop_uid) is not None:
        return False
    study = store.study(study_uid)
    if study is not None and study.state != "receiving":
        return False
    own = store.is_issued(sop_uid)
    record = instance_record(
        header,
        uids,
        transfer_syntax=syntax,
        path=relative,
        size=path.stat().st_size,
        sha256=sha256,
        calling_ae=RECOVERED_AE,
        own=own,
    )
    store.record_instance(record, durable=True)
    log.info("instance recovered from the spool", study_key=study_key(study_uid))
    return True


__all__ = ["RECOVERED_AE", "current_boot", "recover_after_boot", "recover_instances"]
