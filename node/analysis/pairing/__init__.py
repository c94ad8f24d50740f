"""Pick the arterial (AP) and portal-venous (PVP) series of a contrast liver CT study.

A study arrives as a handful of series: a localizer, the contrast phases, perhaps reformats,
dose reports and segmentations. :func:`pair_phases` decides which two series the pipeline
analyses, and records why, from three kinds of evidence:

1. **Names** -- the configurable regular expressions of ``[phases]`` on SeriesDescription and
   ProtocolName;
2. **Timing** -- contrast bolus tags and acquisition times (seconds after ContrastBolusStartTime,
   else the order of the contrast acquisitions);
3. **Image** -- a cheap look at the volumes themselves, comparing the study's series with each
   other (see :func:`image_metrics`). It decides when names and timing are missing or disagree.

:func:`series_info` reads the headers of one series (never the pixels) into a
:class:`SeriesInfo`; it never raises, so that one odd series cannot stop a study -- a series that
cannot be read carries the reason in :attr:`SeriesInfo.error` and is excluded.

Nothing here logs patient identifiers: series are named by :func:`node.logging.uid_key`, files by
their name.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from node.analysis.dicomio import DicomIOError, load_series
from node.core.dicom import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    functional_group,
    functional_group_items,
)
from node.core.logging import get_logger, uid_key

__all__ = [
    "PHASES",
    "Pairing",
    "PhaseEvidence",
    "SeriesInfo",
    "image_metrics",
    "pair_phases",
    "series_info",
]

log = get_logger(__name__)

PHASES: tuple[str, ...] = ("non_contrast", "arterial", "portal_venous", "delayed")

_HUMAN = {
    "non_contrast": "non-contrast",
    "arterial": "arterial",
    "portal_venous": "portal-venous",
    "delayed": "delayed",
}

#: A slice normal within this angle of the patient z axis counts as axial.
AXIAL_TOLERANCE_DEG = 10.0
#: Direction cosines of two images that differ by more than this are "mixed orientations".
_ORIENTATION_TOLERANCE = 1e-3
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

# --- image check -------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesInfo:
    """What the headers of one series say, for pairing.

    Attributes
    ----------
    series_instance_uid, frame_of_reference_uid, modality, sop_class_uid
        From the first readable file; empty strings when absent.
    series_description, protocol_name, body_part
        Free text; ``body_part`` is BodyPartExamined upper-cased.
    image_type
        ImageType values, upper-cased.
    contrast_agent
        ContrastBolusAgent; for Enhanced CT the agent of ContrastBolusAgentSequence or
        ``"administered"`` when a Contrast/Bolus Usage functional group says so. ``""`` when the
        headers carry no contrast information.
    contrast_start_time
        ContrastBolusStartTime (TM) or ``""``.
    acquisition_seconds
        Seconds since midnight of the earliest AcquisitionTime of the series (else ContentTime,
        SeriesTime, AcquisitionDateTime), or None.
    orientation
        ImageOrientationPatient (6 values), or None when absent.
    pixel_spacing
        PixelSpacing (row, column) in mm, or None.
    slice_spacing
        Spacing of the slice positions projected on the normal (median step), else
        SliceThickness, or None.
    rows, columns, slices
        Image size; ``slices`` counts image files (classic) or frames (Enhanced CT).
    paths
        The files, as given.
    error
        Why the series cannot be used as read (unreadable or truncated file, several series,
        mixed orientations); None when the headers are fine.
    """

    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    sop_class_uid: str
    series_description: str
    protocol_name: str
    image_type: tuple[str, ...]
    body_part: str
    contrast_agent: str
    contrast_start_time: str
    acquisition_seconds: float | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_spacing: float | None
    rows: int
    columns: int
    slices: int
    paths: tuple[Path, ...]
    error: str | None = None


@dataclass(frozen=True)
class PhaseEvidence:
    """Why one series got (or did not get) its phase.

    Attributes
    ----------
    series_instance_uid
        The series.
    phase
        Final classification; None when the series is not a candidate or its phase is unknown.
    candidate
        Whether the series is an axial CT volume usable for analysis.
    excluded_because
        Why it is not a candidate (``"LOCALIZER"``, ``"DERIVED"``, ``"not axial"``, ...).
    by_name, by_timing, by_image
        The phase each kind of evidence gave; None for no answer (or, for ``by_image``, when the
        image check did not run).
    image_metrics
        What the image check measured (see :func:`image_metrics`).
    """

    series_instance_uid: str
    phase: str | None
    candidate: bool
    excluded_because: str | None
    by_name: str | None
    by_timing: str | None
    by_image: str | None
    image_metrics: dict[str, float]


@dataclass(frozen=True)
class Pairing:
    """The chosen arterial and portal-venous series of a study, with the evidence.

    Attributes
    ----------
    status
        ``"paired"``; ``"needs_review"`` when contrast phases are present but no usable pair;
        ``"not_applicable"`` when the study is not a contrast liver CT.
    reason
        A sentence for ``needs_review`` and ``not_applicable``; None when paired.
    arterial, portal_venous
        SeriesInstanceUIDs of the chosen pair (None unless paired).
    method
        How the chosen pair was decided: ``"tags"`` (names and timing), ``"image"`` (the image
        check alone) or ``"tags+image"`` (both used, or the image check overruled the tags).
    evidence
        One entry per series given to :func:`pair_phases`, in the same order.
    """

    status: Literal["paired", "needs_review", "not_applicable"]
    reason: str | None
    arterial: str | None
    portal_venous: str | None
    method: Literal["tags", "image", "tags+image"] | None
    evidence: tuple[PhaseEvidence, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable record of the choice and the evidence.

        Metrics are rounded to 0.01 and non-finite values become None, so the record is strict
        JSON.
        """
        evidence = []
        for item in self.evidence:
            record = asdict(item)
            record["image_metrics"] = {
                key: round(value, 2) if math.isfinite(value) else None
                for key, value in item.image_metrics.items()
            }
            evidence.append(record)
        return {
            "status": self.status,
            "reason": self.reason,
            "arterial": self.arterial,
            "portal_venous": self.portal_venous,
            "method": self.method,
            "evidence": evidence,
        }


# ------------------------------------------------------------------------------------------------
# Headers
# ------------------------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value raises on access, whatever its VR
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return values


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _read_header(path: Path) -> Dataset:
    """Headers of one file; raises DicomIOError for unreadable or truncated files."""
    try:
        with path.open("rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=False)
            pixel_offset = handle.tell()
        size = path.stat().st_size
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error, KeyError) as exc:
        raise DicomIOError(
            f"{path.name}: not a readable DICOM file ({type(exc).__name__})"
        ) from exc
    except Exception as exc:  # pydicom meets odd headers with all sorts of errors
        raise DicomIOError(f"{path.name}: unreadable headers ({type(exc).__name__})") from exc
    _check_pixel_length(ds, path, size - pixel_offset)
    return ds


def _check_pixel_length(ds: Dataset, path: Path, remaining: int) -> None:
    """Refuse a file cut short inside native Pixel Data.

    Only the headers are read, so a truncated file would otherwise pass unnoticed until its
    volume is loaded; for native (not encapsulated, not deflated) transfer syntaxes the bytes
    left after the headers must hold every pixel.
    """
    if "Rows" not in ds or "Columns" not in ds:
        return
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_encapsulated or syntax.is_deflated:
        return
    try:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        needed = math.ceil(int(ds.Rows) * int(ds.Columns) * samples * frames * bits / 8)
    except (TypeError, ValueError):
        return
    if remaining <= 0:
        raise DicomIOError(f"{path.name}: missing Pixel Data")
    if remaining < needed:
        raise DicomIOError(
            f"{path.name}: truncated Pixel Data ({remaining} bytes left for {needed})"
        )


def _tm_seconds(value: str) -> float | None:
    """Seconds since midnight of a DICOM TM (``HHMMSS.FFFFFF``, also ``HH:MM:SS``)."""
    text = value.strip().replace(":", "")
    if not text:
        return None
    main, _, fraction = text.partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6):
        return None
    hours = int(main[0:2])
    minutes = int(main[2:4]) if len(main) >= 4 else 0
    seconds = int(main[4:6]) if len(main) >= 6 else 0
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    frac = float(f"0.{fraction}") if fraction.isdigit() else 0.0
    return hours * 3600.0 + minutes * 60.0 + seconds + frac


def _dt_seconds(value: str) -> float | None:
    """Seconds since midnight of the time part of a DICOM DT (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``)."""
    text = re.split(r"[+-]", value.strip(), maxsplit=1)[0]
    if len(text) < 10:
        return None
    return _tm_seconds(text[8:])


def _acquisition_seconds(headers: Sequence[Dataset]) -> float | None:
    # One attribute for the whole series, the first that any file has: mixing AcquisitionTime
    # of one file with ContentTime of another would compare different events.
    for keyword, parse in (
        ("AcquisitionTime", _tm_seconds),
        ("ContentTime", _tm_seconds),
        ("SeriesTime", _tm_seconds),
        ("AcquisitionDateTime", _dt_seconds),
    ):
        times = [parse(_text(ds, keyword)) for ds in headers]
        known = [t for t in times if t is not None]
        if known:
            return min(known)
    return None


def _contrast(ds: Dataset) -> tuple[str, str]:
    """(agent, start time) from the classic or the Enhanced Contrast/Bolus attributes."""
    agent = _text(ds, "ContrastBolusAgent")
    start = _text(ds, "ContrastBolusStartTime")
    for item in ds.get("ContrastBolusAgentSequence") or []:
        if not agent:
            agent = _text(item, "CodeMeaning") or _text(item, "CodeValue") or "contrast"
        for profile in item.get("ContrastAdministrationProfileSequence") or []:
            start = start or _text(profile, "ContrastBolusStartTime")
    if not agent:
        for usage in functional_group_items(ds, "ContrastBolusUsageSequence"):
            if _text(usage, "ContrastBolusAgentAdministered").upper() != "NO":
                agent = "administered"
                break
    return agent, start


@dataclass(frozen=True)
class _Plane:
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    thickness: float | None


def _planes(ds: Dataset) -> list[_Plane]:
    """Geometry of every image (classic file or Enhanced frame) of one object."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        if "Rows" not in ds:
            return []
        return [
            _Plane(
                position=_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
                thickness=_float(ds.get("SliceThickness")),
            )
        ]

    def item(frame: int, keyword: str) -> Dataset:
        return functional_group(ds, frame, keyword) or Dataset()

    planes = []
    for frame in range(len(per_frame)):
        measures = item(frame, "PixelMeasuresSequence")
        planes.append(
            _Plane(
                position=_floats(
                    item(frame, "PlanePositionSequence").get("ImagePositionPatient"), 3
                ),
                orientation=_floats(
                    item(frame, "PlaneOrientationSequence").get("ImageOrientationPatient"), 6
                ),
                pixel_spacing=_floats(measures.get("PixelSpacing"), 2),
                thickness=_float(measures.get("SliceThickness")),
            )
        )
    return planes


def _geometry(
    planes: Sequence[_Plane],
) -> tuple[tuple[float, ...] | None, tuple[float, float] | None, float | None, str | None]:
    """(orientation, pixel spacing, slice spacing, problem) of a series' images."""
    orientations = [p.orientation for p in planes if p.orientation is not None]
    if not orientations:
        return None, None, None, None
    first = np.asarray(orientations[0])
    if any(not np.allclose(o, first, atol=_ORIENTATION_TOLERANCE) for o in orientations[1:]):
        return orientations[0], None, None, "mixed orientations"
    spacings = [p.pixel_spacing for p in planes if p.pixel_spacing is not None]
    pixel_spacing = (spacings[0][0], spacings[0][1]) if spacings else None
    normal = np.cross(first[:3], first[3:])
    norm = float(np.linalg.norm(normal))
    slice_spacing = None
    positions = [p.position for p in planes if p.position is not None]
    if norm > 1e-6 and len(positions) >= 2:
        projections = np.sort([float(np.dot(p, normal / norm)) for p in positions])
        steps = np.diff(projections)
        steps = steps[steps > 0.01]  # duplicates are the loader's business, not the spacing's
        if steps.size:
            slice_spacing = float(np.median(steps))
    if slice_spacing is None:
        thicknesses = [p.thickness for p in planes if p.thickness is not None and p.thickness > 0]
        slice_spacing = thicknesses[0] if thicknesses else None
    return orientations[0], pixel_spacing, slice_spacing, None


def series_info(paths: Sequence[Path]) -> SeriesInfo:
    """Read the headers (never the pixels) of one series.

    Parameters
    ----------
    paths
        The series' files: classic single-frame images or Enhanced CT objects.

    Returns
    -------
    SeriesInfo
        Never raises: unreadable or truncated files, files of several series and mixed
        orientations are reported in :attr:`SeriesInfo.error` (the readable files still fill
        the other fields).
    """
    files = tuple(Path(p) for p in paths)
    headers: list[Dataset] = []
    errors: list[str] = []
    for path in sorted(files):
        try:
            ds = _read_header(path)
            if not _text(ds, "SeriesInstanceUID") or not _text(ds, "SOPClassUID"):
                # pydicom reads some garbage as an empty dataset rather than failing.
                raise DicomIOError(f"{path.name}: no SOP Class or Series Instance UID")
            headers.append(ds)
        except DicomIOError as exc:
            errors.append(str(exc))
    if not headers:
        return _empty_info(files, errors[0] if errors else "no files")
    try:
        return _info_from_headers(files, headers, errors)
    except Exception as exc:  # headers odd enough to break parsing must not stop the study
        info = _empty_info(files, f"unreadable headers ({type(exc).__name__})")
        return replace(info, series_instance_uid=_text(headers[0], "SeriesInstanceUID"))


def _empty_info(paths: tuple[Path, ...], error: str) -> SeriesInfo:
    return SeriesInfo(
        series_instance_uid="",
        frame_of_reference_uid="",
        modality="",
        sop_class_uid="",
        series_description="",
        protocol_name="",
        image_type=(),
        body_part="",
        contrast_agent="",
        contrast_start_time="",
        acquisition_seconds=None,
        orientation=None,
        pixel_spacing=None,
        slice_spacing=None,
        rows=0,
        columns=0,
        slices=0,
        paths=paths,
        error=error,
    )


def _info_from_headers(
    paths: tuple[Path, ...], headers: list[Dataset], errors: list[str]
) -> SeriesInfo:
    first = headers[0]
    uids = {_text(ds, "SeriesInstanceUID") for ds in headers}
    if len(uids) > 1:
        names = ", ".join(uid_key(u) if u else "no SeriesInstanceUID" for u in sorted(uids))
        errors.append(f"files of {len(uids)} series mixed: {names}")
    planes = [plane for ds in headers for plane in _planes(ds)]
    orientation, pixel_spacing, slice_spacing, problem = _geometry(planes)
    if problem is not None:
        errors.append(problem)
    agent, start = "", ""
    for ds in headers:
        found_agent, found_start = _contrast(ds)
        agent, start = agent or found_agent, start or found_start
        if agent and start:
            break
    return SeriesInfo(
        series_instance_uid=_text(first, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
        modality=_text(first, "Modality").upper(),
        sop_class_uid=_text(first, "SOPClassUID"),
        series_description=_text(first, "SeriesDescription"),
        protocol_name=_text(first, "ProtocolName"),
        image_type=tuple(
            v.strip().upper() for v in _text(first, "ImageType").split("\\") if v.strip()
        ),
        body_part=_text(first, "BodyPartExamined").upper(),
        contrast_agent=agent,
        contrast_start_time=start,
        acquisition_seconds=_acquisition_seconds(headers),
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        rows=int(_float(first.get("Rows")) or 0),
        columns=int(_float(first.get("Columns")) or 0),
        slices=len(planes),
        paths=paths,
        error=errors[0] if errors else None,
    )


# ------------------------------------------------------------------------------------------------
# Candidates, names, timing
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Image check
# ------------------------------------------------------------------------------------------------


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
        HU volumes of one study (as :func:`node.dicomio.load_series` returns them).

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


# ------------------------------------------------------------------------------------------------
# Pairing
# ------------------------------------------------------------------------------------------------


@dataclass
class _Work:
    """Mutable evidence of one series while :func:`pair_phases` decides."""

    info: SeriesInfo
    excluded: str | None
    by_name: str | None = None
    by_timing: str | None = None
    by_image: str | None = None
    image_confident: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    phase: str | None = None
    decided_by: Literal["tags", "image", "tags+image"] | None = None

    @property
    def tag_phase(self) -> str | None:
        # Names come first: a radiographer's label beats an inferred order.
        return self.by_name or self.by_timing

    @property
    def conflict(self) -> bool:
        return (
            self.by_name is not None
            and self.by_timing is not None
            and (self.by_name != self.by_timing)
        )


def _run_image_check(candidates: Sequence[_Work]) -> None:
    loaded: list[tuple[_Work, sitk.Image]] = []
    for work in candidates:
        try:
            image = load_series(list(work.info.paths))
        except DicomIOError as exc:
            work.excluded = str(exc)
            continue
        except Exception as exc:  # a decoder or SimpleITK failure must not stop the study
            work.excluded = f"cannot load the volume ({type(exc).__name__})"
            continue
        # Keep only the small copy: full volumes of a whole study would not fit in memory.
        loaded.append((work, _shrink(image)))
    metrics = image_metrics([image for _, image in loaded])
    phases = _phases_by_image(metrics)
    for (work, _), measured, (phase, confident) in zip(loaded, metrics, phases, strict=True):
        work.metrics = measured
        work.by_image = phase
        work.image_confident = confident


def _pair_key(
    arterial: _Work, portal: _Work, working_spacing_mm: float
) -> tuple[int, float, int, int]:
    a, p = arterial.info, portal.info
    same_frame = bool(a.frame_of_reference_uid) and (
        a.frame_of_reference_uid == p.frame_of_reference_uid
    )

    def distance(spacing: float | None) -> float:
        return abs(spacing - working_spacing_mm) if spacing is not None else math.inf

    # Tags and image agreeing beats either alone, but only after geometry: the pair must be
    # analysable first.
    agreement = sum(w.decided_by == "tags+image" for w in (arterial, portal))
    return (
        0 if same_frame else 1,
        round(distance(a.slice_spacing) + distance(p.slice_spacing), 3),
        -(a.slices + p.slices),
        -agreement,
    )


def _join(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _missing_pair_reason(found: Sequence[str]) -> str:
    missing = [p for p in ("arterial", "portal_venous") if p not in found]
    missing_text = " and no ".join(_HUMAN[p] for p in missing)
    if not found:
        return f"no contrast phase could be identified; no {missing_text} series"
    if len(found) == 1:
        name = _HUMAN[found[0]]
        return f"only {_article(name)} {name} series was found; no {missing_text} series"
    return f"found {_join([_HUMAN[p] for p in found])} series; no {missing_text} series"


def pair_phases(
    series: Sequence[SeriesInfo],
    rules: Mapping[str, Sequence[str]],
    *,
    working_spacing_mm: float = 2.0,
    min_slices: int = 16,
    image_check: bool | Literal["auto"] = "auto",
) -> Pairing:
    """Choose the arterial and portal-venous series of one study.

    Parameters
    ----------
    series
        Every series of the study (:func:`series_info`), whatever its kind: non-CT objects,
        localizers and reformats are recorded and ignored.
    rules
        Phase -> regular expressions on SeriesDescription and ProtocolName
        (``settings.phases.model_dump()``); case-insensitive ``re.search``.
    working_spacing_mm
        The pipeline's slice spacing: between candidates of one phase, the series whose slice
        spacing is nearest wins (not simply the thinnest).
    min_slices
        Fewer slices than this and a series is not a volume.
    image_check
        ``"auto"``: measure the volumes when names and timing do not give an unambiguous pair or
        disagree; ``True``: always (the image then overrules tags it disagrees with);
        ``False``: never.

    Returns
    -------
    Pairing
        The decision and the evidence of every series.

    Raises
    ------
    ValueError
        For an invalid regular expression in ``rules`` (configuration, not data).
    """
    compiled = _compile_rules(rules)
    works = [_Work(info=info, excluded=_exclusion(info, min_slices)) for info in series]
    for work in works:
        work.by_name = _phase_by_name(work.info, compiled)
    candidates = [w for w in works if w.excluded is None]
    by_timing = _phases_by_timing([w.info for w in candidates])
    for work in candidates:
        work.by_timing = by_timing.get(work.info.series_instance_uid)

    for work in candidates:
        _decide(work)  # from the tags; decided again below if the image check runs

    contrast_tags = any(w.info.contrast_agent for w in works if w.info.modality == "CT")
    body_parts = {w.info.body_part.replace(" ", "").replace("_", "") for w in candidates}
    other_region = bool(body_parts) and body_parts <= _OTHER_REGIONS
    if other_region and not contrast_tags:
        region = _join(sorted(body_parts))
        return _finish(
            works,
            "not_applicable",
            f"not a contrast liver CT: body part {region} and no contrast tags",
        )

    tags_found = {w.tag_phase for w in candidates}
    tags_clear = {"arterial", "portal_venous"} <= tags_found and not any(
        w.conflict for w in candidates
    )
    run_image = bool(candidates) and (
        image_check is True or (image_check == "auto" and not tags_clear)
    )
    if run_image:
        _run_image_check(candidates)
        candidates = [w for w in candidates if w.excluded is None]
        for work in candidates:
            _decide(work)

    if not candidates:
        if contrast_tags:
            return _finish(
                works, "needs_review", "contrast CT, but no usable axial CT volume was found"
            )
        return _finish(works, "not_applicable", "no axial CT volume in the study")

    found = [p for p in PHASES if any(w.phase == p for w in candidates)]
    contrast_found = [p for p in found if p != "non_contrast"]
    if not contrast_tags and not contrast_found:
        return _finish(
            works,
            "not_applicable",
            "not a contrast liver CT: no contrast tags and no contrast phase in names or images",
        )

    arterials = [w for w in candidates if w.phase == "arterial"]
    portals = [w for w in candidates if w.phase == "portal_venous"]
    if not arterials or not portals:
        reason = _missing_pair_reason(found)
        unknown = sum(w.phase is None for w in candidates)
        if unknown:
            reason += f" ({unknown} series of unknown phase)"
        return _finish(works, "needs_review", reason)

    arterial, portal = min(
        ((a, p) for a in arterials for p in portals),
        key=lambda pair: _pair_key(pair[0], pair[1], working_spacing_mm),
    )
    methods = {arterial.decided_by, portal.decided_by}
    method: Literal["tags", "image", "tags+image"]
    if methods == {"tags"}:
        method = "tags"
    elif methods == {"image"}:
        method = "image"
    else:
        method = "tags+image"
    return _finish(works, "paired", None, arterial=arterial, portal=portal, method=method)


def _decide(work: _Work) -> None:
    """Final phase of a candidate and what decided it."""
    tag, image = work.tag_phase, work.by_image
    if image is not None and tag is not None and tag != image and not work.image_confident:
        # A guess from the images does not overrule the tags.
        work.phase = tag
        work.decided_by = "tags"
    elif image is not None and tag != image:
        work.phase = image
        # Without tags the image alone decided; otherwise it overruled them (or settled their
        # disagreement), so both were used.
        work.decided_by = "image" if tag is None else "tags+image"
    elif image is not None:
        work.phase = tag
        work.decided_by = "tags+image"
    else:
        work.phase = tag
        work.decided_by = "tags" if tag is not None else None


def _finish(
    works: Sequence[_Work],
    status: Literal["paired", "needs_review", "not_applicable"],
    reason: str | None,
    *,
    arterial: _Work | None = None,
    portal: _Work | None = None,
    method: Literal["tags", "image", "tags+image"] | None = None,
) -> Pairing:
    evidence = tuple(
        PhaseEvidence(
            series_instance_uid=w.info.series_instance_uid,
            phase=w.phase if w.excluded is None else None,
            candidate=w.excluded is None,
            excluded_because=w.excluded,
            by_name=w.by_name,
            by_timing=w.by_timing,
            by_image=w.by_image,
            image_metrics=dict(w.metrics),
        )
        for w in works
    )
    pairing = Pairing(
        status=status,
        reason=reason,
        arterial=arterial.info.series_instance_uid if arterial else None,
        portal_venous=portal.info.series_instance_uid if portal else None,
        method=method,
        evidence=evidence,
    )
    log.info(
        "paired phases" if status == "paired" else "no phase pair",
        status=status,
        method=method,
        arterial_key=uid_key(pairing.arterial) if pairing.arterial else None,
        portal_venous_key=uid_key(pairing.portal_venous) if pairing.portal_venous else None,
        series=len(works),
        candidates=sum(e.candidate for e in evidence),
    )
    return pairing
