"""dicom_sr.common: algorithm and result validation, UIDs, slice order, shared attributes."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_sr import codes
from dicom_sr.common import (
    DEMO_DISCLAIMER,
    AlgorithmInfo,
    AnalysisResult,
    allocate_uids,
    content_date_time,
    contributing_equipment,
    copy_patient_study,
    series_description,
    slice_references,
)
from tests.dicom_sr.conftest import ALGORITHM, Case


def test_algorithm_info_validates_and_derives() -> None:
    with pytest.raises(ValueError, match="name"):
        AlgorithmInfo("", "1", "m", "n", "v", demo=False)
    with pytest.raises(ValueError, match="64"):
        AlgorithmInfo("x" * 65, "1", "m", "n", "v", demo=False)
    plain = AlgorithmInfo("model", "1.0", "maker", "node", "0.1", demo=False)
    assert plain.effective_disclaimer == ""
    assert plain.serial_number == "node"
    site = AlgorithmInfo("model", "1.0", "maker", "node", "0.1", demo=True, disclaimer="Site text")
    assert site.effective_disclaimer == f"{DEMO_DISCLAIMER}; Site text"
    assert ALGORITHM.device_uid == AlgorithmInfo(**ALGORITHM.__dict__).device_uid
    assert UID(ALGORITHM.device_uid).is_valid
    assert len(ALGORITHM.device_uid) <= 64


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"status": "done"}, "status"),
        ({"mvi_probability": 1.2}, "mvi_probability"),
        ({"risk_category": "medium"}, "risk_category"),
        ({"segmentation_source": "magic"}, "segmentation_source"),
        ({"max_diameter_mm": -1.0}, "max_diameter_mm"),
        ({"mvi_probability": None}, "mvi_probability"),
        ({"diameter_slice": -1}, "diameter_slice"),
        ({"status": "no_tumor"}, "reason"),
    ],
)
def test_analysis_result_rejects(changes: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "status": "scored",
        "mvi_probability": 0.5,
        "risk_category": "high",
        "max_diameter_mm": 10.0,
        "diameter_slice": 3,
    }
    AnalysisResult(**values)  # type: ignore[arg-type]
    values.update(changes)
    with pytest.raises(ValueError, match=message):
        AnalysisResult(**values)  # type: ignore[arg-type]


def test_allocate_uids_new_every_time() -> None:
    first, second = allocate_uids(), allocate_uids()
    uids = [v for v in first.__dict__.values() if isinstance(v, str)]
    uids += [v for v in second.__dict__.values() if isinstance(v, str)]
    assert len(set(uids)) == len(uids) == 18
    assert all(UID(uid).is_valid for uid in uids)
    assert (first.seg_series_number, first.sr_series_number, first.sc_series_number) == (
        9001,
        9002,
        9003,
    )
    with pytest.raises(ValueError, match="distinct"):
        allocate_uids(series_numbers=(1, 1, 2))
    with pytest.raises(ValueError, match="lacks StudyInstanceUID"):
        allocate_uids(predecessor_sr=Dataset())
    old = Dataset()
    old.StudyInstanceUID, old.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    old.SOPClassUID, old.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.3.4.5"
    reference = allocate_uids(predecessor_sr=old).predecessor_sr
    assert reference is not None and reference.SOPInstanceUID == "1.2.3.4.5"


def test_slice_references_classic_sorted_by_position(classic: Case) -> None:
    shuffled = list(classic.sources)
    random.Random(0).shuffle(shuffled)
    references = slice_references(shuffled)
    z = [float(ref.dataset.ImagePositionPatient[2]) for ref in references]
    assert z == sorted(z)
    assert all(ref.frame_number is None for ref in references)
    with pytest.raises(ValueError, match="empty"):
        slice_references([])
    other = copy.deepcopy(classic.sources[0])
    other.SeriesInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="one series"):
        slice_references([*classic.sources, other])


def test_slice_references_enhanced_by_plane_position(
    case_factory: Callable[[str], Case],
) -> None:
    enhanced = case_factory("enhanced")
    (image,) = enhanced.sources
    references = slice_references([image])
    frames = image.PerFrameFunctionalGroupsSequence
    z = [
        float(frames[ref.frame_number - 1].PlanePositionSequence[0].ImagePositionPatient[2])
        for ref in references
        if ref.frame_number is not None
    ]
    assert len(z) == int(image.NumberOfFrames)
    assert z == sorted(z)


def test_contributing_equipment_and_copy() -> None:
    item = contributing_equipment(ALGORITHM)
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert purpose.CodeValue == codes.PROCESSING_ALGORITHM.value
    assert purpose.CodeMeaning == "Processing Algorithm"
    source = Dataset()
    source.PatientName = "DOE^JANE"
    source.PatientID = "42"
    source.StudyInstanceUID = "1.2.3"
    source.Modality = "CT"
    target = Dataset()
    copy_patient_study(target, source)
    assert target.PatientName == "DOE^JANE" and target.StudyInstanceUID == "1.2.3"
    assert "Modality" not in target


WHEN = datetime(2026, 12, 2, 14, 5, 33, tzinfo=UTC)


def test_series_description_tells_analyses_apart() -> None:
    demo = AlgorithmInfo("model", "1.2", "maker", "node", "0.1", demo=True)
    plain = AlgorithmInfo("model", "v1.2", "maker", "node", "0.1", demo=False)
    assert series_description("report", demo, WHEN) == "MVI AI report v1.2 2026-12-02 14:05Z [DEMO]"
    assert series_description("report", plain, WHEN) == "MVI AI report v1.2 2026-12-02 14:05Z"
    # Another zone is written in UTC.
    later = WHEN.astimezone(timezone(timedelta(hours=9)))
    assert series_description("report", demo, later) == series_description("report", demo, WHEN)
    assert series_description("report", demo, WHEN + timedelta(minutes=1)) != (
        series_description("report", demo, WHEN)
    )
    # A long version is cut; the time and the demo mark are kept (LO: 64 characters).
    long = AlgorithmInfo("model", "9" * 64, "maker", "node", "0.1", demo=True)
    text = series_description("rejection note", long, WHEN)
    assert len(text) == 64
    assert text.startswith("MVI AI rejection note v999")
    assert text.endswith(" 2026-12-02 14:05Z [DEMO]")
    with pytest.raises(ValueError, match="naive"):
        series_description("report", demo, datetime(2026, 12, 2, 14, 5))


def test_content_date_time_local_or_source_offset() -> None:
    source = Dataset()
    source.TimezoneOffsetFromUTC = "+0100"
    assert content_date_time(WHEN, source) == (date(2026, 12, 2), time(15, 5, 33))
    source.TimezoneOffsetFromUTC = "-0530"
    assert content_date_time(WHEN, source) == (date(2026, 12, 2), time(8, 35, 33))
    local = WHEN.astimezone()
    expected = (local.date(), local.time().replace(tzinfo=None))
    assert content_date_time(WHEN, Dataset()) == expected
    assert content_date_time(WHEN + timedelta(microseconds=7)) == expected
    with pytest.raises(ValueError, match="naive"):
        content_date_time(datetime(2026, 12, 2, 14, 5))


def test_outputs_carry_analysis_time(classic: Case) -> None:
    """The SEG, SR and SC of one analysis: the same time in their descriptions and content."""
    when = classic.uids.analysis_time
    day, clock = content_date_time(when, classic.sources[0])
    for key, kind in (("seg", "segmentation"), ("sr_comprehensive", "report"), ("sc", "summary")):
        ds = pydicom.dcmread(classic.paths[key], stop_before_pixels=True)
        assert ds.SeriesDescription == series_description(kind, ALGORITHM, when), key
        if key != "sc":  # the SC's content time is the SC module's own (dicom_sr/sc.py)
            assert ds.ContentDate == f"{day:%Y%m%d}", key
            assert ds.ContentTime.startswith(f"{clock:%H%M%S}"), key
