"""Specification of delivery by STOW-RS, against Orthanc with its DICOMweb plugin.

The archive is a real Orthanc (Debian's orthanc-dicomweb plugin) with HTTP basic authentication
on; a Lua hook logs every instance it receives, duplicates included, so "delivered once" is
counted, not assumed.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from node.deliver.outbox import enqueue, list_outbox
from node.store.database import Store
from tests.node.deliver.test_outbox import _send_study, as_result, make_job, result_of
from tests.nodeproc import running_node, wait_for
from tests.orthanc import Orthanc, counting_orthanc, dicomweb_config, restart_orthanc

USER, PASSWORD = "mvi-node", "stow-secret-4711"


def web_peer(pacs: Orthanc, password: str = PASSWORD) -> dict[str, Any]:
    """A DICOMweb-only peer: no AE title, no port."""
    return {
        "dicomweb_url": f"{pacs.url}/dicom-web",
        "auth": "basic",
        "username": USER,
        "password": password,
    }


def received_uids(log: Path) -> list[str]:
    """SOP Instance UIDs Orthanc received, one entry per request (duplicates included)."""
    return [line.split()[-1] for line in log.read_text().splitlines()] if log.exists() else []


def states(store: Store) -> list[tuple[str, int, str]]:
    return [
        (r.state, r.attempts, r.last_status or "") for r in list_outbox(store, include_sent=True)
    ]


def test_a_scored_study_comes_back_by_stow_rs_into_the_same_study(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    folder = cohort_factory(seed=95, seg=True, masks=True) / "study_0001"
    study_uid = str(
        pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    )
    with counting_orthanc(tmp_path / "pacs", dicomweb_config({USER: PASSWORD})) as (pacs, log):
        extra = {"peers": {"pacs": web_peer(pacs)}, "results": {"destinations": ["pacs"]}}
        with running_node(tmp_path / "node", extra) as node:
            _send_study(node.port, folder)
            store = node.store()
            wait_for(
                lambda: (rows := states(store)) and all(state == "sent" for state, _, _ in rows),
                timeout=180,
            )
            rows = states(store)
            store.close()
            node_log = node.log()
        kinds = {}
        for item in pacs.instances_of_study(study_uid):
            ds = pydicom.dcmread(io.BytesIO(pacs.rest("GET", f"/instances/{item['ID']}/file")))
            kinds[str(ds.SOPInstanceUID)] = ds.Modality
    assert sorted(v for v in kinds.values() if v in ("SEG", "SR", "OT")) == ["OT", "SEG", "SR"]
    assert all("STOW-RS to pacs: HTTP 200, stored" in status for _, _, status in rows)
    node_objects = [uid for uid, modality in kinds.items() if modality in ("SEG", "SR", "OT")]
    counted = received_uids(log)
    assert all(counted.count(uid) == 1 for uid in node_objects), "each object sent once"
    assert PASSWORD not in node_log


def test_a_stopped_archive_makes_the_outbox_wait_then_deliver_once(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=81, size=48, slices=16, seg=True)
    row, seg, _ = result_of(cohort)
    seg_uid = str(pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID)
    with counting_orthanc(tmp_path / "pacs", dicomweb_config({USER: PASSWORD})) as (pacs, log):
        extra = {
            "peers": {"pacs": web_peer(pacs)},
            "results": {"destinations": ["pacs"]},
            "outbox": {"backoff_initial_s": 0.5, "backoff_max_s": 1.0},
        }
        with running_node(tmp_path / "node", extra) as node:
            pacs.stop()
            store = node.store()
            job = make_job(store, row["study_instance_uid"])
            enqueue(store, job, row["study_instance_uid"], [as_result(seg)], ["pacs"])
            wait_for(lambda: states(store)[0][1] >= 2, timeout=30)
            state, _, status = states(store)[0]
            assert state == "pending" and "STOW-RS to pacs: ConnectionError" in status
            again = restart_orthanc(pacs)
            try:
                wait_for(lambda: states(store)[0][0] == "sent", timeout=60)
                found = {
                    i["SOPInstanceUID"] for i in again.instances_of_study(row["study_instance_uid"])
                }
            finally:
                again.stop()
            store.close()
    assert seg_uid in found
    assert received_uids(log).count(seg_uid) == 1


def test_wrong_credentials_fail_at_once_with_the_archive_s_answer(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=81, size=48, slices=16, seg=True)
    row, seg, _ = result_of(cohort)
    with counting_orthanc(tmp_path / "pacs", dicomweb_config({USER: PASSWORD})) as (pacs, log):
        extra = {
            "peers": {"pacs": web_peer(pacs, password="not-the-password")},
            "results": {"destinations": ["pacs"]},
        }
        with running_node(tmp_path / "node", extra) as node:
            store = node.store()
            job = make_job(store, row["study_instance_uid"])
            enqueue(store, job, row["study_instance_uid"], [as_result(seg)], ["pacs"])
            wait_for(lambda: states(store)[0][0] == "failed", timeout=30)
            ((_, attempts, status),) = states(store)
            store.close()
            assert "not-the-password" not in node.log()
    assert attempts == 1, "no retry of a refusal that retrying cannot change"
    assert status.startswith("STOW-RS to pacs: HTTP 401")
    assert received_uids(log) == []


def test_each_instance_is_judged_by_the_answer_then_by_the_http_status() -> None:
    from pydicom.dataset import Dataset

    from node.deliver.stow import _per_instance

    answer = Dataset()
    stored, busy, refused = Dataset(), Dataset(), Dataset()
    stored.ReferencedSOPInstanceUID = "1.1"
    busy.ReferencedSOPInstanceUID, busy.FailureReason = "1.2", 0xA700
    refused.ReferencedSOPInstanceUID, refused.FailureReason = "1.3", 0xC000
    answer.ReferencedSOPSequence = [stored]
    answer.FailedSOPSequence = [busy, refused]
    ok, retried, final, unnamed = _per_instance(answer, ["1.1", "1.2", "1.3", "1.4"], 202, "202")
    assert ok.ok and not retried.ok and not retried.permanent
    assert final.permanent and "0xC000" in final.status
    assert not unnamed.ok and not unnamed.permanent, "a 202 that names it not: sent again"
    # Without an answer body: 200 is stored, 413 final, 503 retried; a 202 is never "stored".
    assert _per_instance(None, ["1.1"], 200, "200")[0].ok
    assert _per_instance(None, ["1.1"], 413, "413")[0].permanent
    assert not _per_instance(None, ["1.1"], 503, "503")[0].permanent
    assert not _per_instance(None, ["1.1"], 202, "202")[0].ok
