"""The rules of ``[phases]``: which series are candidates, and their phase by name and timing.

Names are the configurable regular expressions on SeriesDescription and ProtocolName; timing
is seconds after ContrastBolusStartTime, else the order of the contrast acquisitions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from node.analysis.pairing.headers import SeriesInfo, _tm_seconds
from node.core.dicom import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE

__all__ = ["AXIAL_TOLERANCE_DEG", "PHASES"]

PHASES: tuple[str, ...] = ("non_contrast", "arterial", "portal_venous", "delayed")

#: A slice normal within this angle of the patient z axis counts as axial.
AXIAL_TOLERANCE_DEG = 10.0
#: Acquisitions closer than this (s) are one acquisition (several reconstructions of it).
_SAME_ACQUISITION_S = 5.0

# Seconds after ContrastBolusStartTime: arterial ~20-45 s, portal-venous ~55-90 s, delayed
# > 120 s; the boundaries sit in the gaps between those windows.
_ARTERIAL_BEFORE_S = 50.0
_PORTAL_BEFORE_S = 110.0
# A series acquired this long before the injection is non-contrast even if it carries bolus
# tags (some scanners copy the bolus module to every series of the exam).
_BEFORE_INJECTION_S = -5.0

# BodyPartExamined values that clearly are not the liver (DICOM PS3.16 Annex L defined terms
# and common scanner spellings). Abdomen, chest-abdomen, whole body and empty all stay in scope.
_OTHER_REGIONS = frozenset(
    [
        "HEAD",
        "BRAIN",
        "SKULL",
        "HEADNECK",
        "NECK",
        "CSPINE",
        "CHEST",
        "THORAX",
        "LUNG",
        "HEART",
        "BREAST",
        "SHOULDER",
        "ARM",
        "ELBOW",
        "HAND",
        "WRIST",
        "HIP",
        "KNEE",
        "LEG",
        "ANKLE",
        "FOOT",
        "EXTREMITY",
        "LSPINE",
        "TSPINE",
        "SPINE",
        "PELVIS",
    ]
)


def _exclusion(info: SeriesInfo, min_slices: int) -> str | None:
    """Why a series is not an axial CT volume usable for analysis; None when it is."""
    if info.error is not None:
        return info.error
    if info.modality != "CT":
        return f"not CT (Modality {info.modality or 'missing'})"
    if info.sop_class_uid not in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
        return f"not a CT image (SOP Class {info.sop_class_uid or 'missing'})"
    image_type = info.image_type
    if "LOCALIZER" in image_type:
        return "LOCALIZER"
    if image_type and image_type[0] == "DERIVED":
        return "DERIVED"
    if len(image_type) > 1 and image_type[1] == "SECONDARY":
        return "SECONDARY"
    if image_type and image_type[0] != "ORIGINAL":
        return f"not ORIGINAL ({image_type[0]})"
    for marker in ("MPR", "MIP", "REFORMATTED", "PROJECTION IMAGE"):
        if marker in image_type[2:]:
            return marker
    if info.orientation is None:
        return "no ImageOrientationPatient"
    row = np.asarray(info.orientation[:3])
    col = np.asarray(info.orientation[3:])
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return "degenerate ImageOrientationPatient"
    if abs(float(normal[2])) / norm < math.cos(math.radians(AXIAL_TOLERANCE_DEG)):
        return "not axial"
    if info.slices < min_slices:
        return f"too few slices ({info.slices})"
    return None


def _compile_rules(rules: Mapping[str, Sequence[str]]) -> dict[str, list[re.Pattern[str]]]:
    compiled: dict[str, list[re.Pattern[str]]] = {}
    for phase in PHASES:
        patterns = []
        for pattern in rules.get(phase, ()):
            try:
                patterns.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"phases.{phase}: invalid pattern {pattern!r}: {exc}") from exc
        compiled[phase] = patterns
    return compiled


def _phase_by_name(info: SeriesInfo, rules: Mapping[str, list[re.Pattern[str]]]) -> str | None:
    def matches(text: str) -> set[str]:
        return {phase for phase, patterns in rules.items() if any(p.search(text) for p in patterns)}

    description = matches(info.series_description)
    found = description | matches(info.protocol_name)
    if len(found) == 1:
        return next(iter(found))
    # Protocol names often list every phase of the exam ("liver arterial/portal"); the series
    # description is specific to the series.
    if len(description) == 1:
        return next(iter(description))
    return None


def _seconds_after(later: float, earlier: float) -> float:
    delta = later - earlier
    # Times of day: an exam that runs over midnight wraps around.
    if delta < -43200.0:
        delta += 86400.0
    elif delta > 43200.0:
        delta -= 86400.0
    return delta


def _phases_by_timing(candidates: Sequence[SeriesInfo]) -> dict[str, str]:
    """Phase by contrast tags and acquisition times, for the candidates it can tell."""
    contrast = [c for c in candidates if c.contrast_agent]
    if not contrast:
        # Without any bolus tag the tags were probably removed; absence tells nothing.
        return {}
    result: dict[str, str] = {}
    ordered: list[SeriesInfo] = []
    for info in contrast:
        start = _tm_seconds(info.contrast_start_time)
        if start is None or info.acquisition_seconds is None:
            if info.acquisition_seconds is not None:
                ordered.append(info)
            continue
        delta = _seconds_after(info.acquisition_seconds, start)
        if delta < _BEFORE_INJECTION_S:
            result[info.series_instance_uid] = "non_contrast"
            continue
        ordered.append(info)
        if delta < _ARTERIAL_BEFORE_S:
            result[info.series_instance_uid] = "arterial"
        elif delta < _PORTAL_BEFORE_S:
            result[info.series_instance_uid] = "portal_venous"
        else:
            result[info.series_instance_uid] = "delayed"

    # Order of the contrast acquisitions: first arterial, next portal-venous, later delayed.
    # Reconstructions of one acquisition share its time and so its rank. A single acquisition
    # has no order to speak of.
    times = sorted({c.acquisition_seconds for c in ordered if c.acquisition_seconds is not None})
    groups: list[float] = []
    for t in times:
        if not groups or t - groups[-1] > _SAME_ACQUISITION_S:
            groups.append(t)
    if len(groups) >= 2:
        by_rank = ("arterial", "portal_venous")
        for info in ordered:
            if info.series_instance_uid in result or info.acquisition_seconds is None:
                continue
            rank = max(i for i, g in enumerate(groups) if info.acquisition_seconds >= g)
            result[info.series_instance_uid] = by_rank[rank] if rank < 2 else "delayed"

    first_contrast = min(
        (c.acquisition_seconds for c in ordered if c.acquisition_seconds is not None),
        default=None,
    )
    for info in candidates:
        if info.contrast_agent or info.acquisition_seconds is None or first_contrast is None:
            continue
        if _seconds_after(info.acquisition_seconds, first_contrast) < 0:
            result[info.series_instance_uid] = "non_contrast"
    return result
