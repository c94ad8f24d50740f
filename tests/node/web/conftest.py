"""A console on a real socket over a real SQLite store, with three accounts and one study.

The console is served by uvicorn in a thread on a free loopback port and called over HTTP (no
in-process test client). The study's rows are written through the store's own methods as a
worker writes them: two CT series, a finished job with a needs-review result (gates with their
figures), a failed and a sent delivery, and a queued second job.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dicom_sr.enum import Status
from node.analysis.result import Gate, GateName, Phases, Result
from node.core.http import http_server
from node.core.logging import study_key
from node.core.settings import Settings
from node.store.database import Delivery, InstanceRecord, Store, utcnow
from node.web.app import create_app
from node.web.auth import hash_password
from tests.orthanc import free_port

# httpx logs every request at INFO; the tests' clients are not the node.
logging.getLogger("httpx").setLevel(logging.WARNING)

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
OTHER_STUDY_UID = "1.2.826.0.1.3680043.8.498.2"
ARTERIAL = f"{STUDY_UID}.1"
PORTAL = f"{STUDY_UID}.2"
OTHER_SERIES = f"{OTHER_STUDY_UID}.1"
PASSWORDS = {"vera": "viewer-password-1", "otto": "operator-password-1", "ada": "admin-password-1"}
ROLES = {"vera": "viewer", "otto": "operator", "ada": "admin"}


@dataclass
class Console:
    """A running console and what the tests need to know about it."""

    url: str
    settings: Settings
    store: Store
    key: str
    other_key: str
    failed_item: int
    sent_item: int
    queued_job: int

    def client(self, **kw: Any) -> httpx.Client:
        """An HTTP client without a login."""
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=10.0, **kw)

    def login(self, name: str, password: str | None = None) -> httpx.Client:
        """A client logged in as ``name``."""
        client = self.client()
        answer = self.try_login(client, name, password or PASSWORDS[name])
        assert answer.status_code == 303, answer.text
        return client

    def try_login(self, client: httpx.Client, name: str, password: str) -> httpx.Response:
        """Post the login form as a browser would (its CSRF token from the form)."""
        token = csrf_of(client.get("/login"))
        return client.post(
            "/login", data={"username": name, "password": password, "csrf_token": token}
        )


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token of a page's forms."""
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


def instance(study: str, series: str, number: int, sop: str, **kw: Any) -> InstanceRecord:
    values: dict[str, Any] = {
        "study_uid": study,
        "series_uid": series,
        "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "path": f"spool/{sop}.dcm",
        "size": 10,
        "sha256": "0" * 64,
        "calling_ae": "PACS",
        "modality": "CT",
        "series_number": number,
        "series_description": "ART" if number == 3 else "PV",
        "analysable": True,
        "patient_id": "PID-4711",
        "patient_name": "Doe^Jane",
        "accession_number": "ACC-99",
        "study_date": "20261201",
    }
    values.update(kw)
    return InstanceRecord(**values)


def fill(store: Store) -> tuple[int, int, int]:
    """The study the tests read and act on; returns (failed item, sent item, queued job)."""
    for number, series in ((3, ARTERIAL), (5, PORTAL)):
        store.record_instance(instance(STUDY_UID, series, number, f"{series}.1"))
    store.record_instance(instance(OTHER_STUDY_UID, OTHER_SERIES, 3, f"{OTHER_SERIES}.1"))
    job_id = store.complete_study(STUDY_UID)
    assert job_id is not None
    job = store.claim_job(worker="test:1")
    assert job is not None and job.id == job_id
    result = Result(
        study_instance_uid=STUDY_UID,
        status=Status.NEEDS_REVIEW,
        reason="segmentation: 5 tumor components (at most 3)",
        phases=Phases(
            arterial=ARTERIAL, portal_venous=PORTAL, pairing="tags", registration_shift_mm=None
        ),
        gates=[
            Gate(name=GateName.INPUT, passed=True, figures={"slices": 64}),
            Gate(
                name=GateName.SEGMENTATION,
                passed=False,
                reason="5 tumor components (at most 3)",
                figures={"tumor_components": 5},
                limits={"max_tumor_components": 3},
            ),
        ],
    )
    with store.begin() as tx:
        store.record_result(job.id, STUDY_UID, result, tx, attempt=job.lease)
        failed, sent = store.enqueue_deliveries(
            job.id,
            STUDY_UID,
            [
                Delivery("1.2.3.9.1", "1.2.3.9", "/x/sr.dcm", "pacs"),
                Delivery("1.2.3.9.2", "1.2.3.9", "/x/sc.dcm", "pacs"),
            ],
            tx,
        )
    assert result.phases is not None
    store.finish_job(
        job.id,
        "needs_review",
        reason=result.reason,
        lease=job.lease,
        pairing=result.phases.model_dump(mode="json"),
        arterial_uid=ARTERIAL,
        portal_venous_uid=PORTAL,
    )
    now = utcnow()
    store.record_delivery_attempt(
        failed, attempts=3, status="0xA700 Out of resources", next_attempt_at=None, state="failed"
    )
    store.record_delivery_attempt(
        sent, attempts=1, status="0x0000", next_attempt_at=None, state="sent", delivered_at=now
    )
    queued = store.reprocess(STUDY_UID)
    return failed, sent, queued


def serve_in_thread(settings: Settings, store: Store) -> Iterator[str]:
    """uvicorn with the console's app on a free port, for the duration of a fixture."""
    port = free_port()
    # The server the console process runs (node.core.http), in a thread of the test.
    server = http_server(create_app(settings, store), "127.0.0.1", port, None, None)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the console did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def console_settings(data_dir: Path, **web: Any) -> Settings:
    """A console's settings; plain http in these tests, so no Secure cookies (see test_auth)."""
    return Settings.model_validate(
        {
            "node": {"data_dir": str(data_dir), "free_disk_floor_mb": 1},
            "web": {
                "secure_cookies": False,
                "viewer_url": "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}",
                **web,
            },
        }
    )


def make_console(tmp_path: Path, **web: Any) -> Iterator[Console]:
    settings = console_settings(tmp_path / "data", **web)
    settings.node.data_dir.mkdir(parents=True)
    store = Store(settings.database_url)
    for name, role in ROLES.items():
        store.accounts().save_user(name, role, hash_password(PASSWORDS[name]))
    failed, sent, queued = fill(store)
    for url in serve_in_thread(settings, store):
        yield Console(
            url,
            settings,
            store,
            study_key(STUDY_UID),
            study_key(OTHER_STUDY_UID),
            failed,
            sent,
            queued,
        )
    store.close()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from make_console(tmp_path)
