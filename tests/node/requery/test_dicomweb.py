"""Specification of the re-query over DICOMweb: QIDO-RS and WADO-RS against Orthanc's plugin.

The PACS is reached only over DICOMweb (no AE title, no port, HTTP basic authentication): the
node must find, retrieve and score exactly the studies of a window, and send the results back by
STOW-RS when asked to.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from node.store.database import PRIORITY_RETROSPECTIVE
from tests.node.cli.test_main import mvi_node
from tests.node.requery.test_retrieve import FIRST_DAY, SIZE, _modalities_in_pacs, _study_dates
from tests.nodeproc import running_node, wait_for
from tests.orthanc import dicomweb_config, running_orthanc

USER, PASSWORD = "mvi-node", "qido-secret-1234"


@pytest.fixture(scope="module")
def past(cohort_factory: Callable[..., Path]) -> Path:
    """Four liver studies on consecutive days."""
    return cohort_factory(studies=4, seed=64, **SIZE)


def test_requery_over_qido_and_wado_scores_exactly_the_window(tmp_path: Path, past: Path) -> None:
    since = until = FIRST_DAY + dt.timedelta(days=1)
    dates = _study_dates(past)
    expected = {uid for uid, date in dates.items() if date == f"{since:%Y%m%d}"}
    assert len(expected) == 1
    with running_orthanc(tmp_path / "pacs", extra=dicomweb_config({USER: PASSWORD})) as pacs:
        for study in sorted(p for p in past.iterdir() if p.is_dir()):
            pacs.upload_folder(study)
        peer = {
            "dicomweb_url": f"{pacs.url}/dicom-web",
            "auth": "basic",
            "username": USER,
            "password": PASSWORD,
        }
        extra = {
            "peers": {"pacs": peer},
            "requery": {"peer": "pacs", "send_results": True},
            "results": {"destinations": ["pacs"]},
        }
        with running_node(tmp_path / "node", extra) as node:
            window = ["--since", since.isoformat(), "--until", until.isoformat()]
            dry = mvi_node("requery", *window, "--dry-run", "--config", node.config_path)
            assert dry.returncode == 0, dry.stdout + dry.stderr
            assert "to move" in dry.stdout
            done = mvi_node("requery", *window, "--config", node.config_path)
            assert done.returncode == 0, done.stdout + done.stderr
            store = node.store()
            try:
                scored = {row.study_uid for row in store.list_results()}
                assert scored == expected
                (uid,) = expected
                job = store.newest_job(uid)
                assert job is not None and job.priority == PRIORITY_RETROSPECTIVE
                files = store.instance_files(uid)
                assert files and all((node.spool / f.path).is_file() for f in files)
                assert {f.calling_ae for f in files} == {"pacs"}
                assert all(store.study(other) is None for other in set(dates) - expected)
            finally:
                store.close()
            # send_results: the SR goes back to the archive by STOW-RS.
            wait_for(lambda: "SR" in _modalities_in_pacs(pacs, uid), timeout=60)
            assert PASSWORD not in node.log()


def test_a_refusing_archive_is_one_line(tmp_path: Path) -> None:
    with running_orthanc(tmp_path / "pacs", extra=dicomweb_config({USER: PASSWORD})) as pacs:
        peer = {
            "dicomweb_url": f"{pacs.url}/dicom-web",
            "auth": "basic",
            "username": USER,
            "password": "wrong-password",
        }
        extra = {"peers": {"pacs": peer}, "requery": {"peer": "pacs"}}
        with running_node(tmp_path / "node", extra) as node:
            day = FIRST_DAY.isoformat()
            done = mvi_node("requery", "--since", day, "--until", day, "--config", node.config_path)
    assert done.returncode != 0
    assert "QIDO-RS (studies) to pacs: HTTP 401" in done.stderr + done.stdout
