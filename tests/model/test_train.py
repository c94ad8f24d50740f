"""Specification of fusion training: phantom ROIs, the cache, folds, a tiny run and its card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import model.train as train_module
from model.checkpoint import REQUIRED_CARD_KEYS, load_checkpoint
from model.phantom import PhantomSpec
from model.roi import RoiSpec
from model.train import (
    CARD_KIND,
    FUSION_CARD_KEYS,
    StudyRois,
    cached_rois,
    rois_from_phantom,
    stratified_folds,
    train_fusion,
)

TINY = PhantomSpec(size=96, slices=16)
ROI = RoiSpec(size=32)
SEEDS = list(range(100, 124))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[StudyRois]:
    cache = tmp_path_factory.mktemp("rois")
    return cached_rois(SEEDS, TINY, ROI, cache, register_pv=False)


@pytest.fixture(scope="module")
def trained(
    samples: list[StudyRois], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], list[tuple[str, int, float, float | None]]]:
    out = tmp_path_factory.mktemp("models") / "fusion"
    calls: list[tuple[str, int, float, float | None]] = []
    card = train_fusion(
        samples,
        out,
        roi_spec=ROI,
        arch="fusion",
        folds=2,
        epochs=3,
        patience=3,
        batch_size=8,
        lr=1e-3,
        seed=1,
        device="cpu",
        demo=True,
        progress=lambda stage, epoch, epochs, loss, val: calls.append((stage, epoch, loss, val)),
    )
    return out, card, calls


def test_phantom_rois_carry_truth_and_registration_matches_the_known_shift() -> None:
    spec = PhantomSpec(size=96, slices=24)
    known = rois_from_phantom(7, spec, ROI, register_pv=False)
    registered = rois_from_phantom(7, spec, ROI, register_pv=True)
    assert known.tumor.shape == known.loat.shape == (6, 32, 32)
    assert known.label in (0, 1) and known.study_id == "phantom-7"
    assert known.diameter_mm > 10.0 and known.loat_area_cm2 > 0.5
    # Arterial channels do not depend on the alignment; portal-venous ones nearly agree.
    np.testing.assert_array_equal(known.tumor[:3], registered.tumor[:3])
    assert float(np.abs(known.tumor[3:] - registered.tumor[3:]).mean()) < 0.05
    with pytest.raises(ValueError, match="no tumour"):
        rois_from_phantom(7, PhantomSpec(size=64, slices=16, tumor=False), ROI, register_pv=False)


def test_the_cache_skips_rendering(
    samples: list[StudyRois], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = cached_rois(SEEDS[:3], TINY, ROI, tmp_path, register_pv=False)
    files = list(tmp_path.rglob("*.npz"))
    assert len(files) == 3

    def refuse(*args: object, **kwargs: object) -> StudyRois:
        raise AssertionError("rendered although cached")

    monkeypatch.setattr(train_module, "rois_from_phantom", refuse)
    again = cached_rois(SEEDS[:3], TINY, ROI, tmp_path, register_pv=False)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.tumor, b.tumor)
        assert (a.label, a.diameter_mm, a.study_id) == (b.label, b.diameter_mm, b.study_id)
    # Another ROI spec is another cache folder: it renders (and here, refuses).
    with pytest.raises(AssertionError, match="rendered"):
        cached_rois(SEEDS[:1], TINY, RoiSpec(size=16), tmp_path, register_pv=False)


def test_stratified_folds_partition_and_balance() -> None:
    labels = np.array([0] * 13 + [1] * 7)
    folds = stratified_folds(labels, 3, seed=0)
    together = np.sort(np.concatenate(folds))
    np.testing.assert_array_equal(together, np.arange(20))
    assert all(abs(len(f) - 20 / 3) < 1 for f in folds)
    assert all(int(labels[f].sum()) in (2, 3) for f in folds)
    assert all(
        np.array_equal(a, b) for a, b in zip(folds, stratified_folds(labels, 3, 0), strict=True)
    )
    with pytest.raises(ValueError, match="fewer than"):
        stratified_folds(np.array([0, 0, 0, 1]), 2, seed=0)


def test_tiny_training_writes_a_complete_card(
    trained: tuple[Path, dict[str, Any], list[Any]], samples: list[StudyRois]
) -> None:
    out, card, calls = trained
    state, on_disk = load_checkpoint(out, required=FUSION_CARD_KEYS)
    assert on_disk == card
    for key in (
        *REQUIRED_CARD_KEYS,
        *FUSION_CARD_KEYS,
        "oof_metrics",
        "class_counts",
        "combined_model",
        "clinical_model",
        "libraries",
        "training",
        "phantom_version",
    ):
        assert key in card, key
    assert card["kind"] == CARD_KIND and card["arch"] == "fusion" and card["demo"] is True
    assert card["name"] == "mvi-fusion-demo"
    assert RoiSpec.from_card(card["input"]) == ROI
    assert card["network"]["in_channels"] == 6
    assert set(card["calibration"]) >= {"a", "b"}
    assert 0.0 <= card["threshold"] <= 1.0
    metrics = card["oof_metrics"]
    assert {"auc", "ci95", "sensitivity", "specificity", "accuracy", "brier"} <= set(metrics)
    assert metrics["ci95"][0] <= metrics["auc"] <= metrics["ci95"][1]
    labels = [s.label for s in samples]
    assert card["class_counts"] == {"mvi": sum(labels), "no_mvi": len(labels) - sum(labels)}
    assert "phantom-" not in str(card)  # no study identifiers in the card
    assert card["combined_model"]["features"] == ["dl_logit", "max_diameter_mm", "loat_area_cm2"]
    assert any(k.startswith("loat.") for k in state)
    training = card["training"]
    assert len(training["folds_detail"]) == 2
    assert 1 <= training["final_epochs"] <= 3
    stages = {c[0] for c in calls}
    assert stages == {"fold 1/2", "fold 2/2", "final"}
    assert all(c[3] is None for c in calls if c[0] == "final")


def test_every_epoch_records_a_finite_training_loss(
    trained: tuple[Path, dict[str, Any], list[Any]],
) -> None:
    # Three epochs on 12 studies per fold are too few for the loss to fall on every CPU (the
    # same seed ends 1.12 against a first epoch of 1.07 on one machine): the card must record one
    # finite, positive loss per epoch; whether training learns is the discrimination tests' job.
    _, card, _ = trained
    for fold in card["training"]["folds_detail"]:
        history = fold["loss_history"]
        assert len(history) == 3
        assert all(np.isfinite(v) and v > 0 for v in history)


def test_training_is_deterministic_for_a_seed(
    trained: tuple[Path, dict[str, Any], list[Any]], samples: list[StudyRois], tmp_path: Path
) -> None:
    _, card, _ = trained
    again = train_fusion(
        samples,
        tmp_path / "again",
        roi_spec=ROI,
        folds=2,
        epochs=3,
        patience=3,
        batch_size=8,
        lr=1e-3,
        seed=1,
        device="cpu",
        demo=True,
    )
    assert again["weights_sha256"] == card["weights_sha256"]
    assert again["oof_metrics"] == card["oof_metrics"]
    assert again["calibration"] == card["calibration"]


def test_training_refuses_mismatched_rois(samples: list[StudyRois], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ROI spec"):
        train_fusion(samples, tmp_path / "x", roi_spec=RoiSpec(size=64), folds=2, epochs=1)
    with pytest.raises(ValueError, match="arch"):
        train_fusion(samples, tmp_path / "x", roi_spec=ROI, arch="radiomics")
