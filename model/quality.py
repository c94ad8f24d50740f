"""The figures the node's quality gates judge: geometry, registration residual, masks, HU.

Each function measures one thing on arrays or images the pipeline already has and returns a
number (or a small named tuple); the limits and the verdicts live with the gates
(:mod:`node.analysis.gates`), so a site can change a limit without touching a measurement.
Arrays are ``[k, j, i]`` on the arterial grid; spacings are ``(x, y, z)`` mm.

Nothing here imports :mod:`node` or reads settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

__all__ = [
    "Geometry",
    "geometry",
    "liver_contact",
    "liver_cut_fraction",
    "mean_hu",
    "median_distance_mm",
    "residual_shift_mm",
    "roi_outside_fraction",
]

# Gradients below this (HU/mm) are noise: they would dominate the residual's correlation.
_GRADIENT_FLOOR = 5.0
# Context around the region where the residual shift is measured.
_RESIDUAL_MARGIN_MM = 10.0


class Geometry(NamedTuple):
    """How a series is sampled: its slice count and the tilt of its slices."""

    slices: int
    tilt_deg: float
    """Angle between the slice normal and the patient's head-feet axis (0: axial)."""


def geometry(image: sitk.Image) -> Geometry:
    """The slice count and the tilt of the slice normal from the patient axis S."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    normal = direction[:, 2]
    cosine = abs(float(normal[2])) / max(float(np.linalg.norm(normal)), 1e-12)
    tilt = math.degrees(math.acos(min(1.0, cosine)))
    return Geometry(slices=int(image.GetSize()[2]), tilt_deg=round(tilt, 1))


def mean_hu(
    volumes: Sequence[npt.NDArray[Any]], mask: npt.NDArray[Any]
) -> tuple[float | None, ...]:
    """Mean of each of ``volumes`` (one grid) inside ``mask``; ``None`` for an empty mask."""
    inside = np.asarray(mask) > 0
    if not inside.any():
        return (None,) * len(volumes)
    # Inside the mask's box, found once for every volume: the whole grid of a 512 x 512 x 200
    # study cost 0.5 s a call. Summed in float64 without a float64 copy of the box.
    box = _box(inside, (0, 0, 0))
    within = inside[box]
    return tuple(float(np.asarray(v)[box][within].mean(dtype=np.float64)) for v in volumes)


def liver_cut_fraction(liver: npt.NDArray[Any]) -> float:
    """How much of the liver the field of view cuts off: 0 for a liver seen whole.

    The largest cross-section of the liver's largest component lying on the volume's border
    (its first or last slice, or the first or last row or column of all slices), relative to
    its largest axial cross-section. A liver that ends inside the scanned range has none on the
    border; the phantoms' livers give 0 to 0.15, one cut at 40 % of its height 1.
    """
    from model.measure import labelled_components

    # The largest component only: stray liver voxels a segmenter leaves at the edge of the
    # scan are not the liver being cut. Measured inside the component's box: a side of the
    # box that is not the volume's border has no liver on the border.
    parts = labelled_components(np.asarray(liver) > 0)
    if parts.box is None or not parts.sizes:
        return 0.0
    mask = parts.numbered == 1
    areas = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    largest = int(areas.max())
    on_border = 0
    for axis, (span, size) in enumerate(zip(parts.box, parts.shape, strict=True)):
        for touches, index in ((span.start == 0, 0), (span.stop == size, -1)):
            if touches:
                face = np.take(mask, index, axis=axis)
                on_border = max(on_border, int(np.count_nonzero(face)))
    return round(on_border / largest, 3)


def _box(mask: npt.NDArray[np.bool_], margin: Sequence[int]) -> tuple[slice, slice, slice]:
    """The mask's box grown by ``margin`` voxels per axis, inside the grid (mask not empty)."""
    from model.measure import mask_box

    tight = mask_box(mask)
    if tight is None or len(tight) != 3:
        raise ValueError("a box needs a non-empty 3-D mask")
    z, y, x = (
        slice(max(s.start - m, 0), min(s.stop + m, n))
        for s, m, n in zip(tight, margin, mask.shape, strict=True)
    )
    return z, y, x


def liver_contact(tumor: npt.NDArray[Any], liver: npt.NDArray[Any]) -> float | None:
    """Fraction of the tumor's outer surface that touches liver parenchyma.

    The voxels face-adjacent to the tumor and outside it are counted; the share of them that
    are liver (and not tumor) is returned. A hepatic tumor is wrapped in liver (near 1; an
    exophytic one less); a "tumor" the segmenter put into the stomach or the bowel touches no
    liver (near 0). ``None`` without tumor.
    """
    t = np.asarray(tumor) > 0
    if not t.any():
        return None
    box = _box(t, (1, 1, 1))
    t = np.pad(t[box], 1)
    parenchyma = np.pad((np.asarray(liver) > 0)[box], 1) & ~t
    shell = np.zeros_like(t)
    for axis in range(3):
        for step in (1, -1):
            shell |= np.roll(t, step, axis=axis)
    shell &= ~t
    total = int(np.count_nonzero(shell))
    return round(int(np.count_nonzero(shell & parenchyma)) / total, 3) if total else None


def median_distance_mm(
    source: npt.NDArray[Any],
    target: npt.NDArray[Any],
    spacing_mm: Sequence[float],
    exact_within_mm: float | None = None,
) -> float | None:
    """Median distance (mm) from the voxels of ``source`` to the nearest voxel of ``target``.

    ``None`` when either mask is empty. With ``exact_within_mm`` the distance map is first made
    only around ``source`` (its box grown by that distance): a target voxel outside that box is
    farther from every source voxel, so a median found within the distance is the median; a
    larger one is measured again on the box of both masks.
    """
    s = np.asarray(source) > 0
    t = np.asarray(target) > 0
    if not s.any() or not t.any():
        return None
    if exact_within_mm is not None:
        steps = np.asarray([float(v) for v in spacing_mm], dtype=np.float64)[::-1]
        margin = [int(m) for m in np.ceil(float(exact_within_mm) / steps)]
        near = _box(s, margin)
        if t[near].any():
            values = _distances_mm(s[near], t[near], spacing_mm)
            # The middle value(s) must be within reach: the larger ones may be overestimates.
            if np.count_nonzero(values <= exact_within_mm) > values.size // 2:
                return round(float(np.median(values)), 2)
    # Within the box of both masks: every target voxel is in it, so the nearest one to a source
    # voxel is too, and the distance map of a 512 x 512 x 200 grid is not paid for.
    box = _box(s | t, (0, 0, 0))
    return round(float(np.median(_distances_mm(s[box], t[box], spacing_mm))), 2)


def _distances_mm(
    source: npt.NDArray[np.bool_], target: npt.NDArray[np.bool_], spacing_mm: Sequence[float]
) -> npt.NDArray[np.float32]:
    """The distance (mm, 0 inside) from each ``source`` voxel to the nearest ``target`` voxel."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(target).view(np.uint8))
    image.SetSpacing(tuple(float(v) for v in spacing_mm))
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return np.clip(sitk.GetArrayViewFromImage(distance)[source], 0.0, None)


def _gradient(volume: npt.NDArray[Any], spacing_kji: Sequence[float]) -> npt.NDArray[np.float32]:
    parts = np.gradient(np.asarray(volume, dtype=np.float32), *spacing_kji)
    magnitude = np.sqrt(sum(p * p for p in parts)).astype(np.float32)
    magnitude[magnitude < _GRADIENT_FLOOR] = 0.0
    return magnitude


#: The grid spacing (mm) the residual shift is measured on.
RESIDUAL_GRID_MM = 2.0


def _block_mean(volume: npt.NDArray[Any], steps: Sequence[int]) -> npt.NDArray[np.float32]:
    """``volume`` averaged over blocks of ``steps`` voxels per axis (the rest cut off)."""
    array = np.asarray(volume)
    if all(step == 1 for step in steps):
        return np.asarray(array, dtype=np.float32)
    ends = [size // step * step for size, step in zip(array.shape, steps, strict=True)]
    total: npt.NDArray[np.float32] = np.asarray(
        array[: ends[0], : ends[1], : ends[2]], dtype=np.float32
    )
    # Summed one axis at a time over strided views, the axis of most steps first: numpy's
    # reduction over the interleaved axes of a reshaped block cost 0.09 s a phase on a liver's
    # box at 0.74 mm, this a third of it.
    for axis in sorted(range(3), key=lambda a: -steps[a]):
        step = steps[axis]
        if step == 1:
            continue
        picks = [(slice(None),) * axis + (slice(o, None, step),) for o in range(step)]
        part = total[picks[0]].copy()
        for pick in picks[1:]:
            part += total[pick]
        total = part
    total /= np.float32(math.prod(steps))
    return total


class _Reference(NamedTuple):
    """The fixed window of a normalised cross-correlation, centred once for every trial."""

    centred: npt.NDArray[np.float64]
    norm: float

    @classmethod
    def of(cls, a: npt.NDArray[Any]) -> _Reference:
        centred = np.asarray(a, dtype=np.float64)
        centred = centred - centred.mean()
        return cls(centred, float(np.vdot(centred, centred)))

    def ncc(self, b: npt.NDArray[np.float64]) -> float:
        """Normalised cross-correlation with a window ``b`` of the reference's shape.

        Σ(a − ā)(b − b̄) = Σ(a − ā)·b, since the centred reference sums to zero: ``b`` is
        not centred, only its sum and sum of squares are taken (its one contiguous copy feeds
        the three dot products).
        """
        flat = np.ascontiguousarray(b).ravel()
        total = float(flat.sum())
        spread = float(np.dot(flat, flat)) - total * total / flat.size
        denominator = math.sqrt(self.norm * spread) if self.norm > 0 and spread > 0 else 0.0
        if denominator <= 0:
            return 0.0
        return float(np.dot(self.centred.ravel(), flat)) / denominator


def residual_shift_mm(
    fixed: npt.NDArray[Any],
    moving_on_fixed: npt.NDArray[Any],
    region: npt.NDArray[Any],
    spacing_mm: Sequence[float],
    search_mm: float = 15.0,
) -> tuple[float, float, float] | None:
    """The misalignment left after registration, ``(x, y, z)`` mm, measured around ``region``.

    Edges (gradient magnitude) of the two phases are compared, because enhancement differs
    between phases while organ borders stay: along each axis in turn, the moving volume is
    shifted by whole voxels up to ``search_mm`` and the shift of best normalised correlation
    with the fixed volume is kept, refined to a fraction of a voxel by a parabola. A good
    registration leaves about zero; a liver left a centimetre off shows as ten millimetres.
    ``None`` when the region is empty.
    """
    mask = np.asarray(region) > 0
    if not mask.any():
        return None
    sx, sy, sz = (float(v) for v in spacing_mm)
    spacing_kji = (sz, sy, sx)
    reach = [max(1, math.ceil(search_mm / s)) for s in spacing_kji]
    margin = [math.ceil(_RESIDUAL_MARGIN_MM / s) for s in spacing_kji]
    box = _box(mask, [m + r for m, r in zip(margin, reach, strict=True)])
    # Measured on a grid of about RESIDUAL_GRID_MM (blocks of voxels averaged): at 0.7 mm a
    # 512 x 512 x 200 study took 22 s of searching, for a limit of millimetres.
    steps = [max(1, round(RESIDUAL_GRID_MM / s)) for s in spacing_kji]
    spacing_kji = (sz * steps[0], sy * steps[1], sx * steps[2])
    reach = [max(1, math.ceil(search_mm / s)) for s in spacing_kji]
    fixed_edges = _gradient(_block_mean(np.asarray(fixed)[box], steps), spacing_kji)
    moving_edges = _gradient(_block_mean(np.asarray(moving_on_fixed)[box], steps), spacing_kji)
    moving = moving_edges.astype(np.float64)
    shape = fixed_edges.shape
    # The compared window leaves the search reach out on every side, so every shift sees voxels.
    r = [min(reach[a], max((shape[a] - 1) // 3, 0)) for a in range(3)]
    reference = _Reference.of(fixed_edges[tuple(slice(r[a], shape[a] - r[a]) for a in range(3))])

    def score(offset: Sequence[int]) -> float:
        window = tuple(slice(r[a] + offset[a], shape[a] - r[a] + offset[a]) for a in range(3))
        return reference.ncc(moving[window])

    # Coordinate descent, twice round the axes: a shift along one axis would mislead a search
    # along another made on its own.
    offset = [0, 0, 0]
    for _ in range(2):
        for axis in range(3):
            if r[axis] == 0:
                continue
            scores = []
            for step in range(-r[axis], r[axis] + 1):
                trial = list(offset)
                trial[axis] = step
                scores.append(score(trial))
            offset[axis] = int(np.argmax(scores)) - r[axis]
    shift: list[float] = []
    for axis in range(3):
        value = float(offset[axis])
        if -r[axis] < offset[axis] < r[axis]:
            around = []
            for step in (-1, 0, 1):
                trial = list(offset)
                trial[axis] += step
                around.append(score(trial))
            left, centre, right = around
            curvature = left - 2.0 * centre + right
            if curvature < 0:
                value += 0.5 * (left - right) / curvature
        shift.append(value * spacing_kji[axis])
    z, y, x = shift
    return round(x, 2), round(y, 2), round(z, 2)


def roi_outside_fraction(
    mask: npt.NDArray[Any], spacing_mm: Sequence[float], margin_mm: float, slices: int
) -> float | None:
    """Share of a branch's ROI (:func:`model.roi.extract_branch`) that falls outside the volume.

    The in-plane crop box around the mask's key slice (plus the margin) and the ``slices``
    slices around it: the fraction of that block lying beyond the image (filled with air or
    repeated edge slices by the cut). ``None`` for an empty mask.
    """
    from model.roi import crop_box, key_slice

    array = np.asarray(mask)
    k = key_slice(array)
    if k < 0:
        return None
    r0, r1, c0, c1 = crop_box(array[k] != 0, spacing_mm[:2], margin_mm)
    _, rows, cols = array.shape
    inside_rows = max(0, min(r1, rows) - max(r0, 0))
    inside_cols = max(0, min(c1, cols) - max(c0, 0))
    half = slices // 2
    inside_slices = sum(1 for d in range(-half, half + 1) if 0 <= k + d < array.shape[0])
    total = (r1 - r0) * (c1 - c0) * (2 * half + 1)
    inside = inside_rows * inside_cols * inside_slices
    return round(1.0 - inside / total, 3) if total else None
