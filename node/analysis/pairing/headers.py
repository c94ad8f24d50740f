"""Reading the headers of one series (never its pixels): :func:`series_info` -> :class:`SeriesInfo`.

It never raises, so that one odd series cannot stop a study: a series that cannot be read
carries the reason in :attr:`SeriesInfo.error` and is excluded by the rules.

Pixel Data is deferred, not skipped: for a series of native (uncompressed, not deflated) files
the datasets read here (:attr:`SeriesInfo.headers`) are what the loader decodes the chosen
series from, so each file's headers are parsed once per job (at 512 x 512 x 200 the second parse
cost about a third of the loading).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from node.analysis.dicomio import DicomIOError
from node.core.dicom import functional_group, functional_group_items
from node.core.logging import uid_key

__all__ = ["SeriesInfo", "series_info"]

#: Direction cosines of two images that differ by more than this are "mixed orientations".
_ORIENTATION_TOLERANCE = 1e-3

#: Values longer than this are left in the file until they are used (native Pixel Data).
_DEFER_BYTES = 4096


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
    headers
        The datasets of every file, sorted as the paths, their Pixel Data left in the file until
        it is decoded (:func:`node.analysis.dicomio.load_series` takes them instead of the
        paths); empty unless every file read cleanly and is native (not encapsulated: its
        decoders are the loader's business; not deflated: pydicom keeps a deflated file's
        inflated copy, pixels included, with its dataset), so that only a whole series is ever
        loaded from them.
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
    headers: tuple[Dataset, ...] = field(default=(), compare=False, repr=False)


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
    """Headers of one file, Pixel Data deferred (or dropped, when pydicom read a compressed one
    whole); raises DicomIOError for unreadable or truncated files."""
    try:
        with path.open("rb") as handle:
            ds = pydicom.dcmread(handle, defer_size=_DEFER_BYTES, force=False)
        size = path.stat().st_size
        remaining = 0
        if "PixelData" in ds:
            element: object = ds.get_item("PixelData", keep_deferred=True)
            # Deferred: the bytes the file holds from the value on; read: the value itself.
            value = getattr(element, "value", None)
            if isinstance(element, RawDataElement) and value is None:
                remaining = size - element.value_tell
            else:
                remaining = len(value or b"")
            if value is not None and not _native(ds):
                del ds.PixelData  # compressed pixels of every series would stay in memory
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error, KeyError) as exc:
        raise DicomIOError(
            f"{path.name}: not a readable DICOM file ({type(exc).__name__})"
        ) from exc
    except Exception as exc:  # pydicom meets odd headers with all sorts of errors
        raise DicomIOError(f"{path.name}: unreadable headers ({type(exc).__name__})") from exc
    _check_pixel_length(ds, path, remaining)
    return ds


def _native(ds: Dataset) -> bool:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return syntax is not None and not syntax.is_encapsulated and not syntax.is_deflated


def _check_pixel_length(ds: Dataset, path: Path, remaining: int) -> None:
    """Refuse a file cut short inside native Pixel Data.

    Only the headers are read, so a truncated file would otherwise pass unnoticed until its
    volume is loaded; for native (not encapsulated, not deflated) transfer syntaxes the bytes
    left after the headers must hold every pixel.
    """
    if "Rows" not in ds or "Columns" not in ds or not _native(ds):
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
        info = _info_from_headers(files, headers, errors)
        whole = not errors and all("PixelData" in ds and _native(ds) for ds in headers)
        return replace(info, headers=tuple(headers)) if whole else info
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
