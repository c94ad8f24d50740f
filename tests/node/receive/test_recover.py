"""Specification of the recovery of instance rows a power loss took (SQLite's lazy commits).

A power loss is simulated by deleting the rows the receiver committed: the files they named,
fsynced before the answer, are what is left of them.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.core.settings import Settings
from node.receive import recover
from node.receive.receiver import ReceiverState, store_incoming
from node.receive.recover import RECOVERED_AE, recover_after_boot, recover_instances
from node.receive.spool import INCOMING
from node.store.database import Store
from tests.nodeproc import wait_for


@pytest.fixture(name="state")
def state_fixture(tmp_path: Path) -> ReceiverState:
    settings = Settings.model_validate(
        {"node": {"data_dir": str(tmp_path / "data"), "free_disk_floor_mb": 1}}
    )
    spool = tmp_path / "data" / "spool"
    (spool / INCOMING).mkdir(parents=True)
    store = Store(settings.database_url)
    return ReceiverState(settings=settings, store=store, spool_root=spool)


def _ct(study_uid: str | None = None, description: str = "arterial") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.SeriesDescription = description
    ds.PatientID = "RECOVER-1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _receive(state: ReceiverState, ds: Dataset) -> Path:
    """Store ``ds`` as the C-STORE handler does; returns its spool file."""
    incoming = state.spool_root / INCOMING / f"{ds.SOPInstanceUID}.part"
    ds.save_as(incoming, enforce_file_format=True)
    status = store_incoming(
        state,
        incoming,
        incoming.stat().st_size,
        transfer_syntax=ExplicitVRLittleEndian,
        sop_class=str(ds.SOPClassUID),
        sop_instance=str(ds.SOPInstanceUID),
        calling_ae="MODALITY",
    )
    incoming.unlink(missing_ok=True)
    assert status == 0x0000
    (row,) = [
        f
        for f in state.store.instance_files(str(ds.StudyInstanceUID))
        if f.sop_instance_uid == str(ds.SOPInstanceUID)
    ]
    return state.spool_root / row.path


def _lose(state: ReceiverState, *sop_uids: str, study_too: bool = False) -> None:
    """What a power loss does to the last lazy commits: their rows are gone."""
    database = sqlite3.connect(state.store.url.removeprefix("sqlite:///"))
    with database:
        for sop_uid in sop_uids:
            study = database.execute(
                "SELECT study_uid, series_uid FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
            ).fetchone()
            database.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
            database.execute(
                "UPDATE series SET instance_count = instance_count - 1 WHERE series_uid = ?",
                (study[1],),
            )
            database.execute(
                "UPDATE studies SET instance_count = instance_count - 1 WHERE study_uid = ?",
                (study[0],),
            )
            if study_too:
                database.execute("DELETE FROM series WHERE study_uid = ?", (study[0],))
                database.execute("DELETE FROM studies WHERE study_uid = ?", (study[0],))
    database.close()


def test_instance_rows_are_committed_lazily_on_sqlite(state: ReceiverState) -> None:
    assert state.store.lazy_instance_commits


def test_rows_a_power_loss_took_come_back_from_their_files(state: ReceiverState) -> None:
    kept, lost = _ct(), _ct()
    lost.StudyInstanceUID = kept.StudyInstanceUID
    _receive(state, kept)
    lost_file = _receive(state, lost)
    before = {f.path: f for f in state.store.instance_files(str(kept.StudyInstanceUID))}
    _lose(state, str(lost.SOPInstanceUID))

    assert recover_instances(state) == 1

    after = {f.path: f for f in state.store.instance_files(str(kept.StudyInstanceUID))}
    assert set(after) == set(before)
    row = after[str(lost_file.relative_to(state.spool_root))]
    assert row.sop_instance_uid == str(lost.SOPInstanceUID)
    study = state.store.study(str(kept.StudyInstanceUID))
    assert study is not None
    assert study.state == "receiving"
    assert study.instance_count == 2
    # Nothing is recorded twice.
    assert recover_instances(state) == 0


def test_a_study_whose_rows_were_all_lost_comes_back_with_its_sender_unknown(
    state: ReceiverState,
) -> None:
    ds = _ct()
    _receive(state, ds)
    _lose(state, str(ds.SOPInstanceUID), study_too=True)
    assert state.store.study(str(ds.StudyInstanceUID)) is None

    assert recover_instances(state) == 1

    study = state.store.study(str(ds.StudyInstanceUID))
    assert study is not None
    assert (study.state, study.instance_count) == ("receiving", 1)
    database = sqlite3.connect(state.store.url.removeprefix("sqlite:///"))
    (calling_ae,) = database.execute("SELECT calling_ae FROM instances").fetchone()
    database.close()
    assert calling_ae == RECOVERED_AE


def test_a_late_instance_of_a_scored_study_comes_back_and_reopens_it(
    state: ReceiverState,
) -> None:
    # The study was scored; a late instance's row (and the reopening) was a lazy commit that a
    # power loss took. Its file says it was acknowledged: the study is received again.
    scored, late = _ct(), _ct()
    late.StudyInstanceUID = scored.StudyInstanceUID
    _receive(state, scored)
    _receive(state, late)
    _lose(state, str(late.SOPInstanceUID))
    database = sqlite3.connect(state.store.url.removeprefix("sqlite:///"))
    with database:
        database.execute(
            "UPDATE studies SET state = 'done' WHERE study_uid = ?", (str(scored.StudyInstanceUID),)
        )
    database.close()
    reopened: list[str] = []
    state.on_instance = lambda study_uid, own: reopened.append(study_uid)

    assert recover_instances(state) == 1

    study = state.store.study(str(scored.StudyInstanceUID))
    assert study is not None
    assert (study.state, study.instance_count) == ("receiving", 2)
    assert reopened == [str(scored.StudyInstanceUID)], "its quiet timer is armed"


def test_what_the_node_meant_to_forget_stays_forgotten(state: ReceiverState) -> None:
    # The previous version of a replaced instance, still on disk: its instance has a row.
    first = _ct(description="first")
    first_file = _receive(state, first)
    saved = first_file.read_bytes()
    changed = pydicom.dcmread(first_file)
    changed.SeriesDescription = "edited on the PACS"
    _receive(state, changed)
    assert not first_file.exists()
    first_file.write_bytes(saved)
    # A file whose name does not match its bytes: not one the receiver wrote.
    foreign = _ct()
    foreign_file = _receive(state, foreign)
    _lose(state, str(foreign.SOPInstanceUID))
    renamed = foreign_file.with_name("0" * 32 + "-" + "0" * 16 + ".dcm")
    foreign_file.rename(renamed)
    # And a file that is no DICOM at all.
    (renamed.parent / ("1" * 32 + "-" + "1" * 16 + ".dcm")).write_bytes(b"not dicom")

    assert recover_instances(state) == 0

    (row,) = state.store.instance_files(str(first.StudyInstanceUID))
    assert state.spool_root / row.path != first_file
    assert state.store.instance_files(str(foreign.StudyInstanceUID)) == []


def test_retention_removes_files_before_rows(state: ReceiverState) -> None:
    from node.serve.service import apply_retention

    ds = _ct()
    spooled = _receive(state, ds)
    database = sqlite3.connect(state.store.url.removeprefix("sqlite:///"))
    with database:
        database.execute(
            "UPDATE studies SET state = 'done', completed_at = '2000-01-01 00:00:00' "
            "WHERE study_uid = ?",
            (str(ds.StudyInstanceUID),),
        )
    database.close()
    removed_first: list[bool] = []
    original = state.store.delete_instances

    def delete_instances(study_uid: str) -> list[str]:
        removed_first.append(not spooled.exists())
        return original(study_uid)

    state.store.delete_instances = delete_instances  # type: ignore[method-assign]
    assert apply_retention(state.store, state.spool_root, 1) == 1
    assert removed_first == [True]
    assert state.store.instance_files(str(ds.StudyInstanceUID)) == []
    assert recover_instances(state) == 0


def test_recovery_runs_once_per_boot(
    state: ReceiverState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(recover, "BOOT_ID", boot)
    ds = _ct()
    _receive(state, ds)
    _lose(state, str(ds.SOPInstanceUID))

    assert recover_after_boot(state, tmp_path) == 1
    _lose(state, str(ds.SOPInstanceUID))
    # The same boot: a process restart (kill -9 included) loses no lazy commit, nothing to scan.
    assert recover_after_boot(state, tmp_path) == 0
    boot.write_text("boot-2\n")
    assert recover_after_boot(state, tmp_path) == 1
    # Where the system names no boot, every start scans.
    monkeypatch.setattr(recover, "BOOT_ID", tmp_path / "absent")
    _lose(state, str(ds.SOPInstanceUID))
    assert recover_after_boot(state, tmp_path) == 1


def test_a_node_starting_after_a_power_loss_records_the_lost_rows(
    state: ReceiverState, tmp_path: Path
) -> None:
    from node.serve.service import start_node, stop_node
    from tests.orthanc import free_port

    ds = _ct()
    _receive(state, ds)
    _lose(state, str(ds.SOPInstanceUID), study_too=True)
    state.store.close()
    settings = Settings.model_validate(
        {
            "node": {
                "data_dir": str(tmp_path / "data"),
                "host": "127.0.0.1",
                "port": free_port(),
                "free_disk_floor_mb": 1,
            },
            "pipeline": {"workers": 1},
            "web": {"enabled": False},
        }
    )
    shutil.rmtree(tmp_path / "data" / "spool" / INCOMING)
    node = start_node(settings)
    try:
        # The node is receiving while its recovery runs.
        study = wait_for(lambda: node.store.study(str(ds.StudyInstanceUID)), timeout=30)
        assert study.instance_count == 1
    finally:
        stop_node(node)
