"""The TID 1500 SR: validity, content as DCMTK and dcmqi read it, references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_sr.common import AnalysisResult, allocate_uids, slice_references
from dicom_sr.sr import SOP_CLASSES, build_sr, tumor_outline
from tests.conftest import require_tool, run_tool
from tests.dicom_sr.conftest import (
    ALGORITHM,
    Case,
    assert_study_attributes,
    dciodvfy,
    referenced_uids,
    scored_result,
)


def _dsrdump(path: Path) -> str:
    tool = require_tool("dsrdump", "dcmtk")
    # +Pl: print long text values in full; +Pc: print code values too.
    return run_tool(tool, "+Pl", path).stdout


def _content_items(ds: Dataset) -> list[Dataset]:
    items: list[Dataset] = []

    def walk(sequence: list[Dataset]) -> None:
        for item in sequence:
            items.append(item)
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return items


def _named(ds: Dataset, meaning: str) -> list[Dataset]:
    return [
        item
        for item in _content_items(ds)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


@pytest.mark.parametrize("key", ["sr_comprehensive", "sr_comprehensive3d", "sr_no_tumor"])
def test_dciodvfy_clean(case: Case, key: str) -> None:
    errors, warnings = dciodvfy(case.paths[key])
    assert errors == []
    assert warnings == []


def test_dsrdump_shows_values_units_and_risk(case: Case) -> None:
    text = _dsrdump(case.paths["sr_comprehensive"])
    m = case.measurements
    assert "Imaging Measurement Report" in text
    assert '"Probability of microvascular invasion (deep learning)")="83.0" (%,UCUM' in text
    assert '"Probability of microvascular invasion (combined model)")="79.0" (%,UCUM' in text
    assert f'"Diameter")="{round(m.max_diameter_mm, 2):g}' in text
    assert "(mm,UCUM" in text
    assert f'"Area")="{round(m.loat_max_area_cm2, 3):g}' in text
    assert "(cm2,UCUM" in text
    assert "(ml,UCUM" in text
    assert '"Lesion Risk")=(15508007,SCT,"High risk")' in text
    assert "demo model — not for clinical use" in text
    assert f"Model {ALGORITHM.name} {ALGORITHM.version}" in text
    assert '"Device Observer Manufacturer")="mvi-node project"' in text
    assert "(25045-6,LN," in text
    assert "SCOORD" in text and "POLYLINE" in text
    assert "(SG image,,1)" in text and "(SG image,,2)" in text


def test_sop_class_by_argument(case: Case) -> None:
    for sop_class, uid in SOP_CLASSES.items():
        ds = pydicom.dcmread(case.paths[f"sr_{sop_class}"])
        assert ds.SOPClassUID == uid
    with pytest.raises(ValueError, match="sop_class"):
        build_sr(
            case.result,
            case.sources,
            case.seg,
            algorithm=ALGORITHM,
            uids=case.uids,
            sop_class="basic",
        )


def test_references_and_attributes(case: Case) -> None:
    ds = pydicom.dcmread(case.paths["sr_comprehensive"])
    assert_study_attributes(ds, case.sources[0])
    assert ds.SeriesNumber == 9002
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    seg_uid = str(case.seg.SOPInstanceUID)
    evidence = {
        str(instance.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == case.source_uids | {seg_uid}
    (library,) = _named(ds, "Image Library")
    library_uids = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in _content_items(library)
        if item.get("ValueType") == "IMAGE"
    }
    assert library_uids == case.source_uids
    assert referenced_uids(ds) <= case.source_uids | {seg_uid}
    # The volumetric groups reference the SEG's segments and carry its tracking UIDs.
    tracking = {str(item.UID) for item in _named(ds, "Tracking Unique Identifier")}
    assert {case.uids.tumor_tracking_uid, case.uids.loat_tracking_uid} <= tracking
    schemes = {item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence}
    assert "99MVINODE" in schemes


def test_key_slice_polyline(case: Case) -> None:
    ds = pydicom.dcmread(case.paths["sr_comprehensive"])
    (region,) = _named(ds, "Image Region")
    assert region.GraphicType == "POLYLINE"
    points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
    assert np.array_equal(points[0], points[-1])  # closed
    reference = slice_references(case.sources)[case.measurements.diameter_slice]
    source = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == reference.sop_instance_uid
    if reference.frame_number is not None:
        assert source.ReferencedFrameNumber == reference.frame_number
    # It encloses the tumor pixels of the key slice (SCOORD: pixel corners at integers).
    rows, cols = np.nonzero(case.tumor[case.measurements.diameter_slice])
    assert points[:, 0].min() <= cols.min() and points[:, 0].max() >= cols.max() + 1
    assert points[:, 1].min() <= rows.min() and points[:, 1].max() >= rows.max() + 1


def test_tumor_outline_is_convex_hull_of_pixel_corners() -> None:
    mask = np.zeros((5, 6), dtype=bool)
    mask[1:3, 2:5] = True
    outline = tumor_outline(mask)
    assert {tuple(p) for p in outline} == {(2, 1), (5, 1), (5, 3), (2, 3)}
    assert tuple(outline[0]) == tuple(outline[-1])
    assert tumor_outline(np.zeros((3, 3))).shape == (0, 2)


def test_low_risk_and_predecessor(classic: Case) -> None:
    old = pydicom.dcmread(classic.paths["sr_comprehensive"])
    uids = allocate_uids(predecessor_sr=old)
    result = scored_result(
        classic.measurements, mvi_probability=0.2, combined_probability=None, risk_category="low"
    )
    sr = build_sr(result, classic.sources, classic.seg, algorithm=ALGORITHM, uids=uids)
    (risk,) = {item.ConceptCodeSequence[0].CodeMeaning for item in _named(sr, "Lesion Risk")}
    assert risk == "Low risk"
    assert not _named(sr, "Probability of microvascular invasion (combined model)")
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID


def test_status_only_report(case: Case) -> None:
    ds = pydicom.dcmread(case.paths["sr_no_tumor"])
    assert not _named(ds, "Imaging Measurements")
    assert _named(ds, "Image Library")
    (status,) = _named(ds, "MVI analysis status")
    assert status.TextValue == "No liver tumor found — MVI not scored"
    (reason,) = _named(ds, "Reason MVI was not scored")
    assert reason.TextValue == "The segmenter found no liver tumor."
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert referenced_uids(ds) <= case.source_uids | {
        str(pydicom.dcmread(case.paths["seg_empty"]).SOPInstanceUID)
    }
    text = _dsrdump(case.paths["sr_no_tumor"])
    assert "No liver tumor found" in text and "The segmenter found no liver tumor." in text
    failed = AnalysisResult(status="failed", reason="Out of memory.")
    sr = build_sr(failed, case.sources, None, algorithm=ALGORITHM, uids=allocate_uids())
    assert _named(sr, "Reason MVI was not scored")[0].TextValue == "Out of memory."
    with pytest.raises(ValueError, match="needs the SEG"):
        build_sr(case.result, case.sources, None, algorithm=ALGORITHM, uids=allocate_uids())


def test_dcmqi_reads_measurements(case: Case, tmp_path_factory: pytest.TempPathFactory) -> None:
    tool = require_tool("tid1500reader", "dcmqi (pip install dcmqi)", venv=True)
    out = tmp_path_factory.mktemp(f"tid1500_{case.kind}") / "sr.json"
    run_tool(tool, "--inputDICOM", case.paths["sr_comprehensive"], "--outputMetadata", out)
    metadata = json.loads(out.read_text())
    groups = {group["TrackingIdentifier"]: group for group in metadata["Measurements"]}
    tumor = groups["Liver tumor"]
    assert tumor["ReferencedSegment"] == 1
    values = {
        item["quantity"]["CodeMeaning"]: (float(item["value"]), item["units"]["CodeValue"])
        for item in tumor["measurementItems"]
    }
    m = case.measurements
    assert values["Diameter"] == (pytest.approx(m.max_diameter_mm, abs=0.01), "mm")
    assert values["Volume"] == (pytest.approx(m.tumor_volume_ml, abs=0.001), "ml")
    assert values["Probability of microvascular invasion (deep learning)"] == (83.0, "%")
    assert values["Probability of microvascular invasion (combined model)"] == (79.0, "%")
    loat = groups["Lesser omental adipose tissue"]
    assert loat["ReferencedSegment"] == 2
    loat_values = {
        item["quantity"]["CodeMeaning"]: float(item["value"]) for item in loat["measurementItems"]
    }
    assert loat_values["Area"] == pytest.approx(m.loat_max_area_cm2, abs=0.001)
    assert len(metadata["imageLibrary"]) == len(case.sources)
