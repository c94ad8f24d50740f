"""Specification of the operator commands: jobs list/cancel, studies reprocess."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom

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
    queued = mvi_node("studies", "reprocess", study.study_key, "--config", config)
    assert queued.returncode == 0 and "queued" in queued.stdout
    assert store.list_jobs()[0].state == "queued"


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
        first_sr = pydicom.dcmread(results_folder(node.settings, uid, first_job) / "sr.dcm")
        second_sr = pydicom.dcmread(results_folder(node.settings, uid, latest.job_id) / "sr.dcm")
        predecessors = [
            item.ReferencedSOPInstanceUID
            for study in second_sr.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        ]
        assert predecessors == [first_sr.SOPInstanceUID]
        assert second_sr.SeriesInstanceUID != first_sr.SeriesInstanceUID
        store.close()
