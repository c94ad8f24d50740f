"""Specification of the STOW-RS receiver: a real node on a free port, clients as sites use them.

dicomweb-client (the highdicom authors' client) and curl with a hand-made multipart body send
into it; every refused request must leave the store and the spool as they were.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import require_tool
from tests.nodeproc import NodeProcess, running_node, wait_for
from tests.orthanc import free_port

TOKEN = "stow-token-of-the-modality-0123456789"
BOUNDARY = "mvi-test-boundary-7f3a"


@pytest.fixture(scope="module")
def study(cohort_factory: Callable[..., Path]) -> tuple[list[Path], str]:
    """A small phantom study's files and its StudyInstanceUID."""
    folder = cohort_factory(seed=97, size=48, slices=16) / "study_0001"
    files = sorted(folder.rglob("*.dcm"))
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return files, uid


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    extra = {
        "peers": {"modality": {"dicomweb_url": "https://modality.example", "stow_token": TOKEN}},
        "dicomweb": {"enabled": True, "port": free_port(), "max_request_mb": 4},
    }
    with running_node(tmp_path / "node", extra) as started:
        yield started


def url(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.settings.dicomweb.port}/dicom-web"


def multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    """A multipart/related body, written by hand as PS3.18 shows it."""
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def curl(node: NodeProcess, body: bytes, tmp_path: Path, **kw: Any) -> tuple[int, Any]:
    """POST ``body`` with curl; (HTTP status, decoded JSON answer or None)."""
    tool = require_tool("curl", "curl")
    payload = tmp_path / "body.bin"
    payload.write_bytes(body)
    content_type = kw.get(
        "content_type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    )
    headers = ["-H", f"Content-Type: {content_type}"]
    token = kw.get("token", TOKEN)
    if token:
        headers += ["-H", f"Authorization: Bearer {token}"]
    done = subprocess.run(
        [
            tool,
            "-s",
            "-o",
            str(tmp_path / "answer.json"),
            "-w",
            "%{http_code}",
            *headers,
            "--data-binary",
            f"@{payload}",
            f"{url(node)}/studies{kw.get('path', '')}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    answer = (tmp_path / "answer.json").read_text() if (tmp_path / "answer.json").exists() else ""
    return int(done.stdout or 0), json.loads(answer) if answer.strip().startswith("{") else None


def stored_count(node: NodeProcess) -> int:
    store = node.store()
    try:
        return sum(s.instance_count for s in store.list_studies(100))
    finally:
        store.close()


def spool_files(node: NodeProcess) -> list[Path]:
    return [p for p in node.spool.rglob("*") if p.is_file() and ".incoming" not in p.parts]


def test_a_study_stored_with_dicomweb_client_is_received_like_a_c_store(
    node: NodeProcess, study: tuple[list[Path], str]
) -> None:
    import requests
    from dicomweb_client.api import DICOMwebClient

    files, study_uid = study
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    client = DICOMwebClient(url(node), session=session)
    answer = client.store_instances([pydicom.dcmread(p) for p in files], study_uid)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence}
    assert referenced == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files
    }
    assert "FailedSOPSequence" not in answer
    # Durable before the answer: the rows are there the moment it came back.
    store = node.store()
    row = store.study(study_uid)
    assert row is not None and row.instance_count == len(files)
    # And the study completes and is analysed as any other.
    wait_for(lambda: (s := store.study(study_uid)) is not None and s.state != "receiving", 60)
    store.close()
    assert '"STOW-RS request"' in node.log() and TOKEN not in node.log()


def test_curl_with_a_hand_made_body_and_its_refusals(
    node: NodeProcess, study: tuple[list[Path], str], tmp_path: Path
) -> None:
    files, study_uid = study
    one, two = files[0].read_bytes(), files[1].read_bytes()

    # Refused outright: nothing stored, nothing left in the spool.
    assert curl(node, multipart([one]), tmp_path, token="")[0] == 401
    assert curl(node, multipart([one]), tmp_path, token="a-wrong-token")[0] == 401
    wrong_type = curl(node, one, tmp_path, content_type="application/dicom")
    assert wrong_type[0] == 415
    truncated = multipart([one, two])[: len(one) + 200]
    assert curl(node, truncated, tmp_path)[0] == 400
    oversized = multipart([b"\0" * 5_000_000])
    assert curl(node, oversized, tmp_path)[0] == 413
    assert stored_count(node) == 0 and spool_files(node) == []

    # A part that is no DICOM file: that part fails, with its reason; nothing stored.
    status, answer = curl(node, multipart([b"this is not DICOM"]), tmp_path)
    assert status == 409
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]

    # One good part beside a bad one: 202, the good one stored and named.
    status, answer = curl(node, multipart([one, b"garbage"]), tmp_path)
    assert status == 202
    (stored,) = answer["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [str(pydicom.dcmread(files[0]).SOPInstanceUID)]
    assert stored_count(node) == 1

    # Into the URL of another study: refused per instance (0xA900).
    status, answer = curl(node, multipart([two]), tmp_path, path="/1.2.3.4")
    assert status == 409 and answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]

    # And a plain good request: 200.
    status, answer = curl(node, multipart([two]), tmp_path, path=f"/{study_uid}")
    assert status == 200 and "00081198" not in answer
    assert stored_count(node) == 2


def test_serve_refuses_a_stow_port_it_cannot_take(tmp_path: Path) -> None:
    import socket

    from node.core.settings import to_toml
    from tests.node.cli.test_main import mvi_node
    from tests.nodeproc import node_settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data = node_settings(tmp_path / "data", extra={"dicomweb": {"enabled": True}})
        data["dicomweb"]["port"] = taken.getsockname()[1]
        config = tmp_path / "node.toml"
        config.write_text(to_toml(data))
        refused = mvi_node("serve", "--config", config)
    assert refused.returncode == 2
    assert "FAILED  STOW-RS port: dicomweb.port 127.0.0.1:" in refused.stderr


def test_a_lying_file_meta_or_a_foreign_transfer_syntax_is_refused_per_part(
    node: NodeProcess, study: tuple[list[Path], str], tmp_path: Path
) -> None:
    import struct

    files, _ = study
    good = files[0].read_bytes()
    # The group length claims more meta than the file holds (the size checks would pass).
    lying = good[:140] + struct.pack("<I", 10_000_000) + good[144:]
    status, answer = curl(node, multipart([lying]), tmp_path)
    assert status == 409 and answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    # JPEG baseline (lossy): not a transfer syntax the node takes.
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    ds.PixelData = encapsulate([b"\xff\xd8 a JPEG would be here \xff\xd9"])
    jpeg = tmp_path / "jpeg.dcm"
    ds.save_as(jpeg, enforce_file_format=True)
    status, answer = curl(node, multipart([jpeg.read_bytes()]), tmp_path)
    assert status == 409 and answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC122]
    assert stored_count(node) == 0 and spool_files(node) == []


def test_a_peer_that_names_a_host_sends_from_it_only(
    tmp_path: Path, study: tuple[list[Path], str]
) -> None:
    files, _ = study
    peers = {
        "modality": {
            "dicomweb_url": "https://modality.example",
            "stow_token": TOKEN,
            "host": "10.9.8.7",
        }
    }
    extra = {"peers": peers, "dicomweb": {"enabled": True, "port": free_port()}}
    with running_node(tmp_path / "node", extra) as started:
        status, _ = curl(started, multipart([files[0].read_bytes()]), tmp_path)
        assert status == 403
        assert stored_count(started) == 0
