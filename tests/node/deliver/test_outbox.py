"""Specification of result delivery: durable outbox, retries, refusals, real destinations."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from node.deliver.outbox import ResultObject, backoff, enqueue, list_outbox
from node.store.database import Store, utcnow
from tests.conftest import require_tool
from tests.node.cli.test_main import mvi_node
from tests.nodeproc import dcmtk_env, running_node, start_node_process, tiny_models, wait_for
from tests.orthanc import free_port, restart_orthanc, running_orthanc


def make_job(store: Store, study_uid: str) -> int:
    """A finished job row for ``study_uid`` (what the pipeline leaves before queuing results).

    Written straight into the SQLite file, as the store writes it: through the store a job is
    queued first, and a running node's worker would take it.
    """
    now = utcnow().strftime("%Y-%m-%d %H:%M:%S.%f")
    connection = sqlite3.connect(store.url.removeprefix("sqlite:///"), timeout=30)
    with connection:
        connection.execute(
            "INSERT INTO studies (study_uid, study_key, state, instance_count, priority) "
            "VALUES (?, 'k', 'done', 0, 0)",
            (study_uid,),
        )
        job = connection.execute(
            "INSERT INTO jobs (study_uid, state, priority, attempts, created_at) "
            "VALUES (?, 'done', 0, 1, ?)",
            (study_uid, now),
        ).lastrowid
    connection.close()
    assert job is not None
    return job


def result_of(cohort: Path) -> tuple[dict[str, str], Path, list[Path]]:
    """A study of the cohort, its truth SEG (standing in for a result) and its CT files."""
    with (cohort / "truth.csv").open() as handle:
        row = next(csv.DictReader(handle))
    files = sorted((cohort / row["study_folder"]).rglob("*.dcm"))
    seg = next(p for p in files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")
    return row, seg, [p for p in files if p != seg]


def as_result(path: Path) -> ResultObject:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ResultObject(path, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))


def states(node_store: Store) -> list[tuple[str, int, str]]:
    return [
        (r.state, r.attempts, r.last_status or "")
        for r in list_outbox(node_store, include_sent=True)
    ]


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [backoff(n, 30, 3600) for n in (1, 2, 3, 8, 20)] == [30, 60, 120, 3600, 3600]


def test_results_wait_for_a_stopped_pacs_and_survive_a_node_restart(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=81, size=48, slices=16, seg=True)
    row, seg, ct_files = result_of(cohort)
    with running_orthanc(tmp_path / "orthanc") as pacs:
        pacs.upload(ct_files)
        before = len(pacs.instances_of_study(row["study_instance_uid"]))
        extra = {
            "peers": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
            "results": {"destinations": ["pacs"]},
            "outbox": {"backoff_initial_s": 0.5, "backoff_max_s": 1.0},
        }
        with running_node(tmp_path / "node", extra) as node:
            pacs.stop()
            store = node.store()
            job_id = make_job(store, row["study_instance_uid"])
            enqueue(store, job_id, row["study_instance_uid"], [as_result(seg)], ["pacs"])
            wait_for(lambda: states(store)[0][1] >= 2, timeout=30)
            state, _, status = states(store)[0]
            assert state == "pending" and "association" in status
            listed = mvi_node("outbox", "list", "--config", node.config_path)
            assert listed.returncode == 0 and "pending" in listed.stdout
            # The node restarts while the PACS is still down; the item waits in the database.
            node.stop()
            restarted = start_node_process(node.config_path, node.log_path)
            again = None
            try:
                again = restart_orthanc(pacs)
                wait_for(lambda: states(store)[0][0] == "sent", timeout=60)
                found = again.instances_of_study(row["study_instance_uid"])
            finally:
                restarted.stop()
                if again is not None:
                    again.stop()  # the context manager stops only the first process
            store.close()
        uids = {i["SOPInstanceUID"] for i in found}
        assert str(pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID) in uids
        assert len(uids) == before + 1, "delivered once, into the same study"


def test_a_refusing_destination_fails_the_item_with_its_words(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    storescp = require_tool("storescp", "dcmtk")
    cohort = cohort_factory(seed=81, size=48, slices=16, seg=True)
    row, seg, _ = result_of(cohort)
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[CTOnly]\nPresentationContext1 = CTImageStorage\\Uncompressed\n"
        "[[Profiles]]\n[Default]\nPresentationContexts = CTOnly\n"
    )
    port = free_port()
    scp = subprocess.Popen(
        [
            storescp,
            "-xf",
            str(profile),
            "Default",
            "-aet",
            "CT_ONLY",
            "-od",
            str(tmp_path),
            str(port),
        ],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        extra = {
            "peers": {"ctonly": {"ae_title": "CT_ONLY", "host": "127.0.0.1", "port": port}},
            "results": {"destinations": ["ctonly"]},
        }
        with running_node(tmp_path / "node", extra) as node:
            store = node.store()
            job_id = make_job(store, row["study_instance_uid"])
            enqueue(store, job_id, row["study_instance_uid"], [as_result(seg)], ["ctonly"])
            wait_for(lambda: states(store)[0][0] == "failed", timeout=30)
            _, attempts, status = states(store)[0]
            assert attempts == 1
            assert "accepts no presentation context for Segmentation Storage" in status
            assert node.process.poll() is None
            retried = mvi_node("outbox", "retry", "--config", node.config_path)
            assert retried.returncode == 0 and "1 item(s) queued again" in retried.stdout
            wait_for(lambda: states(store)[0][1] == 2, timeout=30)
            store.close()
    finally:
        scp.terminate()
        scp.wait(10)


@pytest.mark.parametrize("destination", ["nowhere"])
def test_an_unknown_destination_fails_at_once(tmp_path: Path, destination: str) -> None:
    from node.core.settings import Settings
    from node.deliver.outbox import Dispatcher

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    job_id = make_job(store, "1.2.3")
    enqueue(
        store,
        job_id,
        "1.2.3",
        [ResultObject(tmp_path / "x.dcm", "1.2.3.4", "1.2.3.5")],
        [destination],
    )
    assert Dispatcher(Settings(), store).deliver_due() == 1
    (state, attempts, status) = states(store)[0]
    assert state == "failed" and "no [peers.nowhere] configured" in status and attempts == 1


def sr_texts(item: pydicom.Dataset) -> list[str]:
    """Every TEXT value of an SR content tree."""
    texts = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        texts += sr_texts(child)
    return texts


def _send_study(node_port: int, study: Path) -> None:
    from tests.nodeproc import storescu_command

    subprocess.run(
        storescu_command(node_port, study),
        env=dcmtk_env(),
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.parametrize("broken_model", [False, True], ids=["analysed", "failed"])
def test_results_come_back_into_the_same_study_on_the_pacs(
    tmp_path: Path, cohort_factory: Callable[..., Path], broken_model: bool
) -> None:
    cohort = cohort_factory(seed=91, size=64, slices=16)
    with (cohort / "truth.csv").open() as handle:
        row = next(csv.DictReader(handle))
    with running_orthanc(tmp_path / "orthanc") as pacs:
        extra: dict[str, object] = {
            "peers": {
                "scu": {"ae_title": "STORESCU", "host": "127.0.0.1"},
                "pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
            },
            "results": {"destinations": ["pacs"]},
        }
        missing = tmp_path / "missing-model"
        if broken_model:
            # A model folder that goes away under the running node (the pre-flight refuses to
            # start without it): the job fails, and says so to the reading room.
            shutil.copytree(tiny_models()["segmenter_dir"], missing)
            extra["pipeline"] = {"segmenter_dir": str(missing), "max_attempts": 1}
        with running_node(tmp_path / "node", extra) as node:
            if broken_model:
                shutil.rmtree(missing)
            _send_study(node.port, cohort / row["study_folder"])
            store = node.store()
            wait_for(
                lambda: (
                    (r := list_outbox(store, include_sent=True))
                    and all(i.state == "sent" for i in r)
                ),
                timeout=120,
            )
            study = store.study(row["study_instance_uid"])
            store.close()
            # One line per delivered object, naming what it was.
            delivered = [
                json.loads(line) for line in node.log().splitlines() if '"result delivered"' in line
            ]
        assert study is not None
        instances = pacs.instances_of_study(row["study_instance_uid"])
        assert len(delivered) == len(instances)
        assert {d["kind"] for d in delivered} <= {"SEG", "SR", "SC"} and all(
            d["destination"] == "pacs" and d["status"] for d in delivered
        )
        kinds = set()
        for item in instances:
            dicom = pacs.rest("GET", f"/instances/{item['ID']}/file")
            ds = pydicom.dcmread(io.BytesIO(dicom))
            assert ds.StudyInstanceUID == row["study_instance_uid"]
            assert (
                ds.PatientID
                == pydicom.dcmread(
                    next((cohort / row["study_folder"]).rglob("*.dcm")), stop_before_pixels=True
                ).PatientID
            )
            kinds.add(ds.Modality)
            if ds.Modality == "SR" and broken_model:
                text = " ".join(sr_texts(ds))
                assert "failed" in text and "missing-model" in text
        assert "SR" in kinds and len(instances) >= 2, "an SR and a summary image at least"
        assert study.state == ("failed" if broken_model else "done")


def test_one_broken_destination_neither_stalls_the_others_nor_escapes_the_count(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    """A peer whose association cannot even be built (TLS without a CA to check it, which
    `config check` now refuses, but a file edited under a running node can still hold) raised
    out of every round: no attempt was counted and the other destination was never tried."""
    from node.core.settings import Settings
    from node.deliver.outbox import Dispatcher

    storescp = require_tool("storescp", "dcmtk")
    cohort = cohort_factory(seed=81, size=48, slices=16, seg=True)
    row, seg, _ = result_of(cohort)
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(
        [storescp, "-aet", "PACS", "-od", str(received), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        settings = Settings.model_validate(
            {
                "peers": {
                    "broken": {"ae_title": "BROKEN", "host": "127.0.0.1", "port": 9, "tls": True},
                    "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port},
                },
                "outbox": {"backoff_initial_s": 60},
            }
        )
        store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}")
        job_id = make_job(store, row["study_instance_uid"])
        enqueue(store, job_id, row["study_instance_uid"], [as_result(seg)], ["broken", "pacs"])
        dispatcher = Dispatcher(settings, store)
        assert dispatcher.deliver_due() == 2  # both tried in one round
        assert len(list(received.iterdir())) == 1
        by_destination = {r.destination: r for r in list_outbox(store, include_sent=True)}
        assert by_destination["pacs"].state == "sent"
        broken = by_destination["broken"]
        assert broken.state != "failed" and broken.attempts == 1
        assert "TLSConfigError" in (broken.last_status or "")
        assert broken.next_attempt_at is not None and broken.next_attempt_at > utcnow()
        # Not due again before its backoff: the next round tries nothing.
        assert dispatcher.deliver_due() == 0
        store.close()
    finally:
        scp.terminate()
        scp.wait(10)


def test_config_check_refuses_a_tls_peer_without_a_ca(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[peers.pacs]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\ntls = true\n'
    )
    result = mvi_node("config", "check", config)
    assert result.returncode == 2
    assert "peers.pacs.tls" in result.stdout + result.stderr
    assert "security.tls_ca" in result.stdout + result.stderr


def test_two_dispatchers_on_one_database_send_each_instance_once(
    tmp_path: Path, cohort_factory: Callable[..., Path], postgres_database: str
) -> None:
    """Two receivers' dispatchers share one PostgreSQL outbox: each row is claimed by one of
    them (SKIP LOCKED), marked sent only by its owner, and Orthanc gets each UID once."""
    import threading

    from node.core.settings import Settings
    from node.deliver.outbox import Dispatcher
    from node.store.database import InstanceRecord
    from tests.orthanc import counting_orthanc, stores_from

    cohort = cohort_factory(seed=91, size=64, slices=16)
    files = sorted(cohort.rglob("*.dcm"))[:24]  # standing in for result objects
    store = Store(postgres_database)
    store.record_instance(
        InstanceRecord(
            study_uid="1.2.3",
            series_uid="1.2.3.1",
            sop_instance_uid="1.2.3.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="x.dcm",
            size=1,
            sha256="0" * 64,
            calling_ae="SCU",
            modality="CT",
            analysable=True,
        )
    )
    job_id = store.complete_study("1.2.3")
    assert job_id is not None
    with counting_orthanc(tmp_path / "orthanc") as (pacs, received):
        peer = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        settings = Settings.model_validate(
            {"peers": {"pacs": peer}, "database": {"url": postgres_database}}
        )
        enqueue(store, job_id, "1.2.3", [as_result(p) for p in files], ["pacs"])
        dispatchers = [Dispatcher(settings, Store(postgres_database)) for _ in range(2)]
        dispatchers[0].owner, dispatchers[1].owner = "receiver-a:1", "receiver-b:1"
        start = threading.Barrier(2)

        def rounds(dispatcher: Dispatcher) -> None:
            start.wait()
            for _ in range(5):
                dispatcher.deliver_due()

        threads = [threading.Thread(target=rounds, args=(d,)) for d in dispatchers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        rows = list_outbox(store, include_sent=True)
        assert [r.state for r in rows] == ["sent"] * len(files)
        assert all(r.attempts == 1 and r.owner is None for r in rows)
        sent = stores_from(received, settings.node.ae_title)
        assert sorted(sent) == sorted(r.sop_instance_uid for r in rows), "each UID exactly once"
        for dispatcher in dispatchers:
            dispatcher.store.close()
    store.close()


def test_an_outcome_is_recorded_only_by_the_dispatcher_that_owns_the_row(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    job_id = make_job(store, "1.2.3")
    enqueue(store, job_id, "1.2.3", [ResultObject(tmp_path / "sr.dcm", "9.9", "9.8")], ["pacs"])
    (mine,) = store.claim_deliveries("receiver-a:1", lease_s=600)
    assert store.claim_deliveries("receiver-b:1", lease_s=600) == [], "claimed by a"
    assert not store.record_delivery_attempt(
        mine.id,
        attempts=1,
        status="0x0000",
        next_attempt_at=None,
        state="sent",
        owner="receiver-b:1",
    )
    assert store.release_deliveries("receiver-a") == 1  # a's host restarted: its claims lapse
    (again,) = store.claim_deliveries("receiver-b:1", lease_s=600)
    assert again.owner == "receiver-b:1" and again.id == mine.id
    assert not store.record_delivery_attempt(
        mine.id,
        attempts=1,
        status="0x0000",
        next_attempt_at=None,
        state="sent",
        owner="receiver-a:1",
    ), "a's late outcome is not recorded over b's claim"
    assert store.record_delivery_attempt(
        again.id,
        attempts=1,
        status="0x0000",
        next_attempt_at=None,
        state="sent",
        owner="receiver-b:1",
    )
    (row,) = list_outbox(store, include_sent=True)
    assert (row.state, row.owner) == ("sent", None)
