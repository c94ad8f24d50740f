"""The Secondary Capture summary: what a reader can check on it.

Validity (dciodvfy) of every variant, RGB, size and burned-in annotation; the contours, the
maximum-diameter caliper, the orientation letters and the window on the image panels; the risk
headline with the threshold that set it, the key slices named by the source images' series and
image numbers, the quality checks and notes, and one disclaimer line in the text panel.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_sr import sc as sc_module
from dicom_sr.common import (
    DEMO_DISCLAIMER,
    AnalysisResult,
    allocate_uids,
    slice_references,
)
from dicom_sr.sc import (
    CALIPER_COLOR,
    DISCLAIMER_COLOR,
    HIGH_RISK_COLOR,
    LOAT_COLOR,
    MIN_WIDTH,
    TEXT_COLOR,
    TUMOR_COLOR,
    WARNING_COLOR,
    _edge_letters,
    _patient_orientation,
    build_sc,
    render_summary,
    summary_lines,
)
from tests.dicom_sr.conftest import (
    ALGORITHM,
    Case,
    assert_study_attributes,
    dciodvfy,
    referenced_uids,
)

CHECKS = (
    "registration: passed (metric -0.71, body overlap 0.98)",
    "segmentation: FAILED — 14 tumor components (limit 3)",
)
NOTES = ("Supplied segmentation not used: series 7 (LIVER SEG): no LOAT segment",)
STANDARD = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _count(pixels: np.ndarray, color: tuple[int, int, int]) -> int:
    return int(np.count_nonzero(_is(pixels, color)))


def _is(pixels: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(pixels == np.asarray(color, dtype=np.uint8), axis=-1)


def _texts(lines: list[tuple[str, Any, bool]]) -> list[str]:
    return [text for text, _, _ in lines]


def _scored(**changes: Any) -> AnalysisResult:
    values: dict[str, Any] = {
        "status": "scored",
        "mvi_probability": 0.83,
        "combined_probability": 0.64,
        "risk_category": "high",
        "threshold": 0.46,
        "max_diameter_mm": 34.2,
        "loat_found": True,
        "loat_max_area_cm2": 5.3,
        "diameter_slice": 1,
    }
    values.update(changes)
    return AnalysisResult(**values)


def _build(case: Case, result: AnalysisResult, sources: list[Dataset], **kwargs: Any) -> Any:
    """build_sc of the case's key slice (and its LOAT slice unless ``loat_view=None``)."""
    m = case.measurements
    k, kl = m.diameter_slice, m.loat_area_slice
    kwargs.setdefault("loat_view", (case.hu[kl], case.loat[kl]))
    return build_sc(
        result,
        case.hu[k],
        case.tumor[k],
        case.loat[k],
        case.spacing[:2],
        sources,
        algorithm=kwargs.pop("algorithm", ALGORITHM),
        uids=allocate_uids(),
        **kwargs,
    )


def _spy_lines(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the text lines every later build_sc / render_summary draws."""
    calls: list[list[str]] = []
    original = sc_module.summary_lines

    def spy(*args: Any, **kwargs: Any) -> list[tuple[str, Any, bool]]:
        lines = original(*args, **kwargs)
        calls.append(_texts(lines))
        return lines

    monkeypatch.setattr(sc_module, "summary_lines", spy)
    return calls


def _renumbered(sources: list[Dataset], series_number: int) -> list[Dataset]:
    """Copies whose InstanceNumbers run 200, 198, ... against the slice order ``k``."""
    copies = [copy.deepcopy(ds) for ds in sources]
    for k, reference in enumerate(slice_references(copies)):
        reference.dataset.InstanceNumber = 200 - 2 * k
        reference.dataset.SeriesNumber = series_number
    return copies


# ---------------------------------------------------------------------------------------------
# The object


@pytest.mark.parametrize("key", ["sc", "sc_no_tumor", "sc_failed"])
def test_dciodvfy_clean(case: Case, key: str) -> None:
    errors, warnings = dciodvfy(case.paths[key])
    assert errors == []
    assert warnings == []


def test_dciodvfy_clean_with_checks_and_notes(case: Case, tmp_path: Path) -> None:
    """Scored, not scored with a slice, and text only: all valid with every new line in them."""
    scored = dataclasses.replace(
        case.result, checks=CHECKS, notes=NOTES, segmentation_algorithm="manual SEG series 7"
    )
    needs_review = AnalysisResult(
        status="needs_review",
        reason="The tumor segmentation is implausible.",
        checks=CHECKS,
        notes=NOTES,
        segmentation_algorithm="mvi-seg-unet 3",
    )
    middle = case.hu.shape[0] // 2
    objects = {
        "scored": _build(case, scored, _renumbered(case.sources, 7)),
        "with_slice": build_sc(
            needs_review,
            case.hu[middle],
            case.tumor[middle],
            case.loat[middle],
            case.spacing[:2],
            case.sources,
            algorithm=ALGORITHM,
            uids=allocate_uids(),
            slice_index=middle,
        ),
        "text_only": build_sc(
            needs_review,
            None,
            None,
            None,
            None,
            case.sources,
            algorithm=ALGORITHM,
            uids=allocate_uids(),
        ),
    }
    for name, sc in objects.items():
        path = tmp_path / f"{name}.dcm"
        sc.save_as(path)
        assert dciodvfy(path) == ([], []), name


def test_rgb_size_and_annotation(case: Case) -> None:
    ds = pydicom.dcmread(case.paths["sc"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.PhotometricInterpretation == "RGB"
    assert int(ds.SamplesPerPixel) == 3
    assert ds.BurnedInAnnotation == "YES"
    assert int(ds.Columns) >= MIN_WIDTH
    rows, cols = case.hu.shape[1:]
    # Two slices side by side, each upscaled by the same integer factor, then the text panel.
    scale = int(ds.Columns) // (2 * cols)
    assert int(ds.Columns) == 2 * cols * scale
    assert int(ds.Rows) > rows * scale
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx(
        [case.spacing[1] / scale, case.spacing[0] / scale]
    )
    assert ds.SeriesNumber == 9003
    assert_study_attributes(ds, case.sources[0])


def test_contour_colors_on_the_slices(case: Case) -> None:
    ds = pydicom.dcmread(case.paths["sc"])
    pixels = ds.pixel_array
    rows, cols = case.hu.shape[1:]
    scale = int(ds.Columns) // (2 * cols)
    key, loat_view = pixels[: rows * scale, : cols * scale], pixels[: rows * scale, cols * scale :]
    assert _count(key, TUMOR_COLOR) > 0
    assert _count(loat_view, LOAT_COLOR) > 0
    assert _count(loat_view, TUMOR_COLOR) == 0
    # Both slices are referenced, and only source instances.
    references = slice_references(case.sources)
    m = case.measurements
    expected = {
        (references[k].sop_instance_uid, references[k].frame_number)
        for k in (m.diameter_slice, m.loat_area_slice)
    }
    found = {
        (str(item.ReferencedSOPInstanceUID), item.get("ReferencedFrameNumber"))
        for item in ds.SourceImageSequence
    }
    assert {(uid, None if frame is None else int(frame)) for uid, frame in found} == expected
    assert referenced_uids(ds) <= case.source_uids


def test_status_variants(case: Case) -> None:
    with_slice = pydicom.dcmread(case.paths["sc_no_tumor"])
    assert with_slice.BurnedInAnnotation == "YES"
    assert _count(with_slice.pixel_array, TUMOR_COLOR) == 0
    assert _count(with_slice.pixel_array, CALIPER_COLOR) == 0
    text_only = pydicom.dcmread(case.paths["sc_failed"])
    assert int(text_only.Columns) == MIN_WIDTH
    assert "SourceImageSequence" not in text_only
    assert "PixelSpacing" not in text_only
    assert_study_attributes(text_only, case.sources[0])


def test_rejects_bad_input(classic: Case) -> None:
    k = classic.measurements.diameter_slice
    args = (classic.tumor[k], classic.loat[k], (1.0, 1.0), classic.sources)
    with pytest.raises(ValueError, match="needs arterial_slice_hu"):
        build_sc(classic.result, None, *args, algorithm=ALGORITHM, uids=allocate_uids())
    with pytest.raises(ValueError, match="shape"):
        build_sc(
            classic.result, classic.hu[k][1:], *args, algorithm=ALGORITHM, uids=allocate_uids()
        )
    with pytest.raises(ValueError, match="outside"):
        build_sc(
            classic.result,
            classic.hu[k],
            *args,
            algorithm=ALGORITHM,
            uids=allocate_uids(),
            slice_index=len(classic.sources),
        )
    cols = classic.hu.shape[2]
    beyond = dataclasses.replace(classic.result, diameter_endpoints=((0.5, 0.5), (cols + 3.0, 1.0)))
    with pytest.raises(ValueError, match="endpoint"):
        build_sc(beyond, classic.hu[k], *args, algorithm=ALGORITHM, uids=allocate_uids())


# ---------------------------------------------------------------------------------------------
# The text panel


def test_headline_shows_threshold_and_what_sets_the_risk() -> None:
    high = summary_lines(_scored(), ALGORITHM)
    assert high[0] == ("HIGH RISK — MVI probability 83 % ≥ threshold 46 %", HIGH_RISK_COLOR, True)
    assert high[1][0] == (
        "Risk set by the deep-learning MVI probability; combined model 64 % (for information)"
    )
    # Low risk although the combined model is above the threshold: the deep-learning
    # probability decides, the combined one is information.
    low = _texts(
        summary_lines(
            _scored(mvi_probability=0.31, combined_probability=0.52, risk_category="low"),
            ALGORITHM,
        )
    )
    assert low[0] == "LOW RISK — MVI probability 31 % < threshold 46 %"
    assert low[1] == (
        "Risk set by the deep-learning MVI probability; combined model 52 % (for information)"
    )
    no_combined = _texts(summary_lines(_scored(combined_probability=None), ALGORITHM))
    assert no_combined[1] == "Risk set by the deep-learning MVI probability"
    # Rounding must not make the comparison read "46 % < threshold 46 %".
    close = _texts(summary_lines(_scored(mvi_probability=0.456, risk_category="low"), ALGORITHM))
    assert close[0] == "LOW RISK — MVI probability 45.6 % < threshold 46.0 %"
    at = _texts(summary_lines(_scored(mvi_probability=0.46), ALGORITHM))
    assert at[0] == "HIGH RISK — MVI probability 46 % ≥ threshold 46 %"


def test_measurement_and_model_lines() -> None:
    lines = _texts(summary_lines(_scored(diameter_endpoints=((1.5, 2.5), (9.5, 8.5))), ALGORITHM))
    assert "Max tumor diameter 34.2 mm" in lines
    assert "LOAT max area 5.3 cm²" in lines
    assert "Contours: tumor (red), LOAT (green); max diameter: yellow caliper" in lines
    assert f"Model {ALGORITHM.name} {ALGORITHM.version}" in lines
    assert lines[-1] == DEMO_DISCLAIMER
    failed = AnalysisResult(status="failed", reason="Registration did not converge.")
    lines = _texts(summary_lines(failed, ALGORITHM))
    assert lines[:2] == [
        "Analysis failed — MVI not scored",
        "Reason: Registration did not converge.",
    ]


def test_checks_notes_and_segmentation_algorithm() -> None:
    results = [
        _scored(checks=CHECKS, notes=NOTES, segmentation_algorithm="manual SEG series 7"),
        AnalysisResult(
            status="needs_review",
            reason="The tumor segmentation is implausible.",
            checks=CHECKS,
            notes=NOTES,
            segmentation_algorithm="manual SEG series 7",
        ),
    ]
    for result in results:
        lines = {text: color for text, color, _ in summary_lines(result, ALGORITHM)}
        assert lines["Check registration: passed (metric -0.71, body overlap 0.98)"] == TEXT_COLOR
        assert lines["Check segmentation: FAILED — 14 tumor components (limit 3)"] == WARNING_COLOR
        assert lines[f"Note: {NOTES[0]}"] == TEXT_COLOR
        assert lines["Segmentation: manual SEG series 7"] == TEXT_COLOR
    # A gate line that does not say it passed is not shown as a pass.
    odd = summary_lines(_scored(checks=("registration: skipped (one phase)",)), ALGORITHM)
    assert ("Check registration: skipped (one phase)", WARNING_COLOR, True) in odd
    # Without a named algorithm a scored result still says where its masks came from.
    assert "Segmentation: automatic" in _texts(summary_lines(_scored(), ALGORITHM))
    supplied = _scored(segmentation_source="supplied")
    assert "Segmentation: supplied SEG" in _texts(summary_lines(supplied, ALGORITHM))


def test_one_disclaimer_line() -> None:
    site = dataclasses.replace(ALGORITHM, disclaimer="For research use only.")
    for algorithm in (
        site,
        dataclasses.replace(ALGORITHM, disclaimer=DEMO_DISCLAIMER),
        dataclasses.replace(ALGORITHM, disclaimer="For research\nuse only."),
        dataclasses.replace(ALGORITHM, demo=False, disclaimer="For research use only."),
    ):
        lines = summary_lines(_scored(), algorithm)
        disclaimers = [text for text, color, _ in lines if color == DISCLAIMER_COLOR]
        assert disclaimers == [" ".join(algorithm.effective_disclaimer.split())]
        assert sum(DEMO_DISCLAIMER in text for text, _, _ in lines) == int(algorithm.demo)
        assert lines[-1][0] == disclaimers[0]
    assert (
        _texts(summary_lines(_scored(), site))[-1] == f"{DEMO_DISCLAIMER}; For research use only."
    )
    no_disclaimer = dataclasses.replace(ALGORITHM, demo=False)
    lines = summary_lines(_scored(), no_disclaimer)
    assert [color for _, color, _ in lines].count(DISCLAIMER_COLOR) == 0

    # Rendered, the demo and site disclaimers make one band of text rows, not two.
    pixels, _ = render_summary(_scored(), site, None)
    rows = np.flatnonzero(_is(pixels, DISCLAIMER_COLOR).any(axis=1))
    assert rows.size > 0
    assert int(np.count_nonzero(np.diff(rows) > 1)) == 0


def test_text_only_variant_says_status_reason_checks_and_notes(
    classic: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy_lines(monkeypatch)
    failed = AnalysisResult(
        status="failed", reason="Registration did not converge.", checks=CHECKS, notes=NOTES
    )
    sc = build_sc(
        failed,
        None,
        None,
        None,
        None,
        classic.sources,
        algorithm=ALGORITHM,
        uids=allocate_uids(),
        slice_index=3,
    )
    (lines,) = calls
    assert lines[:2] == [
        "Analysis failed — MVI not scored",
        "Reason: Registration did not converge.",
    ]
    assert {f"Check {CHECKS[0]}", f"Check {CHECKS[1]}", f"Note: {NOTES[0]}"} <= set(lines)
    assert not any(line.startswith(("Key slice", "Slice shown")) for line in lines)
    assert int(sc.Columns) == MIN_WIDTH
    # Nothing is shown, so no slice is named as the source of the image.
    assert "SourceImageSequence" not in sc


# ---------------------------------------------------------------------------------------------
# Key slices named by the source images


def test_key_slices_named_by_series_and_image_number(
    classic: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy_lines(monkeypatch)
    m = classic.measurements
    k, kl = m.diameter_slice, m.loat_area_slice
    assert k != kl
    sources = _renumbered(classic.sources, 7)
    _build(classic, classic.result, sources)
    _build(classic, dataclasses.replace(classic.result, loat_area_slice=k), sources, loat_view=None)
    both, same_slice = calls
    # InstanceNumber 200 - 2k: neither k nor k + 1 would pass.
    assert f"Key slice: series 7, image {200 - 2 * k} (max diameter)" in both
    assert f"Key slice: series 7, image {200 - 2 * kl} (LOAT max area)" in both
    assert f"Key slice: series 7, image {200 - 2 * k} (max diameter, LOAT max area)" in same_slice
    assert sum(line.startswith("Key slice") for line in same_slice) == 1


def test_key_slice_of_an_enhanced_ct_names_the_frame(
    case_factory: Callable[[str], Case], monkeypatch: pytest.MonkeyPatch
) -> None:
    enhanced = case_factory("enhanced")
    calls = _spy_lines(monkeypatch)
    _build(enhanced, enhanced.result, enhanced.sources)
    (lines,) = calls
    references = slice_references(enhanced.sources)
    series = enhanced.sources[0].SeriesNumber
    m = enhanced.measurements
    key_frame = references[m.diameter_slice].frame_number
    loat_frame = references[m.loat_area_slice].frame_number
    assert f"Key slice: series {series}, frame {key_frame} (max diameter)" in lines
    assert f"Key slice: series {series}, frame {loat_frame} (LOAT max area)" in lines


def test_shown_slice_of_a_result_that_is_not_scored(
    classic: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy_lines(monkeypatch)
    sources = _renumbered(classic.sources, 7)
    no_tumor = AnalysisResult(status="no_tumor", reason="The segmenter found no liver tumor.")
    build_sc(
        no_tumor,
        classic.hu[5],
        None,
        None,
        classic.spacing[:2],
        sources,
        algorithm=ALGORITHM,
        uids=allocate_uids(),
        slice_index=5,
    )
    (lines,) = calls
    assert "Slice shown: series 7, image 190" in lines


def test_panel_labels_are_drawn() -> None:
    hu = np.full((64, 64), -1000.0)  # air: black, so any light pixel is drawn text
    result = _scored()
    labelled, _ = render_summary(
        result, ALGORITHM, hu, key_slices=[("series 3, image 42", "max diameter")]
    )
    unlabelled, _ = render_summary(result, ALGORITHM, hu, key_slices=[("", "")])
    corner = (slice(0, 60), slice(0, 250))
    assert _count(labelled[corner], TEXT_COLOR) > 50
    assert _count(unlabelled[corner], TEXT_COLOR) == 0


# ---------------------------------------------------------------------------------------------
# Caliper, orientation letters and window on the image panels


def _distances(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each ``(x, y)`` point to the segment ``a``-``b``."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def _assert_caliper(view: np.ndarray, a: np.ndarray, b: np.ndarray, far: float) -> None:
    ys, xs = np.nonzero(_is(view, CALIPER_COLOR))
    points = np.column_stack([xs, ys]).astype(np.float64)
    assert points.size > 0
    # Along the whole segment, ends included...
    for t in np.linspace(0.0, 1.0, 21):
        sample = a + t * (b - a)
        assert np.min(np.linalg.norm(points - sample, axis=1)) <= 2.0, t
    # ...and only near it: the line, its end ticks and its length written beside it.
    assert float(np.max(_distances(points, a, b))) <= far


def test_caliper_between_the_scaled_endpoints() -> None:
    hu = np.zeros((64, 64))
    ends = ((5.5, 10.5), (50.5, 40.5))  # pixel corners, (i, j) = (column, row)
    pixels, scale = render_summary(_scored(diameter_endpoints=ends), ALGORITHM, hu)
    assert scale == MIN_WIDTH // 64
    view = pixels[: 64 * scale]
    a, b = (np.asarray([(i + 0.5) * scale - 0.5, (j + 0.5) * scale - 0.5]) for i, j in ends)
    # The length (about 110 x 25 pixels in the 22 px font of a 768-pixel panel) sits beside it.
    _assert_caliper(view, a, b, far=130.0)
    assert _count(pixels[64 * scale :], CALIPER_COLOR) == 0
    # Not drawn without endpoints, nor when the key slice shown is not the diameter's slice.
    for result, caliper in ((_scored(), True), (_scored(diameter_endpoints=ends), False)):
        pixels, _ = render_summary(result, ALGORITHM, hu, caliper=caliper)
        assert _count(pixels, CALIPER_COLOR) == 0


def test_caliper_on_the_key_slice(case: Case) -> None:
    pixels = pydicom.dcmread(case.paths["sc"]).pixel_array
    rows, cols = case.hu.shape[1:]
    scale = pixels.shape[1] // (2 * cols)
    key, loat_view = pixels[: rows * scale, : cols * scale], pixels[: rows * scale, cols * scale :]
    first, second = case.measurements.diameter_endpoints
    a, b = (
        np.asarray([(i + 0.5) * scale - 0.5, (j + 0.5) * scale - 0.5]) for i, j in (first, second)
    )
    # The length (about 80 x 20 pixels in the 16 px font of a 384-pixel panel) sits beside it.
    _assert_caliper(key, a, b, far=100.0)
    assert _count(loat_view, CALIPER_COLOR) == 0
    assert _count(pixels[rows * scale :], CALIPER_COLOR) == 0


def test_orientation_letters_of_the_edges() -> None:
    # (left, right, top, bottom) of the panel.
    assert _edge_letters(STANDARD) == ("R", "L", "A", "P")
    assert _edge_letters((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)) == ("L", "R", "P", "A")
    assert _edge_letters((1.0, 0.0, 0.0, 0.0, 0.0, -1.0)) == ("R", "L", "H", "F")  # coronal
    oblique = (0.866, 0.5, 0.0, -0.5, 0.866, 0.0)
    assert _edge_letters(oblique) == ("RA", "LP", "AL", "PR")
    standard = Dataset()
    standard.ImageOrientationPatient = list(STANDARD)
    assert _patient_orientation(standard) == ("L", "P")


def test_orientation_letters_and_window_are_drawn() -> None:
    hu = np.full((64, 64), -1000.0)
    result = AnalysisResult(status="no_tumor", reason="The segmenter found no liver tumor.")
    renders = {
        name: render_summary(result, ALGORITHM, hu, image_orientation=orientation)[0][:768]
        for name, orientation in (
            ("none", None),
            ("standard", STANDARD),
            ("flipped", (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)),
        )
    }
    edges = {
        "left": (slice(354, 414), slice(0, 60)),
        "right": (slice(354, 414), slice(708, 768)),
        "top": (slice(0, 60), slice(354, 414)),
        "bottom": (slice(708, 768), slice(354, 414)),
    }
    for name, region in edges.items():
        assert _count(renders["none"][region], TEXT_COLOR) == 0, name
        assert _count(renders["standard"][region], TEXT_COLOR) > 10, name
        # R and L (A and P) are different glyphs: flipping the image changes each edge.
        assert not np.array_equal(renders["standard"][region], renders["flipped"][region]), name
    # "W 400 L 40" in the bottom-left corner of every panel.
    for image in renders.values():
        assert _count(image[708:768, 0:150], TEXT_COLOR) > 20


def test_build_sc_draws_the_letters_of_the_source_orientation(classic: Case) -> None:
    flipped = [copy.deepcopy(ds) for ds in classic.sources]
    for ds in flipped:
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
    standard = _build(classic, classic.result, classic.sources, loat_view=None)
    mirrored = _build(classic, classic.result, flipped, loat_view=None)
    assert list(mirrored.PatientOrientation) == ["R", "A"]
    rows = classic.hu.shape[1] * (MIN_WIDTH // classic.hu.shape[2])
    left_edge = (slice(rows // 2 - 30, rows // 2 + 30), slice(0, 50))
    assert not np.array_equal(standard.pixel_array[left_edge], mirrored.pixel_array[left_edge])
