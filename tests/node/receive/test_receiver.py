"""Specification of the receive path, against real DICOM peers (DCMTK, pynetdicom as an SCU).

A PACS must be able to push a study and trust that every acknowledged instance is safe.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import json
import re
import sqlite3
import subprocess
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node import MANUFACTURER, MODEL_NAME
from node.analysis.dicomio import load_series
from node.core.settings import to_toml
from node.receive.receiver import LOCK_FOLDER
from node.store.database import Study
from tests.conftest import require_tool, run_tool
from tests.nodeproc import (
    NODE_AET,
    SCU_AET,
    NodeProcess,
    dcmtk_env,
    running_node,
    start_node_process,
    storescu_command,
    wait_for,
)


def truth_rows(cohort: Path) -> list[dict[str, str]]:
    with (cohort / "truth.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def storescu(
    node: NodeProcess, *paths: Path, propose: str = "-x="
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu of files or folders (recursively), one association."""
    return subprocess.run(
        storescu_command(node.port, *paths, propose=propose),
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=300,
        check=False,
    )


def storescu_at_once(
    node: NodeProcess, folders: list[Path]
) -> list[subprocess.CompletedProcess[str]]:
    """One storescu association per folder, all at once; their results when all are done."""
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda f=f: results.append(storescu(node, f))) for f in folders
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a file, after its file meta (what a transfer keeps unchanged)."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    meta_end = 132 + len(_meta_bytes(ds))
    return raw[meta_end:]


def _meta_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, ds.file_meta, enforce_standard=False)
    return buffer.getvalue()


def pixel_bytes(path: Path) -> bytes:
    return bytes(pydicom.dcmread(path).PixelData)


def spooled(node: NodeProcess) -> dict[str, Path]:
    """SOPInstanceUID → spooled file."""
    files = {}
    for path in node.spool.rglob("*.dcm"):
        if ".incoming" in path.parts:
            continue  # still arriving (or cut off by a kill): not stored
        files[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return files


def study_state(node: NodeProcess, study_uid: str) -> Study | None:
    store = node.store()
    try:
        return store.study(study_uid)
    finally:
        store.close()


def wait_until_final(node: NodeProcess, study_uid: str, timeout: float = 90) -> Study:
    final = {"done", "failed", "needs_review", "not_applicable"}

    def finished() -> Study | None:
        row = study_state(node, study_uid)
        return row if row is not None and row.state in final else None

    return wait_for(finished, timeout=timeout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cohort(cohort_factory: Callable[..., Path]) -> Path:
    return cohort_factory(seed=21, size=64, slices=16)


def test_echoscu_succeeds(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu", "dcmtk")
    with running_node(tmp_path) as node:
        result = run_tool(echoscu, "-aet", SCU_AET, "-aec", NODE_AET, "127.0.0.1", node.port)
        assert result.returncode == 0


def test_unknown_caller_and_wrong_called_title_are_rejected(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu", "dcmtk")
    with running_node(tmp_path) as node:
        intruder = run_tool(
            echoscu, "-aet", "INTRUDER", "-aec", NODE_AET, "127.0.0.1", node.port, check=False
        )
        assert intruder.returncode != 0
        # A genuine A-ASSOCIATE-RJ with the reason the conformance statement promises, not an
        # A-ABORT (the socket used to close before the reject was sent).
        said = intruder.stdout + intruder.stderr
        assert "Association Rejected" in said and "Calling AE Title Not Recognized" in said
        misdialled = run_tool(
            echoscu, "-aet", SCU_AET, "-aec", "SOMEONE_ELSE", "127.0.0.1", node.port, check=False
        )
        assert misdialled.returncode != 0
        said = misdialled.stdout + misdialled.stderr
        assert "Association Rejected" in said and "Called AE Title Not Recognized" in said
        log = node.log()
        assert '[peers.NAME] ae_title = \\"INTRUDER\\"' in log or "INTRUDER" in log
        assert "allow_with" in log
        # The node still serves the next, legitimate caller.
        assert (
            run_tool(echoscu, "-aet", SCU_AET, "-aec", NODE_AET, "127.0.0.1", node.port).returncode
            == 0
        )


def test_peer_bound_to_another_host_is_rejected(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu", "dcmtk")
    extra = {"peers": {"scu": {"ae_title": SCU_AET, "host": "10.9.8.7"}}}
    with running_node(tmp_path, extra) as node:
        result = run_tool(
            echoscu, "-aet", SCU_AET, "-aec", NODE_AET, "127.0.0.1", node.port, check=False
        )
        assert result.returncode != 0
        assert "not allowed from this address" in node.log()


def test_a_whole_study_is_stored_and_paired(tmp_path: Path, cohort: Path) -> None:
    row = truth_rows(cohort)[0]
    study = cohort / row["study_folder"]
    sent = sorted(study.rglob("*.dcm"))
    with running_node(tmp_path) as node:
        result = storescu(node, study)
        assert result.returncode == 0, result.stderr
        final = wait_until_final(node, row["study_instance_uid"])
        files = spooled(node)
        assert len(files) == len(sent) == final.instance_count
        for path in sent:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(files[uid]) == dataset_bytes(path), "stored as received"
        assert final.state == "done"
        pairing = final.pairing
        assert isinstance(pairing, dict)
        assert pairing["arterial"] == row["arterial_series_uid"]
        assert pairing["portal_venous"] == row["portal_venous_series_uid"]
        for spool_file in files.values():
            relative = str(spool_file.relative_to(node.spool))
            assert not re.search(r"\d+\.\d+\.\d+", relative), "no raw UID in a spool path"


@pytest.mark.parametrize(
    ("tool", "package", "arguments", "syntax", "propose"),
    [
        ("dcmcjpls", "dcmtk", ["+el"], "1.2.840.10008.1.2.4.80", "-xt"),
        ("gdcmconv", "libgdcm-tools", ["--j2k"], "1.2.840.10008.1.2.4.90", "-xv"),
    ],
    ids=["jpeg-ls", "jpeg-2000"],
)
def test_compressed_study_is_stored_unchanged_and_decodes(
    tmp_path: Path,
    cohort: Path,
    tool: str,
    package: str,
    arguments: list[str],
    syntax: str,
    propose: str,
) -> None:
    executable = require_tool(tool, package)
    row = truth_rows(cohort)[0]
    arterial_dir = next(
        p.parent
        for p in (cohort / row["study_folder"]).rglob("*.dcm")
        if str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
        == row["arterial_series_uid"]
    )
    compressed_dir = tmp_path / "compressed"
    compressed_dir.mkdir()
    originals = sorted(arterial_dir.glob("*.dcm"))
    for path in originals:
        run_tool(executable, *arguments, path, compressed_dir / path.name)
    with running_node(tmp_path / "node") as node:
        result = storescu(node, compressed_dir, propose=propose)
        assert result.returncode == 0, result.stderr
        assert "-> Little Endian" not in result.stderr, "sent compressed, not decompressed"
        wait_for(lambda: len(spooled(node)) == len(originals))
        files = spooled(node)
        for path in compressed_dir.glob("*.dcm"):
            stored = files[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
            assert (
                pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID
                == syntax
            )
            assert pixel_bytes(stored) == pixel_bytes(path), "not re-encoded on receipt"
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(load_series(list(files.values()))),
            sitk.GetArrayFromImage(load_series(originals)),
        )


def _ct_dataset(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    for key, value in overrides.items():
        setattr(ds, key, value)
    ds.preamble = b"\x00" * 128  # a DICOM file, even when the dataset itself is broken
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    return ds


def _send_file(node: NodeProcess, path: Path, syntax: str = ExplicitVRLittleEndian) -> int:
    """pynetdicom as the SCU: sends a file's dataset bytes as they are (no re-encoding)."""
    from pynetdicom import _config

    # Chunked sending reads only the file meta and streams the rest untouched, so a broken
    # dataset reaches the node as broken as it is on disk.
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    return int(status.Status)


def test_bad_datasets_get_failure_statuses_and_the_node_carries_on(
    tmp_path: Path, cohort: Path
) -> None:
    good = sorted((cohort / truth_rows(cohort)[0]["study_folder"]).rglob("*.dcm"))[5]
    truncated = tmp_path / "truncated.dcm"
    raw = good.read_bytes()
    meta_length = 132 + len(_meta_bytes(pydicom.dcmread(good, stop_before_pixels=True)))
    # Keep the file meta (the SCU needs it) and cut the dataset inside an element header.
    truncated.write_bytes(raw[:meta_length] + raw[meta_length : meta_length + 7])

    no_uid = tmp_path / "no_uid.dcm"
    ds = _ct_dataset()
    instance_uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    ds.save_as(no_uid, enforce_file_format=False)

    mismatch = tmp_path / "mismatch.dcm"
    ds = _ct_dataset()
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(mismatch, enforce_file_format=False)

    bad_uids = []
    for key, value in (
        ("StudyInstanceUID", "../../x"),
        ("SeriesInstanceUID", "1.2.abc"),
        ("StudyInstanceUID", "1.2." + "3" * 70),
        ("SeriesInstanceUID", "1..2"),
    ):
        ds = _ct_dataset()
        setattr(ds, key, value)
        path = tmp_path / f"bad_uid_{len(bad_uids)}.dcm"
        ds.save_as(path, enforce_file_format=False)
        bad_uids.append(path)

    with running_node(tmp_path / "node") as node:
        assert _send_file(node, truncated) & 0xF000 == 0xC000
        assert _send_file(node, no_uid) == 0xC001
        assert [_send_file(node, path) for path in bad_uids] == [0xC002] * len(bad_uids)
        assert _send_file(node, mismatch) == 0xA901
        assert _send_file(node, good) == 0x0000
        assert node.process.poll() is None
        assert len(spooled(node)) == 1
        assert not list(node.spool.rglob("*.tmp")), "no partial file is left behind"


def _image(rows: int, columns: int, frames: int = 1, pixel_bytes: int | None = None) -> Dataset:
    """A 16-bit CT dataset whose pixel data holds ``pixel_bytes`` (default: what fits)."""
    ds = _ct_dataset(
        Rows=rows,
        Columns=columns,
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        PixelRepresentation=1,
    )
    if frames > 1:
        ds.NumberOfFrames = frames
    size = rows * columns * frames * 2 if pixel_bytes is None else pixel_bytes
    ds.PixelData = bytes(size)
    ds["PixelData"].VR = "OW"
    return ds


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_instances_are_received_into_files_and_oversized_ones_refused(
    tmp_path: Path,
) -> None:
    big = _write(_image(2048, 2048, frames=16), tmp_path / "big.dcm")  # 134 MB
    oversized = _write(_image(2048, 2048, frames=32), tmp_path / "oversized.dcm")  # 268 MB
    # Deflated: 268 MB of zeros in a file of a few hundred kB (a decompression bomb).
    bomb = _image(2048, 2048, frames=32)
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb_path = _write(bomb, tmp_path / "bomb.dcm")
    assert bomb_path.stat().st_size < 2_000_000
    with running_node(tmp_path / "node", {"node": {"max_instance_mb": 200}}) as node:
        before = peak_rss_mb(node.process.pid)
        assert _send_file(node, big) == 0x0000
        # Decoded in memory this instance would have added at least its own size.
        assert peak_rss_mb(node.process.pid) - before < 134 / 2
        (stored,) = node.spool.rglob("*.dcm")
        assert dataset_bytes(stored) == dataset_bytes(big)
        assert _send_file(node, oversized) == 0xA702
        assert _send_file(node, bomb_path, DeflatedExplicitVRLittleEndian) == 0xA702
        assert list(node.spool.rglob("*.dcm")) == [stored]
        left = [p for p in (node.spool / ".incoming").iterdir() if p.name != LOCK_FOLDER]
        assert not left, "nothing left incoming"
        assert "instance larger than node.max_instance_mb" in node.log()


def test_pixel_data_that_is_not_the_image_its_header_describes_is_refused(
    tmp_path: Path,
) -> None:
    short = _write(_image(64, 64, pixel_bytes=100), tmp_path / "short.dcm")
    long = _write(_image(64, 64, pixel_bytes=64 * 64 * 2 * 3), tmp_path / "long.dcm")
    frames = _write(_image(32, 32, frames=4, pixel_bytes=32 * 32 * 2), tmp_path / "frames.dcm")
    fine = _write(_image(64, 64), tmp_path / "fine.dcm")
    with running_node(tmp_path / "node") as node:
        assert [_send_file(node, p) for p in (short, long, frames)] == [0xC003] * 3
        assert _send_file(node, fine) == 0x0000
        assert len(spooled(node)) == 1
        assert "pixel data holds 100 bytes" in node.log()


def test_identical_resend_is_a_success_and_a_different_dataset_replaces(
    tmp_path: Path, cohort: Path
) -> None:
    good = sorted((cohort / truth_rows(cohort)[0]["study_folder"]).rglob("*.dcm"))[3]
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(good)
    ds.SeriesDescription = "edited on the PACS"
    ds.save_as(changed)
    with running_node(tmp_path / "node") as node:
        assert _send_file(node, good) == 0
        assert _send_file(node, good) == 0
        (stored,) = spooled(node).values()
        assert dataset_bytes(stored) == dataset_bytes(good)
        assert _send_file(node, changed) == 0
        (stored,) = spooled(node).values()
        assert pydicom.dcmread(stored).SeriesDescription == "edited on the PACS"
        assert "instance replaced" in node.log()


def test_parallel_associations_deliver_the_first_instances_of_a_new_study(
    tmp_path: Path,
) -> None:
    # Check-then-insert of the study row lost this race: 5 of 18 such C-STOREs got 0xA701 and
    # left files no row named.
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(12):
        ds = _ct_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=index)
        paths.append(_write(ds, tmp_path / f"{index}.dcm"))
    with running_node(tmp_path / "node", {"node": {"max_associations": 16}}) as node:
        barrier = threading.Barrier(len(paths))

        def send(path: Path) -> int:
            barrier.wait()
            return _send_file(node, path)

        with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
            assert list(pool.map(send, paths)) == [0x0000] * len(paths)
        store = node.store()
        try:
            rows = store.instance_files(study)
            assert len(rows) == len(paths) == len(spooled(node))
            assert {node.spool / r.path for r in rows} == set(spooled(node).values())
        finally:
            store.close()


def test_a_reused_sop_instance_uid_never_moves_another_studys_instance(tmp_path: Path) -> None:
    victim, series = generate_uid(), generate_uid()
    originals = [
        _write(
            _ct_dataset(StudyInstanceUID=victim, SeriesInstanceUID=series),
            tmp_path / f"victim{n}.dcm",
        )
        for n in range(3)
    ]
    reused_uid = pydicom.dcmread(originals[1]).SOPInstanceUID
    intruder = _ct_dataset(SOPInstanceUID=reused_uid)
    intruder.file_meta.MediaStorageSOPInstanceUID = reused_uid
    intruder_path = _write(intruder, tmp_path / "intruder.dcm")
    with running_node(tmp_path / "node") as node:
        assert [_send_file(node, p) for p in originals] == [0x0000] * 3
        # Kept apart: the other study's instance is its own row and file.
        assert _send_file(node, intruder_path) == 0x0000
        store = node.store()
        try:
            rows = store.instance_files(victim)
            assert len(rows) == 3 and store.study(victim).instance_count == 3  # type: ignore[union-attr]
            assert {dataset_bytes(node.spool / r.path) for r in rows} == {
                dataset_bytes(p) for p in originals
            }
            (other,) = store.instance_files(str(intruder.StudyInstanceUID))
            assert dataset_bytes(node.spool / other.path) == dataset_bytes(intruder_path)
        finally:
            store.close()
        assert len(list(node.spool.rglob("*.dcm"))) == 4
        assert "SOP Instance UID also used in another study" in node.log()


def test_a_replacement_whose_commit_fails_keeps_the_acknowledged_file(tmp_path: Path) -> None:
    original = _write(_ct_dataset(SeriesDescription="first"), tmp_path / "first.dcm")
    changed = pydicom.dcmread(original)
    changed.SeriesDescription = "edited on the PACS"
    replacement = _write(changed, tmp_path / "second.dcm")
    with running_node(tmp_path / "node") as node:
        assert _send_file(node, original) == 0x0000
        (acknowledged,) = node.spool.rglob("*.dcm")
        acknowledged_bytes = acknowledged.read_bytes()
        database = sqlite3.connect(node.settings.database_url.removeprefix("sqlite:///"))
        with database:
            database.execute(
                "CREATE TRIGGER refuse BEFORE UPDATE ON instances "
                "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
            )
        # The commit fails: the sender is told, and the file acknowledged before is untouched.
        assert _send_file(node, replacement) == 0xA701
        assert list(node.spool.rglob("*.dcm")) == [acknowledged]
        assert acknowledged.read_bytes() == acknowledged_bytes
        with database:
            database.execute("DROP TRIGGER refuse")
        database.close()
        # Committed: the new file replaces the old one, which is gone.
        assert _send_file(node, replacement) == 0x0000
        (stored,) = node.spool.rglob("*.dcm")
        assert stored != acknowledged
        assert pydicom.dcmread(stored).SeriesDescription == "edited on the PACS"
        store = node.store()
        try:
            (row,) = store.instance_files(str(changed.StudyInstanceUID))
            assert node.spool / row.path == stored
        finally:
            store.close()


def test_each_association_ends_with_one_line_saying_what_it_did(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "study"
    folder.mkdir()
    for index in range(3):
        ds = _ct_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=index)
        _write(ds, folder / f"{index}.dcm")
    with running_node(tmp_path / "node") as node:
        assert storescu(node, folder).returncode == 0
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(CTImageStorage)
        assert not stranger.associate("127.0.0.1", node.port, ae_title=NODE_AET).is_established

        def ended() -> list[dict[str, object]]:
            lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
            return [line for line in lines if line.get("event") == "association ended"]

        wait_for(lambda: len(ended()) >= 2)
        sent, rejected = ended()[:2]
    assert (sent["calling_ae"], sent["outcome"], sent["instances"], sent["failed"]) == (
        SCU_AET,
        "released",
        3,
        0,
    )
    assert sent["sop_classes"] == {"CT Image Storage": 3}
    assert sent["address"] == "127.0.0.1" and int(sent["bytes"]) > 3 * 128  # type: ignore[call-overload]
    assert float(sent["seconds"]) >= 0  # type: ignore[arg-type]
    assert (rejected["calling_ae"], rejected["outcome"], rejected["instances"]) == (
        "STRANGER",
        "rejected",
        0,
    )


def test_eight_concurrent_senders(tmp_path: Path, cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(studies=8, seed=31, size=48, slices=16)
    rows = truth_rows(cohort)
    with running_node(tmp_path, {"node": {"max_associations": 16}}) as node:
        results = storescu_at_once(node, [cohort / r["study_folder"] for r in rows])
        assert [r.returncode for r in results] == [0] * 8
        sent = len(list(cohort.glob("study_*/**/*.dcm")))
        assert len(spooled(node)) == sent
        for row in rows:
            final = wait_until_final(node, row["study_instance_uid"], timeout=180)
            assert final.state == "done"
            assert final.pairing["arterial"] == row["arterial_series_uid"]  # type: ignore[index]


def _successful_sends(log: str) -> list[Path]:
    """Files storescu reported as stored with success, in order (from its -v log)."""
    stored, current = [], None
    for line in log.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            stored.append(current)
            current = None
    return stored


def test_kill_9_loses_nothing_that_was_acknowledged(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=41, size=128, slices=48)
    row = truth_rows(cohort)[0]
    study = cohort / row["study_folder"]
    total = len(list(study.rglob("*.dcm")))
    with running_node(tmp_path) as node:
        sender = subprocess.Popen(
            storescu_command(node.port, study),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dcmtk_env(),
        )
        wait_for(
            lambda: len(list(node.spool.rglob("*.dcm"))) >= total // 3, timeout=120, every=0.01
        )
        node.kill()
        log, _ = sender.communicate(timeout=60)
        acknowledged = _successful_sends(log)
        assert 0 < len(acknowledged) < total, "the kill must land mid-study"
        files = spooled(node)
        for path in acknowledged:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert uid in files, f"{path.name} was acknowledged but is not in the spool"
            assert dataset_bytes(files[uid]) == dataset_bytes(path)
        # Restart on the same configuration and resend everything.
        restarted = start_node_process(node.config_path, node.log_path)
        try:
            assert storescu(restarted, study).returncode == 0
            final = wait_until_final(restarted, row["study_instance_uid"])
            assert final.state == "done"
            assert final.instance_count == total
            assert final.pairing["portal_venous"] == row["portal_venous_series_uid"]  # type: ignore[index]
        finally:
            restarted.stop()


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=False)
    return path


def test_other_objects_are_accepted_but_not_analysed(tmp_path: Path, cohort: Path) -> None:
    row = truth_rows(cohort)[0]
    study_uid = row["study_instance_uid"]
    extra = tmp_path / "extra"
    extra.mkdir()
    key_object = _ct_dataset(StudyInstanceUID=study_uid, Modality="KO")
    key_object.SOPClassUID = key_object.file_meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.88.59"
    )
    dose = _ct_dataset(StudyInstanceUID=study_uid, Modality="SR")
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    _write(key_object, extra / "ko.dcm")
    _write(dose, extra / "dose.dcm")
    with running_node(tmp_path / "node") as node:
        assert storescu(node, cohort / row["study_folder"], extra).returncode == 0
        final = wait_until_final(node, study_uid)
        assert final.state == "done"
        store = node.store()
        rows = {r.sop_class_uid: r for r in store.instance_files(study_uid)}
        store.close()
        assert rows["1.2.840.10008.5.1.4.1.1.88.59"].analysable is False
        assert rows["1.2.840.10008.5.1.4.1.1.88.67"].analysable is False


def test_own_outputs_coming_back_start_nothing(tmp_path: Path, cohort: Path) -> None:
    row = truth_rows(cohort)[0]
    study_uid = row["study_instance_uid"]
    with running_node(tmp_path / "node") as node:
        assert storescu(node, cohort / row["study_folder"]).returncode == 0
        assert wait_until_final(node, study_uid).state == "done"
        outputs = sorted((node.settings.node.data_dir / "results").rglob("*.dcm"))
        modalities = {pydicom.dcmread(p).Modality for p in outputs}
        assert "SR" in modalities and modalities <= {"SEG", "SR", "OT"}
        store = node.store()
        jobs_before = len(store.list_jobs())
        # The node's SEG, SR and SC sent back (a PACS forwarding the whole study): recognised
        # by the UIDs the node issued, they re-open nothing.
        assert storescu(node, *outputs).returncode == 0
        sent = len(list((cohort / row["study_folder"]).rglob("*.dcm")))
        wait_for(lambda: len(spooled(node)) == sent + len(outputs))
        # Longer than the quiet period: a re-opened study would have queued a job by now.
        threading.Event().wait(3)
        assert len(store.list_jobs()) == jobs_before
        assert store.study(study_uid).state == "done"  # type: ignore[union-attr]
        assert all(
            f.own_output
            for f in store.instance_files(study_uid)
            if f.sop_class_uid in {str(pydicom.dcmread(p).SOPClassUID) for p in outputs}
        )

        # A CT study that writes the node's manufacturer and model into its headers is still a
        # study to analyse: strings anyone can set do not make it the node's output.
        spoofed, spoofed_study = tmp_path / "spoofed", generate_uid()
        new_series: dict[str, str] = {}
        for source in sorted((cohort / row["study_folder"]).rglob("*.dcm")):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID = spoofed_study
            ds.SeriesInstanceUID = new_series.setdefault(ds.SeriesInstanceUID, generate_uid())
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, MODEL_NAME
            target = spoofed / source.relative_to(cohort)
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target)
        assert storescu(node, spoofed).returncode == 0
        assert wait_until_final(node, spoofed_study).state == "done"
        assert len(store.list_jobs()) == jobs_before + 1
        assert "was not issued by it" in node.log()
        store.close()


def test_spool_digest_helper_matches_pydicom(cohort: Path) -> None:
    """The test's own helper: the dataset part after the file meta is what pydicom decodes."""
    path = sorted(cohort.rglob("*.dcm"))[0]
    body = dataset_bytes(path)
    assert hashlib.sha256(body).hexdigest() != hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(body) < path.stat().st_size


def test_orthanc_moves_a_study_to_the_node(tmp_path: Path, cohort: Path) -> None:
    from tests.orthanc import orthanc_or_skip, running_orthanc

    orthanc_or_skip()
    row = truth_rows(cohort)[0]
    study = cohort / row["study_folder"]
    extra = {
        "peers": {
            "scu": {"ae_title": SCU_AET},
            "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1"},
        }
    }
    with (
        running_node(tmp_path / "node", extra) as node,
        running_orthanc(tmp_path / "orthanc") as pacs,
    ):
        pacs.add_modality("mvi", NODE_AET, "127.0.0.1", node.port)
        pacs.upload_folder(study)
        pacs.move_study(row["study_instance_uid"], NODE_AET, cmove=True)
        final = wait_until_final(node, row["study_instance_uid"])
        assert final.instance_count == len(list(study.rglob("*.dcm")))
        assert final.state == "done"
        assert final.pairing["arterial"] == row["arterial_series_uid"]  # type: ignore[index]
        store = node.store()
        callers = {file.calling_ae for file in store.instance_files(row["study_instance_uid"])}
        store.close()
        assert callers == {"ORTHANC"}


def test_stores_are_refused_below_the_free_disk_floor(tmp_path: Path, cohort: Path) -> None:
    good = sorted((cohort / truth_rows(cohort)[0]["study_folder"]).rglob("*.dcm"))[2]
    with running_node(tmp_path / "node", {"node": {"free_disk_floor_mb": 10**12}}) as node:
        assert _send_file(node, good) == 0xA700
        assert spooled(node) == {}
        assert "free disk below node.free_disk_floor_mb" in node.log()


def test_operator_commands_echo_and_studies_list(tmp_path: Path, cohort: Path) -> None:
    from tests.node.cli.test_main import mvi_node

    row = truth_rows(cohort)[0]
    extra = {
        "peers": {"scu": {"ae_title": SCU_AET}, "self": {"ae_title": NODE_AET, "host": "127.0.0.1"}}
    }
    with running_node(tmp_path / "node", extra) as node:
        data = tomllib.loads(node.config_path.read_text())
        data["peers"]["self"]["port"] = node.port  # the CLI calls the node as a peer
        cli_config = tmp_path / "cli.toml"
        cli_config.write_text(to_toml(data))
        echoed = mvi_node("echo", "self", "--config", cli_config)
        assert echoed.returncode == 0, echoed.stderr
        assert "success" in echoed.stdout
        unknown = mvi_node("echo", "nobody", "--config", cli_config)
        assert unknown.returncode == 2 and "no [peers.nobody]" in unknown.stderr

        assert storescu(node, cohort / row["study_folder"]).returncode == 0
        wait_until_final(node, row["study_instance_uid"])
        listed = mvi_node("studies", "list", "--config", cli_config)
        assert listed.returncode == 0, listed.stderr
        assert "done" in listed.stdout and "tags" in listed.stdout
        patient_id = str(
            pydicom.dcmread(next((cohort / row["study_folder"]).rglob("*.dcm"))).PatientID
        )
        assert patient_id not in listed.stdout
        shown = mvi_node("studies", "list", "--show-identifiers", "--config", cli_config)
        assert patient_id in shown.stdout
    closed = mvi_node("echo", "self", "--config", cli_config)
    assert closed.returncode == 1 and "association failed" in closed.stderr


def test_patient_data_at_rest_is_the_node_accounts_alone(tmp_path: Path) -> None:
    """Outside systemd (no UMask=) the node still writes nothing other users can read: the data
    directory 0700, spooled instances and the database without any bit for others."""
    data = tmp_path / "node" / "data"
    data.mkdir(parents=True, mode=0o755)  # made by hand, too open
    good = tmp_path / "good.dcm"
    _ct_dataset().save_as(good, enforce_file_format=False)
    with running_node(tmp_path / "node") as node:
        assert _send_file(node, good) == 0x0000
        assert data.stat().st_mode & 0o777 == 0o700
        files = [*node.spool.rglob("*.dcm"), *data.glob("*.sqlite3*")]
        assert len(files) >= 2
        for path in files:
            assert path.stat().st_mode & 0o007 == 0, (path.name, oct(path.stat().st_mode))
