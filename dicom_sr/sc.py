"""The node's Secondary Capture summary: the key slice with contours and the numbers burned in.

Many PACS viewers render neither SR nor SEG: this image is what most radiologists will see, so it
must let a reader check what it says. The key slice (the tumor's maximum-diameter slice) is shown
in a soft-tissue window (W 400 / L 40), upscaled to at least :data:`MIN_WIDTH` pixels, with the
tumor outlined in red, the lesser omental adipose tissue in green and the maximum diameter as a
yellow caliper with its length; beside it, when the LOAT's largest area lies on another slice,
that slice. Each image panel carries its label (what it shows, series and image number of the
source image), the orientation letters of its edges and the window. Below, a text panel says the
risk with the probability and the threshold that set it, the measurements, the key slices, what
made the segmentation, each quality check and note, the model and the disclaimer. A result that
is not scored gives the same layout with the status and the reason instead (and no image when no
slice is given).

Text is drawn with Pillow, in DejaVu Sans when the system has it, else Pillow's own scalable
default font.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

from dicom_sr.common import (
    AlgorithmInfo,
    AnalysisResult,
    ResultUIDs,
    SliceReference,
    add_coding_schemes,
    content_date_time,
    contributing_equipment,
    copy_patient_study,
    series_description,
    set_equipment,
    slice_references,
)
from dicom_sr.enum import RiskCategory

__all__ = [
    "CALIPER_COLOR",
    "LOAT_COLOR",
    "MIN_WIDTH",
    "TUMOR_COLOR",
    "WARNING_COLOR",
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
#: The maximum-diameter caliper and its length; no windowed (grey) pixel can have this colour.
CALIPER_COLOR = (255, 255, 0)
TEXT_COLOR = (255, 255, 255)
HIGH_RISK_COLOR = (255, 96, 64)
#: Lines the reader must not miss: a status that is not scored, a quality check that did not pass.
WARNING_COLOR = HIGH_RISK_COLOR
DISCLAIMER_COLOR = (255, 210, 0)
PANEL_COLOR = (0, 0, 0)
_OUTLINE_COLOR = (0, 0, 0)

_FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/TTF"),
    Path("/usr/local/share/fonts"),
    Path("/Library/Fonts"),
)

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
_RGB = tuple[int, int, int]
_Point = tuple[float, float]

# A quality-gate line reads "<gate>: passed (...)" or "<gate>: FAILED — ..."; anything that does
# not say it passed is shown as a warning, so that an unexpected wording is not read as a pass.
_PASSED = re.compile(r"^[^:]*:\s*passed\b", re.IGNORECASE)


@cache
def _font(size: int, bold: bool) -> _Font:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in _FONT_DIRS:
        path = folder / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _percent(probability: float, digits: int = 0) -> str:
    return f"{100.0 * probability:.{digits}f} %"


def _comparison(probability: float, threshold: float) -> str:
    """``"83 % ≥ threshold 46 %"`` with enough digits that the sign agrees with the figures.

    A probability of 45.6 % against a threshold of 46.0 % would otherwise read "46 % < 46 %".
    """
    sign = "≥" if probability >= threshold else "<"
    for digits in range(4):
        shown_p, shown_t = _percent(probability, digits), _percent(threshold, digits)
        if shown_p != shown_t or probability == threshold:
            break
    return f"{shown_p} {sign} threshold {shown_t}"


def _one_line(text: str) -> str:
    # A site disclaimer typed with line breaks would otherwise be drawn as several lines.
    return " ".join(text.split())


def _check_line(check: str) -> tuple[str, _RGB, bool]:
    text = f"Check {_one_line(check)}"
    if _PASSED.match(check.strip()):
        return text, TEXT_COLOR, False
    return text, WARNING_COLOR, True


def _segmentation_text(result: AnalysisResult) -> str | None:
    if result.segmentation_algorithm.strip():
        return f"Segmentation: {_one_line(result.segmentation_algorithm)}"
    if not result.scored:
        return None
    if result.segmentation_source == "supplied":
        return "Segmentation: supplied SEG"
    return "Segmentation: automatic"


def summary_lines(
    result: AnalysisResult,
    algorithm: AlgorithmInfo,
    *,
    key_slices: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, _RGB, bool]]:
    """The text panel: ``(text, colour, bold)`` per line.

    Parameters
    ----------
    result
        The analysis.
    algorithm
        The model (name, version, disclaimer).
    key_slices
        ``(location, purpose)`` of each slice shown, in panel order, e.g.
        ``("series 3, image 42", "max diameter")``; an empty purpose means the slice is shown
        for orientation only. Entries with an empty location are not listed.

    Returns
    -------
    list of (str, tuple, bool)
        The risk headline first (scored) or the status and the reason; the disclaimer, when
        there is one, is the last line and the only one that says it.
    """
    lines: list[tuple[str, _RGB, bool]] = []
    if result.scored:
        assert result.mvi_probability is not None and result.max_diameter_mm is not None
        high = result.risk_category == RiskCategory.HIGH
        risk = "HIGH RISK" if high else "LOW RISK"
        if result.threshold is not None:
            figures = f"MVI probability {_comparison(result.mvi_probability, result.threshold)}"
        else:
            figures = f"MVI probability {_percent(result.mvi_probability)}"
        lines.append((f"{risk} — {figures}", HIGH_RISK_COLOR if high else TEXT_COLOR, True))
        basis = "Risk set by the deep-learning MVI probability"
        if result.combined_probability is not None:
            basis += f"; combined model {_percent(result.combined_probability)} (for information)"
        lines.append((basis, TEXT_COLOR, False))
        lines.append((f"Max tumor diameter {result.max_diameter_mm:.1f} mm", TEXT_COLOR, False))
        if result.loat_found and result.loat_max_area_cm2 is not None:
            lines.append((f"LOAT max area {result.loat_max_area_cm2:.1f} cm²", TEXT_COLOR, False))
        else:
            lines.append(("LOAT not found", TEXT_COLOR, False))
    else:
        lines.append((result.status_text, WARNING_COLOR, True))
        lines.append((f"Reason: {_one_line(result.reason or '')}", TEXT_COLOR, False))
    for location, purpose in key_slices:
        if not location:
            continue
        text = f"Key slice: {location} ({purpose})" if purpose else f"Slice shown: {location}"
        lines.append((text, TEXT_COLOR, False))
    if result.scored:
        legend = "Contours: tumor (red), LOAT (green)"
        if result.diameter_endpoints is not None:
            legend += "; max diameter: yellow caliper"
        lines.append((legend, TEXT_COLOR, False))
    segmentation = _segmentation_text(result)
    if segmentation is not None:
        lines.append((segmentation, TEXT_COLOR, False))
    lines.extend(_check_line(check) for check in result.checks if check.strip())
    lines.extend(
        (f"Note: {_one_line(note)}", TEXT_COLOR, False) for note in result.notes if note.strip()
    )
    lines.append((f"Model {algorithm.label}", TEXT_COLOR, False))
    disclaimer = _one_line(algorithm.effective_disclaimer)
    if disclaimer:
        lines.append((disclaimer, DISCLAIMER_COLOR, True))
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


class _EdgeLetters(NamedTuple):
    """Patient-direction letters at the middle of each edge of an image panel."""

    left: str
    right: str
    top: str
    bottom: str


def _orientation_letters(vector: Sequence[float]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(np.asarray(vector, dtype=np.float64)))
    text = ""
    for axis in order:
        component = float(vector[axis])
        if abs(component) > 0.25:
            text += letters[axis][0] if component > 0 else letters[axis][1]
    return text or "L"


def _edge_letters(image_orientation: Sequence[float]) -> _EdgeLetters:
    """Letters of the panel's edges from ImageOrientationPatient (row cosines, column cosines).

    Columns increase along the row direction, so the right edge is where that vector points and
    the left edge is its opposite; rows increase along the column direction (bottom edge).
    """
    values = [float(v) for v in image_orientation]
    if len(values) != 6:
        raise ValueError(f"image orientation needs 6 values, got {len(values)}")
    row, column = values[:3], values[3:]
    return _EdgeLetters(
        left=_orientation_letters([-v for v in row]),
        right=_orientation_letters(row),
        top=_orientation_letters([-v for v in column]),
        bottom=_orientation_letters(column),
    )


def _image_orientation(reference: Dataset) -> list[float]:
    if "ImageOrientationPatient" in reference:
        orientation = reference.ImageOrientationPatient
    else:
        groups = reference.SharedFunctionalGroupsSequence[0]
        if "PlaneOrientationSequence" not in groups:
            groups = reference.PerFrameFunctionalGroupsSequence[0]
        orientation = groups.PlaneOrientationSequence[0].ImageOrientationPatient
    return [float(v) for v in orientation]


def _patient_orientation(reference: Dataset) -> tuple[str, str]:
    values = _image_orientation(reference)
    return _orientation_letters(values[:3]), _orientation_letters(values[3:])


def _text(
    draw: ImageDraw.ImageDraw, xy: _Point, text: str, font: _Font, fill: _RGB = TEXT_COLOR
) -> None:
    # A black outline keeps overlay text legible on bright and dark tissue alike.
    stroke = max(1, round(_font_size(font) / 8))
    draw.text(xy, text, fill=fill, font=font, stroke_width=stroke, stroke_fill=_OUTLINE_COLOR)


def _font_size(font: _Font) -> int:
    return int(getattr(font, "size", 16))


def _text_box(
    draw: ImageDraw.ImageDraw, text: str, font: _Font
) -> tuple[float, float, float, float]:
    """``(left, top, width, height)`` of ``text`` drawn at the origin, outline included."""
    stroke = max(1, round(_font_size(font) / 8))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    return float(left), float(top), float(right - left), float(bottom - top)


def _scaled(point: _Point, scale: int) -> _Point:
    """A continuous ``(i, j)`` index of the slice in panel pixel coordinates.

    Slice pixel ``c`` covers panel pixels ``c * scale`` to ``(c + 1) * scale - 1`` (nearest
    upscaling of the masks), so its centre, index ``c``, is at ``(c + 0.5) * scale - 0.5``.
    """
    i, j = point
    return (i + 0.5) * scale - 0.5, (j + 0.5) * scale - 0.5


def _draw_caliper(
    draw: ImageDraw.ImageDraw,
    ends: tuple[_Point, _Point],
    label: str,
    size: tuple[int, int],
    line_width: int,
    font: _Font,
) -> None:
    """A caliper between two panel points: the line, end ticks across it, its length beside it."""
    (x0, y0), (x1, y1) = ends
    length = math.hypot(x1 - x0, y1 - y0)
    if length < 1.0:
        return
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    nx, ny = -uy, ux
    draw.line([(x0, y0), (x1, y1)], fill=CALIPER_COLOR, width=line_width)
    tick = 3 * line_width + 3
    for x, y in ((x0, y0), (x1, y1)):
        draw.line(
            [(x - nx * tick, y - ny * tick), (x + nx * tick, y + ny * tick)],
            fill=CALIPER_COLOR,
            width=line_width,
        )
    # The label sits beside the middle of the line, its box clear of the line: its centre is
    # farther from the line than any corner of the box is from the centre.
    left, top, width, height = _text_box(draw, label, font)
    clearance = tick + math.hypot(width, height) / 2.0
    mx, my = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    panel_width, panel_height = size
    sides = (1.0, -1.0) if ny < 0 else (-1.0, 1.0)  # above the line first
    corners = [
        (mx + side * nx * clearance - width / 2.0, my + side * ny * clearance - height / 2.0)
        for side in sides
    ]
    inside = [
        (x, y)
        for x, y in corners
        if x >= 0 and y >= 0 and x + width <= panel_width and y + height <= panel_height
    ]
    # A line near the panel's edge on both sides: keep the label in the panel, even over it.
    x, y = inside[0] if inside else corners[0]
    x = min(max(x, 0.0), panel_width - width)
    y = min(max(y, 0.0), panel_height - height)
    _text(draw, (x - left, y - top), label, font, CALIPER_COLOR)


def _fitting_font(
    draw: ImageDraw.ImageDraw, texts: Sequence[str], size: int, width: float, bold: bool
) -> _Font:
    """The largest font (down to 10 px) in which every text fits ``width``."""
    for candidate in range(size, 9, -1):
        font = _font(candidate, bold)
        if all(_text_box(draw, text, font)[2] <= width for text in texts):
            return font
    return _font(10, bold)


def _annotate(
    image: np.ndarray,
    caption: Sequence[str],
    letters: _EdgeLetters | None,
    caliper: tuple[tuple[_Point, _Point], str] | None,
    line_width: int,
) -> np.ndarray:
    """Burn the caliper, the caption, the edge letters and the window into one image panel."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    size = int(min(22, max(16, round(width / 24))))
    pad = max(4, size // 3)
    letter_font = _font(size, True)
    if caliper is not None:
        ends, label = caliper
        _draw_caliper(draw, ends, label, (width, height), line_width, letter_font)
    top_reserve = 0.0
    if letters is not None:
        middle = height / 2.0
        boxes = {
            name: _text_box(draw, text, letter_font) for name, text in letters._asdict().items()
        }
        top_reserve = boxes["top"][2] / 2.0 + pad
        corners = {  # top-left corner of each letter's box
            "left": (pad, middle - boxes["left"][3] / 2.0),
            "right": (width - pad - boxes["right"][2], middle - boxes["right"][3] / 2.0),
            "top": ((width - boxes["top"][2]) / 2.0, pad),
            "bottom": ((width - boxes["bottom"][2]) / 2.0, height - pad - boxes["bottom"][3]),
        }
        for name, text in letters._asdict().items():
            left, top, _, _ = boxes[name]
            x, y = corners[name]
            _text(draw, (x - left, y - top), text, letter_font)
    lines = [line for line in caption if line]
    if lines:
        # The caption takes the top-left corner up to the top letter, shrinking to stay clear.
        font = _fitting_font(draw, lines, size, width / 2.0 - top_reserve - pad, False)
        y = float(pad)
        for line in lines:
            left, top, _, h = _text_box(draw, line, font)
            _text(draw, (pad - left, y - top), line, font)
            y += h + pad / 2.0
    window = f"W {WINDOW[1]:g} L {WINDOW[0]:g}"
    window_font = _font(size, False)
    left, top, _, h = _text_box(draw, window, window_font)
    _text(draw, (pad - left, height - pad - h - top), window, window_font)
    return np.asarray(canvas)


class _View(NamedTuple):
    hu: np.ndarray
    tumor: np.ndarray | None
    loat: np.ndarray | None
    caption: tuple[str, ...]
    caliper: tuple[_Point, _Point] | None


def _view(view: _View, scale: int, letters: _EdgeLetters | None, diameter_label: str) -> np.ndarray:
    hu = np.asarray(view.hu)
    rows, cols = hu.shape
    gray = _windowed(hu)
    if scale > 1:
        gray = np.asarray(
            Image.fromarray(gray).resize((cols * scale, rows * scale), Image.Resampling.BILINEAR)
        )
    image = np.repeat(gray[:, :, np.newaxis], 3, axis=2)
    thickness = max(2, round(cols * scale / 384))
    for mask, color in (
        (_slice_mask("loat_slice", view.loat, hu.shape), LOAT_COLOR),
        (_slice_mask("tumor_slice", view.tumor, hu.shape), TUMOR_COLOR),
    ):
        if mask.any():
            big = np.kron(mask, np.ones((scale, scale), dtype=bool))
            image[_outline(big, thickness)] = color
    caliper = None
    if view.caliper is not None:
        first, second = view.caliper
        caliper = ((_scaled(first, scale), _scaled(second, scale)), diameter_label)
    return _annotate(image, view.caption, letters, caliper, thickness)


def _check_hu(name: str, hu_slice: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    hu = np.asarray(hu_slice)
    if hu.ndim != 2 or 0 in hu.shape:
        raise ValueError(f"{name} must be a 2-D image, got shape {hu.shape}")
    if shape is not None and hu.shape != shape:
        raise ValueError(f"{name} has shape {hu.shape}, expected {shape}")
    if not np.all(np.isfinite(hu)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return hu


def _default_purposes(result: AnalysisResult, two_views: bool) -> list[str]:
    key = "max diameter" if result.scored else ""
    if (
        result.scored
        and not two_views
        and result.loat_found
        and result.loat_area_slice >= 0
        and result.loat_area_slice == result.diameter_slice
    ):
        key += ", LOAT max area"
    return [key, "LOAT max area"] if two_views else [key]


def _caption(location: str, purpose: str) -> tuple[str, ...]:
    head = purpose[:1].upper() + purpose[1:]
    return tuple(line for line in (head, location) if line)


def _check_endpoints(ends: tuple[_Point, _Point], shape: tuple[int, int]) -> None:
    rows, cols = shape
    tolerance = 1e-6
    for i, j in ends:
        # Endpoints are pixel corners: at most half a pixel beyond the outermost centres.
        inside_i = -0.5 - tolerance <= i <= cols - 0.5 + tolerance
        inside_j = -0.5 - tolerance <= j <= rows - 0.5 + tolerance
        if not (inside_i and inside_j):
            raise ValueError(
                f"diameter endpoint {(i, j)} is outside the key slice ({rows} x {cols})"
            )


def render_summary(
    result: AnalysisResult,
    algorithm: AlgorithmInfo,
    arterial_slice_hu: np.ndarray | None,
    tumor_slice: np.ndarray | None = None,
    loat_slice: np.ndarray | None = None,
    *,
    loat_view: tuple[np.ndarray, np.ndarray] | None = None,
    key_slices: Sequence[tuple[str, str]] | None = None,
    image_orientation: Sequence[float] | None = None,
    caliper: bool = True,
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
    key_slices
        ``(location, purpose)`` of each image panel (key slice, then LOAT slice), e.g.
        ``("series 3, image 42", "max diameter")``: the panel's label and a text line. ``None``:
        the purposes follow from ``result`` and no location is named.
    image_orientation
        ImageOrientationPatient of the slices (six direction cosines): the letters at the
        panels' edges. ``None``: no letters.
    caliper
        Draw ``result.diameter_endpoints`` on the key slice (a scored result only); pass
        ``False`` when the key slice shown is not the diameter's slice.

    Returns
    -------
    pixels, scale
        ``(height, width, 3)`` uint8 and the integer upscaling factor of the slice images (0 when
        there is no image).

    Raises
    ------
    ValueError
        For images or masks of inconsistent shapes, non-finite HU, or diameter endpoints outside
        the key slice.
    """
    two_views = arterial_slice_hu is not None and loat_view is not None
    if key_slices is None:
        key_slices = [("", purpose) for purpose in _default_purposes(result, two_views)]
    key_slices = list(key_slices)
    if arterial_slice_hu is not None:
        hu = _check_hu("arterial_slice_hu", arterial_slice_hu, None)
        ends = result.diameter_endpoints if caliper and result.scored else None
        if ends is not None:
            _check_endpoints(ends, (hu.shape[0], hu.shape[1]))
        labels = [_caption(*entry) for entry in key_slices[:2]]
        labels += [()] * (2 - len(labels))
        views = [_View(hu, tumor_slice, loat_slice, labels[0], ends)]
        if loat_view is not None:
            loat_hu = _check_hu("loat_view HU slice", loat_view[0], hu.shape)
            views.append(_View(loat_hu, None, loat_view[1], labels[1], None))
        scale = max(1, math.ceil(MIN_WIDTH / (hu.shape[1] * len(views))))
        letters = None if image_orientation is None else _edge_letters(image_orientation)
        diameter = f"{result.max_diameter_mm:.1f} mm" if result.max_diameter_mm is not None else ""
        image = np.concatenate([_view(view, scale, letters, diameter) for view in views], axis=1)
        width = image.shape[1]
    else:
        image = np.zeros((0, MIN_WIDTH, 3), dtype=np.uint8)
        scale = 0
        width = MIN_WIDTH
        key_slices = []

    size = int(min(26, max(18, round(width / 40))))
    margin = size
    wrapped: list[tuple[str, _RGB, _Font]] = []
    for text, color, bold in summary_lines(result, algorithm, key_slices=key_slices):
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


def _location(reference: SliceReference) -> str:
    """``"series 3, image 42"`` (``"series 3, frame 17"`` in an Enhanced CT object).

    The numbers a reader types into the viewer to find the slice; never ``k``, which follows the
    slice positions, not the InstanceNumbers.
    """
    ds = reference.dataset
    parts = []
    series = ds.get("SeriesNumber")
    if series is not None and str(series) != "":
        parts.append(f"series {series}")
    if reference.frame_number is not None:
        parts.append(f"frame {reference.frame_number}")
    else:
        instance = ds.get("InstanceNumber")
        has_number = instance is not None and str(instance) != ""
        parts.append(f"image {instance}" if has_number else "image without number")
    return ", ".join(parts)


def _key_slices(
    result: AnalysisResult,
    references: Sequence[SliceReference],
    slice_index: int | None,
    loat_slice_index: int | None,
    loat_view: tuple[np.ndarray, np.ndarray] | None,
) -> list[tuple[str, str]]:
    """``(location, purpose)`` of the key slice and, when shown, of the LOAT slice."""
    purposes = []
    if result.scored and slice_index is not None and slice_index == result.diameter_slice:
        purposes.append("max diameter")
    if (
        loat_view is None
        and result.loat_found
        and slice_index is not None
        and result.loat_area_slice == slice_index
    ):
        # The LOAT's largest area lies on the key slice: its contour there is the one measured.
        purposes.append("LOAT max area")
    where = _location(references[slice_index]) if slice_index is not None else ""
    entries = [(where, ", ".join(purposes))]
    if loat_view is not None:
        where = _location(references[loat_slice_index]) if loat_slice_index is not None else ""
        entries.append((where, "LOAT max area"))
    return entries


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
    study: Dataset | None = None,
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
        RGB, BurnedInAnnotation YES. Each image panel and the text name its slice by the source
        image's SeriesNumber and InstanceNumber (frame number in an Enhanced CT object); the
        caliper is drawn when the slice shown is ``result.diameter_slice``. A text-only image
        references no source image.

    Raises
    ------
    ValueError
        For a scored result without an image, inconsistent shapes, or a slice index outside the
        source images.
    """
    # Without source images (a study with no image series) the SC is text only and takes the
    # patient and study from ``study``.
    references = slice_references(source_images) if source_images else []
    first = references[0].dataset if references else study
    if first is None:
        raise ValueError("an SC without source images needs the study (any instance of it)")
    if not references and (result.scored or arterial_slice_hu is not None):
        raise ValueError("an image SC needs the source images")
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
    if arterial_slice_hu is None:
        # Nothing is shown: the Source Image Sequence must not name a slice.
        slice_index = None
    key_slices = _key_slices(result, references, slice_index, loat_slice_index, loat_view)
    pixels, scale = render_summary(
        result,
        algorithm,
        arterial_slice_hu,
        tumor_slice,
        loat_slice,
        loat_view=loat_view,
        key_slices=key_slices,
        image_orientation=_image_orientation(first) if references else None,
        caliper=slice_index is not None and slice_index == result.diameter_slice,
    )

    spacing = None
    if pixel_spacing is not None and scale > 0:
        sx, sy = (float(v) for v in pixel_spacing)
        if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
            raise ValueError(f"pixel_spacing must be two positive numbers, got {pixel_spacing}")
        spacing = (sy / scale, sx / scale)  # DICOM order: row spacing, column spacing

    content_date, content_time = content_date_time(uids.analysis_time, first)
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
        patient_orientation=_patient_orientation(first) if references else ("L", "P"),
        contributing_equipment=[contributing_equipment(algorithm)],
        series_description=series_description("summary", algorithm, uids.analysis_time),
    )
    copy_patient_study(sc, first)
    set_equipment(sc, algorithm)
    add_coding_schemes(sc)
    # The analysis time, as the SEG and SR carry it, rather than the moment of encoding.
    sc.ContentDate = DA(content_date.strftime("%Y%m%d"))
    sc.ContentTime = TM(content_time.strftime("%H%M%S"))
    if not references:
        sc.PatientOrientation = []  # type 2: a text panel has no orientation
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
