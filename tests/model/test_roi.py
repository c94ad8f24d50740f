"""Specification of the fusion model's ROIs: key slice, crop, window, channels, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from model.phantom import PhantomSpec, PhantomStudy, make_study
from model.roi import (
    MIN_KEY_PIXELS,
    RoiError,
    RoiSpec,
    crop_box,
    extract_branch,
    extract_rois,
    key_slice,
    square_box,
)


@pytest.fixture(scope="module")
def study() -> PhantomStudy:
    return make_study(5, PhantomSpec(size=96, slices=24, phases=("arterial", "portal_venous")))


def test_phantom_rois_have_the_spec_shape_and_unit_range(study: PhantomStudy) -> None:
    spec = RoiSpec()
    rois = extract_rois(
        study.phases["arterial"].hu,
        study.phases["portal_venous"].hu,
        study.masks["tumor"],
        study.masks["loat"],
        study.spacing_mm,
        spec,
    )
    assert set(rois) == {"tumor", "loat"}
    for roi in rois.values():
        assert roi.shape == (6, 128, 128)
        assert roi.dtype == np.float32
        assert float(roi.min()) >= 0.0 and float(roi.max()) <= 1.0
        assert float(roi.std()) > 0.01  # an image, not a constant
    # The LOAT is fat: the centre of its ROI sits near the fat window's middle (-100 HU → 0.5).
    centre = rois["loat"][1, 60:68, 60:68].mean()
    assert 0.35 < centre < 0.65


def test_key_slice_is_the_largest_area_first_on_ties() -> None:
    mask = np.zeros((6, 10, 10), dtype=np.uint8)
    mask[1, 2:4, 2:4] = 1  # 4
    mask[3, 2:5, 2:5] = 1  # 9
    mask[4, 1:4, 1:4] = 1  # 9 (tie: the first wins)
    assert key_slice(mask) == 3
    assert key_slice(np.zeros((3, 4, 4))) == -1


def test_channels_are_phase_major_slices_around_the_key_slice() -> None:
    # Each slice holds its own index in HU (arterial) or index + 100 (portal venous), so the
    # channel values say which slice and phase they were cut from.
    shape = (8, 40, 40)
    arterial = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], shape).copy()
    portal = arterial + 100.0
    mask = np.zeros(shape, dtype=np.uint8)
    mask[5, 10:20, 12:30] = 1
    mask[4, 10:12, 12:14] = 1
    spec = RoiSpec(size=16, margin_mm=2.0, windows={"tumor": (1000.0, 0.0), "loat": (1000.0, 0.0)})
    roi = extract_branch("tumor", [arterial, portal], mask, (1.0, 1.0, 2.0), spec)
    hu = roi.mean(axis=(1, 2)) * 1000.0 - 500.0
    np.testing.assert_allclose(hu, [4, 5, 6, 104, 105, 106], atol=1e-3)


def test_the_last_slice_repeats_at_the_volume_edge() -> None:
    shape = (4, 20, 20)
    arterial = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None], shape).copy()
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3, 5:10, 5:10] = 1
    spec = RoiSpec(
        phases=("arterial",),
        size=8,
        margin_mm=0.0,
        windows={"tumor": (100.0, 0.0), "loat": (100.0, 0.0)},
    )
    roi = extract_branch("tumor", [arterial], mask, (1.0, 1.0, 1.0), spec)
    hu = roi.mean(axis=(1, 2)) * 100.0 - 50.0
    np.testing.assert_allclose(hu, [2, 3, 3], atol=1e-4)


def test_crop_box_adds_the_margin_in_mm_per_axis() -> None:
    mask = np.zeros((50, 50), dtype=bool)
    mask[20:30, 10:15] = True
    # 10 mm: 5 pixels along x (2 mm columns), 10 along y (1 mm rows).
    assert crop_box(mask, (2.0, 1.0), 10.0) == (10, 40, 5, 20)


def test_outside_the_image_is_air() -> None:
    shape = (3, 20, 20)
    arterial = np.full(shape, 50.0, dtype=np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1, 0:4, 0:4] = 1  # in the corner: the margin reaches outside
    spec = RoiSpec(size=24, margin_mm=8.0)
    roi = extract_branch("tumor", [arterial, arterial], mask, (1.0, 1.0, 1.0), spec)
    assert roi[1, 0, 0] == 0.0  # air, below the window
    assert roi[1, -1, -1] == pytest.approx((50.0 + 115.0) / 350.0, abs=1e-5)


def test_empty_or_tiny_masks_raise_roi_error_naming_the_branch(study: PhantomStudy) -> None:
    args = (study.phases["arterial"].hu, study.phases["portal_venous"].hu)
    empty = np.zeros_like(study.masks["loat"])
    with pytest.raises(RoiError, match="loat") as info:
        extract_rois(*args, study.masks["tumor"], empty, study.spacing_mm, RoiSpec())
    assert info.value.branch == "loat"
    assert isinstance(info.value, ValueError)
    tiny = np.zeros_like(study.masks["tumor"])
    tiny[10, 40, 40:42] = 1
    assert np.count_nonzero(tiny) < MIN_KEY_PIXELS
    with pytest.raises(RoiError, match="tumor") as info:
        extract_rois(*args, tiny, study.masks["loat"], study.spacing_mm, RoiSpec())
    assert info.value.branch == "tumor"


def test_spec_card_round_trip_and_refusals() -> None:
    spec = RoiSpec(size=64, margin_mm=12.5)
    assert RoiSpec.from_card(spec.to_card()) == spec
    assert spec.channels == 6
    card = spec.to_card()
    card["channels"] = 9
    with pytest.raises(ValueError, match="channels"):
        RoiSpec.from_card(card)
    with pytest.raises(ValueError, match="incomplete"):
        RoiSpec.from_card({"phases": ["arterial"]})
    with pytest.raises(ValueError):
        RoiSpec(slices=2)
    with pytest.raises(ValueError):
        RoiSpec(phases=("delayed",))


def test_square_and_fixed_crops_keep_shape_and_physical_size() -> None:
    # A 10 x 30 mm bar on 1 x 0.5 mm pixels (x, y): 10 columns by 60 rows.
    shape = (3, 200, 200)
    bar = np.zeros(shape, dtype=np.uint8)
    bar[1, 50:110, 80:90] = 1
    hu = np.where(bar > 0, 500.0, -500.0).astype(np.float32)
    windows = {"tumor": (1000.0, 0.0), "loat": (1000.0, 0.0)}

    def inside(spec: RoiSpec, mask: np.ndarray) -> tuple[int, int]:
        roi = extract_branch("tumor", [hu], mask, (1.0, 0.5, 2.0), spec)
        key = roi[1] > 0.5  # the key slice's channel
        return int(key.any(axis=1).sum()), int(key.any(axis=0).sum())  # rows, cols covered

    one = ("arterial",)
    stretched = inside(RoiSpec(phases=one, size=60, margin_mm=0.0, windows=windows), bar)
    assert stretched == (60, 60)  # the box fills the ROI: 30 mm and 10 mm both span it
    rows, cols = inside(
        RoiSpec(phases=one, size=60, margin_mm=0.0, windows=windows, crop="square"), bar
    )
    assert rows == 60 and abs(cols - 20) <= 1  # 30 mm by 10 mm stays 3 : 1
    fixed = RoiSpec(phases=one, size=60, margin_mm=0.0, windows=windows, crop="fixed", field_mm=60)
    rows, cols = inside(fixed, bar)  # 1 mm per ROI pixel
    assert abs(rows - 30) <= 1 and abs(cols - 10) <= 1
    # A bar half as long shows half as long in the fixed field (size survives); not in "square".
    short = np.zeros_like(bar)
    short[1, 65:95, 80:90] = 1
    hu[:] = np.where(short > 0, 500.0, -500.0)
    assert abs(inside(fixed, short)[0] - 15) <= 1
    assert RoiSpec.from_card(fixed.to_card()) == fixed
    legacy = fixed.to_card()
    del legacy["crop"], legacy["field_mm"]
    assert RoiSpec.from_card(legacy).crop == "box"  # cards from before the choice
    with pytest.raises(ValueError, match="crop"):
        RoiSpec(crop="circle")
    assert square_box((10, 20, 10, 40), (1.0, 1.0)) == (0, 30, 10, 40)
