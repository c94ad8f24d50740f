"""The node's Secondary Capture summary: the key slice with contours and the numbers burned in.

Many PACS viewers render neither SR nor SEG: this image is what most radiologists will see. The
key slice (the tumor's maximum-diameter slice) is shown in a soft-tissue window (W 400 / L 40),
upscaled to at least :data:`MIN_WIDTH` pixels, with the tumor outlined in red and the lesser
omental adipose tissue in green; below it, a text panel says the MVI probabilities and risk, the
diameter and the LOAT area, the model and the disclaimer. A result that is not scored gives the
same layout with the status and the reason instead (and no image when no slice is given).

Text is drawn with Pillow, in DejaVu Sans when the system has it, else Pillow's own scalable
default font.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from dicom_sr.common import (
    AlgorithmInfo,
    AnalysisResult,
    ResultUIDs,
    add_coding_schemes,
    contributing_equipment,
    copy_patient_study,
    series_description,
    set_equipment,
    slice_references,
)
from dicom_sr.enum import RiskCategory

__all__ = [
    "LOAT_COLOR",
    "MIN_WIDTH",
    "TUMOR_COLOR",
    "WINDOW",
    "build_sc",
    "render_summary",
    "summary_lines",
]

#: Minimum width of the image in pixels (the key slice is upscaled by an integer factor).
MIN_WIDTH = 768
#: Soft-tissue window ``(center, width)`` in HU.
WINDOW = (40.0, 400.0)
TUMOR_COLOR = (255, 0, 0)
LOAT_COLOR = (0, 255, 0)
TEXT_COLOR = (255, 255, 255)
HIGH_RISK_COLOR = (255, 96, 64)
DISCLAIMER_COLOR = (255, 210, 0)
PANEL_COLOR = (0, 0, 0)

_FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/TTF"),
    Path("/usr/local/share/fonts"),
    Path("/Library/Fonts"),
)

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
_RGB = tuple[int, int, int]


@cache
def _font(size: int, bold: bool) -> _Font:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in _FONT_DIRS:
        path = folder / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _percent(probability: float) -> str:
    return f"{100.0 * probability:.0f} %"


def summary_lines(result: AnalysisResult, algorithm: AlgorithmInfo) -> list[tuple[str, _RGB, bool]]:
    """The text panel: ``(text, colour, bold)`` per line.

    Parameters
    ----------
    result
        The analysis.
    algorithm
        The model (name, version, disclaimer).

    Returns
    -------
    list of (str, tuple, bool)
    """
    lines: list[tuple[str, _RGB, bool]] = []
    if result.scored:
        assert result.mvi_probability is not None and result.max_diameter_mm is not None
        risk = "HIGH RISK" if result.risk_category == RiskCategory.HIGH else "LOW RISK"
        text = f"MVI probability {_percent(result.mvi_probability)}"
        if result.combined_probability is not None:
            text += f" (combined {_percent(result.combined_probability)})"
        color = HIGH_RISK_COLOR if result.risk_category == RiskCategory.HIGH else TEXT_COLOR
        lines.append((f"{text} — {risk}", color, True))
        lines.append((f"Max tumor diameter {result.max_diameter_mm:.1f} mm", TEXT_COLOR, False))
        if result.loat_found and result.loat_max_area_cm2 is not None:
            lines.append((f"LOAT max area {result.loat_max_area_cm2:.1f} cm²", TEXT_COLOR, False))
        else:
            lines.append(("LOAT not found", TEXT_COLOR, False))
        lines.append(("Contours: tumor (red), LOAT (green)", TEXT_COLOR, False))
    else:
        lines.append((result.status_text, HIGH_RISK_COLOR, True))
        lines.append((f"Reason: {result.reason}", TEXT_COLOR, False))
    lines.append((f"Model {algorithm.label}", TEXT_COLOR, False))
    if algorithm.effective_disclaimer:
        lines.append((algorithm.effective_disclaimer, DISCLAIMER_COLOR, True))
    return lines


def _wrap(text: str, font: _Font, width: float) -> list[str]:
    words = text.split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current]


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(iterations):
        padded = np.pad(out, 1, constant_values=False)
        out = out & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return out


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """The inner boundary band of a mask, ``thickness`` pixels wide."""
    return mask & ~_erode(mask, thickness)


def _windowed(hu: np.ndarray) -> np.ndarray:
    center, width = WINDOW
    low = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) / width * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _slice_mask(name: str, mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, dtype=bool)
    array = np.asarray(mask)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, the key slice {shape}")
    return array.astype(bool)


def _view(
    hu_slice: np.ndarray,
    tumor_slice: np.ndarray | None,
    loat_slice: np.ndarray | None,
    scale: int,
    caption: str | None,
) -> np.ndarray:
    hu = np.asarray(hu_slice)
    rows, cols = hu.shape
    gray = _windowed(hu)
    if scale > 1:
        gray = np.asarray(
            Image.fromarray(gray).resize((cols * scale, rows * scale), Image.Resampling.BILINEAR)
        )
    image = np.repeat(gray[:, :, np.newaxis], 3, axis=2)
    thickness = max(2, round(cols * scale / 384))
    for mask, color in (
        (_slice_mask("loat_slice", loat_slice, hu.shape), LOAT_COLOR),
        (_slice_mask("tumor_slice", tumor_slice, hu.shape), TUMOR_COLOR),
    ):
        if mask.any():
            big = np.kron(mask, np.ones((scale, scale), dtype=bool))
            image[_outline(big, thickness)] = color
    if caption:
        canvas = Image.fromarray(image)
        size = int(min(22, max(16, round(image.shape[1] / 40))))
        ImageDraw.Draw(canvas).text(
            (size // 2, size // 2), caption, fill=TEXT_COLOR, font=_font(size, False)
        )
        image = np.asarray(canvas)
    return image


def _check_hu(name: str, hu_slice: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    hu = np.asarray(hu_slice)
    if hu.ndim != 2 or 0 in hu.shape:
        raise ValueError(f"{name} must be a 2-D image, got shape {hu.shape}")
    if shape is not None and hu.shape != shape:
        raise ValueError(f"{name} has shape {hu.shape}, expected {shape}")
    if not np.all(np.isfinite(hu)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return hu


def render_summary(
    result: AnalysisResult,
    algorithm: AlgorithmInfo,
    arterial_slice_hu: np.ndarray | None,
    tumor_slice: np.ndarray | None = None,
    loat_slice: np.ndarray | None = None,
    *,
    loat_view: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, int]:
    """Render the summary as an RGB array.

    Parameters
    ----------
    result, algorithm
        What the text says.
    arterial_slice_hu
        ``(rows, cols)`` HU of the key slice, or ``None`` for a text-only image.
    tumor_slice, loat_slice
        ``(rows, cols)`` masks of that slice (``None``: nothing drawn).
    loat_view
        ``(hu, loat mask)`` of the slice of the largest LOAT area, shown beside the key slice
        (the LOAT is rarely on the tumor's slice).

    Returns
    -------
    pixels, scale
        ``(height, width, 3)`` uint8 and the integer upscaling factor of the slice images (0 when
        there is no image).
    """
    if arterial_slice_hu is not None:
        hu = _check_hu("arterial_slice_hu", arterial_slice_hu, None)
        views: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str | None]] = [
            (hu, tumor_slice, loat_slice, None)
        ]
        if loat_view is not None:
            loat_hu = _check_hu("loat_view HU slice", loat_view[0], hu.shape)
            views = [
                (hu, tumor_slice, loat_slice, "Key slice (max tumor diameter)"),
                (loat_hu, None, loat_view[1], "Slice of max LOAT area"),
            ]
        cols = hu.shape[1]
        scale = max(1, math.ceil(MIN_WIDTH / (cols * len(views))))
        image = np.concatenate(
            [
                _view(v_hu, v_tumor, v_loat, scale, caption)
                for v_hu, v_tumor, v_loat, caption in views
            ],
            axis=1,
        )
        width = image.shape[1]
    else:
        image = np.zeros((0, MIN_WIDTH, 3), dtype=np.uint8)
        scale = 0
        width = MIN_WIDTH

    size = int(min(26, max(18, round(width / 40))))
    margin = size
    wrapped: list[tuple[str, _RGB, _Font]] = []
    for text, color, bold in summary_lines(result, algorithm):
        font = _font(size, bold)
        wrapped.extend((line, color, font) for line in _wrap(text, font, width - 2 * margin))
    line_height = round(size * 1.45)
    panel_height = 2 * margin + line_height * len(wrapped)
    panel = Image.new("RGB", (width, panel_height), PANEL_COLOR)
    draw = ImageDraw.Draw(panel)
    for index, (line, color, font) in enumerate(wrapped):
        draw.text((margin, margin + index * line_height), line, fill=color, font=font)
    pixels = np.concatenate([image, np.asarray(panel, dtype=np.uint8)], axis=0)
    return np.ascontiguousarray(pixels), scale


def _orientation_letters(vector: Sequence[float]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(np.asarray(vector, dtype=np.float64)))
    text = ""
    for axis in order:
        component = float(vector[axis])
        if abs(component) > 0.25:
            text += letters[axis][0] if component > 0 else letters[axis][1]
    return text or "L"


def _patient_orientation(reference: Dataset) -> tuple[str, str]:
    if "ImageOrientationPatient" in reference:
        orientation = reference.ImageOrientationPatient
    else:
        groups = reference.SharedFunctionalGroupsSequence[0]
        if "PlaneOrientationSequence" not in groups:
            groups = reference.PerFrameFunctionalGroupsSequence[0]
        orientation = groups.PlaneOrientationSequence[0].ImageOrientationPatient
    values = [float(v) for v in orientation]
    return _orientation_letters(values[:3]), _orientation_letters(values[3:])


def build_sc(
    result: AnalysisResult,
    arterial_slice_hu: np.ndarray | None,
    tumor_slice: np.ndarray | None,
    loat_slice: np.ndarray | None,
    pixel_spacing: tuple[float, float] | None,
    source_images: Sequence[Dataset],
    *,
    algorithm: AlgorithmInfo,
    uids: ResultUIDs,
    slice_index: int | None = None,
    loat_view: tuple[np.ndarray, np.ndarray] | None = None,
    loat_slice_index: int | None = None,
) -> Any:
    """Build the Secondary Capture summary of one analysis.

    Parameters
    ----------
    result
        The analysis; a result that is not scored gives the status-only variant.
    arterial_slice_hu
        ``(rows, cols)`` HU of the key slice of the arterial series (``None``: text only).
    tumor_slice, loat_slice
        ``(rows, cols)`` masks of that slice, outlined in red and green.
    pixel_spacing
        ``(x, y)`` = (column spacing, row spacing) of the arterial images in mm, or ``None``.
        PixelSpacing of the SC is divided by the upscaling factor.
    source_images
        The arterial series (classic images or one Enhanced CT image): patient and study
        attributes and the Source Image Sequence (the key slice) come from it.
    algorithm
        The model and the node.
    uids
        UIDs of this analysis.
    slice_index
        ``k`` of the shown slice; defaults to ``result.diameter_slice`` (when >= 0).
    loat_view
        ``(hu, loat mask)`` of the slice of the largest LOAT area, shown beside the key slice
        (pass it when that slice differs from the key slice).
    loat_slice_index
        ``k`` of that slice; defaults to ``result.loat_area_slice``.

    Returns
    -------
    highdicom.sc.SCImage
        RGB, BurnedInAnnotation YES.

    Raises
    ------
    ValueError
        For a scored result without an image, inconsistent shapes, or a slice index outside the
        source images.
    """
    references = slice_references(source_images)
    first = references[0].dataset
    if result.scored and arterial_slice_hu is None:
        raise ValueError("a scored result needs arterial_slice_hu (the key slice)")
    if slice_index is None and result.diameter_slice >= 0:
        slice_index = result.diameter_slice
    if slice_index is not None and not 0 <= slice_index < len(references):
        raise ValueError(
            f"slice index {slice_index} is outside the source images' {len(references)} slices"
        )
    if arterial_slice_hu is not None:
        shape = np.shape(arterial_slice_hu)
        if shape != (int(first.Rows), int(first.Columns)):
            raise ValueError(
                f"arterial_slice_hu has shape {shape}, the source images are "
                f"{first.Rows} x {first.Columns}"
            )
    if loat_view is not None:
        if arterial_slice_hu is None:
            raise ValueError("loat_view needs arterial_slice_hu (it is shown beside it)")
        if loat_slice_index is None and result.loat_area_slice >= 0:
            loat_slice_index = result.loat_area_slice
        if loat_slice_index is not None and not 0 <= loat_slice_index < len(references):
            raise ValueError(
                f"LOAT slice index {loat_slice_index} is outside the source images' "
                f"{len(references)} slices"
            )
    else:
        loat_slice_index = None
    pixels, scale = render_summary(
        result, algorithm, arterial_slice_hu, tumor_slice, loat_slice, loat_view=loat_view
    )

    spacing = None
    if pixel_spacing is not None and scale > 0:
        sx, sy = (float(v) for v in pixel_spacing)
        if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
            raise ValueError(f"pixel_spacing must be two positive numbers, got {pixel_spacing}")
        spacing = (sy / scale, sx / scale)  # DICOM order: row spacing, column spacing

    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=uids.sc_series_uid,
        series_number=uids.sc_series_number,
        sop_instance_uid=uids.sc_instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        patient_id=first.get("PatientID"),
        patient_name=first.get("PatientName"),
        patient_birth_date=first.get("PatientBirthDate"),
        patient_sex=first.get("PatientSex") or None,
        accession_number=first.get("AccessionNumber"),
        study_id=first.get("StudyID"),
        study_date=first.get("StudyDate"),
        study_time=first.get("StudyTime"),
        referring_physician_name=first.get("ReferringPhysicianName"),
        pixel_spacing=spacing,
        patient_orientation=_patient_orientation(first),
        contributing_equipment=[contributing_equipment(algorithm)],
        series_description=series_description("summary", algorithm, uids.analysis_time),
    )
    copy_patient_study(sc, first)
    set_equipment(sc, algorithm)
    add_coding_schemes(sc)
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = algorithm.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = algorithm.model_name
    sc.SecondaryCaptureDeviceSoftwareVersions = algorithm.software_version
    sc.BurnedInAnnotation = "YES"
    # Laterality (General Series, 2C) is for paired body parts; the liver is unpaired.
    sc.ImageLaterality = "U"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (
        f"MVI summary by {algorithm.label}, soft-tissue window W{WINDOW[1]:g}/L{WINDOW[0]:g}"
    )
    shown = [k for k in (slice_index, loat_slice_index) if k is not None]
    if shown:
        items = []
        for k in dict.fromkeys(shown):
            reference = references[k]
            item = Dataset()
            item.ReferencedSOPClassUID = reference.sop_class_uid
            item.ReferencedSOPInstanceUID = reference.sop_instance_uid
            if reference.frame_number is not None:
                item.ReferencedFrameNumber = reference.frame_number
            items.append(item)
        sc.SourceImageSequence = items
    return sc
