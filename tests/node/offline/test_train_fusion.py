"""Specification of `mvi-node train` and `mvi-node evaluate` on DICOM studies with labels."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from model.checkpoint import load_checkpoint
from node.core.settings import to_toml
from tests.node.cli.test_main import mvi_node
from tests.nodeproc import tiny_models


def test_train_then_evaluate_and_compare(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    # Truth SEGs in the studies stand for a radiologist's segmentations (they win over the U-Net).
    cohort = cohort_factory(studies=12, seed=97, size=64, slices=16, seg=True)
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(tmp_path / "data")},
                "pipeline": {"device": "cpu", **tiny_models()},
            }
        )
    )
    common = (
        "--studies",
        cohort,
        "--labels",
        cohort / "labels.csv",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--roi-size",
        "32",
        "--device",
        "cpu",
        "--config",
        config,
    )
    fusion = tmp_path / "fusion"
    trained = mvi_node("train", "--out", fusion, *common)
    assert trained.returncode == 0, trained.stderr
    assert "out-of-fold AUC" in trained.stdout and "grouped by patient" in trained.stdout
    _, card = load_checkpoint(fusion)
    assert card["arch"] == "fusion" and card["demo"] is False
    # A study whose masks are too small for a crop is skipped, and said so (not a crash).
    skipped = [line for line in trained.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) <= 2, skipped
    assert card["class_counts"]["mvi"] + card["class_counts"]["no_mvi"] == 12 - len(skipped)
    assert card["tripod"]["exclusions"]["studies"] == len(skipped)
    assert card["tripod"]["data"]["studies"] == 12 - len(skipped)
    tumor_only = tmp_path / "tumor-only"
    assert mvi_node("train", "--out", tumor_only, "--arch", "tumor-only", *common).returncode == 0

    report = tmp_path / "report" / "report.json"
    evaluate = (
        "evaluate",
        "--model",
        fusion,
        "--studies",
        cohort,
        "--labels",
        cohort / "labels.csv",
        "--out",
        report,
        "--compare",
        tumor_only,
        "--config",
        config,
    )
    # The training studies are no test set: refused, with the counts, unless asked for.
    used = 12 - len(skipped)
    refused = mvi_node(*evaluate)
    assert refused.returncode == 2 and not report.exists()
    assert f"trained on {used} of these {used} studies and {used} of their" in refused.stderr
    evaluated = mvi_node(*evaluate, "--allow-overlap")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "sensitivity" in evaluated.stdout and "Brier" in evaluated.stdout
    body = json.loads(report.read_text())
    overlap = body["training_overlap"][str(fusion)]
    assert overlap == {
        "checked": True,
        "studies": used,
        "patients": used,
        "test_studies": used,
        "test_patients": used,
    }
    first = body["models"][str(fusion)]
    assert first["studies"] == 12 - len(skipped) and 0.0 <= first["auc"] <= 1.0
    assert first["auc_ci95"][0] <= first["auc"] <= first["auc_ci95"][1]
    assert {"sensitivity", "specificity", "accuracy", "brier", "threshold"} <= set(first)
    # Eleven studies hold too few events for a combined model (one variable per 10 events):
    # the report says why instead of a number.
    assert "events allow 0 predictor" in first["combined_model"]["absent_reason"]
    assert set(first["card"]) == {"auc", "sensitivity", "specificity", "brier"}
    # What a reviewer asks for: CIs, calibration, net benefit, subgroups by tumour size.
    assert {"ppv", "npv", "auc", "brier"} <= set(first["intervals"])
    assert {"intercept", "slope", "curve"} <= set(first["calibration"])
    assert first["decision_curve"][0]["threshold"] == 0.05
    sizes = [row for row in first["subgroups"] if row["subgroup"].startswith("tumour")]
    assert sum(row["studies"] for row in sizes) == used

    # Recalibration on local studies: refused on the training studies, then a new folder with
    # the same weights and only a new intercept and slope.
    recalibrate = (
        "recalibrate",
        "--model",
        fusion,
        "--studies",
        cohort,
        "--labels",
        cohort / "labels.csv",
        "--out",
        tmp_path / "recalibrated",
        "--config",
        config,
    )
    assert mvi_node(*recalibrate).returncode == 2
    # (The members trained on most of these studies, so they rank them: the slope is positive.)
    redone = mvi_node(*recalibrate, "--allow-overlap")
    assert redone.returncode == 0, redone.stderr
    assert "Brier" in redone.stdout
    _, new_card = load_checkpoint(tmp_path / "recalibrated")
    assert new_card["weights_sha256"] == card["weights_sha256"]
    assert new_card["calibration"]["history"][0]["a"] == card["calibration"]["a"]
    assert new_card["threshold"] == card["threshold"]
    assert set(body["delong"]) == {"auc", "z", "p"}
    assert (report.parent / body["roc_png"]).is_file()
    markdown = (report.parent / body["report_md"]).read_text()
    assert "TRIPOD+AI" in markdown and "| auc |" in markdown


def test_train_refuses_bad_labels(tmp_path: Path, cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(seed=98, size=48, slices=16)
    labels = tmp_path / "labels.csv"
    labels.write_text("study_instance_uid,mvi\n1.2.3,maybe\n")
    result = mvi_node("train", "--studies", cohort, "--labels", labels, "--out", tmp_path / "m")
    assert result.returncode == 2
    assert "labels.csv:2: mvi must be 0 or 1" in result.stderr


def _write_labels(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def _uids(cohort: Path) -> list[tuple[str, str]]:
    lines = (cohort / "labels.csv").read_text().splitlines()[1:]
    return [(line.split(",")[0], line.split(",")[1]) for line in lines]


def test_train_refuses_a_patient_at_two_centres(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=3, seed=96, size=48, slices=16)
    (a, la), (b, lb), (c, lc) = _uids(cohort)
    labels = _write_labels(
        tmp_path / "labels.csv",
        [
            "study_instance_uid,mvi,patient_id,centre",
            f"{a},{la},P1,north",
            f"{b},{lb},P2,north",
            f"{c},{lc},P1,south",
        ],
    )
    result = mvi_node("train", "--studies", cohort, "--labels", labels, "--out", tmp_path / "m")
    assert result.returncode == 2
    assert "labels.csv:4: this patient is at centre 'north' on line 2 and 'south' here" in (
        result.stderr
    )
    assert "P1" not in result.stderr  # identifiers stay out of messages


def test_train_refuses_labels_that_match_no_study(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=3, seed=96, size=48, slices=16)
    labels = _write_labels(
        tmp_path / "labels.csv", ["study_instance_uid,mvi", "1.2.3.4,1", "1.2.3.5,0"]
    )
    result = mvi_node("train", "--studies", cohort, "--labels", labels, "--out", tmp_path / "m")
    assert result.returncode == 2
    assert "none of the 2 labelled studies is among the 3 studies under" in result.stderr


def test_leave_one_centre_out_refuses_a_centre_with_one_class(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=12, seed=97, size=64, slices=16, seg=True)
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(tmp_path / "data")},
                "pipeline": {"device": "cpu", **tiny_models()},
            }
        )
    )
    rows = ["study_instance_uid,mvi,centre"]
    # Centre "east" gets only the studies without MVI, "west" all the others.
    for uid, label in _uids(cohort):
        rows.append(f"{uid},{label},{'east' if label == '0' else 'west'}")
    labels = _write_labels(tmp_path / "labels.csv", rows)
    result = mvi_node(
        "train",
        "--studies",
        cohort,
        "--labels",
        labels,
        "--out",
        tmp_path / "m",
        "--cv",
        "loco",
        "--roi-size",
        "32",
        "--config",
        config,
    )
    assert result.returncode == 2, result.stderr
    assert "centre 'east' has only no-MVI studies" in result.stderr
    assert not (tmp_path / "m").exists()


def test_train_refuses_imagenet_without_safetensors_weights(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=3, seed=96, size=48, slices=16)
    common = ("train", "--studies", cohort, "--labels", cohort / "labels.csv", "--out", tmp_path)
    alone = mvi_node(*common, "--init", "imagenet")
    assert (
        alone.returncode == 2 and "--init imagenet and --weights FILE go together" in alone.stderr
    )
    pth = tmp_path / "resnet18.pth"
    pth.write_bytes(b"\0" * 16)
    pickled = mvi_node(*common, "--init", "imagenet", "--weights", pth)
    assert pickled.returncode == 2 and "mvi-node convert-weights" in pickled.stderr
    layout = mvi_node(*common, "--layout", "channels")
    assert layout.returncode == 2 and "--layout 'channels': use region, phase" in layout.stderr


def test_train_refuses_an_even_slice_count(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=98, size=48, slices=16)
    result = mvi_node(
        "train",
        "--studies",
        cohort,
        "--labels",
        cohort / "labels.csv",
        "--out",
        tmp_path / "m",
        "--roi-slices",
        "4",
    )
    assert result.returncode == 2
    assert "--roi-slices 4: use an odd number" in result.stderr
    assert not (tmp_path / "m").exists()
