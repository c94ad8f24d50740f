"""The TID 1500 SR: validity, content as DCMTK and dcmqi read it, references."""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicom_sr.common import (
    AnalysisResult,
    allocate_uids,
    content_date_time,
    series_description,
    slice_references,
)
from dicom_sr.sr import SOP_CLASSES, SUPPLIED_VERSION, build_sr, image_library, tumor_outline
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


CHECKS = (
    "registration: passed (metric -0.71, body overlap 0.98)",
    "segmentation: passed (1 tumor component, limit 3)",
)
NOTES = ("Supplied segmentation not used: series 7 (LIVER SEG): no LOAT segment",)


def _texts(ds: Dataset, meaning: str) -> list[str]:
    return [str(item.TextValue) for item in _named(ds, meaning)]


def _algorithm_of(item: Dataset) -> tuple[str, str] | None:
    """(name, version) of the Algorithm Identification directly under ``item``."""
    found = {
        child.ConceptNameCodeSequence[0].CodeMeaning: str(child.TextValue)
        for child in item.get("ContentSequence", [])
        if child.get("ValueType") == "TEXT"
    }
    if "Algorithm Name" not in found:
        return None
    return found["Algorithm Name"], found["Algorithm Version"]


def _saved(sr: Dataset, folder: Path, name: str) -> Path:
    path = folder / f"{name}.dcm"
    sr.save_as(path)
    return path


def test_checks_notes_and_algorithms_scored(classic: Case, tmp_path: Path) -> None:
    result = scored_result(
        classic.measurements,
        tumor_count=3,
        segmentation_algorithm="mvi-seg-unet 3",
        checks=CHECKS,
        notes=NOTES,
    )
    uids = allocate_uids()
    sr = build_sr(result, classic.sources, classic.seg, algorithm=ALGORITHM, uids=uids)
    path = _saved(sr, tmp_path, "sr_checks")
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == []
    ds = pydicom.dcmread(path)
    (container,) = _named(ds, "Qualitative Evaluations")
    assert _texts(container, "Quality check") == list(CHECKS)
    assert _texts(container, "Analysis note") == list(NOTES)
    # Counts are integers: "3", not "3.0", and no float copy.
    (count,) = _named(ds, "Number of tumor components")
    assert count.MeasuredValueSequence[0].NumericValue == "3"
    assert "FloatingPointValue" not in count.MeasuredValueSequence[0]
    assert '"Number of tumor components")="3"' in _dsrdump(path)
    # Sizes name the segmentation, probabilities and the groups' risk the MVI model.
    segmenter = ("mvi-seg-unet", "3")
    classifier = (ALGORITHM.name, ALGORITHM.version)
    for meaning in ("Diameter", "Volume", "Number of tumor components", "Area"):
        assert {_algorithm_of(item) for item in _named(ds, meaning)} == {segmenter}, meaning
    for meaning in (
        "Probability of microvascular invasion (deep learning)",
        "Probability of microvascular invasion (combined model)",
        "High-risk threshold of microvascular invasion probability",
    ):
        assert {_algorithm_of(item) for item in _named(ds, meaning)} == {classifier}, meaning
    groups = {
        _named(group, "Tracking Identifier")[0].TextValue: _algorithm_of(group)
        for group in _named(ds, "Measurement Group")
    }
    assert groups == {
        "Liver tumor": classifier,
        "Lesser omental adipose tissue": segmenter,
        "Liver tumor, key slice": classifier,
    }


def test_supplied_segmentation_named_as_given(classic: Case) -> None:
    result = scored_result(
        classic.measurements,
        segmentation_source="supplied",
        segmentation_algorithm="manual SEG series 7",
    )
    sr = build_sr(result, classic.sources, classic.seg, algorithm=ALGORITHM, uids=allocate_uids())
    (diameter, *_) = _named(sr, "Diameter")
    assert _algorithm_of(diameter) == ("manual SEG series 7", SUPPLIED_VERSION)
    # Unknown: the sizes carry no algorithm of their own (the group's applies).
    sr = build_sr(
        classic.result, classic.sources, classic.seg, algorithm=ALGORITHM, uids=allocate_uids()
    )
    assert all(_algorithm_of(item) is None for item in _named(sr, "Diameter"))


def test_dcmqi_reads_algorithm_identification(
    classic: Case, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tool = require_tool("tid1500reader", "dcmqi (pip install dcmqi)", venv=True)
    result = scored_result(
        classic.measurements, segmentation_algorithm="mvi-seg-unet 3", checks=CHECKS
    )
    sr = build_sr(result, classic.sources, classic.seg, algorithm=ALGORITHM, uids=allocate_uids())
    folder = tmp_path_factory.mktemp("tid1500_algorithms")
    path = _saved(sr, folder, "sr")
    run_tool(tool, "--inputDICOM", path, "--outputMetadata", folder / "sr.json")
    metadata = json.loads((folder / "sr.json").read_text())
    groups = {group["TrackingIdentifier"]: group for group in metadata["Measurements"]}
    assert {"Liver tumor", "Lesser omental adipose tissue"} <= set(groups)


def test_status_report_has_checks_and_notes(classic: Case, tmp_path: Path) -> None:
    result = AnalysisResult(
        status="needs_review",
        reason="Segmentation failed its quality gate.",
        checks=(
            "registration: passed (metric -0.71, body overlap 0.98)",
            "segmentation: FAILED — 14 tumor components (limit 3)",
        ),
        notes=NOTES,
    )
    sr = build_sr(result, classic.sources, None, algorithm=ALGORITHM, uids=allocate_uids())
    path = _saved(sr, tmp_path, "sr_review")
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == []
    ds = pydicom.dcmread(path)
    assert _texts(ds, "Quality check") == list(result.checks)
    assert _texts(ds, "Analysis note") == list(NOTES)
    assert "segmentation: FAILED — 14 tumor components (limit 3)" in _dsrdump(path)


def test_report_on_another_series(classic: Case, tmp_path: Path) -> None:
    """A study without arterial series: the report hangs on the portal-venous series."""
    files = sorted((classic.folder / "study_0001" / "SE0004").glob("*.dcm"))
    assert files, "the phantom has a portal-venous series"
    portal = [pydicom.dcmread(path) for path in files]
    result = AnalysisResult(
        status="not_applicable", reason="No arterial series in the study.", checks=CHECKS[:1]
    )
    uids = allocate_uids()
    sr = build_sr(result, portal, None, algorithm=ALGORITHM, uids=uids)
    path = _saved(sr, tmp_path, "sr_portal")
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == []
    ds = pydicom.dcmread(path)
    assert_study_attributes(ds, portal[0])
    portal_uids = {str(image.SOPInstanceUID) for image in portal}
    (library,) = _named(ds, "Image Library")
    assert {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in _content_items(library)
        if item.get("ValueType") == "IMAGE"
    } == portal_uids
    assert referenced_uids(ds) == portal_uids


def test_study_level_report(classic: Case, tmp_path: Path) -> None:
    """No usable series at all: the report is about the study, one instance its evidence."""
    study = pydicom.dcmread(
        next((classic.folder / "study_0001" / "SE0001").glob("*.dcm")), stop_before_pixels=True
    )
    result = AnalysisResult(status="not_applicable", reason="No CT series of the liver.")
    uids = allocate_uids()
    sr = build_sr(result, [], None, algorithm=ALGORITHM, uids=uids, study=study)
    path = _saved(sr, tmp_path, "sr_study")
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == []
    ds = pydicom.dcmread(path)
    assert_study_attributes(ds, study)
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (library,) = _named(ds, "Image Library")
    assert "ContentSequence" not in library
    assert not [item for item in _content_items(ds) if item.get("ValueType") == "IMAGE"]
    evidence = {
        str(instance.ReferencedSOPInstanceUID)
        for item in ds.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == {str(study.SOPInstanceUID)}
    assert _texts(ds, "Reason MVI was not scored") == ["No CT series of the liver."]
    text = _dsrdump(path)
    assert "Study not applicable" in text


def test_study_level_report_refusals(classic: Case) -> None:
    not_applicable = AnalysisResult(status="not_applicable", reason="No arterial series.")
    with pytest.raises(ValueError, match="study-level"):
        build_sr(not_applicable, [], None, algorithm=ALGORITHM, uids=allocate_uids())
    with pytest.raises(ValueError, match="source images"):
        build_sr(
            classic.result,
            [],
            classic.seg,
            algorithm=ALGORITHM,
            uids=allocate_uids(),
            study=classic.sources[0],
        )
    with pytest.raises(ValueError, match="SEG needs its source images"):
        build_sr(
            not_applicable,
            [],
            classic.seg,
            algorithm=ALGORITHM,
            uids=allocate_uids(),
            study=classic.sources[0],
        )
    other = Dataset()
    other.StudyInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="another study"):
        build_sr(
            not_applicable,
            classic.sources,
            None,
            algorithm=ALGORITHM,
            uids=allocate_uids(),
            study=other,
        )


def test_series_description_and_content_time(classic: Case) -> None:
    ds = pydicom.dcmread(classic.paths["sr_comprehensive"])
    when = classic.uids.analysis_time
    assert ds.SeriesDescription == series_description("report", ALGORITHM, when)
    assert ds.SeriesDescription.endswith(f"{when.astimezone(UTC):%Y-%m-%d %H:%M}Z [DEMO]")
    day, clock = content_date_time(when, classic.sources[0])
    assert ds.ContentDate == f"{day:%Y%m%d}"
    assert ds.ContentTime.startswith(f"{clock:%H%M%S}")


def _encoded(items: list[Dataset]) -> bytes:
    """Content items as they are written into a file (explicit VR little endian)."""
    ds = Dataset()
    ds.ContentSequence = list(items)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


_POSITION = {
    "Image Position (Patient) X",
    "Image Position (Patient) Y",
    "Image Position (Patient) Z",
}


def _grouped(library: Any) -> list[Any]:
    """highdicom's one-group library with the descriptors its entries share moved into the
    group (TID 1600 row 3); refuses a library whose entries describe other than positions
    differently."""
    ((group,),) = [list(container.ContentSequence) for container in library]
    head = [item for item in group.ContentSequence if item.ValueType != "IMAGE"]
    entries = [item for item in group.ContentSequence if item.ValueType == "IMAGE"]

    def split(entry: Any) -> tuple[bytes, list[Any]]:
        items = list(entry.ContentSequence)
        other = [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning not in _POSITION]
        return _encoded(other), [i for i in items if i not in other]

    shared = [
        i
        for i in entries[0].ContentSequence
        if i.ConceptNameCodeSequence[0].CodeMeaning not in _POSITION
    ]
    assert {split(entry)[0] for entry in entries} == {_encoded(shared)}
    for entry in entries:
        entry.ContentSequence = split(entry)[1]
    group.ContentSequence = [*head, *shared, *entries]
    return list(library)


def test_an_image_library_made_beforehand_is_the_one_the_report_makes(classic: Case) -> None:
    """The node makes the library while the study is registered; the report is the same, and a
    library of other images is not taken."""
    files = sorted((classic.folder / "study_0001" / "SE0003").glob("*.dcm"))
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]

    def library_of(sr: Any) -> bytes:
        names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in sr.ContentSequence]
        return _encoded([sr.ContentSequence[names.index("Image Library")]])

    def report(**kwargs: Any) -> Any:
        return build_sr(
            classic.result, sources, classic.seg, algorithm=ALGORITHM, uids=classic.uids, **kwargs
        )

    own = library_of(report())
    made = image_library(list(reversed(sources)))  # any order: the library is in slice order
    assert len(made.sop_instance_uids) == len(sources)
    taken = report(library=made)
    assert library_of(taken) == own
    assert any(item is made.items[0] for item in taken.ContentSequence)  # taken, not remade
    # Made of fewer images (another series, a file replaced since): the report makes its own.
    fewer = image_library(sources[1:])
    other = report(library=fewer)
    assert library_of(other) == own
    assert not any(item is fewer.items[0] for item in other.ContentSequence)


@pytest.mark.parametrize(
    ("status", "vary"), [("scored", None), ("scored", "SliceThickness"), ("no_tumor", None)]
)
def test_image_library_is_highdicoms_with_shared_descriptors_in_the_group(
    classic: Case, status: str, vary: str | None
) -> None:
    """build_sr builds the library's entries from the first slice's and adds the library after
    highdicom's constructor (for speed): what is written is highdicom's ImageLibrary, in its
    place, with what every entry describes alike (all but its position) said once in the
    group; slices that differ in anything else keep highdicom's library as it is."""
    files = sorted((classic.folder / "study_0001" / "SE0003").glob("*.dcm"))
    # Headers only, as the pipeline reads them.
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    if vary is not None:
        setattr(sources[len(sources) // 2], vary, "9.5")
    if status == "scored":
        result = classic.result
    else:
        result = AnalysisResult(status=status, reason="The segmenter found no liver tumor.")
    sr = build_sr(result, sources, classic.seg, algorithm=ALGORITHM, uids=classic.uids)
    highdicoms = hd.sr.ImageLibrary([ref.dataset for ref in slice_references(sources)])
    expected = list(highdicoms) if vary is not None else _grouped(highdicoms)
    for root in (sr.ContentSequence, sr.content[0].ContentSequence):
        names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in root]
        at = names.index("Image Library")
        assert names[at - 1] == "Procedure reported"
        assert _encoded([root[at]]) == _encoded(expected)
    (group,) = sr.content[0].ContentSequence[at].ContentSequence
    entries = [item for item in group.ContentSequence if item.ValueType == "IMAGE"]
    assert len(entries) == len(sources)
    if vary is None:
        assert all(len(entry.ContentSequence) == 3 for entry in entries)
