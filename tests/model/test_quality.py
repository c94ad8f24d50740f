"""model.quality: the figures the quality gates judge."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from model.quality import (
    _block_mean,
    geometry,
    liver_contact,
    liver_cut_fraction,
    mean_hu,
    median_distance_mm,
    residual_shift_mm,
    roi_outside_fraction,
)


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float):
    k, j, i = np.indices(shape)
    return ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2).astype(
        np.uint8
    )


def test_geometry_counts_slices_and_measures_tilt_from_axial() -> None:
    axial = sitk.Image(32, 32, 12, sitk.sitkFloat32)
    assert geometry(axial) == (12, 0.0)
    sagittal = sitk.Image(32, 32, 40, sitk.sitkFloat32)
    # Rows along y, columns along z, slices stacked along x: a sagittal reconstruction.
    sagittal.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    assert geometry(sagittal).tilt_deg == pytest.approx(90.0)


def test_mean_hu_is_none_for_an_empty_mask() -> None:
    volume = np.arange(27, dtype=float).reshape(3, 3, 3)
    mask = np.zeros((3, 3, 3), np.uint8)
    assert mean_hu([volume], mask) == (None,)
    mask[1, 1, 1] = 1
    mask[2, 2, 2] = 1
    assert mean_hu([volume, -volume], mask) == pytest.approx(((13 + 26) / 2, -(13 + 26) / 2))


def test_a_liver_inside_the_scan_is_not_cut_and_one_ending_at_the_top_slice_is() -> None:
    whole = _ball((30, 40, 40), (15, 20, 20), 10)
    assert liver_cut_fraction(whole) == 0.0
    cut = whole[10:]  # the scan starts inside the liver: slice 0 crosses it near its middle
    assert liver_cut_fraction(cut) > 0.7


@pytest.mark.parametrize(
    "face",
    [
        (slice(None, 20), slice(None), slice(None)),  # the scan ends inside the liver
        (slice(None), slice(18, None), slice(None)),  # the first row
        (slice(None), slice(None, 24), slice(None)),  # the last row
        (slice(None), slice(None), slice(15, None)),  # the first column
        (slice(None), slice(None), slice(None, 26)),  # the last column
    ],
)
def test_a_liver_cut_at_any_face_of_the_volume_counts_and_a_stray_speck_there_does_not(
    face: tuple[slice, slice, slice],
) -> None:
    whole = _ball((30, 40, 40), (15, 20, 20), 10)
    whole[0, 0, 0] = whole[-1, -1, -1] = 1  # specks a segmenter left in the corners
    assert liver_cut_fraction(whole) == 0.0
    assert liver_cut_fraction(whole[face]) > 0.2


def test_a_tumor_inside_the_liver_touches_liver_and_one_outside_does_not() -> None:
    liver = _ball((30, 60, 60), (15, 30, 30), 12)
    inside = _ball((30, 60, 60), (15, 30, 30), 4)
    outside = _ball((30, 60, 60), (15, 30, 52), 4)
    assert liver_contact(inside, liver | inside) == 1.0
    assert liver_contact(outside, liver | outside) == 0.0
    assert liver_contact(np.zeros_like(liver), liver) is None


def test_median_distance_is_measured_in_millimetres() -> None:
    target = np.zeros((5, 5, 40), np.uint8)
    target[:, :, 0] = 1
    source = np.zeros_like(target)
    source[2, 2, 10] = 1
    assert median_distance_mm(source, target, (2.0, 1.0, 1.0)) == pytest.approx(20.0)
    assert median_distance_mm(source, np.zeros_like(target), (1.0, 1.0, 1.0)) is None


def test_a_median_within_reach_is_measured_around_the_source_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from model import quality

    maps: list[tuple[int, ...]] = []
    distances = quality._distances_mm

    def counted(source: np.ndarray, target: np.ndarray, spacing: object) -> np.ndarray:
        maps.append(source.shape)
        return distances(source, target, spacing)  # type: ignore[arg-type]

    monkeypatch.setattr(quality, "_distances_mm", counted)
    rng = np.random.default_rng(3)
    target = _ball((40, 50, 50), (20, 25, 10), 6)
    # (source centre, reach, distance maps): within reach, around the source alone; no target
    # near, the box of both at once; a target near but the median beyond, both; all in reach.
    cases = (
        ((20, 25, 22), 8.0, 1),
        ((20, 25, 44), 8.0, 1),
        ((20, 25, 30), 10.0, 2),
        ((20, 25, 30), 30.0, 1),
    )
    for centre, reach, count in cases:
        source = _ball((40, 50, 50), centre, 3) & (rng.random((40, 50, 50)) < 0.7)
        whole = median_distance_mm(source, target, (0.8, 0.9, 1.5))
        maps.clear()
        assert median_distance_mm(source, target, (0.8, 0.9, 1.5), reach) == whole
        assert len(maps) == count, (centre, reach, maps)
    assert whole is not None and whole > 0
    # An even count with one middle value in reach and one beyond: the median is not known
    # from the source's box alone.
    line = np.zeros((1, 1, 40), np.uint8)
    line[0, 0, 0] = 1
    two = np.zeros_like(line)
    two[0, 0, [5, 15]] = 1  # 5 and 15 mm from the target
    maps.clear()
    assert median_distance_mm(two, line, (1.0, 1.0, 1.0), 10.0) == 10.0  # (5 + 15) / 2
    assert len(maps) == 2


def _textured(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.standard_normal(shape).astype(np.float32))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 2.0))
    return (smooth / smooth.std() * 80.0 + 60.0).astype(np.float32)


def test_residual_shift_is_zero_for_aligned_phases_and_finds_a_left_over_shift() -> None:
    fixed = _textured((40, 64, 64))
    region = np.zeros(fixed.shape, np.uint8)
    region[12:28, 20:44, 20:44] = 1
    spacing = (1.5, 1.5, 2.5)  # x, y, z
    aligned = residual_shift_mm(fixed, fixed * 1.3 + 20.0, region, spacing)
    assert aligned is not None
    assert np.linalg.norm(aligned) < 0.5
    moved = np.roll(fixed, 4, axis=2)  # 4 columns = 6 mm along x
    shift = residual_shift_mm(fixed, moved, region, spacing)
    assert shift is not None
    assert abs(shift[0]) == pytest.approx(6.0, abs=0.8)
    assert abs(shift[1]) < 0.8 and abs(shift[2]) < 0.8


@pytest.mark.parametrize("steps", [(1, 1, 1), (2, 3, 3), (1, 2, 4), (3, 1, 2)])
def test_the_coarser_grid_averages_whole_blocks_and_drops_the_rest(
    steps: tuple[int, int, int],
) -> None:
    volume = np.random.default_rng(4).normal(size=(13, 17, 22)).astype(np.float32)
    k, j, i = (n // s * s for n, s in zip(volume.shape, steps, strict=True))
    blocks = volume[:k, :j, :i].reshape(
        k // steps[0], steps[0], j // steps[1], steps[1], -1, steps[2]
    )
    coarse = _block_mean(volume, steps)
    assert coarse.dtype == np.float32
    np.testing.assert_allclose(coarse, blocks.mean(axis=(1, 3, 5)), rtol=1e-5, atol=1e-6)


def test_residual_shift_of_a_fine_grid_is_measured_on_a_coarser_one() -> None:
    # 0.7 mm in-plane, as a 512 x 512 study: averaged to about 2 mm before the search.
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.standard_normal((24, 120, 120)).astype(np.float32))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 5.0))
    fixed = (smooth / smooth.std() * 80.0 + 60.0).astype(np.float32)
    region = np.zeros(fixed.shape, np.uint8)
    region[8:16, 40:80, 40:80] = 1
    spacing = (0.7, 0.7, 2.5)
    aligned = residual_shift_mm(fixed, fixed, region, spacing)
    assert aligned is not None and np.linalg.norm(aligned) < 0.5
    moved = np.roll(fixed, 6, axis=2)  # 6 columns = 4.2 mm along x, near the 5 mm limit
    shift = residual_shift_mm(fixed, moved, region, spacing)
    assert shift is not None
    assert abs(shift[0]) == pytest.approx(4.2, abs=0.8)
    assert abs(shift[1]) < 1.0 and abs(shift[2]) < 1.0


def test_roi_outside_fraction_grows_as_the_mask_nears_the_edge() -> None:
    central = np.zeros((9, 64, 64), np.uint8)
    central[4, 28:36, 28:36] = 1
    assert roi_outside_fraction(central, (1.0, 1.0, 1.0), 10.0, 3) == 0.0
    edge = np.zeros_like(central)
    edge[0, 0:8, 28:36] = 1  # first slice, top rows: crop reaches above and below the volume
    fraction = roi_outside_fraction(edge, (1.0, 1.0, 1.0), 10.0, 3)
    assert fraction is not None and fraction > 0.4
    assert roi_outside_fraction(np.zeros_like(central), (1.0, 1.0, 1.0), 10.0, 3) is None
