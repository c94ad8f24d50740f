"""Specification of fusion training: phantom ROIs, the cache, folds, the shipped ensemble and its
card, which must hold on a second cohort of the same generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import model.train as train_module
from model.checkpoint import REQUIRED_CARD_KEYS, load_checkpoint
from model.inference import FusionModel
from model.phantom import PhantomSpec
from model.roi import RoiSpec
from model.stats import (
    brier,
    logistic_predict,
    platt_apply,
    platt_fit,
    sens_spec_acc,
    youden_threshold,
)
from model.train import (
    CARD_KIND,
    FUSION_CARD_KEYS,
    StudyRois,
    cached_rois,
    centre_folds,
    check_patient_centres,
    grouped_folds,
    hash_id,
    make_folds,
    recalibrated_card,
    rois_from_phantom,
    stratified_folds,
    train_fusion,
)

TINY = PhantomSpec(size=96, slices=16)
ROI = RoiSpec(size=32)
SEEDS = list(range(100, 124))
# A cohort large enough to learn from in about a minute on two cores, and a second one.
COHORT = PhantomSpec(size=128, slices=32)
TRAIN = 160
HELD_OUT = 300
# Five folds, the default: with three, each member learns from 107 studies and the out-of-fold
# figures run further ahead of a new cohort (phantom v2: card sensitivity 0.79, held-out 0.60).
FOLDS = 5


def _cohort_seeds(cohort: int, count: int) -> list[int]:
    return [int(np.random.SeedSequence([cohort, i]).generate_state(1)[0]) for i in range(count)]


@pytest.fixture(scope="module")
def rois_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rois")


@pytest.fixture(scope="module")
def samples(rois_cache: Path) -> list[StudyRois]:
    return cached_rois(_cohort_seeds(11, TRAIN), COHORT, ROI, rois_cache, register_pv=False)


@pytest.fixture(scope="module")
def held_out(rois_cache: Path) -> list[StudyRois]:
    return cached_rois(_cohort_seeds(12, HELD_OUT), COHORT, ROI, rois_cache, register_pv=False)


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
        folds=FOLDS,
        epochs=15,
        patience=6,
        batch_size=16,
        lr=1e-3,
        seed=0,
        device="cpu",
        demo=True,
        progress=lambda stage, epoch, epochs, loss, val: calls.append((stage, epoch, loss, val)),
    )
    return out, card, calls


def test_the_card_holds_on_a_second_cohort(
    trained: tuple[Path, dict[str, Any], list[Any]], held_out: list[StudyRois]
) -> None:
    # What a site does: train, then score new studies of the same kind with the shipped model.
    # Its threshold must split them as the card says (a separately trained final network once
    # called every new study high risk: sensitivity 1.00, specificity 0.05).
    out, card, _ = trained
    model = FusionModel.load(out, device="cpu")
    predictions = model.predict(_rois_of(held_out))
    y = np.asarray([s.label for s in held_out])
    p = np.asarray([q.mvi_probability for q in predictions])
    assert len({q.risk_category for q in predictions}) == 2
    sensitivity, specificity, _ = sens_spec_acc(y, p, model.threshold)
    metrics = card["oof_metrics"]
    # Within 0.3 of the card: the same code and seed trained on another CPU (other float
    # rounding in the convolutions) gave held-out sensitivity 0.52 against the card's 0.75, the
    # spread a 160-study training has from run to run; a miscalibrated model is off by 0.5 or more.
    assert abs(sensitivity - metrics["sensitivity"]) <= 0.3, (sensitivity, metrics)
    assert abs(specificity - metrics["specificity"]) <= 0.3, (specificity, metrics)
    # ... and the threshold still separates the classes on the new cohort.
    assert sensitivity + specificity - 1.0 >= 0.3, (sensitivity, specificity)
    assert brier(y, p) <= 0.22


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


def _rois_of(samples: list[StudyRois]) -> list[dict[str, np.ndarray]]:
    return [{"tumor": s.tumor, "loat": s.loat} for s in samples]


def test_the_card_is_recomputed_from_the_shipped_weights(
    trained: tuple[Path, dict[str, Any], list[Any]], samples: list[StudyRois]
) -> None:
    # Each training study scored by the shipped member that did not train on it (the card's
    # fold) gives back the card's calibration, threshold and out-of-fold figures.
    out, card, _ = trained
    model = FusionModel.load(out, device="cpu")
    assert model.members == FOLDS
    logits = model.member_logits(_rois_of(samples))
    folds = np.asarray(card["training_ids"]["fold"])
    oof = logits[np.arange(len(samples)), folds]
    y = np.asarray([s.label for s in samples])
    a, b = platt_fit(y, oof)
    assert (a, b) == (
        pytest.approx(card["calibration"]["a"], abs=1e-4),
        pytest.approx(card["calibration"]["b"], abs=1e-4),
    )
    p = platt_apply(oof, a, b)
    assert youden_threshold(y, p) == pytest.approx(card["threshold"], abs=1e-5)
    sensitivity, specificity, _ = sens_spec_acc(y, p, card["threshold"])
    metrics = card["oof_metrics"]
    assert sensitivity == pytest.approx(metrics["sensitivity"], abs=1e-3)
    assert specificity == pytest.approx(metrics["specificity"], abs=1e-3)
    assert brier(y, p) == pytest.approx(metrics["brier"], abs=1e-3)
    # The combined model's own threshold and its calls, from the same out-of-fold logits and
    # the studies' measurements.
    combined = card["combined_model"]
    values = {
        "dl_logit": card["calibration"]["a"] * oof + card["calibration"]["b"],
        "max_diameter_mm": np.asarray([s.diameter_mm for s in samples]),
        "loat_area_cm2": np.asarray([s.loat_area_cm2 for s in samples]),
    }
    q = np.asarray(
        [
            logistic_predict(combined, {k: float(v[i]) for k, v in values.items()})
            for i in range(y.size)
        ]
    )
    assert youden_threshold(y, q) == pytest.approx(combined["threshold"], abs=1e-5)
    sensitivity, specificity, _ = sens_spec_acc(y, q, combined["threshold"])
    assert sensitivity == pytest.approx(combined["sensitivity"], abs=1e-3)
    assert specificity == pytest.approx(combined["specificity"], abs=1e-3)
    assert {"sensitivity", "specificity"} <= set(combined["optimism_corrected"]["corrected"])
    # And what the node sends for a study is the calibrated mean of the members.
    predictions = model.predict(_rois_of(samples[:4]))
    for row, prediction in zip(logits[:4], predictions, strict=True):
        assert prediction.logit == pytest.approx(float(row.mean()), abs=1e-5)
        assert prediction.mvi_probability == pytest.approx(
            float(platt_apply(row.mean(), card["calibration"]["a"], card["calibration"]["b"])),
            abs=1e-5,
        )


def test_a_patients_studies_never_cross_folds() -> None:
    # 30 patients with 1-3 studies each; every study of a patient shares the patient's label.
    rng = np.random.default_rng(3)
    groups, labels = [], []
    for patient in range(30):
        label = int(patient % 3 == 0)
        for _ in range(int(rng.integers(1, 4))):
            groups.append(f"p{patient}")
            labels.append(label)
    folds = grouped_folds(np.asarray(labels), groups, 4, seed=0)
    together = np.sort(np.concatenate(folds))
    np.testing.assert_array_equal(together, np.arange(len(labels)))
    fold_of_patient: dict[str, set[int]] = {}
    for f, index in enumerate(folds):
        for i in index:
            fold_of_patient.setdefault(groups[int(i)], set()).add(f)
    assert all(len(where) == 1 for where in fold_of_patient.values())
    y = np.asarray(labels)
    assert all(0 < int(y[f].sum()) < f.size for f in folds)  # both classes in every fold
    assert max(f.size for f in folds) - min(f.size for f in folds) <= 4
    with pytest.raises(ValueError, match=r"fold .* has no study of class 1"):
        grouped_folds(np.array([1, 1, 0, 0, 0, 0]), ["a", "a", "b", "c", "d", "e"], 2, seed=0)


def test_leave_one_centre_out_and_patients_at_two_centres() -> None:
    y = np.array([0, 1, 0, 1, 1, 0, 0])
    centres = ["B", "B", "A", "A", "A", "C", "C"]
    with pytest.raises(ValueError, match="centre 'C' has only no-MVI studies"):
        centre_folds(y, centres)
    folds = centre_folds(y[:5], centres[:5])
    assert [list(f) for f in folds] == [[2, 3, 4], [0, 1]]  # sorted by centre: A, B
    with pytest.raises(ValueError, match="1 patient"):
        check_patient_centres(["p1", "p2", "p1"], ["A", "A", "B"])
    check_patient_centres(["p1", "p2", "p1"], ["A", "B", "A"])


def test_training_folds_group_by_patient_centre_or_study(samples: list[StudyRois]) -> None:
    import dataclasses

    # Pairs of studies of one patient (same label), at two centres.
    ordered = sorted(samples, key=lambda s: s.label)
    paired = [
        dataclasses.replace(s, patient_id=f"p{i // 2}", centre="AB"[(i // 4) % 2])
        for i, s in enumerate(ordered)
    ]
    y = np.asarray([s.label for s in paired])
    for f in make_folds(paired, y, cv="kfold", group_by="patient", folds=3, seed=0):
        patients = {paired[int(i)].patient_id for i in f}
        others = {s.patient_id for j, s in enumerate(paired) if j not in set(f.tolist())}
        assert not patients & others
    loco = make_folds(paired, y, cv="loco", group_by="patient", folds=3, seed=0)
    assert [{paired[int(i)].centre for i in f} for f in loco] == [{"A"}, {"B"}]
    assert len(make_folds(paired, y, cv="kfold", group_by="study", folds=3, seed=0)) == 3


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
    combined = card["combined_model"]
    assert combined["features"][0] == "dl_logit"  # forced in; the measurements are selected
    assert set(combined["features"]) <= {"dl_logit", "max_diameter_mm", "loat_area_cm2"}
    assert combined["selection"]["selected"] == combined["features"]
    assert combined["selection"]["variables_allowed"] == min(card["class_counts"].values()) // 10
    calibration = card["calibration"]
    assert combined["dl_calibration"] == {"a": calibration["a"], "b": calibration["b"]}
    # The shipped network is the fold ensemble, each member with its standardisation.
    assert card["network"]["members"] == FOLDS
    assert any(k.startswith("members.1.loat.") for k in state)
    assert set(state) >= {"centre", "scale"} and all(v > 0 for v in card["network"]["scale"])
    training = card["training"]
    assert len(training["folds_detail"]) == FOLDS
    assert all(1 <= f["best_epoch"] <= 15 for f in training["folds_detail"])
    assert training["cv"] == "kfold" and training["group_by"] == "patient"
    # No final network: the folds are all there is.
    assert {c[0] for c in calls} == {f"fold {k}/{FOLDS}" for k in range(1, FOLDS + 1)}
    # Intervals for every figure, and the optimism of fitting Platt and the threshold on them.
    intervals = card["oof_intervals"]
    assert intervals["sensitivity"]["value"] == pytest.approx(metrics["sensitivity"], abs=1e-4)
    low, high = intervals["ppv"]["ci95_wilson"]
    assert low < intervals["ppv"]["value"] < high
    optimism = card["oof_optimism_corrected"]
    assert optimism["apparent"]["sensitivity"] == pytest.approx(metrics["sensitivity"], abs=1e-4)
    corrected, apparent = optimism["corrected"], optimism["apparent"]
    assert corrected["brier"] >= apparent["brier"]
    ids = card["training_ids"]
    assert ids["studies"] == [hash_id(s.study_id, ids["salt"]) for s in samples]
    assert sorted(set(ids["fold"])) == list(range(FOLDS))
    assert len(ids["patients"]) == len(samples)


def test_every_epoch_records_a_finite_training_loss(
    trained: tuple[Path, dict[str, Any], list[Any]],
) -> None:
    # One finite, positive loss per epoch run (whether training learns is the second cohort's
    # test); a fold stops once its validation AUC has not improved for `patience` epochs.
    _, card, _ = trained
    for fold in card["training"]["folds_detail"]:
        history = fold["loss_history"]
        assert len(history) == len(fold["val_auc_history"])
        assert fold["best_epoch"] <= len(history) <= min(15, fold["best_epoch"] + 6)
        assert all(np.isfinite(v) and v > 0 for v in history)
        assert fold["val_auc"] == max(fold["val_auc_history"])


def _short_run(samples: list[StudyRois], out: Path, **options: Any) -> dict[str, Any]:
    """Two folds of three epochs on 96 studies: seconds, and enough to rank."""
    return train_fusion(
        samples[:96],
        out,
        roi_spec=ROI,
        folds=2,
        epochs=3,
        patience=3,
        batch_size=16,
        lr=1e-3,
        seed=1,
        device="cpu",
        demo=True,
        **options,
    )


def test_training_is_deterministic_for_a_seed(samples: list[StudyRois], tmp_path: Path) -> None:
    first, again = _short_run(samples, tmp_path / "first"), _short_run(samples, tmp_path / "again")
    assert again["weights_sha256"] == first["weights_sha256"]
    assert again["oof_metrics"] == first["oof_metrics"]
    assert again["calibration"] == first["calibration"]
    assert again["training_ids"] == first["training_ids"]  # a demo card's salt is seeded


def test_the_size_target_trains_a_second_head_that_is_not_shipped(
    samples: list[StudyRois], tmp_path: Path
) -> None:
    plain = _short_run(samples, tmp_path / "plain")
    sized = _short_run(samples, tmp_path / "sized", size_target=1.0)
    assert plain["training"]["size_target"] is None
    assert sized["training"]["size_target"]["weight"] == 1.0
    # The loss carries the size term (a standardised target starts near a squared error of 1).
    for without, with_size in zip(
        plain["training"]["folds_detail"], sized["training"]["folds_detail"], strict=True
    ):
        assert with_size["loss_history"][0] > without["loss_history"][0] + 0.2
    # The shipped members are plain classifiers: no size head in the weights or the card.
    state, _ = load_checkpoint(tmp_path / "sized", required=FUSION_CARD_KEYS)
    assert not any("size_head" in k for k in state)
    shape = {k: v for k, v in sized["network"].items() if k not in ("centre", "scale")}
    assert shape == {k: v for k, v in plain["network"].items() if k not in ("centre", "scale")}
    model = FusionModel.load(tmp_path / "sized", device="cpu")
    assert len(model.predict(_rois_of(samples[:2]))) == 2
    with pytest.raises(ValueError, match="size_target"):
        train_fusion(samples, tmp_path / "x", roi_spec=ROI, size_target=-1.0)


def test_training_refuses_mismatched_rois(samples: list[StudyRois], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ROI spec"):
        train_fusion(samples, tmp_path / "x", roi_spec=RoiSpec(size=64), folds=2, epochs=1)
    with pytest.raises(ValueError, match="arch"):
        train_fusion(samples, tmp_path / "x", roi_spec=ROI, arch="radiomics")
    with pytest.raises(ValueError, match="cv"):
        train_fusion(samples, tmp_path / "x", roi_spec=ROI, cv="bootstrap")
    with pytest.raises(ValueError, match="leave-one-centre-out needs a centre"):
        train_fusion(samples, tmp_path / "x", roi_spec=ROI, cv="loco")


def test_recalibration_refits_only_intercept_and_slope() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 2.0, 3000)
    # At this site the truth is sigmoid(0.5 * logit - 1): the card's a = 1, b = 0 is off.
    y = (rng.random(logits.size) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(int)
    card = {
        "calibration": {"method": "platt", "a": 1.0, "b": 0.0},
        "threshold": 0.4,
        "weights_sha256": "x" * 64,
        "network": {"members": 3},
    }
    kept = recalibrated_card(card, logits, y)
    calibration = kept["calibration"]
    assert calibration["a"] == pytest.approx(0.5, abs=0.05)
    assert calibration["b"] == pytest.approx(-1.0, abs=0.1)
    assert calibration["history"] == [{"method": "platt", "a": 1.0, "b": 0.0}]
    assert kept["threshold"] == 0.4 and kept["network"] == card["network"]
    assert "weights_sha256" not in kept and card["calibration"]["a"] == 1.0  # a copy
    before, after = calibration["local_before"], calibration["local_after"]
    assert after["brier"] < before["brier"]
    assert after["calibration_slope"] == pytest.approx(1.0, abs=0.1)
    assert before["calibration_slope"] == pytest.approx(0.5, abs=0.1)
    youden = recalibrated_card(card, logits, y, threshold_rule="youden")
    assert youden["threshold"] != 0.4
    with pytest.raises(ValueError, match="Platt slope"):
        recalibrated_card(card, -logits, y)


def test_imagenet_initialisation_and_the_phase_layout_reach_the_card(
    samples: list[StudyRois], tmp_path: Path
) -> None:
    # No weights can be downloaded here: a file with torchvision ResNet18's names and shapes.
    import torch
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    from model.fusion import IMAGENET_GREY

    torch.manual_seed(7)
    reference = resnet18(weights=None).state_dict()
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.items()}, str(weights))
    card = _short_run(samples, tmp_path / "phase", layout="phase", pretrained=weights)
    assert card["layout"] == "phase" and card["network"]["layout"] == "phase"
    assert card["network"]["normalise"] == {"mean": IMAGENET_GREY[0], "std": IMAGENET_GREY[1]}
    assert card["training"]["init"] == "imagenet"
    assert len(card["training"]["pretrained_sha256"]) == 64
    model = FusionModel.load(tmp_path / "phase", device="cpu")
    assert model.network.members[0].normalise == IMAGENET_GREY
    assert model.network.members[0].layout == "phase"
    assert len(model.predict(_rois_of(samples[:2]))) == 2
    with pytest.raises(ValueError, match="layout"):
        train_fusion(samples, tmp_path / "x", roi_spec=ROI, layout="channels")


def test_the_tiled_phase_layout_trains_and_loads(samples: list[StudyRois], tmp_path: Path) -> None:
    card = _short_run(samples, tmp_path / "tiled", layout="phase-tiled")
    assert card["layout"] == "phase-tiled" and card["network"]["layout"] == "phase-tiled"
    model = FusionModel.load(tmp_path / "tiled", device="cpu")
    assert [b.conv1.in_channels for b in model.network.members[0].branches()] == [3, 3]
    predictions = model.predict(_rois_of(samples[:3]))
    assert all(0.0 <= q.mvi_probability <= 1.0 for q in predictions)


def test_strong_augmentation_adds_zoom_offset_blur_and_noise() -> None:
    import torch

    from model.train import _augment

    x = torch.zeros(4, 2, 32, 32)
    x[:, :, 12:20, 12:20] = 0.5
    light = _augment(x, torch.Generator().manual_seed(0), "light")
    strong = _augment(x, torch.Generator().manual_seed(0), "strong")
    assert light.shape == strong.shape == x.shape

    # Noise: a flat corner stays flat in each image under light augmentation, not under strong.
    def spread(batch: torch.Tensor) -> float:
        return float(batch[:, :, :6, :6].std(dim=(2, 3)).max())

    assert spread(light) < 1e-4 < spread(strong)
    # The HU offset: up to ±0.055 of the window (about 20 HU) against ±0.02 for light.
    offsets = strong[:, :, :6, :6].mean(dim=(1, 2, 3))
    assert float(offsets.abs().max()) <= 0.055 + 0.01


def test_a_patient_identifier_never_reaches_a_repr() -> None:
    sample = StudyRois(np.zeros(1), np.zeros(1), 1, 30.0, 4.0, "study-key", "PAT-00417", "north")
    assert "PAT-00417" not in repr(sample) and sample.patient == "PAT-00417"
    assert StudyRois(np.zeros(1), np.zeros(1), 0, 1.0, 1.0, "k").patient == "study:k"
