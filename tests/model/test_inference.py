"""Specification of fusion inference: loading, refusals, calibrated scores, combined model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.checkpoint import CARD_NAME, WEIGHTS_NAME, CheckpointError, save_checkpoint
from model.fusion import FusionEnsemble, FusionNet
from model.inference import FusionModel, Prediction
from model.roi import RoiSpec

SPEC = RoiSpec(size=32)
COMBINED = {
    "features": ["dl_logit", "max_diameter_mm", "loat_area_cm2"],
    "names": ["dl_logit", "max_diameter_mm", "loat_area_cm2"],
    "intercept": -3.0,
    "coefficients": {"dl_logit": 0.8, "max_diameter_mm": 0.05, "loat_area_cm2": 0.1},
}


def _card(arch: str = "fusion", **changes: Any) -> dict[str, Any]:
    card: dict[str, Any] = {
        "name": "mvi-fusion-test",
        "version": "1",
        "created": "2025-01-01T00:00:00+00:00",
        "kind": "mvi-fusion",
        "arch": arch,
        "demo": True,
        "input": SPEC.to_card(),
        "network": {"backbone": "resnet18", "arch": arch, "in_channels": 6, "dropout": 0.3},
        "calibration": {"method": "platt", "a": 0.5, "b": -0.2},
        "threshold": 0.4,
        "combined_model": dict(COMBINED),
    }
    card.update(changes)
    return card


def _save(directory: Path, arch: str = "fusion", seed: int = 0, **changes: Any) -> Path:
    torch.manual_seed(seed)
    net = FusionNet(arch, in_channels=6)
    save_checkpoint(directory, net.state_dict(), _card(arch, **changes))
    return directory


def _rois(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "tumor": rng.random((6, 32, 32), dtype=np.float32),
            "loat": rng.random((6, 32, 32), dtype=np.float32),
        }
        for _ in range(n)
    ]


def test_round_trip_two_loads_give_identical_predictions(tmp_path: Path) -> None:
    directory = _save(tmp_path / "m")
    rois = _rois(5)
    first = FusionModel.load(directory, device="cpu").predict(rois)
    second = FusionModel.load(directory, device="cpu").predict(rois, batch_size=2)
    assert len(first) == 5
    for a, b in zip(first, second, strict=True):
        assert isinstance(a, Prediction)
        assert a.logit == pytest.approx(b.logit, abs=1e-5)
    same = FusionModel.load(directory, device="cpu").predict(rois)
    assert [p.logit for p in same] == [p.logit for p in first]


def test_an_ensemble_scores_the_mean_of_its_standardised_members(tmp_path: Path) -> None:
    torch.manual_seed(0)
    members = [FusionNet("fusion", in_channels=6) for _ in range(3)]
    ensemble = FusionEnsemble(members, centre=[0.1, -0.2, 0.3], scale=[0.5, 2.0, 1.0])
    card = _card(network=ensemble.spec())
    save_checkpoint(tmp_path / "m", ensemble.state_dict(), card)
    model = FusionModel.load(tmp_path / "m", device="cpu")
    assert model.members == 3 and card["network"]["members"] == 3
    rois = _rois(4)
    columns = model.member_logits(rois)
    with torch.inference_mode():
        tumor = torch.from_numpy(np.stack([r["tumor"] for r in rois]))
        loat = torch.from_numpy(np.stack([r["loat"] for r in rois]))
        raw = np.stack([m.eval()(tumor, loat).numpy() for m in members], axis=1)
    expected = (raw - np.array([0.1, -0.2, 0.3])) / np.array([0.5, 2.0, 1.0])
    np.testing.assert_allclose(columns, expected, atol=1e-5)
    for row, prediction in zip(expected, model.predict(rois), strict=True):
        assert prediction.logit == pytest.approx(float(row.mean()), abs=1e-5)
        z = 0.5 * row.mean() - 0.2
        assert prediction.mvi_probability == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-6)
    # Members of different kinds, or a scale that is not positive, make no ensemble.
    with pytest.raises(ValueError, match="differ"):
        FusionEnsemble([FusionNet("fusion"), FusionNet("tumor-only")])
    with pytest.raises(ValueError, match="positive"):
        FusionEnsemble(members[:1], centre=[0.0], scale=[0.0])


def test_a_single_network_card_still_loads(tmp_path: Path) -> None:
    # Cards written before the fold ensemble hold one network with unprefixed keys.
    model = FusionModel.load(_save(tmp_path / "m"), device="cpu")
    assert model.members == 1
    (row,) = model.member_logits(_rois(1))
    assert model.predict(_rois(1))[0].logit == pytest.approx(float(row[0]), abs=1e-6)


def test_probability_is_calibrated_and_thresholded(tmp_path: Path) -> None:
    model = FusionModel.load(_save(tmp_path / "m"), device="cpu")
    assert model.spec == SPEC and model.threshold == 0.4
    for p in model.predict(_rois(4)):
        expected = 1.0 / (1.0 + math.exp(-(0.5 * p.logit - 0.2)))
        assert p.mvi_probability == pytest.approx(expected)
        assert p.risk_category == ("high" if p.mvi_probability >= 0.4 else "low")
        assert p.threshold == 0.4
        assert p.combined_probability is None  # no measurements given
    # The pipeline's risk_threshold overrides the card's.
    assert {p.risk_category for p in model.predict(_rois(3), threshold=0.0)} == {"high"}
    assert {p.risk_category for p in model.predict(_rois(3), threshold=1.0)} == {"low"}


def test_combined_probability_follows_the_card(tmp_path: Path) -> None:
    model = FusionModel.load(_save(tmp_path / "m"), device="cpu")
    predictions = model.predict(_rois(2), max_diameter_mm=[40.0, None], loat_area_cm2=[6.0, 6.0])
    p = predictions[0]
    dl_logit = 0.5 * p.logit - 0.2
    z = -3.0 + 0.8 * dl_logit + 0.05 * 40.0 + 0.1 * 6.0
    assert p.combined_probability == pytest.approx(1.0 / (1.0 + math.exp(-z)))
    assert predictions[1].combined_probability is None
    # A card whose combined model could not be fitted gives None, not an error.
    failed = _save(tmp_path / "f", combined_model={"names": ["dl_logit"], "error": "separation"})
    only = FusionModel.load(failed, device="cpu").predict(
        _rois(1), max_diameter_mm=[40.0], loat_area_cm2=[6.0]
    )
    assert only[0].combined_probability is None


@pytest.mark.parametrize("recorded", [True, False])
def test_recalibration_moves_the_dl_probability_not_the_combined_models_scale(
    tmp_path: Path, recorded: bool
) -> None:
    """The combined model was fitted on the training calibration's dl_logit: a site's
    recalibration changes the DL probability and leaves the combined model's input as it was
    (from its own record, or for an older card from the first calibration in the history)."""
    combined = {**COMBINED, "dl_calibration": {"a": 0.5, "b": -0.2}} if recorded else COMBINED
    history = [{"method": "platt", "a": 0.5, "b": -0.2}]
    recalibrated = {"method": "platt", "a": 1.7, "b": 0.9, "history": history}
    before = _save(tmp_path / "before", combined_model=combined)
    after = _save(tmp_path / "after", combined_model=combined, calibration=recalibrated)
    kwargs: dict[str, Any] = {"max_diameter_mm": [40.0, 25.0], "loat_area_cm2": [6.0, 3.0]}
    old = FusionModel.load(before, device="cpu").predict(_rois(2), **kwargs)
    new = FusionModel.load(after, device="cpu").predict(_rois(2), **kwargs)
    for o, n in zip(old, new, strict=True):
        assert n.mvi_probability == pytest.approx(1.0 / (1.0 + math.exp(-(1.7 * n.logit + 0.9))))
        assert n.mvi_probability != pytest.approx(o.mvi_probability)
        assert n.combined_probability == pytest.approx(o.combined_probability)


def test_tumor_only_needs_no_loat(tmp_path: Path) -> None:
    model = FusionModel.load(_save(tmp_path / "t", arch="tumor-only"), device="cpu")
    rois = [{"tumor": r["tumor"]} for r in _rois(3)]
    assert len(model.predict(rois)) == 3
    fusion = FusionModel.load(_save(tmp_path / "f"), device="cpu")
    with pytest.raises(ValueError, match="loat ROI is missing"):
        fusion.predict(rois)


def test_wrong_roi_shapes_are_refused(tmp_path: Path) -> None:
    model = FusionModel.load(_save(tmp_path / "m"), device="cpu")
    with pytest.raises(ValueError, match="shape"):
        model.predict([{"tumor": np.zeros((6, 64, 64)), "loat": np.zeros((6, 64, 64))}])
    with pytest.raises(ValueError, match="entries"):
        model.predict(_rois(2), max_diameter_mm=[1.0])


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "extra.pkl"])
def test_a_pickle_file_in_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    directory = _save(tmp_path / "m")
    (directory / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match=name):
        FusionModel.load(directory, device="cpu")


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    directory = _save(tmp_path / "m")
    weights = directory / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        FusionModel.load(directory, device="cpu")


def test_missing_files_are_refused(tmp_path: Path) -> None:
    directory = _save(tmp_path / "m")
    (directory / CARD_NAME).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        FusionModel.load(directory, device="cpu")
    with pytest.raises(CheckpointError, match="not a folder"):
        FusionModel.load(tmp_path / "nowhere", device="cpu")


def _edit_card(directory: Path, **changes: Any) -> None:
    # Edit the card in place; the weights (and their hash) stay valid.
    path = directory / CARD_NAME
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "radiomics"}, "arch 'radiomics' is unknown"),
        ({"kind": "segmenter"}, "not a mvi-fusion"),
        ({"input": {**SPEC.to_card(), "slices": 5, "channels": 10}}, "channels"),
        ({"input": {"size": 32}}, "input spec"),
        ({"network": {"in_channels": 3}}, "do not fit"),
        ({"calibration": {"a": "x", "b": 0}}, "calibration.a"),
        ({"combined_model": {**COMBINED, "names": ["age"]}}, "predictors"),
    ],
)
def test_cards_it_cannot_honour_are_refused(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    directory = _save(tmp_path / "m")
    _edit_card(directory, **changes)
    with pytest.raises(CheckpointError, match=message):
        FusionModel.load(directory, device="cpu")


def test_a_tumor_only_card_with_fusion_weights_is_refused(tmp_path: Path) -> None:
    directory = _save(tmp_path / "m")
    _edit_card(directory, arch="tumor-only")
    with pytest.raises(CheckpointError, match="do not fit"):
        FusionModel.load(directory, device="cpu")
