"""Specification of the tumour and LOAT measurements (model/measure.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from model.measure import (
    AxialDiameter,
    Measurements,
    feret_diameter_mm,
    labelled_components,
    largest_component,
    max_axial_diameter,
    max_axial_diameter_mm,
    measure,
    sized_components,
)
from model.phantom import PhantomSpec, make_study, measure_truth

SX, SY, SZ = 0.7, 1.3, 2.5
SPACING = (SX, SY, SZ)
DIAGONAL = math.hypot(SX, SY)


def ellipse(
    shape: tuple[int, int], centre_mm: tuple[float, float], a: float, b: float, angle_deg: float
) -> npt.NDArray[np.uint8]:
    """Pixels whose centre lies in the ellipse (semi-axes a, b mm, major axis at angle_deg)."""
    j, i = np.mgrid[: shape[0], : shape[1]]
    x = i * SX - centre_mm[0]
    y = j * SY - centre_mm[1]
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    u = x * c + y * s
    v = -x * s + y * c
    return ((u / a) ** 2 + (v / b) ** 2 <= 1.0).astype(np.uint8)


def brute_force(mask2d: npt.NDArray[np.generic], sx: float, sy: float) -> float:
    """Largest distance between any two corners of any two region pixels."""
    j, i = np.nonzero(mask2d)
    corners = np.array(
        [((i + di) * sx, (j + dj) * sy) for di, dj in itertools.product((0, 1), repeat=2)]
    ).transpose(0, 2, 1)
    points = corners.reshape(-1, 2)
    if points.size == 0:
        return 0.0
    d = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((d**2).sum(axis=2)).max())


def endpoint_distance_mm(d: AxialDiameter) -> float:
    (i0, j0), (i1, j1) = d.endpoints
    return math.hypot((i1 - i0) * SX, (j1 - j0) * SY)


def test_disc_diameter_is_analytic_within_a_pixel_diagonal() -> None:
    radius = 15.0
    mask = np.zeros((3, 40, 70), dtype=np.uint8)
    mask[1] = ellipse((40, 70), (24.0, 26.0), radius, radius, 0.0)
    d = max_axial_diameter(mask, SPACING)
    assert abs(d.mm - 2 * radius) <= DIAGONAL
    assert d.slice_index == 1
    assert d.mm == pytest.approx(brute_force(mask[1], SX, SY), abs=1e-9)
    assert endpoint_distance_mm(d) == pytest.approx(d.mm)


def test_rotated_ellipse_major_axis_and_endpoints() -> None:
    a, b, angle = 20.0, 8.0, 30.0
    centre = (30.0, 33.0)
    mask = np.zeros((5, 50, 90), dtype=np.uint8)
    mask[1] = ellipse((50, 90), centre, 10.0, 6.0, angle)
    mask[3] = ellipse((50, 90), centre, a, b, angle)
    mask[4] = ellipse((50, 90), centre, 14.0, 8.0, angle)
    d = max_axial_diameter(mask, SPACING)
    assert abs(d.mm - 2 * a) <= DIAGONAL
    assert d.slice_index == 3
    assert endpoint_distance_mm(d) == pytest.approx(d.mm)
    # The endpoints are pixel corners (half-integers, voxel centres at integers) near the ends
    # of the major axis.
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    tips = [(centre[0] + a * c, centre[1] + a * s), (centre[0] - a * c, centre[1] - a * s)]
    for i, j in d.endpoints:
        assert (i - 0.5).is_integer() and (j - 0.5).is_integer()
        x, y = i * SX, j * SY
        assert min(math.hypot(x - tx, y - ty) for tx, ty in tips) <= 1.5 * DIAGONAL
    m = measure(mask, np.zeros_like(mask), SPACING)
    assert (m.max_diameter_mm, m.diameter_slice, m.diameter_endpoints) == (
        d.mm,
        d.slice_index,
        d.endpoints,
    )


def test_single_pixel_endpoints_are_its_corners() -> None:
    mask = np.zeros((2, 5, 6), dtype=np.uint8)
    mask[1, 2, 3] = 1
    d = max_axial_diameter(mask, SPACING)
    assert d.mm == pytest.approx(DIAGONAL)
    assert d.slice_index == 1
    assert sorted(d.endpoints) == [(2.5, 1.5), (3.5, 2.5)] or sorted(d.endpoints) == [
        (2.5, 2.5),
        (3.5, 1.5),
    ]


def test_diameter_matches_brute_force_on_random_masks() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        mask = rng.random((3, 9, 11)) < rng.uniform(0.02, 0.4)
        sx, sy = rng.uniform(0.3, 2.0, 2)
        expected = max(brute_force(mask[k], sx, sy) for k in range(3))
        assert max_axial_diameter_mm(mask, (sx, sy)) == pytest.approx(expected, abs=1e-9)
        assert max_axial_diameter(mask, (sx, sy, 1.0)).mm == pytest.approx(expected, abs=1e-9)
        assert max(feret_diameter_mm(mask[k], (sx, sy)) for k in range(3)) == pytest.approx(
            expected, abs=1e-9
        )


def test_components_and_largest_component() -> None:
    mask = np.zeros((6, 12, 12), dtype=np.uint8)
    mask[1:3, 1:4, 1:4] = 1  # 18 voxels
    mask[3:6, 6:10, 6:10] = 1  # 48 voxels
    biggest, count = largest_component(mask)
    assert count == 2
    assert biggest.dtype == np.uint8
    assert int(biggest.sum()) == 48 and np.all(biggest[3:6, 6:10, 6:10] == 1)
    assert measure(mask, np.zeros_like(mask), SPACING).tumor_components == 2
    # Touching at a corner only is one component under 26-connectivity.
    corner = np.zeros((4, 4, 4), dtype=np.uint8)
    corner[1, 1, 1] = corner[2, 2, 2] = 1
    assert largest_component(corner)[1] == 1
    assert measure(corner, corner, SPACING).tumor_components == 1


def test_components_are_labelled_in_the_masks_box_and_placed_back_on_the_grid() -> None:
    rng = np.random.default_rng(5)
    mask = np.zeros((20, 30, 30), dtype=bool)
    mask[4:15, 6:25, 3:22] = rng.random((11, 19, 19)) < 0.08  # many components, odd box
    parts = labelled_components(mask)
    assert parts.box is not None and parts.numbered.shape == (11, 19, 19)
    numbered, sizes = sized_components(mask)
    assert sizes == parts.sizes and len(sizes) > 5
    assert list(sizes) == sorted(sizes, reverse=True) and sum(sizes) == int(mask.sum())
    assert np.array_equal(numbered > 0, mask)
    # The same partition as 26-connected labelling of the whole grid, numbered by size.
    reference, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert count == len(sizes)
    for number, size in enumerate(sizes, start=1):
        (found,) = np.unique(reference[numbered == number])
        assert int(np.count_nonzero(reference == found)) == size
    assert np.array_equal(parts.largest(), numbered == 1)
    keep = np.zeros(len(sizes) + 1, dtype=bool)
    keep[[0, 2, 4]] = True  # 0 (outside) never selects anything
    assert np.array_equal(parts.select(keep), (numbered == 2) | (numbered == 4))
    with pytest.raises(ValueError, match="entries"):
        parts.select(keep[:-1])
    empty = labelled_components(np.zeros((3, 4, 5), dtype=bool))
    assert empty.box is None and empty.sizes == ()
    assert not empty.largest().any() and empty.largest().shape == (3, 4, 5)


def test_volumes_and_areas_are_counts_times_voxel_size() -> None:
    tumor = np.zeros((4, 10, 10), dtype=np.uint8)
    tumor[1:3, 2:5, 2:7] = 1  # 30 voxels
    loat = np.zeros_like(tumor)
    loat[0, 0:2, 0:3] = 1  # 6 pixels
    loat[2, 5:9, 5:9] = 1  # 16 pixels
    loat[3, 9, 9] = 1
    m = measure(tumor, loat, SPACING)
    voxel_ml = SX * SY * SZ / 1000.0
    assert m.tumor_volume_ml == pytest.approx(30 * voxel_ml)
    assert m.loat_found
    assert m.loat_volume_ml == pytest.approx(23 * voxel_ml)
    assert m.loat_max_area_cm2 == pytest.approx(16 * SX * SY / 100.0)
    assert m.loat_area_slice == 2
    assert m.tumor_components == 1


def test_empty_masks_give_zeros() -> None:
    empty = np.zeros((3, 8, 8), dtype=bool)
    assert measure(empty, empty, SPACING) == Measurements(
        max_diameter_mm=0.0,
        diameter_slice=-1,
        diameter_endpoints=((0.0, 0.0), (0.0, 0.0)),
        tumor_volume_ml=0.0,
        tumor_components=0,
        loat_found=False,
        loat_max_area_cm2=0.0,
        loat_area_slice=-1,
        loat_volume_ml=0.0,
    )
    assert max_axial_diameter(empty, SPACING).slice_index == -1
    component, count = largest_component(empty)
    assert count == 0 and not component.any() and component.shape == empty.shape


def test_measure_on_a_phantom_equals_its_truth() -> None:
    study = make_study(5, PhantomSpec(size=96, slices=24, phases=("arterial",)))
    m = measure(study.masks["tumor"], study.masks["loat"], study.spacing_mm)
    truth = measure_truth(study.masks, study.spacing_mm, study.truth.mvi)
    assert truth == study.truth
    assert (m.max_diameter_mm, m.tumor_volume_ml, m.loat_max_area_cm2, m.loat_volume_ml) == (
        truth.max_diameter_mm,
        truth.tumor_volume_ml,
        truth.loat_max_area_cm2,
        truth.loat_volume_ml,
    )
    assert m.max_diameter_mm > 0.0 and m.loat_found


def test_invalid_inputs_raise() -> None:
    mask = np.zeros((2, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        measure(mask, np.zeros((2, 4, 5), dtype=np.uint8), SPACING)
    with pytest.raises(ValueError, match="3-D"):
        measure(mask[0], mask[0], SPACING)
    with pytest.raises(ValueError, match="spacing_mm"):
        measure(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        max_axial_diameter(mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing_xy"):
        feret_diameter_mm(mask[0], (1.0, -1.0))
    with pytest.raises(ValueError, match="3-D"):
        largest_component(mask[0])
