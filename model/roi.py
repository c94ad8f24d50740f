"""Regions of interest fed to the fusion model's two branches (tumour and LOAT).

For each branch the key axial slice is the one where the branch's mask has the largest area;
that slice and its neighbours (``RoiSpec.slices`` in all, centred on it), from each phase, are
stacked as channels: ``[phase 0 slice k-1, phase 0 slice k, phase 0 slice k+1, phase 1 …]``.
Every channel is cropped to the mask's bounding box on the key slice plus a margin in mm (the
same box on every channel), resized to ``size × size``, windowed (a liver window for the tumour,
a fat window for the LOAT) and scaled to ``[0, 1]``.

Training and inference both call :func:`extract_rois` with the :class:`RoiSpec` stored in the
model card (:meth:`RoiSpec.to_card` / :meth:`RoiSpec.from_card`), so the two cannot drift.

The portal-venous volume must already be registered and resampled onto the arterial grid
(:mod:`model.registration`); masks are on the arterial grid. Arrays are indexed ``[k, j, i]``
and spacing is ``(x, y, z)`` mm, as everywhere in :mod:`model`. Nothing here imports
:mod:`node` or reads settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

__all__ = [
    "BRANCHES",
    "CROPS",
    "DEFAULT_WINDOWS",
    "MIN_KEY_PIXELS",
    "PHASES",
    "RoiError",
    "RoiSpec",
    "crop_box",
    "extract_branch",
    "extract_rois",
    "key_slice",
    "square_box",
]

#: The branches, in the order the fusion network concatenates their features.
BRANCHES: tuple[str, ...] = ("tumor", "loat")

#: The phases an ROI can be cut from (the arterial grid is the reference of both).
PHASES: tuple[str, ...] = ("arterial", "portal_venous")

#: How an ROI is cut around its mask (:class:`RoiSpec` ``crop``).
CROPS: tuple[str, ...] = ("box", "square", "fixed")

#: ``(width, level)`` HU per branch: a liver window shows enhancement differences of the tumour
#: and its rim; a fat window keeps the LOAT apart from the stomach wall and the liver.
DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {"tumor": (350.0, 60.0), "loat": (400.0, -100.0)}

#: Fewest mask pixels on the key slice: below this the box is a few pixels of noise, and an ROI
#: cut around it would show nothing the model learnt from.
MIN_KEY_PIXELS = 4

# Outside the image: air, as SimpleITK resampling in model.registration fills it.
_AIR_HU = -1024.0

_FloatArray = npt.NDArray[np.float32]


class RoiError(ValueError):
    """A branch's mask is missing or too small to cut an ROI from.

    Attributes
    ----------
    branch
        ``"tumor"`` or ``"loat"``: the pipeline maps a tumour failure to ``no_tumor`` and a LOAT
        failure to a missing-LOAT flag.
    """

    def __init__(self, branch: str, message: str) -> None:
        super().__init__(f"{branch}: {message}")
        self.branch = branch


@dataclass(frozen=True)
class RoiSpec:
    """How ROIs are cut; stored in the model card as ``input``.

    Parameters
    ----------
    phases
        Phases stacked as channels, in order (a subset of :data:`PHASES`).
    slices
        Axial slices per phase, centred on the key slice (odd).
    size
        Rows and columns of each channel after resizing.
    margin_mm
        Context added around the mask's bounding box on each side, in mm.
    windows
        ``{branch: (width, level)}`` HU; the window ``[level - width/2, level + width/2]`` maps
        to ``[0, 1]``.
    crop
        ``"box"``: the mask's bounding box plus the margin, resized to ``size²`` (stretches a
        long tumour; the first models' crop). ``"square"``: the box's longer side plus the margin
        as a square in mm, so the shape keeps its aspect (its size does not survive the
        resizing). ``"fixed"``: a square of ``field_mm`` centred on the box, so shape and
        physical size both survive (a mask larger than the field is cut at its edges).
    field_mm
        Side of the ``"fixed"`` square, mm.
    """

    phases: tuple[str, ...] = PHASES
    slices: int = 3
    size: int = 128
    margin_mm: float = 10.0
    windows: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: dict(DEFAULT_WINDOWS)
    )
    crop: str = "box"
    field_mm: float = 100.0

    def __post_init__(self) -> None:
        phases = tuple(self.phases)
        if not phases or len(set(phases)) != len(phases) or any(p not in PHASES for p in phases):
            raise ValueError(f"phases must be distinct names from {PHASES}, got {self.phases!r}")
        if isinstance(self.slices, bool) or not isinstance(self.slices, int):
            raise ValueError(f"slices must be an integer, got {self.slices!r}")
        if self.slices < 1 or self.slices % 2 == 0:
            raise ValueError(f"slices must be a positive odd number, got {self.slices}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"size must be an integer >= 8, got {self.size!r}")
        if not (math.isfinite(self.margin_mm) and self.margin_mm >= 0.0):
            raise ValueError(f"margin_mm must be finite and >= 0, got {self.margin_mm}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if not (math.isfinite(self.field_mm) and self.field_mm > 0.0):
            raise ValueError(f"field_mm must be positive, got {self.field_mm}")
        windows: dict[str, tuple[float, float]] = {}
        for branch in BRANCHES:
            if branch not in self.windows:
                raise ValueError(f"windows lacks the branch {branch!r}")
            width, level = (float(v) for v in self.windows[branch])
            if not (math.isfinite(width) and width > 0.0 and math.isfinite(level)):
                raise ValueError(f"window of {branch} must have a positive width, got {width}")
            windows[branch] = (width, level)
        # Frozen: normalise through object.__setattr__ so equal specs compare equal.
        object.__setattr__(self, "phases", phases)
        object.__setattr__(self, "windows", windows)

    @property
    def channels(self) -> int:
        """Channels of each branch's ROI: phases × slices."""
        return len(self.phases) * self.slices

    def window_range(self, branch: str) -> tuple[float, float]:
        """``(low, high)`` HU of a branch's window."""
        width, level = self.windows[branch]
        return level - width / 2.0, level + width / 2.0

    def to_card(self) -> dict[str, Any]:
        """JSON-ready description (the model card's ``input`` entry)."""
        return {
            "phases": list(self.phases),
            "slices": self.slices,
            "size": self.size,
            "margin_mm": self.margin_mm,
            "windows": {b: {"width": w, "level": lv} for b, (w, lv) in self.windows.items()},
            "channels": self.channels,
            "channel_order": "phase-major, slices inferior to superior",
            "crop": self.crop,
            "field_mm": self.field_mm,
        }

    @classmethod
    def from_card(cls, entry: Mapping[str, Any]) -> RoiSpec:
        """Rebuild a spec from :meth:`to_card`'s output.

        Raises
        ------
        ValueError
            When the entry is incomplete or describes an ROI this code cannot cut (including a
            ``channels`` value that disagrees with phases × slices).
        """
        try:
            windows = {
                str(b): (float(w["width"]), float(w["level"]))
                for b, w in dict(entry["windows"]).items()
            }
            spec = cls(
                phases=tuple(str(p) for p in entry["phases"]),
                slices=int(entry["slices"]),
                size=int(entry["size"]),
                margin_mm=float(entry["margin_mm"]),
                windows=windows,
                # Cards from before the crop choice cut the bounding box.
                crop=str(entry.get("crop", "box")),
                field_mm=float(entry.get("field_mm", 100.0)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"ROI input spec is incomplete: {exc!r}") from exc
        channels = entry.get("channels", spec.channels)
        if channels != spec.channels:
            raise ValueError(
                f"ROI input spec says {channels} channels but phases × slices = {spec.channels}"
            )
        return spec


def key_slice(mask: npt.ArrayLike) -> int:
    """Index ``k`` of the axial slice with the largest mask area (the first on ties); -1 if empty.

    The first-on-ties rule is :func:`model.measure.measure`'s for ``loat_area_slice``.
    """
    array = np.asarray(mask)
    if array.ndim != 3:
        raise ValueError(f"mask must be 3-D, got shape {array.shape}")
    per_slice = np.count_nonzero(array.reshape(array.shape[0], -1), axis=1)
    if not per_slice.any():
        return -1
    return int(np.argmax(per_slice))


def crop_box(
    mask2d: npt.ArrayLike, spacing_xy: Sequence[float], margin_mm: float
) -> tuple[int, int, int, int]:
    """Bounding box of a 2-D mask plus a margin: ``(row0, row1, col0, col1)``, end exclusive.

    The margin is converted to pixels per axis (rounded up), so anisotropic pixels keep the same
    physical context on both axes. The box may reach outside the image.
    """
    array = np.asarray(mask2d) != 0
    rows = np.flatnonzero(array.any(axis=1))
    cols = np.flatnonzero(array.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask: no bounding box")
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    # The epsilon keeps an exact multiple of the spacing from gaining a pixel through rounding.
    mi = math.ceil(margin_mm / sx - 1e-9)
    mj = math.ceil(margin_mm / sy - 1e-9)
    return int(rows[0]) - mj, int(rows[-1]) + 1 + mj, int(cols[0]) - mi, int(cols[-1]) + 1 + mi


def square_box(
    box: tuple[int, int, int, int], spacing_xy: Sequence[float], side_mm: float | None = None
) -> tuple[int, int, int, int]:
    """A box made square in mm around the centre of ``box``: its longer side, or ``side_mm``.

    Pixels may be anisotropic: the half-side is converted per axis, so that the resized ROI is
    square in millimetres, not in pixels.
    """
    r0, r1, c0, c1 = box
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    side = side_mm if side_mm is not None else max((r1 - r0) * sy, (c1 - c0) * sx)
    rows = max(1, round(side / sy))
    cols = max(1, round(side / sx))
    # Integer centre (floor of the midpoint): the same box on every platform.
    top = (r0 + r1 - rows) // 2
    left = (c0 + c1 - cols) // 2
    return top, top + rows, left, left + cols


def _cut(
    volume: npt.NDArray[Any], ks: Sequence[int], box: tuple[int, int, int, int]
) -> _FloatArray:
    """``volume[ks, r0:r1, c0:c1]`` as float32, air outside the image."""
    r0, r1, c0, c1 = box
    _, rows, cols = volume.shape
    out = np.full((len(ks), r1 - r0, c1 - c0), _AIR_HU, dtype=np.float32)
    sr0, sr1 = max(r0, 0), min(r1, rows)
    sc0, sc1 = max(c0, 0), min(c1, cols)
    if sr0 < sr1 and sc0 < sc1:
        out[:, sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = volume[list(ks), sr0:sr1, sc0:sc1]
    return out


def _resize(stack: _FloatArray, size: int) -> _FloatArray:
    tensor = torch.from_numpy(np.ascontiguousarray(stack))[None]
    # Antialiasing matters when a large tumour's box is shrunk: without it, noise aliases.
    resized = F.interpolate(
        tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].numpy()


def extract_branch(
    branch: str,
    phases_hu: Sequence[npt.NDArray[Any]],
    mask: npt.ArrayLike,
    spacing_mm: Sequence[float],
    spec: RoiSpec,
) -> _FloatArray:
    """One branch's ROI: float32 ``(phases × slices, size, size)`` in ``[0, 1]``.

    Parameters
    ----------
    branch
        ``"tumor"`` or ``"loat"`` (selects the window; named in errors).
    phases_hu
        HU volumes in ``spec.phases`` order, all on the mask's grid.
    mask
        ``[k, j, i]`` mask, nonzero inside.
    spacing_mm
        ``(x, y, z)`` voxel spacing.
    spec
        The ROI spec.

    Raises
    ------
    RoiError
        When the mask is empty or has fewer than :data:`MIN_KEY_PIXELS` pixels on its key slice.
    ValueError
        When shapes disagree or the branch is unknown.
    """
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; expected one of {BRANCHES}")
    array = np.asarray(mask)
    if len(phases_hu) != len(spec.phases):
        raise ValueError(f"{len(phases_hu)} volumes given for the phases {spec.phases}")
    for volume in phases_hu:
        if np.shape(volume) != array.shape or array.ndim != 3:
            raise ValueError(
                f"{branch}: volumes {np.shape(volume)} and mask {array.shape} must be 3-D and equal"
            )
    if len(spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
    k = key_slice(array)
    if k < 0:
        raise RoiError(branch, "the mask is empty")
    on_key = array[k] != 0
    count = int(np.count_nonzero(on_key))
    if count < MIN_KEY_PIXELS:
        raise RoiError(
            branch, f"only {count} mask pixel(s) on the key slice (at least {MIN_KEY_PIXELS})"
        )
    box = crop_box(on_key, spacing_mm[:2], spec.margin_mm)
    if spec.crop != "box":
        box = square_box(box, spacing_mm[:2], spec.field_mm if spec.crop == "fixed" else None)
    half = spec.slices // 2
    # Clamped at the volume's ends: the edge slice repeats rather than inventing anatomy.
    ks = [min(max(k + d, 0), array.shape[0] - 1) for d in range(-half, half + 1)]
    stack = np.concatenate([_cut(np.asarray(v), ks, box) for v in phases_hu])
    resized = _resize(stack, spec.size)
    low, high = spec.window_range(branch)
    scaled = (resized - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled).astype(np.float32, copy=False)


def extract_rois(
    arterial_hu: npt.NDArray[Any],
    pv_on_arterial_hu: npt.NDArray[Any],
    tumor_mask: npt.ArrayLike,
    loat_mask: npt.ArrayLike,
    spacing_mm: Sequence[float],
    spec: RoiSpec,
) -> dict[str, _FloatArray]:
    """Both branches' ROIs (see :func:`extract_branch`).

    Parameters
    ----------
    arterial_hu
        Arterial HU ``[k, j, i]``.
    pv_on_arterial_hu
        Portal-venous HU registered and resampled onto the arterial grid.
    tumor_mask, loat_mask
        Masks on the arterial grid.
    spacing_mm
        ``(x, y, z)`` of the arterial grid.
    spec
        The model card's ROI spec.

    Returns
    -------
    dict
        ``{"tumor": array, "loat": array}``, each float32 ``(channels, size, size)``.

    Raises
    ------
    RoiError
        Naming the first branch (tumour before LOAT) whose mask is empty or too small.
    """
    by_phase = {"arterial": arterial_hu, "portal_venous": pv_on_arterial_hu}
    volumes = [by_phase[p] for p in spec.phases]
    return {
        "tumor": extract_branch("tumor", volumes, tumor_mask, spacing_mm, spec),
        "loat": extract_branch("loat", volumes, loat_mask, spacing_mm, spec),
    }
