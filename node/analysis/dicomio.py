"""DICOM CT series -> SimpleITK volume, and the volume helpers both directions share.

Reading (:func:`load_series`) turns one CT series -- classic single-frame CT Image Storage files
or Enhanced CT multi-frame objects, natively encoded or compressed -- into a float32 HU
:class:`SimpleITK.Image` in patient LPS space. Slices are ordered by their position along the
slice normal, never by InstanceNumber, and the series is refused with a :class:`DicomIOError` when
it cannot be a regular volume (gaps, duplicates, mixed geometry, missing pixels).

Writing a CT series (for phantoms, demos and tests) is :mod:`node.offline.ct_writer`'s.

:func:`scan_folder` groups the DICOM files below a folder by study and series, reading headers
only.

Conventions: a numpy volume is indexed ``[k, j, i]`` (slice, row, column), as
``SimpleITK.GetArrayFromImage`` returns it; spacing, origin and direction follow SimpleITK
(spacing ``(x, y, z)`` = (column, row, slice) spacing; direction is the row-major 3x3 matrix whose
columns are the i, j, k axis directions in LPS).

Nothing here logs or raises with patient identifiers: series and instances are named by short
hashes of their UIDs (:func:`node.core.logging.uid_key`) or by file name.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from node.core.dicom import functional_group
from node.core.errors import InputError
from node.core.logging import get_logger, uid_key

__all__ = [
    "DicomIOError",
    "SeriesFiles",
    "image_from_volume",
    "load_series",
    "scan_folder",
    "volume_from_image",
]

log = get_logger(__name__)

#: Direction cosines of two slices that differ by more than this are "mixed orientations".
ORIENTATION_TOLERANCE = 1e-4
#: Positions closer than this (mm) along the normal are duplicates; also the absolute floor of
#: the gap tolerance.
POSITION_TOLERANCE_MM = 0.01
#: A step between neighbouring slices that differs from the series' typical step by more than
#: this fraction of it (and more than POSITION_TOLERANCE_MM) is a gap.
GAP_FRACTION = 0.10

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class DicomIOError(InputError):
    """A series cannot be written or loaded; the message names the file or series and says what
    is wrong."""


@dataclass(frozen=True)
class SeriesFiles:
    """The files of one series found by :func:`scan_folder`.

    Attributes
    ----------
    study_instance_uid, series_instance_uid
        The UIDs the files share.
    modality, sop_class_uid, series_description
        Taken from the first file (by path); empty strings when absent.
    paths
        Every file of the series, sorted by path.
    sop_classes
        The SOP Class UIDs of all its files (an empty string for a file without one); empty
        when not known. The pipeline reads no header to look for supplied SEGs in a study whose
        series are known to hold none.
    patient_id
        PatientID of the first file, for grouping a patient's studies in training; kept out of
        the repr so that it never reaches a log line.
    """

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    sop_class_uid: str
    series_description: str
    paths: tuple[Path, ...]
    patient_id: str = field(default="", repr=False)
    sop_classes: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------------------
# SimpleITK <-> numpy
# --------------------------------------------------------------------------------------------


def volume_from_image(
    image: sitk.Image,
) -> tuple[
    np.ndarray,
    tuple[float, float, float],
    tuple[float, float, float],
    tuple[float, ...],
]:
    """Split a 3-D SimpleITK image into a numpy volume and its geometry.

    Parameters
    ----------
    image
        A 3-D scalar image.

    Returns
    -------
    volume
        A copy of the voxels indexed ``[k, j, i]``.
    spacing
        ``(x, y, z)`` spacing in mm.
    origin
        LPS position of the centre of voxel ``[0, 0, 0]`` in mm.
    direction
        Row-major 3x3 matrix (9 values) whose columns are the i, j, k axis directions.
    """
    if image.GetDimension() != 3:
        raise DicomIOError(f"expected a 3-D image, got {image.GetDimension()}-D")
    volume = sitk.GetArrayFromImage(image)
    sx, sy, sz = (float(v) for v in image.GetSpacing())
    ox, oy, oz = (float(v) for v in image.GetOrigin())
    direction = tuple(float(v) for v in image.GetDirection())
    return volume, (sx, sy, sz), (ox, oy, oz), direction


def image_from_volume(
    volume: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float] = _IDENTITY,
) -> sitk.Image:
    """Build a SimpleITK image from a numpy volume indexed ``[k, j, i]`` and its geometry.

    Parameters
    ----------
    volume
        3-D array; its dtype is kept.
    spacing
        ``(x, y, z)`` spacing in mm.
    origin
        LPS position of the centre of voxel ``[0, 0, 0]``.
    direction
        Row-major 3x3 matrix (9 values) whose columns are the i, j, k axis directions.

    Returns
    -------
    SimpleITK.Image
        The image, with the voxels copied.
    """
    array = np.asarray(volume)
    if array.ndim != 3:
        raise DicomIOError(f"expected a 3-D volume [k, j, i], got shape {array.shape}")
    if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
        raise DicomIOError("spacing and origin need 3 values and direction 9")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in direction])
    return image


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """One 2-D image of a series: a single-frame file or one frame of a multi-frame object."""

    dataset: Dataset
    frame: int | None  # None: single-frame object
    label: str
    position: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    slope: float
    intercept: float
    thickness: float | None


def _label(source: Path | Dataset, index: int) -> str:
    """A PHI-free name for an error message: the file name, else the instance UID's hash."""
    if isinstance(source, Path):
        return source.name
    filename = getattr(source, "filename", None)
    if isinstance(filename, str) and filename:
        return Path(filename).name
    uid = str(source.get("SOPInstanceUID", "") or "")
    return f"dataset #{index}" + (f" (instance {uid_key(uid)})" if uid else "")


def _floats(value: Any, count: int, what: str, label: str) -> np.ndarray:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomIOError(f"{label}: unreadable {what}") from exc
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise DicomIOError(f"{label}: {what} needs {count} finite values")
    return array


def _read_source(source: Path | Dataset, index: int) -> tuple[Dataset, str]:
    label = _label(source, index)
    if isinstance(source, Dataset):
        return source, label
    try:
        ds = pydicom.dcmread(source, force=False)
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as exc:
        raise DicomIOError(f"{label}: not a readable DICOM file ({type(exc).__name__})") from exc
    return ds, label


def _slices_of(ds: Dataset, label: str) -> list[_Slice]:
    """The 2-D images of one object, with the geometry and rescale each needs."""
    if "Rows" not in ds or "Columns" not in ds:
        sop_class = str(ds.get("SOPClassUID", "") or "unknown")
        raise DicomIOError(f"{label}: not an image object (SOP Class {sop_class})")
    if "PixelData" not in ds:
        raise DicomIOError(f"{label}: missing Pixel Data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomIOError(f"{label}: not a grayscale image (SamplesPerPixel != 1)")
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)

    if "PerFrameFunctionalGroupsSequence" not in ds:
        if n_frames != 1:
            raise DicomIOError(f"{label}: multi-frame object without functional groups")
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if not ds.get(keyword):
                raise DicomIOError(f"{label}: missing {keyword}")
        orientation = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", label)
        spacing = _floats(ds.PixelSpacing, 2, "PixelSpacing", label)
        thickness = ds.get("SliceThickness")
        return [
            _Slice(
                dataset=ds,
                frame=None,
                label=label,
                position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", label),
                row_dir=orientation[:3],
                col_dir=orientation[3:],
                rows=rows,
                cols=cols,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
                intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
                thickness=float(thickness) if thickness not in (None, "") else None,
            )
        ]

    if len(ds.PerFrameFunctionalGroupsSequence) != n_frames:
        raise DicomIOError(
            f"{label}: {len(ds.PerFrameFunctionalGroupsSequence)} per-frame functional groups "
            f"for {n_frames} frames"
        )
    slices = []
    for frame in range(n_frames):
        frame_label = f"{label} frame {frame + 1}"
        position_item = functional_group(ds, frame, "PlanePositionSequence")
        orientation_item = functional_group(ds, frame, "PlaneOrientationSequence")
        measures_item = functional_group(ds, frame, "PixelMeasuresSequence")
        if position_item is None or orientation_item is None or measures_item is None:
            raise DicomIOError(f"{frame_label}: missing plane position, orientation or measures")
        orientation = _floats(
            orientation_item.get("ImageOrientationPatient"),
            6,
            "ImageOrientationPatient",
            frame_label,
        )
        spacing = _floats(measures_item.get("PixelSpacing"), 2, "PixelSpacing", frame_label)
        transform = functional_group(ds, frame, "PixelValueTransformationSequence")
        # Without the functional group the top-level rescale (or identity) applies.
        source = transform if transform is not None else ds
        thickness = measures_item.get("SliceThickness")
        slices.append(
            _Slice(
                dataset=ds,
                frame=frame,
                label=frame_label,
                position=_floats(
                    position_item.get("ImagePositionPatient"),
                    3,
                    "ImagePositionPatient",
                    frame_label,
                ),
                row_dir=orientation[:3],
                col_dir=orientation[3:],
                rows=rows,
                cols=cols,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                slope=float(source.get("RescaleSlope", 1.0) or 1.0),
                intercept=float(source.get("RescaleIntercept", 0.0) or 0.0),
                thickness=float(thickness) if thickness not in (None, "") else None,
            )
        )
    return slices


def _unit(vector: np.ndarray, label: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if norm < 1e-6:
        raise DicomIOError(f"{label}: degenerate ImageOrientationPatient")
    return vector / norm


def _check_consistent(slices: list[_Slice], series_name: str) -> None:
    first = slices[0]
    for other in slices[1:]:
        if (other.rows, other.cols) != (first.rows, first.cols):
            raise DicomIOError(
                f"{series_name}: mixed image sizes: {first.rows}x{first.cols} ({first.label}) "
                f"and {other.rows}x{other.cols} ({other.label})"
            )
        if not np.allclose(other.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-4):
            raise DicomIOError(
                f"{series_name}: mixed PixelSpacing: {list(first.pixel_spacing)} "
                f"({first.label}) and {list(other.pixel_spacing)} ({other.label})"
            )
        if not (
            np.allclose(other.row_dir, first.row_dir, atol=ORIENTATION_TOLERANCE)
            and np.allclose(other.col_dir, first.col_dir, atol=ORIENTATION_TOLERANCE)
        ):
            raise DicomIOError(
                f"{series_name}: mixed orientations: ImageOrientationPatient of {other.label} "
                f"differs from {first.label}"
            )


def _sorted_geometry(
    slices: list[_Slice], series_name: str
) -> tuple[list[_Slice], float, np.ndarray, np.ndarray, np.ndarray]:
    """Sort slices along the normal and check that they form a regular grid.

    Returns the sorted slices, the slice spacing and the orthonormal row, column and normal
    directions.
    """
    first = slices[0]
    row_dir = _unit(first.row_dir, first.label)
    # Re-orthogonalise: DS rounding leaves IOP a few 1e-9 off orthogonal, which SimpleITK and
    # later resampling would carry along.
    col_dir = first.col_dir - np.dot(first.col_dir, row_dir) * row_dir
    col_dir = _unit(col_dir, first.label)
    normal = np.cross(row_dir, col_dir)

    distances = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(distances, kind="stable")
    ordered = [slices[i] for i in order]
    distances = distances[order]

    if len(ordered) == 1:
        thickness = ordered[0].thickness
        spacing = thickness if thickness is not None and thickness > 0 else 1.0
        return ordered, spacing, row_dir, col_dir, normal

    steps = np.diff(distances)
    for index, step in enumerate(steps):
        if step < POSITION_TOLERANCE_MM:
            raise DicomIOError(
                f"{series_name}: duplicate slice position {distances[index]:.3f} mm along the "
                f"normal ({ordered[index].label} and {ordered[index + 1].label})"
            )
    typical = float(np.median(steps))
    tolerance = max(GAP_FRACTION * typical, POSITION_TOLERANCE_MM)
    for index, step in enumerate(steps):
        if abs(step - typical) > tolerance:
            kind = "gap" if step > typical else "irregular spacing"
            raise DicomIOError(
                f"{series_name}: {kind} between slice positions {distances[index]:.3f} and "
                f"{distances[index + 1]:.3f} mm along the normal ({ordered[index].label} and "
                f"{ordered[index + 1].label}): step {step:.3f} mm, expected {typical:.3f} mm"
            )

    # Slices must stack straight along the normal; a tilted gantry or sheared stack has no
    # SimpleITK representation and would be silently distorted.
    origin = ordered[0].position
    for s, distance in zip(ordered, distances, strict=True):
        offset = s.position - origin
        lateral = offset - np.dot(offset, normal) * normal
        if float(np.linalg.norm(lateral)) > tolerance:
            raise DicomIOError(
                f"{series_name}: slice positions do not line up along the slice normal "
                f"({s.label} at {distance:.3f} mm is offset {np.linalg.norm(lateral):.3f} mm "
                "in-plane; tilted or sheared acquisition)"
            )

    spacing = float((distances[-1] - distances[0]) / (len(ordered) - 1))
    return ordered, spacing, row_dir, col_dir, normal


def _decode(slice_: _Slice) -> np.ndarray:
    try:
        if slice_.frame is None:
            array = pixel_array(slice_.dataset)
        else:
            array = pixel_array(slice_.dataset, index=slice_.frame)
    except Exception as exc:  # decoders raise anything from RuntimeError to their own types
        raise DicomIOError(
            f"{slice_.label}: cannot decode pixel data ({type(exc).__name__}: {exc})"
        ) from exc
    if array.shape != (slice_.rows, slice_.cols):
        raise DicomIOError(
            f"{slice_.label}: decoded pixel data has shape {array.shape}, "
            f"expected {(slice_.rows, slice_.cols)}"
        )
    return array


def load_series(sources: Sequence[Path | Dataset]) -> sitk.Image:
    """Load one CT series as a float32 HU image in patient LPS space.

    Parameters
    ----------
    sources
        The series' files or datasets, in any order: classic single-frame images, or one or more
        Enhanced (multi-frame, functional-group) objects. Compressed transfer syntaxes are
        decoded by pydicom's pixel backends (JPEG Lossless, JPEG-LS, JPEG 2000, RLE, deflate).

    Returns
    -------
    SimpleITK.Image
        float32 HU (rescale applied per slice, or per frame from the functional groups).
        Slices are ordered by position along the normal ``row x column``, never by
        InstanceNumber; origin is the position of the first slice in that order; spacing is
        (column, row, slice) with the slice spacing computed from the positions (SliceThickness,
        or 1 mm, for a single slice); direction has columns row, column, normal.

    Raises
    ------
    DicomIOError
        For no input, unreadable files, non-image objects, missing Pixel Data, several series,
        mixed sizes, pixel spacings or orientations, duplicate positions, gaps or irregular
        spacing, or slices that do not stack along the normal.
    """
    if not sources:
        raise DicomIOError("no files or datasets given: empty series")

    slices: list[_Slice] = []
    series_uids: dict[str, str] = {}
    for index, source in enumerate(sources):
        ds, label = _read_source(source, index)
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        series_uids.setdefault(series_uid, label)
        slices.extend(_slices_of(ds, label))
    if len(series_uids) > 1:
        names = ", ".join(
            f"{uid_key(uid) if uid else 'no SeriesInstanceUID'} ({label})"
            for uid, label in series_uids.items()
        )
        raise DicomIOError(f"files of {len(series_uids)} series mixed: {names}")
    (only_uid,) = series_uids
    series_name = f"series {uid_key(only_uid)}" if only_uid else "series without UID"

    _check_consistent(slices, series_name)
    ordered, slice_spacing, row_dir, col_dir, normal = _sorted_geometry(slices, series_name)

    first = ordered[0]
    volume = np.empty((len(ordered), first.rows, first.cols), dtype=np.float32)
    for k, slice_ in enumerate(ordered):
        # In float32, in place: 16-bit stored values are exact in float32 (wider ones round
        # as the float32 volume rounds them anyway), and float64 temporaries cost a third of a
        # millisecond per 512 x 512 slice.
        np.multiply(_decode(slice_), np.float32(slice_.slope), out=volume[k], dtype=np.float32)
        volume[k] += np.float32(slice_.intercept)

    row_spacing, col_spacing = first.pixel_spacing
    direction = np.column_stack([row_dir, col_dir, normal]).ravel()
    image = image_from_volume(
        volume,
        (col_spacing, row_spacing, slice_spacing),
        tuple(float(v) for v in first.position),
        tuple(float(v) for v in direction),
    )
    log.debug("loaded series", series_key=uid_key(only_uid), size=list(image.GetSize()))
    return image


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------


def scan_folder(folder: Path) -> dict[str, dict[str, SeriesFiles]]:
    """Find the DICOM files below ``folder`` and group them by study and series.

    Only headers are read. Files that are not DICOM (no ``DICM`` preamble, unreadable,
    truncated before the series UIDs) are skipped; their count is logged at debug level.

    Parameters
    ----------
    folder
        Folder walked recursively.

    Returns
    -------
    dict
        ``{StudyInstanceUID: {SeriesInstanceUID: SeriesFiles}}``, paths sorted within each
        series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomIOError(f"{folder}: not a folder")
    found: dict[tuple[str, str], list[tuple[Path, Dataset]]] = {}
    skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        except (InvalidDicomError, OSError, EOFError, ValueError, struct.error, KeyError):
            skipped += 1
            continue
        if not study_uid or not series_uid:
            skipped += 1
            continue
        found.setdefault((study_uid, series_uid), []).append((path, ds))

    result: dict[str, dict[str, SeriesFiles]] = {}
    for (study_uid, series_uid), members in found.items():
        first = members[0][1]
        result.setdefault(study_uid, {})[series_uid] = SeriesFiles(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            modality=str(first.get("Modality", "") or ""),
            sop_class_uid=str(first.get("SOPClassUID", "") or ""),
            series_description=str(first.get("SeriesDescription", "") or ""),
            paths=tuple(path for path, _ in members),
            patient_id=str(first.get("PatientID", "") or "").strip(),
            sop_classes=frozenset(str(ds.get("SOPClassUID", "") or "") for _, ds in members),
        )
    log.debug(
        "scanned folder",
        series=sum(len(s) for s in result.values()),
        studies=len(result),
        skipped_files=skipped,
    )
    return result
