"""The Secondary Capture summary: validity, RGB, size, burned-in annotation, contour colours."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from dicom_sr.common import AnalysisResult, allocate_uids, slice_references
from dicom_sr.sc import LOAT_COLOR, MIN_WIDTH, TUMOR_COLOR, build_sc, summary_lines
from tests.dicom_sr.conftest import (
    ALGORITHM,
    Case,
    assert_study_attributes,
    dciodvfy,
    referenced_uids,
)


def _count(pixels: np.ndarray, color: tuple[int, int, int]) -> int:
    return int(np.count_nonzero(np.all(pixels == np.asarray(color, dtype=np.uint8), axis=-1)))


@pytest.mark.parametrize("key", ["sc", "sc_no_tumor", "sc_failed"])
def test_dciodvfy_clean(case: Case, key: str) -> None:
    errors, warnings = dciodvfy(case.paths[key])
    assert errors == []
    assert warnings == []


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


def test_text_lines() -> None:
    result = AnalysisResult(
        status="scored",
        mvi_probability=0.83,
        combined_probability=0.79,
        risk_category="high",
        max_diameter_mm=34.2,
        loat_found=True,
        loat_max_area_cm2=5.3,
        diameter_slice=1,
    )
    lines = [text for text, _, _ in summary_lines(result, ALGORITHM)]
    assert lines[0] == "MVI probability 83 % (combined 79 %) — HIGH RISK"
    assert "Max tumor diameter 34.2 mm" in lines
    assert "LOAT max area 5.3 cm²" in lines
    assert f"Model {ALGORITHM.name} {ALGORITHM.version}" in lines
    assert lines[-1] == "demo model — not for clinical use"
    failed = AnalysisResult(status="failed", reason="Registration did not converge.")
    lines = [text for text, _, _ in summary_lines(failed, ALGORITHM)]
    assert lines[:2] == [
        "Analysis failed — MVI not scored",
        "Reason: Registration did not converge.",
    ]


def test_status_variants(case: Case) -> None:
    with_slice = pydicom.dcmread(case.paths["sc_no_tumor"])
    assert with_slice.BurnedInAnnotation == "YES"
    assert _count(with_slice.pixel_array, TUMOR_COLOR) == 0
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
