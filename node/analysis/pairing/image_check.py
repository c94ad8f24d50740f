"""The image check: a cheap look at the candidate volumes, comparing a study's series.

It decides when names and timing are missing or disagree (see :func:`image_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from node.analysis.dicomio import DicomIOError, load_series

__all__ = ["IMAGE_CHECK_VOXEL_MM", "ImageVerdict", "check_images", "image_metrics"]

#: Volumes are averaged down to about this voxel size before anything is measured.
IMAGE_CHECK_VOXEL_MM = 4.0
_BODY_HU = -400.0  # above: inside the patient (air and lung are below)
_STATIC_HU = 180.0  # bright in every series of the study: bone, not contrast
_SOFT_TISSUE_HU = (-20.0, 250.0)
_VESSEL_PERCENTILE = 99.8
_BRIGHT_HU = 220.0
#: vessel - parenchyma (HU) at or above which a series is arterial...
_ARTERIAL_CONTRAST_HU = 160.0
#: ...and within this much of the study's most arterial series.
_ARTERIAL_CLUSTER_HU = 50.0
#: vessel - parenchyma (HU) below which a series shows no contrast in its vessels.
_UNENHANCED_CONTRAST_HU = 55.0
#: A non-contrast series' parenchyma is at least this much (HU) below an enhanced series'.
_UNENHANCED_MARGIN_HU = 10.0
#: Parenchyma (HU) below which a series without bright vessels is non-contrast when no series
#: of the study is enhanced...
_UNENHANCED_PARENCHYMA_HU = 60.0
#: ...and below which a series that is the only one of its study is non-contrast.
_LONE_UNENHANCED_PARENCHYMA_HU = 50.0
#: Between venous-phase series, the portal-venous one has the brightest vessels by this much.
_VENOUS_SEPARATION_HU = 12.0
#: A venous-phase series without another to compare is portal-venous for sure at or above this
#: vessel - parenchyma (HU); below it, portal-venous is only the likelier guess.
_LONE_PORTAL_HU = 95.0


@dataclass(frozen=True)
class ImageVerdict:
    """What the image check says about one series.

    Attributes
    ----------
    excluded
        Why the volume could not be loaded (the series is then no candidate); None when loaded.
    metrics
        What :func:`image_metrics` measured (empty when excluded).
    phase, confident
        The phase the images suggest (None: no answer), and whether it may overrule the tags.
    """

    excluded: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    phase: str | None = None
    confident: bool = False


def check_images(series: Sequence[Sequence[Path]]) -> list[ImageVerdict]:
    """Load each series' volume (small copies only) and classify the series against each other.

    Parameters
    ----------
    series
        The files of each candidate series of one study.

    Returns
    -------
    list of ImageVerdict
        One per series, in order; a volume that cannot be loaded is excluded, never raised.
    """
    excluded: list[str | None] = []
    loaded: list[sitk.Image] = []
    for paths in series:
        try:
            image = load_series(list(paths))
        except DicomIOError as exc:
            excluded.append(str(exc))
            continue
        except Exception as exc:  # a decoder or SimpleITK failure must not stop the study
            excluded.append(f"cannot load the volume ({type(exc).__name__})")
            continue
        # Keep only the small copy: full volumes of a whole study would not fit in memory.
        excluded.append(None)
        loaded.append(_shrink(image))
    metrics = image_metrics(loaded)
    phases = iter(zip(metrics, _phases_by_image(metrics), strict=True))
    verdicts = []
    for reason in excluded:
        if reason is not None:
            verdicts.append(ImageVerdict(excluded=reason))
            continue
        measured, (phase, confident) = next(phases)
        verdicts.append(ImageVerdict(None, measured, phase, confident))
    return verdicts


def _shrink(image: sitk.Image) -> sitk.Image:
    """Average blocks of voxels down to about IMAGE_CHECK_VOXEL_MM (cheap, and less noise)."""
    factors = [max(1, round(IMAGE_CHECK_VOXEL_MM / s)) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def image_metrics(images: Sequence[sitk.Image]) -> list[dict[str, float]]:
    """Measure the enhancement of each series of one study, relative to the others.

    Every volume is averaged to ~4 mm voxels and resampled onto the grid of the first, so the
    series are compared voxel for voxel. Voxels bright (>= 180 HU) in *every* series are bone
    (contrast comes and goes, bone stays) and are left out with a 1-voxel margin; with a single
    series, voxels >= 350 HU are left out instead. Over the remaining voxels inside the body
    (> -400 HU) and seen by all series:

    ``parenchyma_hu``
        median of the soft-tissue voxels (-20..250 HU): liver, spleen, muscle and bowel, which
        enhance most in the portal-venous phase;
    ``vessel_hu``
        99.8th percentile: the brightest vessels (aorta in the arterial phase, portal vein and
        kidneys later);
    ``arterial_contrast_hu``
        ``vessel_hu - parenchyma_hu``, high only when the aorta outshines everything else;
    ``bright_per_mille``
        voxels >= 220 HU per thousand (arterial aorta; empty in the other phases).

    Parameters
    ----------
    images
        HU volumes of one study (as :func:`node.analysis.dicomio.load_series` returns them).

    Returns
    -------
    list of dict
        One metrics dictionary per image, in order.
    """
    if not images:
        return []
    small = [_shrink(sitk.Cast(image, sitk.sitkFloat32)) for image in images]
    reference = small[0]
    arrays = [
        sitk.GetArrayFromImage(
            sitk.Resample(s, reference, sitk.Transform(), sitk.sitkLinear, math.nan)
        )
        for s in small
    ]
    stack = np.stack(arrays)
    valid = np.all(np.isfinite(stack), axis=0)
    if not valid.any():
        # No common coverage: each series is measured on its own extent.
        valid = np.ones(stack.shape[1:], dtype=bool)
    if len(arrays) > 1:
        static = np.all(np.nan_to_num(stack, nan=-1000.0) >= _STATIC_HU, axis=0)
    else:
        static = np.nan_to_num(arrays[0], nan=-1000.0) >= 350.0
    static_image = sitk.GetImageFromArray(static.astype(np.uint8))
    static = sitk.GetArrayFromImage(sitk.BinaryDilate(static_image, [1, 1, 1])).astype(bool)

    results: list[dict[str, float]] = []
    for array in arrays:
        values = array[valid & ~static & (np.nan_to_num(array, nan=-1000.0) > _BODY_HU)]
        if values.size == 0:
            results.append({})
            continue
        soft = values[(values >= _SOFT_TISSUE_HU[0]) & (values <= _SOFT_TISSUE_HU[1])]
        parenchyma = float(np.median(soft)) if soft.size else math.nan
        vessel = float(np.percentile(values, _VESSEL_PERCENTILE))
        results.append(
            {
                "parenchyma_hu": parenchyma,
                "vessel_hu": vessel,
                "arterial_contrast_hu": vessel - parenchyma,
                "bright_per_mille": 1000.0 * float(np.mean(values >= _BRIGHT_HU)),
                "voxels": float(values.size),
            }
        )
    return results


def _phases_by_image(metrics: Sequence[Mapping[str, float]]) -> list[tuple[str | None, bool]]:
    """Classify series from :func:`image_metrics`, relative to each other.

    Returns ``(phase, confident)`` per series. A guess that is not confident (a lone venous-phase
    series taken for portal-venous) fills in a missing phase but never overrules the tags.
    """
    n = len(metrics)
    phases: list[tuple[str | None, bool]] = [(None, False)] * n
    usable = [
        i for i, m in enumerate(metrics) if m and math.isfinite(m.get("parenchyma_hu", math.nan))
    ]
    if not usable:
        return phases
    if len(usable) == 1:
        # Nothing to compare with, and bone cannot be told from contrast without a second
        # series: only a clearly unenhanced parenchyma is a safe call.
        (i,) = usable
        if metrics[i]["parenchyma_hu"] < _LONE_UNENHANCED_PARENCHYMA_HU:
            phases[i] = ("non_contrast", True)
        return phases
    contrast = {i: metrics[i]["arterial_contrast_hu"] for i in usable}
    parenchyma = {i: metrics[i]["parenchyma_hu"] for i in usable}
    vessel = {i: metrics[i]["vessel_hu"] for i in usable}

    # Arterial: the aorta outshines the parenchyma, and it is among the study's most arterial.
    top = max(contrast.values())
    arterial = {
        i
        for i in usable
        if contrast[i] >= _ARTERIAL_CONTRAST_HU and contrast[i] >= top - _ARTERIAL_CLUSTER_HU
    }
    for i in arterial:
        phases[i] = ("arterial", True)

    # Non-contrast: no bright vessels and parenchyma clearly below every enhanced series.
    rest = [i for i in usable if i not in arterial]
    quiet = [i for i in rest if contrast[i] < _UNENHANCED_CONTRAST_HU]
    enhanced = [i for i in usable if i not in quiet]
    for i in quiet:
        if enhanced:
            if parenchyma[i] <= min(parenchyma[j] for j in enhanced) - _UNENHANCED_MARGIN_HU:
                phases[i] = ("non_contrast", True)
        elif parenchyma[i] < _UNENHANCED_PARENCHYMA_HU:
            phases[i] = ("non_contrast", True)

    # Venous phases: the portal-venous series has the brightest veins and kidneys; a delayed
    # series is washing out. A lone one has the study's brightest parenchyma, which makes it
    # portal-venous by definition -- and dual-phase (arterial + portal-venous) studies are the
    # common case -- but without a second venous series a delayed phase looks much the same.
    venous = [i for i in rest if i not in quiet]
    if len(venous) == 1:
        (i,) = venous
        phases[i] = ("portal_venous", contrast[i] >= _LONE_PORTAL_HU)
    elif venous:
        best = max(venous, key=lambda i: vessel[i])
        for i in venous:
            gap = vessel[best] - vessel[i]
            if i == best or (
                gap < _VENOUS_SEPARATION_HU / 2 and abs(parenchyma[best] - parenchyma[i]) < 5.0
            ):
                phases[i] = ("portal_venous", True)  # the same phase (another reconstruction)
            elif gap >= _VENOUS_SEPARATION_HU:
                phases[i] = ("delayed", True)
    return phases
