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
    assert "out-of-fold AUC" in trained.stdout
    _, card = load_checkpoint(fusion)
    assert card["arch"] == "fusion" and card["demo"] is False
    # A study whose masks are too small for a crop is skipped, and said so (not a crash).
    skipped = [line for line in trained.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) <= 2, skipped
    assert card["class_counts"]["mvi"] + card["class_counts"]["no_mvi"] == 12 - len(skipped)
    tumor_only = tmp_path / "tumor-only"
    assert mvi_node("train", "--out", tumor_only, "--arch", "tumor-only", *common).returncode == 0

    report = tmp_path / "report" / "report.json"
    evaluated = mvi_node(
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
    assert evaluated.returncode == 0, evaluated.stderr
    body = json.loads(report.read_text())
    first = body["models"][str(fusion)]
    assert first["studies"] == 12 - len(skipped) and 0.0 <= first["auc"] <= 1.0
    assert first["auc_ci95"][0] <= first["auc"] <= first["auc_ci95"][1]
    assert {"sensitivity", "specificity", "accuracy", "brier", "threshold"} <= set(first)
    assert set(body["delong"]) == {"auc", "z", "p"}
    assert (report.parent / body["roc_png"]).is_file()


def test_train_refuses_bad_labels(tmp_path: Path, cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(seed=98, size=48, slices=16)
    labels = tmp_path / "labels.csv"
    labels.write_text("study_instance_uid,mvi\n1.2.3,maybe\n")
    result = mvi_node("train", "--studies", cohort, "--labels", labels, "--out", tmp_path / "m")
    assert result.returncode == 2
    assert "labels.csv:2: mvi must be 0 or 1" in result.stderr
