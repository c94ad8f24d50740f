"""The IOCM rejection note: validity, title, references, patient/study and equipment."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_sr.common import series_description
from dicom_sr.kos import REJECTION_SERIES_NUMBER, build_rejection_note
from tests.conftest import require_tool, run_tool
from tests.dicom_sr.conftest import ALGORITHM, PATIENT_STUDY, Case, dciodvfy, referenced_uids

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
WHEN = datetime(2026, 12, 2, 14, 5, 33, tzinfo=UTC)


def _superseded(case: Case) -> list[Dataset]:
    """The earlier analysis's SEG, SR and SC as the caller reads them: headers from disk."""
    return [
        pydicom.dcmread(case.paths[key], stop_before_pixels=True)
        for key in ("seg", "sr_comprehensive", "sc")
    ]


@pytest.fixture(scope="module")
def note_path(classic: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    note = build_rejection_note(_superseded(classic), algorithm=ALGORITHM, analysis_time=WHEN)
    path = tmp_path_factory.mktemp("kos") / "kos.dcm"
    note.save_as(path)
    return path


def test_dciodvfy_clean(note_path: Path) -> None:
    errors, warnings = dciodvfy(note_path)
    assert errors == []
    assert warnings == []


def test_title_and_references(classic: Case, note_path: Path) -> None:
    ds = pydicom.dcmread(note_path)
    superseded = _superseded(classic)
    assert ds.SOPClassUID == KOS_SOP_CLASS
    assert ds.Modality == "KO"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001",
        "DCM",
        "Rejected for Quality Reasons",
    )
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    expected = {str(item.SOPInstanceUID): str(item.SOPClassUID) for item in superseded}
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == classic.sources[0].StudyInstanceUID
    evidence = {
        str(instance.ReferencedSOPInstanceUID): str(instance.ReferencedSOPClassUID)
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == expected
    series = {str(item.SeriesInstanceUID) for item in study.ReferencedSeriesSequence}
    assert series == {str(item.SeriesInstanceUID) for item in superseded}
    # The content: the SEG and SC as IMAGE, the SR as COMPOSITE items.
    content = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): item.ValueType
        for item in ds.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    seg, sr, sc = (str(item.SOPInstanceUID) for item in superseded)
    assert content == {seg: "IMAGE", sr: "COMPOSITE", sc: "IMAGE"}
    assert referenced_uids(ds) == set(expected)
    descriptions = [
        item.TextValue
        for item in ds.ContentSequence
        if item.ValueType == "TEXT"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Key Object Description"
    ]
    assert descriptions == [
        "3 MVI AI object(s) superseded by a re-analysis of this study at 2026-12-02 14:05Z"
    ]
    # highdicom reads it back as a KOS of that title.
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    assert len(document.content.get_references()) == 3
    assert document.resolve_reference(sr)[1] == str(superseded[1].SeriesInstanceUID)


def test_patient_study_series_and_equipment(classic: Case, note_path: Path) -> None:
    ds = pydicom.dcmread(note_path)
    source = classic.sources[0]
    for keyword in PATIENT_STUDY:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.SeriesNumber == REJECTION_SERIES_NUMBER == 9004
    assert ds.SeriesDescription == series_description("rejection note", ALGORITHM, WHEN)
    assert ds.SeriesDescription.startswith("MVI AI rejection note v")
    assert ds.SeriesDescription.endswith("2026-12-02 14:05Z [DEMO]")
    assert ds.SeriesInstanceUID not in {
        str(item.SeriesInstanceUID) for item in _superseded(classic)
    }
    assert ds.Manufacturer == ALGORITHM.manufacturer
    assert ds.ManufacturerModelName == ALGORITHM.model_name
    assert ds.SoftwareVersions == ALGORITHM.software_version
    assert ds.DeviceSerialNumber == ALGORITHM.serial_number
    assert ds.ContentDate and ds.ContentTime
    observer = [
        item.TextValue
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer Manufacturer"
    ]
    assert observer == [ALGORITHM.manufacturer]


def test_dsrdump_reads_it(note_path: Path) -> None:
    tool = require_tool("dsrdump", "dcmtk")
    text = run_tool(tool, note_path).stdout
    assert "Rejected for Quality Reasons" in text
    assert "Key Object Selection Document" in text


def test_uids_given_are_kept(classic: Case) -> None:
    series_uid, instance_uid = hd.UID(), hd.UID()
    note = build_rejection_note(
        _superseded(classic)[:1],
        algorithm=ALGORITHM,
        series_uid=series_uid,
        instance_uid=instance_uid,
        series_number=9104,
        analysis_time=WHEN,
        description="Superseded by the re-analysis of 2026-12-02.",
    )
    assert (note.SeriesInstanceUID, note.SOPInstanceUID) == (series_uid, instance_uid)
    assert note.SeriesNumber == 9104


def test_refusals(classic: Case) -> None:
    superseded = _superseded(classic)
    with pytest.raises(ValueError, match="empty"):
        build_rejection_note([], algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="twice"):
        build_rejection_note([superseded[0], superseded[0]], algorithm=ALGORITHM)
    other = copy.deepcopy(superseded[1])
    other.StudyInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="one study"):
        build_rejection_note([superseded[0], other], algorithm=ALGORITHM)
    other = copy.deepcopy(superseded[1])
    other.PatientID = "someone else"
    with pytest.raises(ValueError, match="one patient"):
        build_rejection_note([superseded[0], other], algorithm=ALGORITHM)
    bare = Dataset()
    bare.SOPInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="lacks"):
        build_rejection_note([bare], algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="naive"):
        build_rejection_note(superseded, algorithm=ALGORITHM, analysis_time=datetime(2026, 1, 1))
