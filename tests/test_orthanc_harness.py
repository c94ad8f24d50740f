"""The Orthanc harness (:mod:`tests.orthanc`) against real DICOM peers: DCMTK and Orthanc itself.

One Orthanc holding one small phantom study serves the module; a DCMTK ``storescp`` stands in for
the node as C-STORE SCP. Under ``CI=true`` a missing tool fails, elsewhere it skips.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.conftest import require_tool, run_tool
from tests.orthanc import (
    Orthanc,
    OrthancError,
    free_port,
    orthanc_fixture,  # noqa: F401  (fixture "orthanc")
    orthanc_or_skip,
    running_orthanc,
)

STORESCP_AET = "STORESCP"


@dataclass(frozen=True)
class Study:
    """The phantom study uploaded to the module's Orthanc."""

    folder: Path
    uid: str
    date: str
    sop_uids: frozenset[str]


@dataclass(frozen=True)
class StoreScp:
    """A DCMTK storescp writing what it receives into ``folder``."""

    folder: Path
    port: int

    def clear(self) -> None:
        """Forget what arrived before."""
        for path in self.folder.iterdir():
            path.unlink()

    def received(self, expected: int, timeout: float = 15) -> set[str]:
        """SOPInstanceUIDs received (storescp writes ``CT.<uid>``), waiting for ``expected``."""
        deadline = time.monotonic() + timeout
        while True:
            uids = {path.name.partition(".")[2] for path in self.folder.iterdir()}
            if len(uids) >= expected or time.monotonic() > deadline:
                return uids
            time.sleep(0.05)


def _dcmtk_env() -> dict[str, str]:
    """DCMTK waits for delayed ACKs (~40 ms per message) unless TCP_NODELAY is set."""
    return {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(scope="module")
def study(cohort_factory: Callable[..., Path]) -> Study:
    """``study_0001`` of ``cohort_factory(seed=1)`` with its UIDs read from the files."""
    folder = cohort_factory(seed=1) / "study_0001"
    files = sorted(folder.rglob("*.dcm"))
    assert files, f"no DICOM files in {folder}"
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    uids = {str(header.StudyInstanceUID) for header in headers}
    assert len(uids) == 1
    return Study(
        folder=folder,
        uid=uids.pop(),
        date=str(headers[0].StudyDate),
        sop_uids=frozenset(str(header.SOPInstanceUID) for header in headers),
    )


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreScp]:
    """``storescp -od DIR -aet STORESCP PORT`` on a free port, answering C-ECHO; stopped after."""
    executable = require_tool("storescp", "dcmtk")
    echoscu = require_tool("echoscu", "dcmtk")
    folder = tmp_path_factory.mktemp("storescp")
    port = free_port()
    log = (folder.parent / f"{folder.name}.log").open("wb")
    process = subprocess.Popen(
        [executable, "-od", str(folder), "-aet", STORESCP_AET, str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_dcmtk_env(),
    )
    try:
        deadline = time.monotonic() + 10
        while run_tool(
            echoscu, "-aec", STORESCP_AET, "127.0.0.1", str(port), check=False
        ).returncode:
            assert process.poll() is None, "storescp exited at start"
            assert time.monotonic() < deadline, "storescp did not answer C-ECHO"
            time.sleep(0.1)
        yield StoreScp(folder=folder, port=port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, study: Study, storescp: StoreScp
) -> Iterator[Orthanc]:
    """Orthanc with the DCMTK peers registered (one at start, two at runtime) and the study."""
    workdir = tmp_path_factory.mktemp("orthanc")
    modalities = {"storescp": (STORESCP_AET, "127.0.0.1", storescp.port)}
    with running_orthanc(workdir, modalities=modalities) as server:
        # Query/retrieve SCUs only call Orthanc; the port is never dialled.
        server.add_modality("findscu", "FINDSCU", "127.0.0.1", free_port())
        server.add_modality("movescu", "MOVESCU", "127.0.0.1", free_port())
        server.upload_folder(study.folder)
        yield server


def test_orthanc_or_skip_finds_the_executable() -> None:
    path = Path(orthanc_or_skip())
    assert path.name == "Orthanc"
    assert os.access(path, os.X_OK)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_system_answers(pacs: Orthanc) -> None:
    system = pacs.rest("GET", "/system")
    assert system["DicomAet"] == pacs.aet == "ORTHANC"
    assert system["DicomPort"] == pacs.dicom_port
    assert system["HttpPort"] == pacs.http_port
    assert system["Version"]
    assert pacs.process.poll() is None
    assert pacs.storage.is_dir()


def test_dicom_port_answers_echoscu(pacs: Orthanc) -> None:
    echoscu = require_tool("echoscu", "dcmtk")
    result = run_tool(echoscu, "-aet", "TEST", "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port))
    assert result.returncode == 0, result.stderr


def test_upload_over_rest(pacs: Orthanc, study: Study) -> None:
    assert study.uid in pacs.studies()
    instances = pacs.instances_of_study(study.uid)
    assert len(instances) == len(list(study.folder.rglob("*.dcm")))
    assert {item["SOPInstanceUID"] for item in instances} == study.sop_uids
    assert all(item["ID"] for item in instances)
    # Uploading again is harmless and gives the same IDs.
    again = pacs.upload(sorted(study.folder.rglob("*.dcm"))[:2])
    assert set(again) <= {item["ID"] for item in instances}


def test_find_study_id(pacs: Orthanc, study: Study) -> None:
    study_id = pacs.find_study_id(study.uid)
    assert study_id is not None
    tags = pacs.rest("GET", f"/studies/{study_id}")["MainDicomTags"]
    assert tags["StudyInstanceUID"] == study.uid
    assert pacs.find_study_id("1.2.3.4.5.6.7.8.9") is None


def test_rest_errors_carry_orthancs_text(pacs: Orthanc) -> None:
    with pytest.raises(OrthancError, match="404"):
        pacs.rest("GET", "/studies/no-such-study")


def test_store_study_to_storescp(pacs: Orthanc, study: Study, storescp: StoreScp) -> None:
    storescp.clear()
    pacs.store_study_to("storescp", study.uid)
    assert storescp.received(len(study.sop_uids)) == study.sop_uids


@pytest.mark.parametrize("cmove", [False, True], ids=["push", "cmove"])
def test_move_study_by_aet(pacs: Orthanc, study: Study, storescp: StoreScp, cmove: bool) -> None:
    storescp.clear()
    pacs.move_study(study.uid, STORESCP_AET, cmove=cmove)
    assert storescp.received(len(study.sop_uids)) == study.sop_uids


def test_move_study_to_unknown_aet_fails(pacs: Orthanc, study: Study) -> None:
    with pytest.raises(OrthancError, match="NOBODY"):
        pacs.move_study(study.uid, "NOBODY")


def test_findscu_finds_the_study(pacs: Orthanc, study: Study) -> None:
    findscu = require_tool("findscu", "dcmtk")
    result = run_tool(
        findscu, "-S", "-aet", "FINDSCU", "-aec", pacs.aet,
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "StudyDate",
        "127.0.0.1", str(pacs.dicom_port),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert study.uid in output, output
    assert study.date in output, output


def test_movescu_moves_the_study(pacs: Orthanc, study: Study, storescp: StoreScp) -> None:
    movescu = require_tool("movescu", "dcmtk")
    storescp.clear()
    result = subprocess.run(
        [
            movescu, "-S", "-aet", "MOVESCU", "-aec", pacs.aet, "-aem", STORESCP_AET,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.uid}",
            "127.0.0.1", str(pacs.dicom_port),
        ],
        capture_output=True, text=True, timeout=120, env=_dcmtk_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert storescp.received(len(study.sop_uids)) == study.sop_uids


def _refuses(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    with running_orthanc(tmp_path) as server:
        assert server.process.poll() is None
        server.stop()
        assert server.process.poll() is not None
        server.stop()  # idempotent
    assert _refuses(server.http_port)
    assert _refuses(server.dicom_port)


def test_stopped_on_exception(tmp_path: Path) -> None:
    started: list[Orthanc] = []
    with pytest.raises(RuntimeError, match="boom"), running_orthanc(tmp_path) as server:
        started.append(server)
        raise RuntimeError("boom")
    assert started[0].process.poll() is not None
    assert "Orthanc has started" in started[0].log_tail()


def test_orthanc_fixture(orthanc: Orthanc) -> None:
    assert orthanc.studies() == []
    assert orthanc.rest("GET", "/modalities") == []
