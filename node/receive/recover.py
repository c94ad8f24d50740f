"""Instance rows a power loss took, rebuilt from the spool after the first start of each boot.

On SQLite the receive path commits an instance's row without waiting for the disk (WAL,
``synchronous=NORMAL``): the row survives the process dying, and every later commit of the node
(fully synchronous) makes it durable, but a power loss or kernel crash may take the last rows
while the files they name, fsynced before the answer, remain. So after the node's first start
following a boot, a thread looks for spool files no row names and records them again (the
receiver is already taking new instances; each file is handled under its instance's lock).

A file is recovered only when all of these hold, so nothing the node meant to forget comes back:

- its name is the one the receiver gives its dataset (UIDs and dataset hash agree with it);
- no row names it, and no row holds that instance (a replaced version or an identical resend
  waiting for removal: a replacement's row is made durable before the old file goes);
- retention removes a study's files before its rows, so no leftover of it looks lost.

A recovered instance is recorded as received (its study receiving again, its quiet timer armed),
so a study that had been scored without it is scored again with it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from node.core.logging import get_logger, study_key
from node.receive.receiver import (
    ReceiverState,
    dataset_offset,
    dataset_sha256,
    header_uids,
    instance_record,
)
from node.receive.spool import instance_relative_path, write_durably

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


def recover_after_boot(state: ReceiverState, data_dir: Path) -> int:
    """Run :func:`recover_instances` once per boot (at every start where boots are unknown);
    the boot it last ran in is kept in ``data_dir`` / :data:`RECOVERED_BOOT`."""
    store = state.store
    if not store.lazy_instance_commits:
        return 0
    boot = current_boot()
    marker = data_dir / RECOVERED_BOOT
    try:
        if boot is not None and marker.read_text().strip() == boot:
            return 0
    except OSError:
        pass
    recovered = recover_instances(state)
    if boot is not None:
        write_durably(data_dir, RECOVERED_BOOT, [boot.encode()])
    return recovered


def recover_in_background(state: ReceiverState, data_dir: Path) -> threading.Thread:
    """:func:`recover_after_boot` in a thread, so that a large spool never delays the start."""

    def run() -> None:
        try:
            recover_after_boot(state, data_dir)
        except Exception:
            # Tried again at the next start (no boot marker was written).
            log.exception("recovery of instance rows from the spool failed")

    thread = threading.Thread(target=run, name="spool-recovery", daemon=True)
    thread.start()
    return thread


def recover_instances(state: ReceiverState) -> int:
    """Record the spool's instance files that no row names; returns how many were recorded."""
    recovered = 0
    spool_root = state.spool_root
    # The spool's layout: <study hash[:2]>/<study hash[:12]>/<instance>-<dataset>.dcm, the
    # second level being the study's key.
    for top in sorted(spool_root.glob("??")):
        for folder in sorted(top.iterdir()) if top.is_dir() else []:
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            named = state.store.instance_paths_of_study_key(folder.name)
            relative_folder = f"{top.name}/{folder.name}/"
            for path in sorted(folder.glob("*.dcm")):
                relative = relative_folder + path.name
                if relative in named:
                    continue
                try:
                    if _recover(state, path, relative):
                        recovered += 1
                except Exception as exc:
                    log.warning("spool file not recovered", error=type(exc).__name__)
    if recovered:
        log.warning("instances recovered from the spool after a power loss", instances=recovered)
    return recovered


def _recover(state: ReceiverState, path: Path, relative: str) -> bool:
    store = state.store
    try:
        offset = dataset_offset(path)
        header = pydicom.dcmread(path, stop_before_pixels=True)
        uids = header_uids(header)
        syntax = str(header.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, ValueError, EOFError, KeyError, AttributeError, OSError) as exc:
        log.warning("spool file not recovered: unreadable", error=type(exc).__name__)
        return False
    sha256 = dataset_sha256(path, offset)
    study_uid, series_uid = uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
    sop_uid = uids["SOPInstanceUID"]
    if relative != instance_relative_path(study_uid, series_uid, sop_uid, sha256):
        # Not a file the receiver named (or its bytes changed): not the node's to record.
        log.warning("spool file not recovered: its name does not match its content")
        return False
    # The receiver holds this lock from the file's rename to its commit and clean-up.
    with state.instance_lock(relative):
        if not path.exists() or store.instance_sha256(study_uid, series_uid, sop_uid) is not None:
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
    state.on_instance(study_uid, own)
    log.info("instance recovered from the spool", study_key=study_key(study_uid))
    return True


__all__ = [
    "RECOVERED_AE",
    "current_boot",
    "recover_after_boot",
    "recover_in_background",
    "recover_instances",
]
