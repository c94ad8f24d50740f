"""Specification of the retrospective re-query: Orthanc holds the past, the node scores it."""

from __future__ import annotations

import csv
import datetime as dt
import os
import signal
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicom_sr.enum import Status
from node.analysis.result import Result
from node.core.settings import Settings, to_toml
from node.requery.retrieve import StudyCandidate, classify_series
from node.store.database import PRIORITY_RETROSPECTIVE, Store
from tests.node.cli.test_main import mvi_node
from tests.node.store.test_database import backdate, record
from tests.nodeproc import NODE_AET, NodeProcess, mvi_node_script, running_node, wait_for
from tests.orthanc import Orthanc, orthanc_or_skip, running_orthanc

#: The cohort's studies are dated 2024-03-01 + index days (the phantom writer's default).
FIRST_DAY = dt.date(2024, 3, 1)
SIZE = {"size": 64, "slices": 16}
SITE_KEY = "site-secret-" + "k" * 32  # security.pseudonym_key needs 32 bytes


def _series(*descriptions: str, modality: str = "CT") -> list[dict[str, str]]:
    return [
        {"series_uid": f"1.2.3.{i}", "modality": modality, "description": d, "protocol": ""}
        for i, d in enumerate(descriptions)
    ]


@pytest.mark.parametrize(
    ("descriptions", "outcome", "reason"),
    [
        (("Topogram", "Liver NC", "Liver arterial", "Liver portal venous"), "to_move", None),
        (("Thorax plain 1.5", "CHEST W/O"), "skipped", "no arterial or portal-venous"),
        (("Liver arterial", "Liver 5 min delayed"), "skipped", "no portal-venous series"),
        (("Liver portal venous",), "skipped", "no arterial series"),
    ],
)
def test_series_names_decide_before_anything_moves(
    descriptions: tuple[str, ...], outcome: str, reason: str | None
) -> None:
    candidate = StudyCandidate(study_uid="1.2.3", series=_series(*descriptions))
    classify_series(candidate, Settings())
    assert candidate.outcome == outcome
    assert (candidate.reason or "").startswith(reason or "")


def test_a_study_without_ct_is_skipped() -> None:
    candidate = StudyCandidate(study_uid="1.2.3", series=_series("arterial", modality="MR"))
    classify_series(candidate, Settings())
    assert (candidate.outcome, candidate.reason) == ("skipped", "no CT series")


# -- against Orthanc ---------------------------------------------------------------------------


@dataclass
class Site:
    """Orthanc holding the past studies, the node serving, and the CLI's configuration."""

    pacs: Orthanc
    node: NodeProcess
    config: Path
    dates: dict[str, str]  # StudyInstanceUID -> StudyDate

    def in_window(self, since: dt.date, until: dt.date) -> set[str]:
        return {
            uid
            for uid, date in self.dates.items()
            if f"{since:%Y%m%d}" <= date <= f"{until:%Y%m%d}"
        }

    def requery(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return mvi_node("requery", *args, "--config", self.config)

    def results(self) -> dict[str, list[str]]:
        store = self.node.store()
        try:
            rows = store.list_results()
        finally:
            store.close()
        found: dict[str, list[str]] = {}
        for row in rows:
            found.setdefault(row.study_uid, []).append(row.status)
        return found


def _study_dates(folder: Path) -> dict[str, str]:
    dates: dict[str, str] = {}
    for study in sorted(p for p in folder.iterdir() if p.is_dir()):
        first = next(study.rglob("*.dcm"))
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        dates[str(ds.StudyInstanceUID)] = str(ds.StudyDate)
    return dates


@pytest.fixture(scope="module")
def past(cohort_factory: Callable[..., Path]) -> tuple[Path, Path]:
    """Twelve liver studies on consecutive days, and one chest CT inside the first window."""
    liver = cohort_factory(studies=12, seed=61, **SIZE)
    chest = cohort_factory(
        studies=1, seed=62, non_liver=True, dates=(dt.date(2024, 3, 4), dt.date(2024, 3, 4)), **SIZE
    )
    return liver, chest


@contextmanager
def site(tmp_path: Path, past: tuple[Path, Path], **requery: object) -> Iterator[Site]:
    orthanc_or_skip()
    liver, chest = past
    with running_orthanc(tmp_path / "orthanc") as pacs:
        extra = {
            "peers": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
            "requery": {"peer": "pacs", **requery},
            "results": {"destinations": ["pacs"]},
        }
        with running_node(tmp_path / "node", extra) as node:
            pacs.add_modality("mvi", NODE_AET, "127.0.0.1", node.port)
            for folder in (liver, chest):
                for study in sorted(p for p in folder.iterdir() if p.is_dir()):
                    pacs.upload_folder(study)
            dates = {**_study_dates(liver), **_study_dates(chest)}
            yield Site(pacs, node, node.config_path, dates)


def _modalities_in_pacs(pacs: Orthanc, study_uid: str) -> set[str]:
    study_id = pacs.find_study_id(study_uid)
    if study_id is None:
        return set()
    series = pacs.rest("GET", f"/studies/{study_id}/series")
    return {str(item["MainDicomTags"].get("Modality", "")) for item in series}


def test_requery_scores_exactly_the_window_and_resumes(
    tmp_path: Path, past: tuple[Path, Path]
) -> None:
    since, until = FIRST_DAY + dt.timedelta(days=2), FIRST_DAY + dt.timedelta(days=4)
    window = ["--since", since.isoformat(), "--until", until.isoformat()]
    with site(tmp_path, past) as s:
        expected = s.in_window(since, until)
        (chest,) = _study_dates(past[1])
        assert len(expected) == 4  # three liver studies and the chest CT

        dry = s.requery(*window, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "dry run" in dry.stdout and "to move" in dry.stdout
        assert "no arterial or portal-venous series by name" in dry.stdout
        assert s.results() == {}
        store = s.node.store()
        try:  # nothing was moved: the node has never seen any study of the window
            assert all(store.study(uid) is None for uid in expected)
        finally:
            store.close()

        first = s.requery(*window)
        assert first.returncode == 0, first.stdout + first.stderr
        scored = s.results()
        assert set(scored) == expected - {chest}
        assert all(statuses in (["scored"], ["no_tumor"]) for statuses in scored.values())
        store = s.node.store()
        try:
            for uid in scored:
                job = store.newest_job(uid)
                assert job is not None and job.priority == PRIORITY_RETROSPECTIVE
                assert store.retrospective_row(uid).state == "done"  # type: ignore[union-attr]
            assert store.study(chest) is None  # skipped before anything was moved
        finally:
            store.close()
        # Audit only by default: nothing went back to the PACS.
        for uid in scored:
            assert _modalities_in_pacs(s.pacs, uid) == {"CT"}

        again = s.requery(*window)
        assert again.returncode == 0, again.stderr
        assert "moved" not in again.stdout.split("found")[-1]
        assert again.stdout.count("already scored") + again.stdout.count("already no_tumor") == 3
        assert s.results() == scored  # no second analysis

        # An interrupted run: killed once the first study of another window is moved.
        later_since, later_until = (
            FIRST_DAY + dt.timedelta(days=7),
            FIRST_DAY + dt.timedelta(days=9),
        )
        later = ["--since", later_since.isoformat(), "--until", later_until.isoformat()]
        process = subprocess.Popen(
            [mvi_node_script(), "requery", *later, "--config", str(s.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("MVI_")},
        )
        target = s.in_window(later_since, later_until)

        def one_moved() -> bool:
            store = s.node.store()
            try:
                return any(
                    (row := store.retrospective_row(uid)) is not None and row.state != "requested"
                    for uid in target
                )
            finally:
                store.close()

        wait_for(one_moved, timeout=120)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        resumed = s.requery(*later)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        final = s.results()
        assert set(final) == (expected - {chest}) | target
        assert all(len(statuses) == 1 for statuses in final.values()), final


def test_c_get_brings_the_study_into_the_same_store(
    tmp_path: Path, past: tuple[Path, Path]
) -> None:
    day = FIRST_DAY + dt.timedelta(days=5)
    with site(tmp_path, past, use_c_get=True, send_results=True) as s:
        (uid,) = s.in_window(day, day)
        done = s.requery("--since", day.isoformat(), "--until", day.isoformat())
        assert done.returncode == 0, done.stdout + done.stderr
        assert list(s.results()) == [uid]
        store = s.node.store()
        try:
            study = store.study(uid)
            assert study is not None and study.instance_count > 0
            files = store.instance_files(uid)
        finally:
            store.close()
        assert all((s.node.spool / file.path).is_file() for file in files)
        senders = {file.calling_ae for file in files}
        assert senders == {s.pacs.aet}  # the PACS sent them, though the node opened the call
        # send_results: the results of a re-queried study go to the PACS like live ones.
        wait_for(lambda: "SR" in _modalities_in_pacs(s.pacs, uid), timeout=60)


def test_a_pacs_that_refuses_the_move_is_reported_per_study(
    tmp_path: Path, past: tuple[Path, Path]
) -> None:
    since, until = FIRST_DAY, FIRST_DAY + dt.timedelta(days=1)
    with site(tmp_path, past) as s:
        # Orthanc forgets the node as a destination: every C-MOVE fails, the run goes on.
        s.pacs.rest("DELETE", "/modalities/mvi")
        s.pacs.add_modality("mvi-find-only", "SOMEONE", "127.0.0.1", 1)
        failed = s.requery("--since", since.isoformat(), "--until", until.isoformat())
        assert failed.returncode in (1, 2)
        if failed.returncode == 1:
            assert "found 2: move_failed 2" in failed.stdout
            assert "C-MOVE" in failed.stdout
        else:  # Orthanc refuses the C-FIND of an unknown caller: one clear line
            assert "association with pacs" in failed.stderr
        assert s.results() == {}


def test_requery_needs_the_node_running(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(tmp_path / "data"), "port": 1, "host": "127.0.0.1"},
                "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 2}},
                "requery": {"peer": "pacs"},
            }
        )
    )
    result = mvi_node(
        "requery", "--since", "2024-01-01", "--until", "2024-01-31", "--config", config
    )
    assert result.returncode == 2
    assert "start `mvi-node serve`" in result.stderr


def test_requery_needs_a_model_to_score_with(tmp_path: Path) -> None:
    import socket

    with socket.socket() as listener:  # stands in for the node's port
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        config = tmp_path / "node.toml"
        config.write_text(
            to_toml(
                {
                    "node": {
                        "data_dir": str(tmp_path / "data"),
                        "host": "127.0.0.1",
                        "port": listener.getsockname()[1],
                    },
                    "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 2}},
                    "requery": {"peer": "pacs"},
                    "pipeline": {"model_dir": str(tmp_path / "no-model")},
                }
            )
        )
        result = mvi_node(
            "requery", "--since", "2024-01-01", "--until", "2024-01-31", "--config", config
        )
    assert result.returncode == 2
    assert "no MVI model" in result.stderr and "mvi-node train" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "2024-13-01", "--until", "2024-12-31"), "--since '2024-13-01'"),
        (("--since", "2024-02-01", "--until", "2024-01-31"), "before --since"),
        (
            ("--since", "2024-01-01", "--until", "2024-01-31", "--description", "("),
            "does not compile",
        ),
        (
            ("--since", "2024-01-01", "--until", "2024-01-31", "--peer", "nobody"),
            "no [peers.nobody]",
        ),
    ],
)
def test_bad_requery_arguments_get_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"node": {"data_dir": str(tmp_path / "data")}}))
    result = mvi_node("requery", *args, "--dry-run", "--config", config)
    assert result.returncode == 2
    assert message in result.stderr


# -- results export ----------------------------------------------------------------------------


def _store_with_results(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """A store holding three studies with results, written through the store's own API."""

    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(data)},
                "security": {"pseudonym_key": SITE_KEY},
            }
        )
    )
    settings = Settings.model_validate(tomllib.loads(config.read_text()))
    store = Store(settings.database_url)
    studies = []
    for i, (date, status) in enumerate(
        [("20230105", "scored"), ("20230610", "no_tumor"), ("20240102", "scored")]
    ):
        uid = f"1.2.826.0.1.3680043.8.498.{100 + i}"
        store.record_instance(
            record(
                study=uid,
                series=uid + ".1",
                sop=uid + ".1.1",
                sha256=str(i),
                patient_id=f"PAT{i}",
                patient_name="DOE^JANE",
                accession_number=f"ACC{i}",
                study_date=date,
            )
        )
        job = store.reprocess(uid)
        scored = status == "scored"
        tumor = {"max_diameter_mm": 41.5, "volume_ml": 20.25, "count": 1, "diameter_slice": 3}
        result = {
            "study_instance_uid": uid,
            "status": status,
            "mvi_probability": 0.25 + 0.3 * i if scored else None,
            "combined_probability": 0.3 if scored else None,
            "risk_category": ("high" if i else "low") if scored else None,
            "tumor": tumor if scored else None,
            "loat": {"found": True, "max_area_cm2": 3.5, "volume_ml": 1.0, "area_slice": 4},
            "model": {
                "name": "mvi-fusion-resnet18",
                "version": "1.0.0",
                "threshold": 0.5,
                "demo": True,
            },
        }
        store.record_result(job, uid, Result.model_validate(result))
        studies.append({"uid": uid, "date": date, "patient": f"PAT{i}", "accession": f"ACC{i}"})
    store.close()
    return config, studies


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_results_export_hashes_identifiers_by_default(tmp_path: Path) -> None:
    from node.core.pseudonym import date_shift_days, keyed_hash
    from node.report.export import COLUMNS, SHIFTED_DATE_COLUMN

    config, studies = _store_with_results(tmp_path)
    out = tmp_path / "results.csv"
    done = mvi_node("results", "export", "--out", out, "--config", config)
    assert done.returncode == 0, done.stderr
    with out.open(newline="") as handle:
        # The calendar date does not leave a hashed export: it is shifted per patient.
        assert tuple(next(csv.reader(handle))) == tuple(
            SHIFTED_DATE_COLUMN if c == "study_date" else c for c in COLUMNS
        )
    rows = _read_csv(out)
    assert [r["study_instance_uid"] for r in rows] == [
        keyed_hash(s["uid"], SITE_KEY) for s in studies
    ]
    assert rows[0]["patient_id"] == keyed_hash("PAT0", SITE_KEY)
    text = out.read_text()
    for s in studies:
        assert s["uid"] not in text and s["patient"] not in text and s["accession"] not in text
    assert rows[0]["mvi_probability"] == "0.25" and rows[0]["risk_category"] == "low"
    assert rows[0]["tumor_max_diameter_mm"] == "41.5" and rows[0]["loat_max_area_cm2"] == "3.5"
    assert rows[1]["status"] == "no_tumor" and rows[1]["mvi_probability"] == ""
    days = date_shift_days(rows[2]["patient_id"], SITE_KEY)
    shifted = (dt.date(2024, 1, 2) + dt.timedelta(days=days)).strftime("%Y%m%d")
    assert rows[2]["model_version"] == "1.0.0" and rows[2][SHIFTED_DATE_COLUMN] == shifted
    assert "20240102" not in text


def test_results_export_plain_none_and_dates(tmp_path: Path) -> None:
    config, studies = _store_with_results(tmp_path)
    plain = tmp_path / "plain.csv"
    assert (
        mvi_node(
            "results", "export", "--out", plain, "--identifiers", "plain", "--config", config
        ).returncode
        == 0
    )
    assert [r["study_instance_uid"] for r in _read_csv(plain)] == [s["uid"] for s in studies]
    assert _read_csv(plain)[2]["accession_number"] == "ACC2"
    none = tmp_path / "none.csv"
    args = ("--identifiers", "none", "--since", "2023-06-01", "--until", "2023-12-31")
    assert mvi_node("results", "export", "--out", none, *args, "--config", config).returncode == 0
    rows = _read_csv(none)
    assert len(rows) == 1 and rows[0]["study_date"] == "20230610"
    assert "study_instance_uid" not in rows[0] and "patient_id" not in rows[0]


def test_results_export_refuses_hashing_without_a_key(tmp_path: Path) -> None:
    config, _ = _store_with_results(tmp_path)
    data = tomllib.loads(config.read_text())
    data["security"]["pseudonym_key"] = ""
    config.write_text(to_toml(data))
    out = tmp_path / "results.csv"
    refused = mvi_node("results", "export", "--out", out, "--config", config)
    assert refused.returncode == 2
    assert "security.pseudonym_key is empty" in refused.stderr
    assert not out.exists()


def test_the_safety_net_retrieves_only_studies_the_node_never_received(
    tmp_path: Path, past: tuple[Path, Path]
) -> None:
    from node.core.settings import load_settings
    from node.requery.retrieve import safety_net

    last = FIRST_DAY + dt.timedelta(days=11)
    with site(tmp_path, past, safety_net_days=1) as s:
        (seen,) = s.in_window(last - dt.timedelta(days=1), last - dt.timedelta(days=1))
        (missed,) = s.in_window(last, last)
        day = (last - dt.timedelta(days=1)).isoformat()
        assert s.requery("--since", day, "--until", day).returncode == 0
        settings = load_settings(s.config)
        store = Store(settings.database_url)
        try:
            summary = safety_net(settings, store, today=last)
            outcomes = {c.study_uid: (c.outcome, c.reason) for c in summary.candidates}
            assert outcomes[seen] == ("skipped", "the node already received it")
            assert outcomes[missed][0] == "moved"
            assert set(outcomes) == {seen, missed}  # only the last safety_net_days + today
        finally:
            store.close()
        # The safety net does not wait: the node scores the study on its own.
        wait_for(lambda: missed in s.results(), timeout=120)
        assert set(s.results()) == {seen, missed}


def test_the_running_node_schedules_the_safety_net_from_its_cron(tmp_path: Path) -> None:
    extra = {
        "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "requery": {"peer": "pacs", "schedule": "30 2 * * *", "safety_net_days": 5},
    }
    with running_node(tmp_path / "node", extra) as node:
        line = wait_for(
            lambda: next((x for x in node.log().splitlines() if "safety net scheduled" in x), None),
            timeout=30,
        )
    assert "02:30:00+00:00" in line and '"days": 5' in line
    with running_node(tmp_path / "off") as node:
        wait_for(lambda: "node started" in node.log(), timeout=30)
        assert "safety net scheduled" not in node.log()


# -- decisions against the store (no network) --------------------------------------------------


def _record(store: Store, uid: str, n: int = 1) -> None:
    store.record_instance(
        record(study=uid, series=f"{uid}.1", sop=f"{uid}.1.{n}", sha256=f"{uid}-{n}")
    )


def test_a_retrieve_in_progress_runs_at_low_priority_and_live_sends_later_do_not(
    tmp_path: Path,
) -> None:
    from node.store.database import PRIORITY_LIVE

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    store.mark_retrospective("1.2.3.1", "20240301")
    _record(store, "1.2.3.1")
    assert store.study("1.2.3.1").priority == PRIORITY_RETROSPECTIVE  # type: ignore[union-attr]
    job_id = store.complete_study("1.2.3.1")
    assert job_id is not None
    assert store.newest_job("1.2.3.1").priority == PRIORITY_RETROSPECTIVE  # type: ignore[union-attr]
    assert store.complete_study("1.2.3.1") is None  # completed once only
    store.set_retrospective_state("1.2.3.1", "moved")
    # The retrieve is over: a later live send of the study queues a live job (results sent).
    _record(store, "1.2.3.1", 2)
    assert store.complete_study("1.2.3.1") is not None
    assert store.newest_job("1.2.3.1").priority == PRIORITY_LIVE  # type: ignore[union-attr]
    # A study asked for once, whose retrieve failed, is live when it arrives live later.
    store.mark_retrospective("1.2.3.2")
    store.set_retrospective_state("1.2.3.2", "move_failed", "refused")
    _record(store, "1.2.3.2")
    assert store.study("1.2.3.2").priority == PRIORITY_LIVE  # type: ignore[union-attr]
    store.close()


def test_a_broken_off_retrieve_is_retried_not_skipped_or_waited_for(tmp_path: Path) -> None:
    import datetime as _dt

    from node.requery.retrieve import _in_flight, already_done

    settings = Settings.model_validate({"completion": {"quiet_seconds": 1.0}})
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    store.mark_retrospective("1.2.3.9")
    _record(store, "1.2.3.9")
    assert _in_flight(store, "1.2.3.9", settings)  # instances arriving right now
    old = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    backdate(store, "studies", "last_received_at", old, "study_uid = '1.2.3.9'")
    assert not _in_flight(store, "1.2.3.9", settings)  # nothing for 5 minutes: broken off
    job = store.reprocess("1.2.3.9", priority=PRIORITY_RETROSPECTIVE)
    store.record_result(
        job, "1.2.3.9", Result(study_instance_uid="1.2.3.9", status=Status.NEEDS_REVIEW)
    )
    store.finish_job(job, "needs_review", reason="only one phase")
    store.set_retrospective_state("1.2.3.9", "move_failed", "aborted")
    model = ("mvi-fusion-resnet18", "1")
    assert already_done(store, "1.2.3.9", model) is None  # the result may be of a partial study
    store.set_retrospective_state("1.2.3.9", "done", "needs_review")
    # A finished retrieve's needs_review stands for the model that made it, not for a new one.
    assert already_done(store, "1.2.3.9", model) is None
    store.close()
