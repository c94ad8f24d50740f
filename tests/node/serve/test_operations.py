"""Specification of the operator commands: jobs list/cancel, studies reprocess."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom

from node.core.logging import uid_key
from node.core.settings import to_toml
from node.jobs.runner import results_folder
from node.store.database import InstanceRecord, Store
from tests.node.cli.test_main import mvi_node
from tests.nodeproc import dcmtk_env, running_node, storescu_command, wait_for


def config_for(tmp_path: Path) -> tuple[Path, Store]:
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"node": {"data_dir": str(tmp_path / "data")}}))
    return config, Store(f"sqlite:///{tmp_path / 'data' / 'mvi-node.sqlite3'}")


def a_study(store: Store, uid: str) -> None:
    store.record_instance(
        InstanceRecord(
            uid,
            uid + ".1",
            uid + ".1.1",
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.840.10008.1.2.1",
            "x.dcm",
            1,
            "0" * 64,
            "SCU",
            analysable=True,
        )
    )


def test_jobs_list_and_cancel(tmp_path: Path) -> None:
    config, store = config_for(tmp_path)
    a_study(store, "1.2.3")
    job_id = store.complete_study("1.2.3")
    listed = mvi_node("jobs", "list", "--config", config)
    assert listed.returncode == 0 and "queued" in listed.stdout
    assert "1.2.3" not in listed.stdout, "study keys, not UIDs"
    cancelled = mvi_node("jobs", "cancel", str(job_id), "--config", config)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    again = mvi_node("jobs", "cancel", str(job_id), "--config", config)
    assert again.returncode == 1 and "not queued" in again.stderr


def test_reprocess_needs_a_known_study_and_both_series(tmp_path: Path) -> None:
    config, store = config_for(tmp_path)
    a_study(store, "1.2.3")
    unknown = mvi_node("studies", "reprocess", "nope", "--config", config)
    assert unknown.returncode == 2 and "no study 'nope'" in unknown.stderr
    half = mvi_node("studies", "reprocess", "1.2.3", "--arterial", "1.2", "--config", config)
    assert half.returncode == 2 and "both --arterial and --portal-venous" in half.stderr
    study = store.study("1.2.3")
    assert study is not None
    assert store.accounts().audit_entries() == [], "refused: nothing recorded"
    queued = mvi_node("studies", "reprocess", study.study_key, "--config", config)
    assert queued.returncode == 0 and "queued" in queued.stdout
    assert store.list_jobs()[0].state == "queued"
    # The console's audit log has the command too, under the host account's name.
    (entry,) = store.accounts().audit_entries()
    assert (entry.action, entry.target, entry.client) == ("reprocess", study.study_key, "cli")


def test_reprocess_names_series_by_number_key_or_uid_and_refuses_others(tmp_path: Path) -> None:
    config, store = config_for(tmp_path)
    for number, description in ((3, "ART"), (5, "PV")):
        store.record_instance(
            InstanceRecord(
                "1.2.3",
                f"1.2.3.{number}",
                f"1.2.3.{number}.1",
                "1.2.840.10008.5.1.4.1.1.2",
                "1.2.840.10008.1.2.1",
                f"{number}.dcm",
                1,
                "0" * 64,
                "SCU",
                analysable=True,
                series_number=number,
                series_description=description,
            )
        )
    store.complete_study("1.2.3")
    jobs_before = store.list_jobs()
    # A UID of no series of this study, a number it lacks, a key of another: one line each, exit
    # 2, nothing queued.
    for wrong in ("1.2.3", "7", uid_key("9.9.9")):
        refused = mvi_node(
            "studies",
            "reprocess",
            "1.2.3",
            "--arterial",
            wrong,
            "--portal-venous",
            "5",
            "--config",
            config,
        )
        assert refused.returncode == 2, refused.stderr
        assert (
            refused.stderr.count("\n") == 1 and "is not a CT series of the study" in refused.stderr
        )
        assert "3 (" in refused.stderr and "ART" in refused.stderr, "the study's series are listed"
    same = mvi_node(
        "studies",
        "reprocess",
        "1.2.3",
        "--arterial",
        "5",
        "--portal-venous",
        "1.2.3.5",
        "--config",
        config,
    )
    assert same.returncode == 2 and "the same series" in same.stderr
    assert store.list_jobs() == jobs_before
    # By series number and by series key.
    queued = mvi_node(
        "studies",
        "reprocess",
        "1.2.3",
        "--arterial",
        "3",
        "--portal-venous",
        uid_key("1.2.3.5"),
        "--config",
        config,
    )
    assert queued.returncode == 0, queued.stderr
    pairing = store.list_jobs()[0].pairing or {}
    assert (pairing["arterial"], pairing["portal_venous"]) == ("1.2.3.3", "1.2.3.5")


def test_operator_commands_never_create_a_database(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"node": {"data_dir": str(tmp_path / "elsewhere")}}))
    for command in (("studies", "list"), ("jobs", "list"), ("outbox", "list")):
        refused = mvi_node(*command, "--config", config)
        assert refused.returncode == 2, command
        (line,) = refused.stderr.strip().splitlines()
        assert f"no database at {tmp_path / 'elsewhere'}" in line and "--config" in line
        assert "MVI_CONFIG" in line
    assert not (tmp_path / "elsewhere").exists(), "the service's database is not this one"


def test_reprocess_with_a_forced_pair_supersedes_the_first_report(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=93, size=64, slices=16)
    with (cohort / "truth.csv").open() as handle:
        row = next(csv.DictReader(handle))
    with running_node(tmp_path / "node") as node:
        subprocess.run(
            storescu_command(node.port, cohort / row["study_folder"]),
            env=dcmtk_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )
        store = node.store()
        uid = row["study_instance_uid"]
        wait_for(lambda: (s := store.study(uid)) and s.state == "done", timeout=120)
        first_job = store.list_jobs()[0].id
        # The operator swaps the phases on purpose: the job must use exactly that pair.
        result = mvi_node(
            "studies",
            "reprocess",
            uid,
            "--arterial",
            row["portal_venous_series_uid"],
            "--portal-venous",
            row["arterial_series_uid"],
            "--config",
            node.config_path,
        )
        assert result.returncode == 0, result.stderr
        wait_for(
            lambda: store.list_jobs()[0].state in ("done", "needs_review", "failed"), timeout=120
        )
        latest = store.latest_result(uid)
        assert latest is not None
        phases = latest.result.phases
        assert phases is not None and phases.pairing == "operator"
        assert phases.arterial == row["portal_venous_series_uid"]
        first = store.job_result(first_job)
        assert first is not None and first.attempt == 1 and latest.attempt == 1
        first_sr = pydicom.dcmread(
            results_folder(node.settings, uid, first_job, first.attempt) / "sr.dcm"
        )
        second_sr = pydicom.dcmread(
            results_folder(node.settings, uid, latest.job_id, latest.attempt) / "sr.dcm"
        )
        predecessors = [
            item.ReferencedSOPInstanceUID
            for study in second_sr.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        ]
        assert predecessors == [first_sr.SOPInstanceUID]
        assert second_sr.SeriesInstanceUID != first_sr.SeriesInstanceUID
        # Everything an operator needs about the study, on one screen.
        shown = mvi_node("studies", "show", uid_key(uid)[:12], "--config", node.config_path)
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout
        assert f"study {uid_key(uid)}" in text
        for series_uid, role in (
            (row["portal_venous_series_uid"], "arterial"),
            (row["arterial_series_uid"], "portal venous"),
        ):
            (line,) = [line for line in text.splitlines() if uid_key(series_uid) in line]
            assert role in line and series_uid in line
        assert 'phases: {"pairing": "operator"' in text
        # The test node runs without quality gates: the page says so rather than nothing.
        assert f"result of job {latest.job_id}" in text and "checks: none ran" in text
        assert len([line for line in text.splitlines() if "no liver tumor" in line]) >= 2
        store.close()
