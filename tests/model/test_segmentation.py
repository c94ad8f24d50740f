"""Specification of the segmenter: post-processing, uncertainty, training on phantoms, checkpoint
loading, and the card entries the quality gates read."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import model.segmentation as segmentation
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.phantom import PHANTOM_VERSION, PhantomSpec, make_study
from model.registration import register, resample_onto
from model.segmentation import (
    LABELS,
    LEGACY_LABELS,
    MIN_LESION_WIDTH_MM,
    SEGMENTER_CARD_VERSION,
    Masks,
    TrainingRange,
    UNetSegmenter,
    build_network,
    default_network_spec,
    dice,
    labels_from_masks,
    postprocess,
    predict_labels,
    prediction_from_logits,
    resolve_device,
    training_range_of,
    uncertainty_limit_of,
)
from model.train_seg import UNCERTAINTY_LIMIT_FACTOR, TrainingSample, train_segmenter

SPEC = PhantomSpec(size=96, slices=24, phases=("arterial", "portal_venous"))
SPACING_MM = 4.0
PATCH = (32, 32, 16)


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------


def test_postprocess_keeps_the_largest_tumor_and_counts_components() -> None:
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[1:9, 2:18, 2:18] = LABELS["liver"]
    labels[2:6, 3:9, 3:9] = LABELS["tumor"]  # 144 voxels
    labels[7:8, 14:16, 14:16] = LABELS["tumor"]  # 4 voxels
    hu = np.full(labels.shape, 60.0, dtype=np.float32)
    masks = postprocess(labels, hu, "unet")
    assert isinstance(masks, Masks)
    assert masks.tumor_components == 2
    assert masks.tumor.sum() == 144 and masks.tumor[2:6, 3:9, 3:9].all()
    assert masks.tumor[7, 14, 14] == 0
    # The liver includes the tumour, the kept one and the dropped one.
    assert masks.liver[2:6, 3:9, 3:9].all() and masks.liver[7, 14, 14] == 1
    assert masks.liver.sum() == 8 * 16 * 16
    assert masks.source == "unet"
    assert {m.dtype for m in (masks.liver, masks.tumor, masks.loat)} == {np.dtype(np.uint8)}


def test_postprocess_keeps_loat_only_where_it_is_fat() -> None:
    labels = np.zeros((4, 8, 8), dtype=np.uint8)
    labels[1:3, 1:7, 1:7] = LABELS["loat"]
    hu = np.full(labels.shape, -100.0, dtype=np.float32)
    hu[1, 1:7, 1] = 40.0  # stomach wall
    hu[2, 1:7, 6] = -500.0  # air
    hu[1, 3, 3] = -190.0  # the range is closed
    hu[1, 3, 4] = -30.0
    masks = postprocess(labels, hu, "supplied")
    expected = (labels == LABELS["loat"]) & (hu >= -190.0) & (hu <= -30.0)
    assert np.array_equal(masks.loat.astype(bool), expected)
    assert masks.loat[1, 3, 3] == 1 and masks.loat[1, 3, 4] == 1
    assert masks.loat.sum() == 2 * 36 - 6 - 6
    assert masks.tumor_components == 0 and masks.tumor.sum() == 0
    assert masks.source == "supplied"


def _abdomen() -> tuple[np.ndarray, np.ndarray]:
    """A 2 mm grid with a liver block (tumour inside), soft tissue elsewhere."""
    labels = np.zeros((20, 60, 60), dtype=np.uint8)
    labels[2:18, 5:35, 5:35] = LABELS["liver"]
    labels[6:12, 10:18, 10:18] = LABELS["tumor"]
    return labels, np.full(labels.shape, 60.0, dtype=np.float32)


def test_a_segmenters_liver_and_tumour_outside_the_main_liver_are_dropped() -> None:
    labels, hu = _abdomen()
    # "Liver" with a "tumour" in it on the spleen, far from the liver: 5 % of the liver's size.
    labels[4:12, 44:52, 44:52] = LABELS["liver"]
    labels[6:9, 46:49, 46:49] = LABELS["tumor"]
    masks = postprocess(labels, hu, "unet", LABELS, spacing_mm=(2.0, 2.0, 2.0))
    assert masks.liver[:, 40:, 40:].sum() == 0
    assert masks.liver[2:18, 5:35, 5:35].all()
    # The stray blob is no second lesion: one component, and the count of what was dropped.
    assert masks.tumor_components == 1 and masks.tumor_component_voxels == (6 * 8 * 8,)
    assert masks.dropped_voxels == {"liver": 8 * 8 * 8, "tumor": 27, "loat": 0, "tumor_narrow": 0}
    # A reader's SEG is kept as drawn: the same labels without spacing keep both.
    drawn = postprocess(labels, hu, "supplied", LABELS)
    assert drawn.tumor_components == 2 and drawn.liver[4:12, 44:52, 44:52].all()
    assert drawn.dropped_voxels == {}


def test_tumour_specks_narrower_than_a_lesion_stay_liver() -> None:
    """Partial volume at the liver's surface and noise give thin "tumour" specks: a component
    is a lesion only when it is MIN_LESION_WIDTH_MM (8 mm) wide on some axial slice."""
    assert MIN_LESION_WIDTH_MM == 8.0
    labels, hu = _abdomen()  # the tumour: 16 mm wide, 12 mm deep
    labels[3:10, 28:34, 33:35] = LABELS["tumor"]  # a rim at the surface, 4 mm wide
    labels[14:16, 25:27, 25:27] = LABELS["tumor"]  # a speck 4 mm wide
    masks = postprocess(labels, hu, "unet", LABELS, spacing_mm=(2.0, 2.0, 2.0))
    assert masks.tumor_components == 1 and masks.tumor_component_voxels == (6 * 8 * 8,)
    assert masks.dropped_voxels["tumor_narrow"] == 7 * 6 * 2 + 2 * 2 * 2
    assert masks.liver[3:10, 28:34, 33:35].all()  # the specks stay liver
    # Width is in-plane and in mm: with 1 mm pixels the tumour is 8 mm wide and stays…
    fine = postprocess(labels, hu, "unet", LABELS, spacing_mm=(1.0, 1.0, 2.0))
    assert fine.tumor_components == 1 and fine.tumor.sum() == 6 * 8 * 8
    # …a lesion on one thick slice is no thinner for it…
    one_slice = np.where(labels == LABELS["tumor"], LABELS["liver"], labels).astype(np.uint8)
    one_slice[8, 10:16, 10:16] = LABELS["tumor"]  # 12 mm wide, one 7 mm slice
    thick = postprocess(one_slice, hu, "unet", LABELS, spacing_mm=(2.0, 2.0, 7.0))
    assert thick.tumor.sum() == 36
    # …and with 0.5 mm pixels the 12 mm tumour is 4 mm wide: a speck, no lesion.
    small = postprocess(labels, hu, "unet", LABELS, spacing_mm=(0.5, 0.5, 2.0))
    assert small.tumor_components == 0 and small.tumor.sum() == 0
    # A reader's SEG is kept as drawn.
    assert postprocess(labels, hu, "supplied", LABELS).tumor_components == 3


def test_the_image_border_does_not_thin_a_lesion() -> None:
    """The field of view cuts a lesion, it does not make its edge: width is measured to the
    nearest pixel outside the mask within the image, whatever box the labelling used."""
    from model.segmentation import _wide_components

    mask = np.zeros((3, 20, 20), dtype=bool)
    mask[1, 5:15, 0:2] = True  # 4 mm wide at 2 mm pixels, against the image's left border
    mask[1, 5:15, 9:11] = True  # 4 mm wide inside the image
    kept = _wide_components(mask, (2.0, 2.0, 2.0), 8.0)
    assert kept[1, 5:15, 0:2].all() and not kept[1, 5:15, 9:11].any()
    alone = np.zeros_like(mask)
    alone[1, 5:15, 9:11] = True  # its box is its own: the grid around it is still outside
    assert not _wide_components(alone, (2.0, 2.0, 2.0), 8.0).any()
    assert _wide_components(alone, (2.0, 2.0, 2.0), 4.0).sum() == 20


def test_a_liver_cut_in_two_keeps_both_parts() -> None:
    labels, hu = _abdomen()
    labels[2:18, 5:35, 20] = 0  # a fissure through the whole liver: 15 and 14 columns
    masks = postprocess(labels, hu, "unet", LABELS, spacing_mm=(2.0, 2.0, 2.0))
    assert masks.liver.sum() == np.count_nonzero(labels)
    assert masks.dropped_voxels["liver"] == 0


def test_loat_far_from_the_liver_is_dropped_and_loat_beside_it_kept() -> None:
    labels, hu = _abdomen()
    # Beside the liver (3 voxels from it in x: 6 mm) and 16 voxels (32 mm) away, both fat.
    labels[6:12, 10:20, 37:40] = LABELS["loat"]
    labels[6:12, 10:20, 50:53] = LABELS["loat"]
    hu[labels == LABELS["loat"]] = -100.0
    masks = postprocess(labels, hu, "unet", LABELS, spacing_mm=(2.0, 2.0, 2.0))
    assert masks.loat[6:12, 10:20, 37:40].all()
    assert masks.loat[:, :, 45:].sum() == 0
    assert masks.dropped_voxels["loat"] == 6 * 10 * 3
    # The reach is in mm: with 4 mm voxels in x the near block lies 12 mm away, beyond it.
    coarse = postprocess(labels, hu, "unet", LABELS, spacing_mm=(4.0, 2.0, 2.0))
    assert coarse.loat.sum() == 0 and coarse.dropped_voxels["loat"] == 2 * 6 * 10 * 3
    # No liver found: no LOAT can be placed.
    no_liver = np.where(labels == LABELS["loat"], labels, 0).astype(np.uint8)
    empty = postprocess(no_liver, hu, "unet", LABELS, spacing_mm=(2.0, 2.0, 2.0))
    assert empty.loat.sum() == 0 and empty.dropped_voxels["loat"] == 2 * 6 * 10 * 3


def test_postprocess_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        postprocess(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), "unet")


def test_the_label_map_has_the_stomach_and_the_aorta() -> None:
    assert LABELS == {
        "background": 0,
        "liver": 1,
        "tumor": 2,
        "loat": 3,
        "stomach": 4,
        "aorta": 5,
    }
    # The older map is the same indices without the two organs: one post-processing reads both.
    assert {k: v for k, v in LABELS.items() if k not in ("stomach", "aorta")} == LEGACY_LABELS
    assert default_network_spec()["kwargs"]["out_channels"] == len(LABELS) == 6


def test_postprocess_gives_stomach_and_aorta_only_for_a_map_that_has_them() -> None:
    labels = np.zeros((4, 10, 10), dtype=np.uint8)
    labels[:, 1:4, 1:4] = LABELS["liver"]
    labels[:, 5:8, 1:4] = LABELS["stomach"]
    labels[:, 5:7, 7:9] = LABELS["aorta"]
    hu = np.full(labels.shape, 50.0, dtype=np.float32)
    masks = postprocess(labels, hu, "unet", LABELS)
    assert masks.stomach is not None and masks.aorta is not None
    assert np.array_equal(masks.stomach.astype(bool), labels == LABELS["stomach"])
    assert np.array_equal(masks.aorta.astype(bool), labels == LABELS["aorta"])
    assert masks.stomach.dtype == masks.aorta.dtype == np.uint8
    # Neither organ is liver.
    assert masks.liver.sum() == 4 * 9
    # A supplied SEG or an older segmenter did not look for them: None, not an empty mask.
    legacy = postprocess(labels, hu, "supplied")
    assert legacy.stomach is None and legacy.aorta is None
    assert np.array_equal(legacy.liver, masks.liver)
    assert masks.uncertainty is None and legacy.uncertainty is None


def test_labels_from_masks_lets_tumor_and_loat_win_over_the_organs() -> None:
    shape = (1, 1, 6)
    liver = np.array([[[1, 1, 1, 1, 0, 0]]], dtype=np.uint8)
    stomach = np.array([[[0, 1, 1, 1, 1, 0]]], dtype=np.uint8)
    aorta = np.array([[[0, 0, 1, 1, 0, 1]]], dtype=np.uint8)
    tumor = np.array([[[0, 0, 0, 1, 0, 0]]], dtype=np.uint8)
    loat = np.array([[[0, 0, 0, 1, 1, 0]]], dtype=np.uint8)
    labels = labels_from_masks(liver, tumor, loat, stomach=stomach, aorta=aorta)
    names = {v: k for k, v in LABELS.items()}
    assert [names[int(v)] for v in labels.ravel()] == [
        "liver",  # liver only
        "stomach",  # stomach over liver
        "aorta",  # aorta over stomach and liver
        "loat",  # LOAT over everything, the tumour included
        "loat",
        "aorta",
    ]
    # Without the organs the map is the three-structure one.
    without = labels_from_masks(liver, tumor, loat)
    assert set(np.unique(without)) <= {0, 1, 2, 3}
    assert labels.shape == shape
    with pytest.raises(ValueError, match="stomach"):
        labels_from_masks(liver, tumor, loat, stomach=np.zeros((1, 1, 5)))


def test_phantom_masks_make_a_full_label_map() -> None:
    phantom = make_study(3, PhantomSpec(size=64, slices=16, phases=("arterial",)))
    labels = labels_from_masks(**phantom.masks)
    for name in LABELS:
        assert (labels == LABELS[name]).any(), name
    masks = postprocess(labels, phantom.phases["arterial"].hu, "unet", LABELS)
    assert masks.stomach is not None and masks.aorta is not None
    assert np.array_equal(masks.stomach, phantom.masks["stomach"])
    assert np.array_equal(masks.aorta, phantom.masks["aorta"])


# --------------------------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------------------------


def _entropy(logits: list[float]) -> float:
    """Normalised entropy of the softmax of one voxel's scores, in plain Python."""
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    total = sum(weights)
    p = [w / total for w in weights]
    return -sum(q * math.log(q) for q in p if q > 0) / math.log(len(logits))


def test_uncertainty_is_the_mean_normalised_entropy_over_foreground_voxels() -> None:
    confident = [0.0, 6.0, 0.0, 0.0, 0.0, 0.0]  # liver, clearly
    unsure = [0.0, 0.6, 0.5, 0.0, 0.0, 0.0]  # liver, barely
    background = [0.3, 0.2, 0.2, 0.2, 0.2, 0.2]  # background, hardly better than uniform
    logits = torch.zeros((6, 3, 2, 2))
    logits[:, 0] = torch.tensor(confident)[:, None, None]
    logits[:, 1] = torch.tensor(unsure)[:, None, None]
    logits[:, 2] = torch.tensor(background)[:, None, None]
    prediction = prediction_from_logits(logits)
    assert prediction.labels.dtype == np.uint8 and prediction.labels.shape == (3, 2, 2)
    assert (prediction.labels[:2] == LABELS["liver"]).all()
    assert (prediction.labels[2] == LABELS["background"]).all()
    # The near-uniform background voxels do not count: only the 8 liver voxels do.
    expected = (_entropy(confident) + _entropy(unsure)) / 2
    assert prediction.uncertainty == pytest.approx(expected, rel=1e-5)
    assert _entropy(background) > 0.99 > expected


def test_each_class_has_the_mean_entropy_of_its_own_voxels() -> None:
    confident = [0.0, 6.0, 0.0, 0.0, 0.0, 0.0]  # liver, clearly
    faint = [0.0, 0.5, 0.9, 0.0, 0.0, 0.0]  # tumour, barely
    clear = [0.0, 0.0, 7.0, 0.0, 0.0, 0.0]  # tumour, clearly
    logits = torch.zeros((6, 4, 2, 2))
    logits[:, 0] = torch.tensor(confident)[:, None, None]
    logits[:, 1] = torch.tensor(confident)[:, None, None]
    logits[:, 2] = torch.tensor(faint)[:, None, None]
    logits[:, 3] = torch.tensor(clear)[:, None, None]
    prediction = prediction_from_logits(logits)
    per_class = prediction.class_uncertainty
    assert set(per_class) == {LABELS["liver"], LABELS["tumor"]}  # no voxel of the others
    assert per_class[LABELS["liver"]] == pytest.approx(_entropy(confident), rel=1e-5)
    tumour = (_entropy(faint) + _entropy(clear)) / 2
    assert per_class[LABELS["tumor"]] == pytest.approx(tumour, rel=1e-5)
    # The whole's mean weighs the tumour by its share of the foreground: here half.
    assert prediction.uncertainty == pytest.approx((tumour + _entropy(confident)) / 2, rel=1e-5)


def test_uncertainty_does_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn((6, 9, 5, 7), generator=torch.Generator().manual_seed(0)) * 3
    whole = prediction_from_logits(logits)
    monkeypatch.setattr(segmentation, "_ENTROPY_BLOCK_VOXELS", 40)  # one slice at a time
    sliced = prediction_from_logits(logits)
    assert np.array_equal(whole.labels, sliced.labels)
    assert sliced.uncertainty == pytest.approx(whole.uncertainty, rel=1e-6)
    assert set(sliced.class_uncertainty) == set(whole.class_uncertainty)
    for label, value in whole.class_uncertainty.items():
        assert sliced.class_uncertainty[label] == pytest.approx(value, rel=1e-6)
    # Half-precision scores (CUDA autocast) are worked in float32: as good as float32 input.
    half = logits.to(torch.bfloat16)
    assert prediction_from_logits(half).uncertainty == pytest.approx(
        prediction_from_logits(half.float()).uncertainty, rel=1e-6
    )


def test_a_segmentation_without_foreground_counts_as_fully_uncertain() -> None:
    logits = torch.zeros((6, 2, 2, 2))
    logits[0] = 10.0  # background everywhere, confidently
    prediction = prediction_from_logits(logits)
    assert not prediction.labels.any()
    assert prediction.uncertainty == 1.0
    assert set(prediction.class_uncertainty) == {LABELS["background"]}


class _Scores(torch.nn.Module):
    """A "network" whose output is fixed class scores at every voxel."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.scores.shape[0], *x.shape[2:])
        return self.scores[None, :, None, None, None].expand(shape).clone()


def test_predict_labels_is_certain_for_a_confident_network_and_not_for_random_weights() -> None:
    image = np.random.default_rng(0).random((2, 16, 24, 24), dtype=np.float32)
    cpu = torch.device("cpu")
    scores = [0.0, 8.0, 0.0, 0.0, 0.0, 0.0]
    confident = predict_labels(_Scores(scores), image, (16, 16, 16), cpu)
    assert (confident.labels == LABELS["liver"]).all()
    # The sliding window blends constant scores into the same scores (to float32 rounding).
    assert confident.uncertainty == pytest.approx(_entropy(scores), rel=1e-3)
    assert confident.uncertainty < 0.01
    torch.manual_seed(0)
    untrained = build_network(default_network_spec(channels=(4, 8, 16, 32)))
    random = predict_labels(untrained, image, (16, 16, 16), cpu)
    assert random.labels.shape == (16, 24, 24)
    assert 0.0 <= random.uncertainty <= 1.0
    # Random weights spread the probability over the six classes.
    assert random.uncertainty > 0.5 > 50 * confident.uncertainty


def test_dice_and_labels_from_masks() -> None:
    a = np.zeros((2, 2, 2), dtype=np.uint8)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[0, 0, 0] = 1
    assert dice(a, b) == 0.0
    assert dice(b, b) == 1.0
    liver, tumor, loat = (np.zeros((2, 2, 2), dtype=np.uint8) for _ in range(3))
    liver[0] = 1
    tumor[0, 0] = 1
    loat[1, 1, 1] = 1
    labels = labels_from_masks(liver, tumor, loat)
    assert labels[0, 0, 0] == LABELS["tumor"] and labels[0, 1, 0] == LABELS["liver"]
    assert labels[1, 1, 1] == LABELS["loat"] and labels[1, 0, 0] == LABELS["background"]


def test_devices() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_build_network_only_builds_known_classes() -> None:
    with pytest.raises(CheckpointError, match="not supported"):
        build_network({"class": "os.system", "kwargs": {}})
    with pytest.raises(CheckpointError, match="cannot build"):
        build_network({"class": "UNet", "kwargs": {"spatial_dims": 3, "nonsense": 1}})


# --------------------------------------------------------------------------------------------
# Training and inference on small phantoms
# --------------------------------------------------------------------------------------------


def _image(volume: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]) -> Any:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _sample(seed: int) -> TrainingSample:
    phantom = make_study(seed, SPEC)
    arterial = _image(phantom.phases["arterial"].hu, phantom.spacing_mm, phantom.origin_mm)
    portal = _image(phantom.phases["portal_venous"].hu, phantom.spacing_mm, phantom.origin_mm)
    registration = register(arterial, portal, working_spacing_mm=SPACING_MM)
    aligned = resample_onto(portal, arterial, registration.transform)
    labels = labels_from_masks(**phantom.masks)
    return TrainingSample(arterial, aligned, labels, name=f"seed{seed}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A tiny U-Net trained on four small phantoms (well under a minute on two CPU cores)."""
    out = tmp_path_factory.mktemp("segmenter") / "model"
    steps: list[tuple[int, int, float]] = []
    card = train_segmenter(
        [_sample(seed) for seed in (1, 2, 3, 4)],
        out,
        spacing_mm=SPACING_MM,
        patch=PATCH,
        iterations=300,
        batch_size=2,
        seed=0,
        validation=[_sample(5)],
        demo=True,
        progress=lambda step, total, loss: steps.append((step, total, loss)),
    )
    assert [s[0] for s in steps] == list(range(1, 301)) and steps[-1][1] == 300
    yield out, card


def test_training_writes_a_complete_card(trained: tuple[Path, dict[str, Any]]) -> None:
    out, card = trained
    _, on_disk = load_checkpoint(out)
    assert on_disk == card
    assert card["kind"] == "segmenter" and card["demo"] is True
    assert card["card_version"] == SEGMENTER_CARD_VERSION == 2
    assert card["phantom_version"] == PHANTOM_VERSION
    assert card["labels"] == LABELS
    assert card["input"]["channels"] == ["arterial", "portal_venous"]
    assert card["input"]["spacing_mm"] == SPACING_MM
    assert len(card["input"]["window_hu"]) == 2
    assert card["network"]["class"] == "UNet"
    assert card["network"]["kwargs"]["in_channels"] == 2
    assert card["network"]["kwargs"]["out_channels"] == 6
    training = card["training"]
    assert training["seed"] == 0 and training["iterations"] == 300
    assert training["patch_size"] == list(PATCH) and training["studies"] == 4
    assert training["studies_without"] == {"stomach": 0, "aorta": 0}
    assert training["device"] == str(resolve_device("auto")) and training["seconds"] > 0
    validation = card["validation"]
    assert validation["studies"] == 1
    assert set(validation["dice"]) == {"liver", "tumor", "loat", "stomach", "aorta"}
    assert all(validation["dice"][k] is not None for k in validation["dice"])
    assert card["created"].endswith("+00:00")


def test_the_card_records_the_training_range_of_the_training_studies(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    _, card = trained
    entry = card["training_range"]
    assert entry["studies"] == 4
    phantoms = [make_study(seed, SPEC) for seed in (1, 2, 3, 4)]  # the training studies
    tumor_ml = [p.truth.tumor_volume_ml for p in phantoms]
    loat_ml = [p.truth.loat_volume_ml for p in phantoms]
    # Rounded outward to 0.01 ml: the range holds every study, and no more than rounding adds.
    low, high = entry["tumor_volume_ml"]
    assert low <= min(tumor_ml) < low + 0.01 and high - 0.01 < max(tumor_ml) <= high
    low, high = entry["loat_volume_ml"]
    assert low <= min(loat_ml) < low + 0.01 and high - 0.01 < max(loat_ml) <= high
    # Liver parenchyma enhances more in the portal-venous phase; the aorta in the arterial one.
    liver, aorta = entry["liver_hu"], entry["aorta_hu"]
    assert set(liver) == set(aorta) == {"arterial", "portal_venous"}
    for bounds in (*liver.values(), *aorta.values()):
        assert len(bounds) == 2 and bounds[0] <= bounds[1]
    assert liver["arterial"][0] > 40.0 and liver["arterial"][1] < liver["portal_venous"][0]
    assert liver["portal_venous"][1] < 160.0
    assert aorta["arterial"][0] > 200.0 and aorta["arterial"][0] > aorta["portal_venous"][1]
    parsed = training_range_of(card)
    assert parsed == TrainingRange(
        tumor_volume_ml=tuple(entry["tumor_volume_ml"]),
        loat_volume_ml=tuple(entry["loat_volume_ml"]),
        liver_hu={phase: tuple(b) for phase, b in liver.items()},
        aorta_hu={phase: tuple(b) for phase, b in aorta.items()},
        studies=4,
    )


def test_the_card_records_the_uncertainty_on_the_validation_studies(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    out, card = trained
    quality = card["quality"]
    assert quality["measured_on"] == "validation" and quality["studies"] == 1
    p50, p95, top = quality["uncertainty_validation"]
    assert 0.0 < p50 <= p95 <= top <= 1.0
    # The one validation study is the one the card's validation entry segmented.
    assert top == card["validation"]["per_study"][0]["uncertainty"]
    assert UNCERTAINTY_LIMIT_FACTOR == 1.5
    limit = quality["uncertainty_limit"]
    assert limit == pytest.approx(1.5 * p95, abs=1e-4) and limit >= 1.5 * p95
    assert uncertainty_limit_of(card) == limit
    # The segmenter as loaded reports the same uncertainty for that study.
    held_out = _sample(5)
    again = UNetSegmenter.from_checkpoint(out).segment(held_out.arterial, held_out.portal_venous)
    assert again.uncertainty == pytest.approx(top, abs=1e-5)


def test_card_readers_return_none_for_a_card_without_the_entries() -> None:
    assert training_range_of({}) is None and uncertainty_limit_of({}) is None
    assert training_range_of({"training_range": {"tumor_volume_ml": [5.0, 1.0]}}) is None
    assert uncertainty_limit_of({"quality": {"uncertainty_limit": "high"}}) is None
    assert uncertainty_limit_of({"quality": {"uncertainty_limit": 0.0}}) is None
    # Site training from manual SEGs: no aorta entry, the rest is there.
    site = {
        "training_range": {
            "tumor_volume_ml": [1.0, 80.0],
            "loat_volume_ml": [2.0, 30.0],
            "liver_hu": {"arterial": [60.0, 90.0], "portal_venous": [100.0, 140.0]},
            "studies": 40,
        }
    }
    parsed = training_range_of(site)
    assert parsed is not None and parsed.aorta_hu is None
    assert parsed.liver_hu["portal_venous"] == (100.0, 140.0) and parsed.studies == 40


def test_segmenter_from_checkpoint_segments_a_held_out_phantom(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = trained
    segmenter = UNetSegmenter.from_checkpoint(out)
    assert segmenter.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert segmenter.working_spacing_mm == SPACING_MM
    sample = _sample(6)
    masks = segmenter.segment(sample.arterial, sample.portal_venous)
    shape = sample.labels.shape
    assert masks.liver.shape == masks.tumor.shape == masks.loat.shape == shape
    assert masks.stomach is not None and masks.aorta is not None
    assert masks.stomach.shape == masks.aorta.shape == shape
    assert masks.source == "unet"
    assert masks.uncertainty is not None and 0.0 < masks.uncertainty < 1.0
    truth_liver = (sample.labels == LABELS["liver"]) | (sample.labels == LABELS["tumor"])
    # Chance level for the liver (about 7 % of the volume) is a Dice near 0.1.
    assert dice(masks.liver, truth_liver) > 0.5
    # The aorta (bright, round, always in the same place) and the stomach are learnt as well.
    assert dice(masks.aorta, sample.labels == LABELS["aorta"]) > 0.5
    assert dice(masks.stomach, sample.labels == LABELS["stomach"]) > 0.5
    assert not np.any(masks.stomach & masks.liver) and not np.any(masks.aorta & masks.liver)
    # The tumour, when found, is part of the liver, and LOAT is fat only.
    assert not np.any(masks.tumor & ~masks.liver)
    hu = sitk.GetArrayViewFromImage(sample.arterial)
    assert np.all((hu[masks.loat > 0] >= -190.0) & (hu[masks.loat > 0] <= -30.0))
    # Same input, same output.
    again = segmenter.segment(sample.arterial, sample.portal_venous)
    assert np.array_equal(again.liver, masks.liver)
    assert again.uncertainty == masks.uncertainty
    assert again.tumor_uncertainty == masks.tumor_uncertainty
    # The tumour's own uncertainty: a figure in [0, 1] wherever the network labelled tumour.
    if masks.tumor.any():
        assert masks.tumor_uncertainty is not None and 0.0 <= masks.tumor_uncertainty <= 1.0


def test_segment_refuses_a_portal_venous_image_not_on_the_arterial_grid(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    segmenter = UNetSegmenter.from_checkpoint(trained[0], device="cpu")
    sample = _sample(5)
    other = sitk.Shrink(sample.portal_venous, [2, 2, 1])
    with pytest.raises(ValueError, match="arterial grid"):
        segmenter.segment(sample.arterial, other)


def test_a_checkpoint_of_another_kind_is_refused(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from model.checkpoint import save_checkpoint

    state, card = load_checkpoint(trained[0])
    save_checkpoint(tmp_path / "fusion", state, {**card, "kind": "fusion"})
    with pytest.raises(CheckpointError, match="not a segmenter"):
        UNetSegmenter.from_checkpoint(tmp_path / "fusion")
    wrong = {
        **card,
        "network": {
            **card["network"],
            "kwargs": {**card["network"]["kwargs"], "channels": [8, 16, 32, 64]},
        },
    }
    save_checkpoint(tmp_path / "wrong", state, wrong)
    with pytest.raises(CheckpointError, match="do not fit"):
        UNetSegmenter.from_checkpoint(tmp_path / "wrong")


def _tiny_card(labels: dict[str, int], outputs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = default_network_spec(channels=(4, 8, 16, 32))
    spec["kwargs"]["out_channels"] = outputs
    torch.manual_seed(0)
    state = build_network(spec).state_dict()
    card = {
        "name": "tiny",
        "version": "1",
        "created": "2026-01-01T00:00:00+00:00",
        "kind": "segmenter",
        "demo": True,
        "labels": labels,
        "input": {"spacing_mm": SPACING_MM, "window_hu": [-250.0, 350.0]},
        "network": spec,
        "training": {"patch_size": list(PATCH)},
    }
    return state, card


def test_a_segmenter_with_the_older_four_labels_still_loads_without_organs(
    tmp_path: Path,
) -> None:
    state, card = _tiny_card(dict(LEGACY_LABELS), 4)
    save_checkpoint(tmp_path / "legacy", state, card)
    segmenter = UNetSegmenter.from_checkpoint(tmp_path / "legacy", device="cpu")
    assert segmenter.labels == LEGACY_LABELS
    sample = _sample(5)
    masks = segmenter.segment(sample.arterial, sample.portal_venous)
    assert masks.stomach is None and masks.aorta is None
    assert masks.liver.shape == sample.labels.shape
    # Its uncertainty is normalised by its own four classes: still in [0, 1].
    assert masks.uncertainty is not None and 0.0 <= masks.uncertainty <= 1.0
    assert training_range_of(card) is None and uncertainty_limit_of(card) is None


def test_a_segmenter_with_another_label_map_is_refused(tmp_path: Path) -> None:
    other = {"background": 0, "liver": 1, "spleen": 2}
    state, card = _tiny_card(other, 3)
    save_checkpoint(tmp_path / "other", state, card)
    with pytest.raises(CheckpointError, match="labels"):
        UNetSegmenter.from_checkpoint(tmp_path / "other")
    # Six outputs under the four-label card: argmax would name classes the card does not have.
    state, card = _tiny_card(dict(LEGACY_LABELS), 6)
    save_checkpoint(tmp_path / "mismatch", state, card)
    with pytest.raises(CheckpointError, match="6 outputs for 4 labels"):
        UNetSegmenter.from_checkpoint(tmp_path / "mismatch")
    with pytest.raises(CheckpointError, match="labels"):
        UNetSegmenter(build_network(card["network"]), {**card, "labels": other})


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    samples = [_sample(1)]
    cards = [
        train_segmenter(
            samples, tmp_path / name, spacing_mm=8.0, patch=(16, 16, 8), iterations=3, seed=3
        )
        for name in ("a", "b")
    ]
    assert cards[0]["weights_sha256"] == cards[1]["weights_sha256"]
    # Without a validation split the uncertainty is measured on the training studies.
    quality = cards[0]["quality"]
    assert quality["measured_on"] == "training" and quality["studies"] == 1
    assert quality["uncertainty_limit"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segmenter_runs_on_cuda(trained: tuple[Path, dict[str, Any]]) -> None:
    segmenter = UNetSegmenter.from_checkpoint(trained[0], device="cuda")
    assert next(segmenter.network.parameters()).is_cuda
    sample = _sample(6)
    on_gpu = segmenter.segment(sample.arterial, sample.portal_venous)
    on_cpu = UNetSegmenter.from_checkpoint(trained[0], device="cpu").segment(
        sample.arterial, sample.portal_venous
    )
    # Mixed precision may flip a few boundary voxels, not the segmentation.
    assert dice(on_gpu.liver, on_cpu.liver) > 0.95
