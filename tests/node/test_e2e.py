"""End to end beside a real PACS: Orthanc moves a study to the node, the results come back.

Orthanc runs on free loopback ports with the node registered as a modality, and the node's one
results destination is Orthanc. A phantom study is uploaded to Orthanc and C-MOVEd to the node;
the node's SEG, SR and SC must then be in the same study in Orthanc. The second test kills the
node (kill -9) while its worker is in the middle of the job, restarts it on the same data folder,
and checks that the results still arrive exactly once.

The study carries the phantom's truth as a manual SEG, which the node uses instead of its U-Net:
the tiny test segmenter (:func:`tests.nodeproc.tiny_models`) finds no tumor, and a study without
a tumor gets no SEG back. So every run is scored, on the truth.

Orthanc keeps one copy per SOP Instance UID and silently accepts a second C-STORE of an instance
it holds, so its study alone cannot show a resend. A Lua ``ReceivedInstanceFilter`` therefore
writes one line per instance Orthanc receives, duplicates included: the count of C-STOREs from
the node is exact.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.deliver.outbox import list_outbox
from node.store.database import Job, Store, StoredResult
from tests.node.jobs.test_pool import alive, workers_of
from tests.nodeproc import (
    NODE_AET,
    NodeProcess,
    children,
    running_node,
    start_node_process,
    wait_for,
)
from tests.orthanc import Orthanc, counting_orthanc, stores_from

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # results.sr_sop_class = "comprehensive"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
NODE_OBJECTS = {"seg.dcm": SEG_STORAGE, "sr.dcm": COMPREHENSIVE_SR, "sc.dcm": SECONDARY_CAPTURE}

#: Upper bound of every wait for the node (the job itself takes about 10 s on 2 cores).
RESULT_TIMEOUT_S = 180.0
#: After the last delivery: how long a second set of results would have to show up.
SETTLE_S = 3.0

# Orthanc calls this for every instance it receives, before the "already stored?" check.


@pytest.fixture(scope="module")
def study(cohort_factory: Callable[..., Path]) -> tuple[Path, str]:
    """A 96×96×24 phantom study with its truth SEG: (folder, StudyInstanceUID)."""
    cohort = cohort_factory(seed=95, seg=True, masks=True)
    folder = cohort / "study_0001"
    first = next(folder.rglob("*.dcm"))
    return folder, str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def stores_from_node(received: Path) -> list[str]:
    """SOP Instance UIDs Orthanc received from the node by C-STORE, one per request."""
    return stores_from(received, NODE_AET)


def node_settings_for(pacs: Orthanc) -> dict[str, Any]:
    """Orthanc both sends to the node (C-MOVE) and receives its results."""
    return {
        "peers": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
        "results": {"destinations": ["pacs"]},
        "completion": {"quiet_seconds": 0.5},
        "outbox": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0},
    }


def send_study(pacs: Orthanc, node: NodeProcess, folder: Path, study_uid: str) -> set[str]:
    """Upload the study to Orthanc and C-MOVE it to the node; returns the uploaded Orthanc IDs."""
    pacs.add_modality("mvi", NODE_AET, "127.0.0.1", node.port)
    uploaded = set(pacs.upload_folder(folder))
    pacs.move_study(study_uid, NODE_AET, cmove=True)
    return uploaded


def new_instances(pacs: Orthanc, study_uid: str, uploaded: set[str]) -> list[dict[str, Any]]:
    """Tags of the instances of the study that were not uploaded (what the node sent)."""
    found = []
    for item in pacs.instances_of_study(study_uid):
        if item["ID"] not in uploaded:
            found.append(pacs.rest("GET", f"/instances/{item['ID']}/tags?simplify"))
    return found


def delivered(store: Store, study_uid: str) -> bool:
    """True when the study's outbox holds a full set of objects and every item is sent.

    A second set would make more items than that: the checks after the wait count them.
    """
    items = [i for i in list_outbox(store, include_sent=True) if i.study_uid == study_uid]
    return len(items) >= len(NODE_OBJECTS) and all(i.state == "sent" for i in items)


def result_rows(store: Store, study_uid: str) -> list[StoredResult]:
    return store.list_results(study_uid)


def job_rows(store: Store, study_uid: str) -> list[Job]:
    return store.list_jobs(study_uid=study_uid)[::-1]


def check_results_in_pacs(
    pacs: Orthanc, received: Path, store: Store, folder: Path, study_uid: str, uploaded: set[str]
) -> dict[str, str]:
    """The node's SEG, SR and SC are in the study in Orthanc, each stored exactly once.

    Returns SOP Instance UID -> SOP Class UID of the node's objects.
    """
    items = [i for i in list_outbox(store, include_sent=True) if i.study_uid == study_uid]
    assert sorted(Path(i.path).name for i in items) == sorted(NODE_OBJECTS)
    assert {i.destination for i in items} == {"pacs"}
    assert [i.attempts for i in items] == [1] * len(NODE_OBJECTS), "each sent once"
    outbox_classes = {i.sop_instance_uid: NODE_OBJECTS[Path(i.path).name] for i in items}

    sent = new_instances(pacs, study_uid, uploaded)
    assert sorted(t["SOPClassUID"] for t in sent) == sorted(NODE_OBJECTS.values()), (
        "exactly one SEG, one SR and one SC from the node"
    )
    assert {t["SOPInstanceUID"]: t["SOPClassUID"] for t in sent} == outbox_classes
    source = pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True)
    for tags in sent:
        assert tags["StudyInstanceUID"] == study_uid
        assert tags["PatientID"] == source.PatientID
        assert tags["AccessionNumber"] == source.AccessionNumber
    # One C-STORE per object: no resend of the same instances, no second set under new UIDs.
    assert sorted(stores_from_node(received)) == sorted(outbox_classes)
    return outbox_classes


def kill_if_stopped_worker(pid: int) -> None:
    """SIGKILL ``pid`` if it is still the node worker this test stopped (never leave one behind)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if stat.rsplit(")", 1)[1].split()[0] == "T" and b"spawn_main" in cmdline:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_orthanc_moves_a_study_and_gets_seg_sr_and_sc_back(
    tmp_path: Path, study: tuple[Path, str]
) -> None:
    folder, study_uid = study
    log_file = tmp_path / "mvi-node.log"
    with (
        counting_orthanc(tmp_path / "orthanc") as (pacs, received),
        running_node(
            tmp_path / "node", node_settings_for(pacs) | {"node": {"log_file": str(log_file)}}
        ) as node,
    ):
        uploaded = send_study(pacs, node, folder, study_uid)
        store = node.store()
        try:
            wait_for(lambda: delivered(store, study_uid), timeout=RESULT_TIMEOUT_S, every=0.5)
            time.sleep(SETTLE_S)
            check_results_in_pacs(pacs, received, store, folder, study_uid, uploaded)
            # node.log_file holds the receiver's and the worker's lines, as JSON, without PHI.
            lines = [json.loads(line) for line in log_file.read_text().splitlines()]
            events = {(r.get("component"), r["event"]) for r in lines}
            assert ("node.receive.receiver", "association ended") in events
            assert ("node.jobs.runner", "job started") in events
            assert any(event == "result delivered" for _, event in events)
            source = pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True)
            for secret in (str(source.PatientID), str(source.PatientName), study_uid):
                assert secret not in log_file.read_text()

            study_row = store.study(study_uid)
            assert study_row is not None and study_row.state == "done"
            (job,) = job_rows(store, study_uid)
            assert (job.state, job.attempts) == ("done", 1)
            (result,) = result_rows(store, study_uid)
            assert result.job_id == job.id and result.status == "scored"
            segmentation = result.result.segmentation
            assert segmentation is not None and segmentation.source == "supplied"
            assert sorted(result.result.outputs) == ["sc", "seg", "sr"]
        finally:
            store.close()


def test_results_arrive_once_after_a_kill_9_in_the_middle_of_the_job(
    tmp_path: Path, study: tuple[Path, str]
) -> None:
    folder, study_uid = study
    with (
        counting_orthanc(tmp_path / "orthanc") as (pacs, received),
        running_node(tmp_path / "node", node_settings_for(pacs)) as node,
    ):
        old_children = set(wait_for(lambda: workers_of(node.process.pid)))
        old_children |= children(node.process.pid)
        uploaded = send_study(pacs, node, folder, study_uid)
        store = node.store()
        running = wait_for(lambda: store.list_jobs(states=("running",)), timeout=60, every=0.02)
        (job,) = running
        worker_pid = job.worker_pid
        assert worker_pid in old_children, "the job runs in one of the node's workers"
        # Past the pairing, the job registers and segments for seconds: kill it there. The
        # worker is frozen first, so the state at the kill is known exactly; then kill -9
        # of the node, and the kernel SIGKILLs its workers (PR_SET_PDEATHSIG), stopped or not.
        wait_for(lambda: "paired phases" in node.log(), timeout=60, every=0.02)
        os.kill(worker_pid, signal.SIGSTOP)
        assert job_rows(store, study_uid)[0].state == "running"
        assert result_rows(store, study_uid) == [], "killed before the result was recorded"
        assert list_outbox(store, include_sent=True) == [], "killed before any delivery"
        node.kill()
        wait_for(lambda: not any(alive(pid) for pid in old_children), timeout=20)
        assert stores_from_node(received) == []

        restarted = start_node_process(node.config_path, node.log_path)
        try:
            wait_for(lambda: delivered(store, study_uid), timeout=RESULT_TIMEOUT_S, every=0.5)
            time.sleep(SETTLE_S)
            assert delivered(store, study_uid), "everything queued was delivered"
            objects = check_results_in_pacs(pacs, received, store, folder, study_uid, uploaded)

            # The interrupted job was re-queued and finished once, by a new worker.
            (again,) = job_rows(store, study_uid)
            assert again.id == job.id
            assert (again.state, again.attempts) == ("done", 2)
            assert again.worker_pid in workers_of(restarted.process.pid)
            (result,) = result_rows(store, study_uid)
            assert result.job_id == job.id and result.status == "scored"
            study_row = store.study(study_uid)
            assert study_row is not None and study_row.state == "done"
            # The killed attempt left no result behind, so the SR replaces nothing.
            sr_path = next(
                Path(i.path)
                for i in list_outbox(store, include_sent=True)
                if Path(i.path).name == "sr.dcm"
            )
            sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
            assert "PredecessorDocumentsSequence" not in sr
            assert str(sr.SOPInstanceUID) in objects
            assert '"jobs_requeued": 1' in restarted.log()
        finally:
            restarted.stop()
            store.close()
            kill_if_stopped_worker(worker_pid)
