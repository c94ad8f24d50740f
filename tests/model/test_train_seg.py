"""Specification of the segmenter training's card entries and its loss on partial truth.

Training itself (on phantoms, with all labels) is specified in ``test_segmentation.py``; here the
pieces are checked on volumes whose every number is known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.losses import DiceLoss

from model.segmentation import (
    LABELS,
    training_range_of,
    tumor_uncertainty_limit_of,
    uncertainty_limit_of,
)
from model.train_seg import (
    AUGMENTATION,
    DICE_LABELS,
    OPTIONAL_LABELS,
    UNCERTAINTY_LIMIT_FACTOR,
    TrainingSample,
    _dice_weights,
    _segmentation_loss,
    augmentation,
    train_segmenter,
    training_range,
    uncertainty_quality,
)

SPACING = (2.0, 2.0, 5.0)  # 20 mm³ a voxel: 50 voxels a millilitre


def _image(hu: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetSpacing(SPACING)
    return image


def _sample(
    tumor_voxels: int,
    liver_hu: tuple[float, float],
    aorta_hu: tuple[float, float] | None,
    name: str,
) -> TrainingSample:
    """A 4 × 20 × 20 study: a liver block with a tumour row, LOAT, stomach and maybe an aorta.

    HU are constant per structure, ``(arterial, portal-venous)``; the tumour is much brighter
    than the liver so that counting it as liver would show.
    """
    shape = (4, 20, 20)
    labels = np.zeros(shape, dtype=np.uint8)
    arterial = np.full(shape, -100.0)
    portal = np.full(shape, -100.0)
    labels[:, 0:10, 0:10] = LABELS["liver"]
    arterial[:, 0:10, 0:10], portal[:, 0:10, 0:10] = liver_hu
    inside = tuple(np.argwhere(labels == LABELS["liver"])[:tumor_voxels].T)
    labels[inside] = LABELS["tumor"]
    arterial[inside] = portal[inside] = 500.0
    labels[:, 12:14, 0:5] = LABELS["loat"]  # 40 voxels
    labels[:, 15:19, 12:19] = LABELS["stomach"]
    unlabelled: frozenset[str] = frozenset({"aorta"})
    if aorta_hu is not None:
        labels[:, 2:4, 15:17] = LABELS["aorta"]
        arterial[:, 2:4, 15:17], portal[:, 2:4, 15:17] = aorta_hu
        unlabelled = frozenset()
    return TrainingSample(
        _image(arterial), _image(portal), labels, name=name, unlabelled=unlabelled
    )


def test_training_range_spans_the_studies_truth() -> None:
    samples = [
        _sample(50, (60.0, 100.0), (280.0, 150.0), "a"),  # 1 ml of tumour
        _sample(125, (75.0, 120.0), (320.0, 170.0), "b"),  # 2.5 ml
        _sample(0, (70.0, 110.0), None, "c"),  # no tumour, no aorta drawn
    ]
    entry = training_range(samples)
    assert entry["studies"] == 3
    assert entry["tumor_volume_ml"] == [0.0, 2.5]
    assert entry["loat_volume_ml"] == [0.8, 0.8]
    # Mean HU of the liver without the tumour: the 500 HU tumour does not leak in.
    assert entry["liver_hu"] == {"arterial": [60.0, 75.0], "portal_venous": [100.0, 120.0]}
    # The study without an aorta label adds nothing to the aorta range.
    assert entry["aorta_hu"] == {"arterial": [280.0, 320.0], "portal_venous": [150.0, 170.0]}
    parsed = training_range_of({"training_range": entry})
    assert parsed is not None
    assert parsed.tumor_volume_ml == (0.0, 2.5)
    assert parsed.aorta_hu == {"arterial": (280.0, 320.0), "portal_venous": (150.0, 170.0)}


def test_training_range_rounds_outward_and_omits_an_aorta_nobody_drew() -> None:
    odd = _sample(1, (60.04, 99.96), None, "a")  # 0.02 ml of tumour
    entry = training_range([odd, _sample(3, (60.06, 100.0), None, "b")])
    assert "aorta_hu" not in entry
    assert entry["tumor_volume_ml"] == [0.02, 0.06]
    # HU to 0.1, outward: the measured values stay inside the range.
    low, high = entry["liver_hu"]["arterial"]
    assert low == 60.0 and high == 60.1
    assert entry["liver_hu"]["portal_venous"] == [99.9, 100.0]
    parsed = training_range_of({"training_range": entry})
    assert parsed is not None and parsed.aorta_hu is None


def test_uncertainty_limit_is_one_and_a_half_times_the_95th_percentile() -> None:
    assert UNCERTAINTY_LIMIT_FACTOR == 1.5
    quality = uncertainty_quality([0.1, 0.2, 0.3, 0.4], "validation")
    p50, p95, top = quality["uncertainty_validation"]
    assert p50 == pytest.approx(0.25) and p95 == pytest.approx(0.385) and top == 0.4
    assert quality["uncertainty_limit"] == pytest.approx(0.5775)
    assert quality["studies"] == 4 and quality["measured_on"] == "validation"
    assert uncertainty_limit_of({"quality": quality}) == quality["uncertainty_limit"]
    # Rounded up, never down, and never zero.
    assert uncertainty_quality([0.12345], "training")["uncertainty_limit"] == 0.1852
    assert uncertainty_quality([0.0], "training")["uncertainty_limit"] > 0
    with pytest.raises(ValueError):
        uncertainty_quality([], "validation")


def test_the_tumors_own_limit_follows_the_same_rule_when_tumours_were_found() -> None:
    quality = uncertainty_quality([0.1, 0.2, 0.3, 0.4], "validation", [0.04, 0.08, 0.12])
    p50, p95, top = quality["tumor_uncertainty_validation"]
    assert p50 == pytest.approx(0.08) and p95 == pytest.approx(0.116) and top == 0.12
    assert quality["tumor_uncertainty_limit"] == pytest.approx(0.174)
    assert quality["tumor_studies"] == 3 and quality["studies"] == 4
    assert tumor_uncertainty_limit_of({"quality": quality}) == quality["tumor_uncertainty_limit"]
    assert quality["uncertainty_limit"] == pytest.approx(0.5775)  # the whole's is unchanged
    # No validation study had a tumour found: no tumour limit, and the gate does not judge it.
    none = uncertainty_quality([0.1], "validation", [])
    assert (
        "tumor_uncertainty_limit" not in none
        and tumor_uncertainty_limit_of({"quality": none}) is None
    )
    with pytest.raises(ValueError):
        uncertainty_quality([0.1], "validation", [float("nan")])


def _logits(seed: int) -> torch.Tensor:
    return torch.randn((2, len(LABELS), 4, 6, 6), generator=torch.Generator().manual_seed(seed))


def _dice() -> DiceLoss:
    """The Dice term as training builds it."""
    return DiceLoss(to_onehot_y=True, softmax=False, batch=True, weight=_dice_weights())


def test_the_loss_is_dice_of_the_reported_classes_plus_cross_entropy_of_all() -> None:
    assert DICE_LABELS == ("background", "liver", "tumor", "loat")
    logits = _logits(0)
    generator = torch.Generator().manual_seed(2)
    target = torch.randint(0, len(LABELS), (2, 1, 4, 6, 6), generator=generator)
    per_class = DiceLoss(to_onehot_y=True, softmax=True, batch=True, reduction="none")(
        logits, target
    ).flatten()
    dice = float(per_class[[LABELS[name] for name in DICE_LABELS]].mean())
    cross_entropy = float(torch.nn.functional.cross_entropy(logits, target[:, 0]))
    loss = _segmentation_loss(logits, target, [(), ()], _dice())
    assert float(loss) == pytest.approx(dice + cross_entropy, rel=1e-5)
    # The organs' scores still matter, through cross-entropy.
    moved = logits.clone()
    moved[:, LABELS["aorta"]] += 1.0
    assert float(_segmentation_loss(moved, target, [(), ()], _dice())) != pytest.approx(
        float(loss), rel=1e-4
    )


def test_the_loss_does_not_teach_an_unlabelled_organ_as_background() -> None:
    dice = _dice()
    stomach, aorta = LABELS["stomach"], LABELS["aorta"]
    target = torch.zeros((2, 1, 4, 6, 6), dtype=torch.long)
    target[:, :, :, :3] = LABELS["liver"]
    unlabelled = [(stomach, aorta), (stomach, aorta)]
    logits = _logits(1)
    # Move probability between background and stomach on the background voxels, keeping their
    # sum: the loss must not change.
    moved = logits.clone()
    shift = torch.log(torch.tensor(0.5))
    background = (target[:, 0] == 0)[:, None]
    total = torch.logaddexp(moved[:, 0:1], moved[:, stomach : stomach + 1])
    moved[:, 0:1] = torch.where(background, total + shift, moved[:, 0:1])
    moved[:, stomach : stomach + 1] = torch.where(
        background, total + shift, moved[:, stomach : stomach + 1]
    )
    before = _segmentation_loss(logits, target, unlabelled, dice)
    after = _segmentation_loss(moved, target, unlabelled, dice)
    assert float(after) == pytest.approx(float(before), rel=1e-5)
    # With the stomach labelled, the same move is a change (the truth says background there).
    full = [(), ()]
    assert float(_segmentation_loss(moved, target, full, dice)) != pytest.approx(
        float(_segmentation_loss(logits, target, full, dice)), rel=1e-3
    )
    # The -inf of the dropped classes never reaches a gradient.
    leaf = logits.clone().requires_grad_(True)
    _segmentation_loss(leaf, target, unlabelled, dice).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    # On a background voxel background, stomach and aorta are one class: the same pull on each
    # logit in proportion to its probability.
    probabilities = torch.softmax(logits, dim=1)[0, :, 0, 4, 4]
    grad = leaf.grad[0, :, 0, 4, 4]
    organs = [0, stomach, aorta]
    ratios = grad[organs] / probabilities[organs]
    assert torch.allclose(ratios, ratios[0].expand(3), rtol=1e-4)


def test_a_sample_may_leave_only_the_optional_organs_unlabelled(tmp_path: Path) -> None:
    assert OPTIONAL_LABELS == ("stomach", "aorta")
    sample = _sample(50, (60.0, 100.0), None, "a")
    bad = TrainingSample(
        sample.arterial, sample.portal_venous, sample.labels, "bad", frozenset({"tumor"})
    )
    with pytest.raises(ValueError, match="only stomach, aorta"):
        train_segmenter([bad], tmp_path / "x", spacing_mm=8.0, patch=(16, 16, 8), iterations=1)
    drawn = TrainingSample(
        sample.arterial, sample.portal_venous, sample.labels, "drawn", frozenset({"stomach"})
    )
    with pytest.raises(ValueError, match="stomach is said to be unlabelled"):
        train_segmenter([drawn], tmp_path / "y", spacing_mm=8.0, patch=(16, 16, 8), iterations=1)


def test_training_on_partial_truth_says_so_in_the_card(tmp_path: Path) -> None:
    partial = _sample(50, (60.0, 100.0), None, "a")
    card = train_segmenter(
        [partial], tmp_path / "model", spacing_mm=8.0, patch=(16, 16, 8), iterations=3, seed=1
    )
    assert card["training"]["studies_without"] == {"stomach": 0, "aorta": 1}
    assert "aorta_hu" not in card["training_range"]
    assert card["training_range"]["liver_hu"]["arterial"] == [60.0, 60.0]
    assert card["quality"]["measured_on"] == "training"
    assert np.isfinite(card["training"]["final_loss"])


def _patch(seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.zeros((1, 16, 32, 32), dtype=np.int64)
    labels[0, 4:12, 8:24, 8:24] = LABELS["liver"]
    labels[0, 6:10, 12:20, 12:20] = LABELS["tumor"]
    image = (0.3 + 0.4 * (labels > 0) + 0.01 * rng.standard_normal((2, 16, 32, 32))).astype(
        np.float32
    )
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(labels)}


def test_augmentation_keeps_labels_whole_and_is_seeded() -> None:
    # Every listed MONAI transform is in the chain, at the probability the card records.
    chain = augmentation(0)
    assert [type(t).__name__ for t in chain.transforms] == [
        name.split(":")[0] for name, _ in AUGMENTATION
    ]
    assert [t.prob for t in chain.transforms] == [prob for _, prob in AUGMENTATION]  # type: ignore[attr-defined]
    first = augmentation(7)(_patch(1))
    again = augmentation(7)(_patch(1))
    torch.testing.assert_close(torch.as_tensor(first["image"]), torch.as_tensor(again["image"]))
    changed = 0
    chain = augmentation(3)
    for index in range(40):
        patch = _patch(index)
        out = chain(patch)
        image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        assert image.shape == patch["image"].shape and label.shape == patch["label"].shape
        # Nearest-neighbour resampling: only labels that were there, as whole numbers.
        assert set(torch.unique(label).tolist()) <= {
            0.0,
            float(LABELS["liver"]),
            float(LABELS["tumor"]),
        }
        assert torch.equal(label, label.round())
        changed += int(not torch.equal(image, patch["image"]))
    # Most patches are changed by at least one transform (scale and shift alone: 3 in 4).
    assert changed >= 25
