"""Tests for node.analysis.supplied_seg: a radiologist's SEG in the study is found and decoded.

The phantom cohorts write a MANUAL truth SEG on the arterial series (series 100 "Manual
segmentation": segments 1 tumor, 2 LOAT, 3 liver) and the truth masks beside the studies; edited
copies of that SEG, and SEGs built here with highdicom, cover the rules one by one. A SEG that is
not used is named as its reader knows it and says why, in the result and in the log.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_sr import codes
from node import MANUFACTURER, MODEL_NAME
from node.analysis.dicomio import SeriesFiles, load_series, scan_folder
from node.analysis.supplied_seg import (
    RejectedSeg,
    SuppliedSeg,
    SuppliedSegError,
    SuppliedSegSearch,
    find_supplied_segs,
    supplied_masks,
)
from node.core.logging import configure_logging, uid_key
from node.core.settings import PipelineSection

DEFAULTS = PipelineSection()
ALGORITHM_TYPES: list[str] = list(DEFAULTS.supplied_seg_algorithm_types)
LABELS: dict[str, list[str]] = DEFAULTS.supplied_seg_labels.model_dump()


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


class Study:
    """One study of a phantom cohort: its files, phase series, truth row and masks."""

    def __init__(self, cohort: Path, index: int = 0) -> None:
        with (cohort / "truth.csv").open(newline="") as handle:
            self.row = list(csv.DictReader(handle))[index]
        self.folder = cohort / self.row["study_folder"]
        self.masks_dir = cohort / "masks" / self.row["study_folder"]
        self.arterial_uid = self.row["arterial_series_uid"]
        self.pv_uid = self.row["portal_venous_series_uid"]
        self.files = sorted(p for p in self.folder.rglob("*") if p.is_file())
        self.seg_path = self.folder / "SE0100" / "SEG00001.dcm"
        self.ct_files = [p for p in self.files if p != self.seg_path]

    def series_files(self, series_uid: str) -> list[Path]:
        return [
            p
            for p in self.ct_files
            if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == series_uid
        ]

    def arterial(self) -> sitk.Image:
        return load_series(self.series_files(self.arterial_uid))

    def truth(self, name: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(self.masks_dir / f"{name}.nrrd")))

    def find(self, paths: list[Path] | None = None, **overrides: object) -> SuppliedSegSearch:
        arguments: dict[str, object] = {
            "arterial_series_uid": self.arterial_uid,
            "portal_venous_series_uid": self.pv_uid,
            "allowed_algorithm_types": ALGORITHM_TYPES,
            "label_patterns": LABELS,
        }
        arguments.update(overrides)
        return find_supplied_segs(self.files if paths is None else paths, **arguments)  # type: ignore[arg-type]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def edited_copy(source: Path, dest: Path, edit: Callable[[Dataset], None]) -> Path:
    """A copy of a SEG as another instance of another series, changed by ``edit``."""
    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    edit(ds)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def edits(*steps: Callable[[Dataset], None]) -> Callable[[Dataset], None]:
    """One edit that applies ``steps`` in order."""

    def edit(ds: Dataset) -> None:
        for step in steps:
            step(ds)

    return edit


def named(number: int | None, description: str | None) -> Callable[[Dataset], None]:
    """Give the SEG's series this SeriesNumber and SeriesDescription (None: remove it)."""

    def edit(ds: Dataset) -> None:
        for keyword, value in (("SeriesNumber", number), ("SeriesDescription", description)):
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return edit


def rejection_of(search: SuppliedSegSearch, path: Path) -> RejectedSeg:
    rejections = [r for r in search.rejected if r.path == path]
    assert len(rejections) == 1, f"{path.name} was not rejected once: {search}"
    return rejections[0]


def reason_for(search: SuppliedSegSearch, path: Path) -> str:
    return rejection_of(search, path).reason


def assert_truth_masks(study: Study, seg: SuppliedSeg, threshold: float = 0.99) -> None:
    masks = supplied_masks(seg, study.arterial())
    assert set(masks) == {"tumor", "loat", "liver"}
    for name, mask in masks.items():
        truth = study.truth(name)
        assert mask.dtype == np.uint8
        assert mask.shape == truth.shape
        assert dice(mask, truth) >= threshold, name


@pytest.fixture(scope="module")
def study(small_cohort: Path) -> Study:
    return Study(small_cohort)


# ------------------------------------------------------------------------------------------------
# The truth SEG of the phantom cohorts
# ------------------------------------------------------------------------------------------------


def test_truth_seg_is_found_and_mapped(study: Study) -> None:
    search = study.find()
    assert search.rejected == []
    (seg,) = search.found
    assert seg.path == study.seg_path
    assert seg.referenced_series_uid == study.arterial_uid
    assert seg.referenced_phase == "arterial"
    assert seg.algorithm_types == ("MANUAL",)
    assert seg.segments == {"tumor": 1, "loat": 2, "liver": 3}
    assert len(seg.created) == len("YYYYMMDDHHMMSS.ffffff")
    assert (seg.series_number, seg.series_description) == (100, "Manual segmentation")
    assert not seg.loat_is_single_fat


def test_truth_seg_gives_the_truth_masks(study: Study) -> None:
    (seg,) = study.find().found
    assert_truth_masks(study, seg)


def test_enhanced_ct_cohort(cohort_factory: Callable[..., Path]) -> None:
    enhanced = Study(cohort_factory(seed=11, enhanced=True, seg=True, masks=True))
    search = enhanced.find()
    (seg,) = search.found
    assert seg.segments == {"tumor": 1, "loat": 2, "liver": 3}
    assert_truth_masks(enhanced, seg)


def test_empty_tumor_segment_gives_an_empty_mask(cohort_factory: Callable[..., Path]) -> None:
    # highdicom writes a segment with no frames when the array is all zero for it: legal DICOM.
    no_tumor = Study(cohort_factory(seed=11, tumor=False, seg=True, masks=True))
    (seg,) = no_tumor.find().found
    assert seg.segments["tumor"] == 1
    masks = supplied_masks(seg, no_tumor.arterial())
    assert not masks["tumor"].any()
    assert dice(masks["loat"], no_tumor.truth("loat")) >= 0.99


# ------------------------------------------------------------------------------------------------
# The rules
# ------------------------------------------------------------------------------------------------


def _automatic(ds: Dataset) -> None:
    for segment in ds.SegmentSequence:
        segment.SegmentAlgorithmType = "AUTOMATIC"
        segment.SegmentAlgorithmName = "Some AI"


def test_automatic_seg_rejected_by_default(study: Study, tmp_path: Path) -> None:
    copy = edited_copy(study.seg_path, tmp_path / "auto.dcm", _automatic)
    search = study.find([*study.ct_files, copy])
    assert search.found == []
    assert "algorithm type AUTOMATIC" in reason_for(search, copy)

    allowed = study.find([*study.ct_files, copy], allowed_algorithm_types=["MANUAL", "AUTOMATIC"])
    (seg,) = allowed.found
    assert seg.algorithm_types == ("AUTOMATIC",)


def test_liver_of_another_algorithm_type_is_left_out(study: Study, tmp_path: Path) -> None:
    def automatic_liver(ds: Dataset) -> None:
        ds.SegmentSequence[2].SegmentAlgorithmType = "AUTOMATIC"
        ds.SegmentSequence[2].SegmentAlgorithmName = "Some AI"

    copy = edited_copy(study.seg_path, tmp_path / "liver.dcm", automatic_liver)
    (seg,) = study.find([*study.ct_files, copy]).found
    assert seg.segments == {"tumor": 1, "loat": 2}
    assert set(supplied_masks(seg, study.arterial())) == {"tumor", "loat"}


def test_own_seg_rejected(study: Study, tmp_path: Path) -> None:
    def node_made(ds: Dataset) -> None:
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = MODEL_NAME

    copy = edited_copy(study.seg_path, tmp_path / "own.dcm", node_made)
    search = study.find([*study.ct_files, copy])
    assert search.found == []
    assert "written by this node" in reason_for(search, copy)

    # A series the store recorded as the node's is excluded whatever the header says.
    by_uid = study.find(own_series_uids=[pydicom.dcmread(study.seg_path).SeriesInstanceUID])
    assert by_uid.found == []
    assert "written by this node" in reason_for(by_uid, study.seg_path)


def test_seg_on_another_series_rejected(study: Study, tmp_path: Path) -> None:
    def on_delayed(ds: Dataset) -> None:
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = study.row["delayed_series_uid"]

    copy = edited_copy(study.seg_path, tmp_path / "delayed.dcm", on_delayed)
    search = study.find([*study.ct_files, copy])
    assert search.found == []
    reason = reason_for(search, copy)
    assert reason == (
        "references neither the arterial nor the portal-venous series "
        f"(references {uid_key(study.row['delayed_series_uid'])})"
    )
    # Reasons name series by hash key only: they go to logs.
    assert study.row["delayed_series_uid"] not in reason


def test_seg_of_another_study_rejected_as_such(study: Study, tmp_path: Path) -> None:
    # A SEG routed beside the wrong study may still name this study's series (its references
    # were copied); its own StudyInstanceUID gives it away.
    other_study_uid = generate_uid()

    def of_another_study(ds: Dataset) -> None:
        ds.StudyInstanceUID = other_study_uid

    copy = edited_copy(study.seg_path, tmp_path / "other_study.dcm", of_another_study)
    search = study.find([*study.ct_files, copy])
    assert search.found == []
    reason = reason_for(search, copy)
    assert reason.startswith(f"belongs to another study (study {uid_key(other_study_uid)};")
    assert other_study_uid not in reason


def test_seg_on_series_outside_the_study_rejected_as_another_studys(
    study: Study, tmp_path: Path
) -> None:
    foreign_series_uid = generate_uid()

    def on_foreign_series(ds: Dataset) -> None:
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = foreign_series_uid

    copy = edited_copy(study.seg_path, tmp_path / "foreign.dcm", on_foreign_series)
    search = study.find([*study.ct_files, copy])
    assert search.found == []
    reason = reason_for(search, copy)
    assert reason.startswith("references neither the arterial nor the portal-venous series")
    assert f"not in this study ({uid_key(foreign_series_uid)})" in reason
    assert "another study" in reason
    assert foreign_series_uid not in reason


def test_source_image_references_used_without_referenced_series(
    study: Study, tmp_path: Path
) -> None:
    def no_series(ds: Dataset) -> None:
        del ds.ReferencedSeriesSequence

    copy = edited_copy(study.seg_path, tmp_path / "sources.dcm", no_series)
    (seg,) = study.find([*study.ct_files, copy]).found
    assert seg.referenced_series_uid == study.arterial_uid


def _generic_codes(labels: tuple[str, str]) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for segment, label in zip(ds.SegmentSequence[:2], labels, strict=True):
            code = segment.SegmentedPropertyTypeCodeSequence[0]
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
                codes.TISSUE.value,
                codes.TISSUE.scheme_designator,
                codes.TISSUE.meaning,
            )
            segment.SegmentLabel = label

    return edit


def test_mapping_by_label(study: Study, tmp_path: Path) -> None:
    copy = edited_copy(
        study.seg_path, tmp_path / "labels.dcm", _generic_codes(("Lesion 1", "LOAT"))
    )
    (seg,) = study.find([*study.ct_files, copy]).found
    assert seg.segments == {"tumor": 1, "loat": 2, "liver": 3}


def test_unmapped_labels_rejected_with_reason(study: Study, tmp_path: Path) -> None:
    copy = edited_copy(
        study.seg_path, tmp_path / "nolabels.dcm", _generic_codes(("Region A", "Region B"))
    )
    search = study.find([*study.ct_files, copy])
    assert search.found == []
    reason = reason_for(search, copy)
    assert "no TUMOR and no LOAT segment" in reason
    assert "Region A" in reason


def test_tumor_only_seg_rejected(study: Study, tmp_path: Path) -> None:
    def drop_loat(ds: Dataset) -> None:
        segment = ds.SegmentSequence[1]
        code = segment.SegmentedPropertyTypeCodeSequence[0]
        code.CodeValue, code.CodeMeaning = codes.TISSUE.value, codes.TISSUE.meaning
        segment.SegmentLabel = "Something else"
        del segment.AnatomicRegionSequence

    copy = edited_copy(study.seg_path, tmp_path / "tumoronly.dcm", drop_loat)
    search = study.find([*study.ct_files, copy])
    assert search.found == []
    assert "no LOAT segment" in reason_for(search, copy)


def _plain_fat(*numbers: int) -> Callable[[Dataset], None]:
    """Segments ``numbers`` become fat labelled "Fett": coded as fat, nothing says omentum."""

    def edit(ds: Dataset) -> None:
        for number in numbers:
            segment = ds.SegmentSequence[number - 1]
            assert int(segment.SegmentNumber) == number
            code = segment.SegmentedPropertyTypeCodeSequence[0]
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
                codes.ADIPOSE_TISSUE.value,
                codes.ADIPOSE_TISSUE.scheme_designator,
                codes.ADIPOSE_TISSUE.meaning,
            )
            segment.SegmentLabel = "Fett" if number == 2 else f"Fett {number}"
            for keyword in ("AnatomicRegionSequence", "SegmentDescription"):
                if keyword in segment:
                    delattr(segment, keyword)

    return edit


SINGLE_FAT_OFF = (
    "no LOAT segment: fat segment 2 ('Fett') is not labelled as lesser omentum; set "
    "pipeline.supplied_seg_accept_single_fat = true to accept a SEG with one neoplasm and one "
    "fat segment"
)


def test_single_fat_segment_is_not_loat_by_default(study: Study, tmp_path: Path) -> None:
    assert DEFAULTS.supplied_seg_accept_single_fat is False
    copy = edited_copy(study.seg_path, tmp_path / "fett.dcm", _plain_fat(2))
    search = study.find([*study.ct_files, copy])
    assert search.found == []
    assert reason_for(search, copy) == SINGLE_FAT_OFF

    # A fat segment whose label says LOAT needs no setting.
    def labelled_loat(ds: Dataset) -> None:
        ds.SegmentSequence[1].SegmentLabel = "LOAT"

    labelled = edited_copy(copy, tmp_path / "fett_loat.dcm", labelled_loat)
    (seg,) = study.find([*study.ct_files, labelled]).found
    assert seg.segments == {"tumor": 1, "loat": 2, "liver": 3}
    assert not seg.loat_is_single_fat


def test_single_fat_segment_is_the_loat_when_accepted(study: Study, tmp_path: Path) -> None:
    copy = edited_copy(study.seg_path, tmp_path / "fett.dcm", _plain_fat(2))
    search = study.find([*study.ct_files, copy], accept_single_fat=True)
    assert search.rejected == []
    (seg,) = search.found
    assert seg.segments == {"tumor": 1, "loat": 2, "liver": 3}
    assert seg.loat_is_single_fat
    assert_truth_masks(study, seg)


@pytest.mark.parametrize("accept", [False, True])
def test_two_fat_segments_rejected_whatever_the_setting(
    study: Study, tmp_path: Path, accept: bool
) -> None:
    copy = edited_copy(study.seg_path, tmp_path / "two_fats.dcm", _plain_fat(2, 3))
    search = study.find([*study.ct_files, copy], accept_single_fat=accept)
    assert search.found == []
    reason = reason_for(search, copy)
    assert reason.startswith("no LOAT segment: 2 fat segments; cannot tell which is the LOAT")
    assert "'Fett'" in reason and "'Fett 3'" in reason


def test_single_fat_needs_exactly_one_neoplasm(study: Study, tmp_path: Path) -> None:
    def liver_as_second_lesion(ds: Dataset) -> None:
        code = ds.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0]
        code.CodeValue, code.CodeMeaning = codes.NEOPLASM.value, codes.NEOPLASM.meaning
        ds.SegmentSequence[2].SegmentLabel = "Lesion 2"

    copy = edited_copy(
        study.seg_path,
        tmp_path / "fett_two_lesions.dcm",
        edits(_plain_fat(2), liver_as_second_lesion),
    )
    search = study.find([*study.ct_files, copy], accept_single_fat=True)
    assert search.found == []
    reason = reason_for(search, copy)
    assert reason.startswith("no LOAT segment: fat segment 2 ('Fett') is not labelled")
    assert "exactly one tumor segment coded as a neoplasm (tumor segments: 1, 3;" in reason


def test_several_tumor_segments_are_united(study: Study, tmp_path: Path) -> None:
    def liver_as_second_lesion(ds: Dataset) -> None:
        segment = ds.SegmentSequence[2]
        code = segment.SegmentedPropertyTypeCodeSequence[0]
        code.CodeValue, code.CodeMeaning = codes.NEOPLASM.value, codes.NEOPLASM.meaning
        segment.SegmentLabel = "Lesion 2"

    copy = edited_copy(study.seg_path, tmp_path / "two.dcm", liver_as_second_lesion)
    (seg,) = study.find([*study.ct_files, copy]).found
    assert seg.segments == {"tumor": 1, "loat": 2}
    assert seg.segment_groups == {"tumor": (1, 3), "loat": (2,)}
    masks = supplied_masks(seg, study.arterial())
    union = (study.truth("tumor") > 0) | (study.truth("liver") > 0)
    assert dice(masks["tumor"], union) >= 0.99


def test_newest_first(study: Study, tmp_path: Path) -> None:
    def at(date: str, time: str) -> Callable[[Dataset], None]:
        def edit(ds: Dataset) -> None:
            ds.ContentDate, ds.ContentTime = date, time

        return edit

    older = edited_copy(study.seg_path, tmp_path / "a_older.dcm", at("20240101", "0930"))
    newer = edited_copy(study.seg_path, tmp_path / "b_newer.dcm", at("20240101", "093000.5"))
    search = study.find([*study.ct_files, older, newer])
    assert [seg.path for seg in search.found] == [newer, older]
    assert search.found[0].created == "20240101093000.500000"
    assert search.found[1].created == "20240101093000.000000"


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_corrupt_files_rejected_without_exception(study: Study, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    data = study.seg_path.read_bytes()
    header_cut = tmp_path / "header_cut.dcm"
    header_cut.write_bytes(data[:1500])
    search = study.find([*study.ct_files, garbage, header_cut])
    assert search.found == []
    assert {r.path for r in search.rejected} == {garbage, header_cut}
    assert all(r.reason for r in search.rejected)
    # Nothing could be read of the garbage: the reader sees the file name.
    unreadable = rejection_of(search, garbage)
    assert (unreadable.series_uid, unreadable.sop_instance_uid) == (None, None)
    assert unreadable.series_number is None and unreadable.series_description == ""
    assert unreadable.label == "garbage.dcm"


def test_truncated_pixel_data_raises_supplied_seg_error(study: Study, tmp_path: Path) -> None:
    data = study.seg_path.read_bytes()
    pixels_cut = tmp_path / "pixels_cut.dcm"
    pixels_cut.write_bytes(data[:-200])
    (seg,) = study.find([*study.ct_files, pixels_cut]).found  # the header is intact
    with pytest.raises(SuppliedSegError):
        supplied_masks(seg, study.arterial())


# ------------------------------------------------------------------------------------------------
# What the reader and the operator learn of a SEG that is not used
# ------------------------------------------------------------------------------------------------


def _on_delayed(study: Study) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = study.row["delayed_series_uid"]

    return edit


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_rejections_name_the_series_and_say_why(study: Study, tmp_path: Path) -> None:
    automatic = edited_copy(
        study.seg_path,
        tmp_path / "auto.dcm",
        edits(_automatic, named(7, "LIVER SEG CORRECTED")),
    )
    delayed = edited_copy(
        study.seg_path, tmp_path / "delayed.dcm", edits(_on_delayed(study), named(8, None))
    )
    unnumbered = edited_copy(
        study.seg_path,
        tmp_path / "unnumbered.dcm",
        edits(_generic_codes(("Region A", "Region B")), named(None, "Corrected")),
    )
    search = study.find([*study.ct_files, automatic, delayed, unnumbered])
    assert search.found == []
    assert len(search.rejected) == 3

    expected = {
        automatic: (
            7,
            "LIVER SEG CORRECTED",
            "series 7 (LIVER SEG CORRECTED)",
            "segment 1 (tumor) has algorithm type AUTOMATIC, allowed: MANUAL, SEMIAUTOMATIC",
        ),
        delayed: (8, "", "series 8", "references neither the arterial nor the portal-venous"),
        unnumbered: (None, "Corrected", "unnumbered.dcm", "no TUMOR and no LOAT segment"),
    }
    header = pydicom.dcmread(study.seg_path, stop_before_pixels=True)
    identifiers = [str(header.PatientName), str(header.PatientID)]
    for path, (number, description, label, reason) in expected.items():
        rejection = rejection_of(search, path)
        series_uid, sop_uid = _uids(path)
        assert rejection == RejectedSeg(
            path=path,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=number,
            series_description=description,
            reason=rejection.reason,
        )
        assert rejection.reason.startswith(reason), rejection.reason
        assert rejection.label == label
        for text in (rejection.label, rejection.reason):
            assert not any(identifier in text for identifier in identifiers if identifier)
            assert series_uid not in text and sop_uid not in text
    # The job's record keeps them as they were found.
    with pytest.raises(dataclasses.FrozenInstanceError):
        search.rejected[0].reason = "changed"  # type: ignore[misc]


@pytest.fixture
def node_log() -> Iterator[Callable[[], list[dict[str, object]]]]:
    """The node's log as configured for a site at its default level, INFO: JSON records."""
    stream = io.StringIO()
    saved = structlog.get_config()
    named_loggers = ("pynetdicom", "highdicom", "matplotlib")
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: logging.getLogger(name).level for name in named_loggers}
    configure_logging("info", stream=stream)

    def records() -> list[dict[str, object]]:
        # Standard-library lines share the stream; the node's own lines are the JSON ones.
        return [json.loads(line) for line in stream.getvalue().splitlines() if line[:1] == "{"]

    yield records
    structlog.configure(**saved)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_each_rejection_is_logged_at_info(
    study: Study, tmp_path: Path, node_log: Callable[[], list[dict[str, object]]]
) -> None:
    automatic = edited_copy(
        study.seg_path, tmp_path / "auto.dcm", edits(_automatic, named(7, "LIVER SEG CORRECTED"))
    )
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    search = study.find([*study.ct_files, automatic, garbage])

    records = [r for r in node_log() if r["event"] == "supplied SEG not used"]
    assert len(records) == len(search.rejected) == 2
    by_file = {record["file"]: record for record in records}
    series_uid, sop_uid = _uids(automatic)
    assert by_file["auto.dcm"]["level"] == "info"
    assert by_file["auto.dcm"]["series_key"] == uid_key(series_uid)
    assert by_file["auto.dcm"]["reason"] == reason_for(search, automatic)
    assert by_file["garbage.dcm"]["level"] == "info"
    assert by_file["garbage.dcm"]["series_key"] is None
    assert by_file["garbage.dcm"]["reason"] == reason_for(search, garbage)
    text = json.dumps(records)
    assert series_uid not in text and sop_uid not in text


# ------------------------------------------------------------------------------------------------
# SEGs built here: fractional, and on the portal-venous series
# ------------------------------------------------------------------------------------------------


def _sorted_sources(paths: list[Path]) -> list[Dataset]:
    # highdicom pairs pixel_array[i] with source image i; sort by z so mask slice k goes with
    # the image at the phantom's slice k (the phantom's direction is the identity).
    return sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: ds.ImagePositionPatient[2])


def _descriptions(algorithm_type: str = "MANUAL") -> list[hd.seg.SegmentDescription]:
    kinds = (
        ("Tumor", codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, codes.NEOPLASM),
        ("LOAT", codes.TISSUE, codes.ADIPOSE_TISSUE),
        ("Liver", codes.ANATOMICAL_STRUCTURE, codes.LIVER),
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=property_type,
            algorithm_type=algorithm_type,
            anatomic_regions=[codes.OMENTUM] if label == "LOAT" else None,
        )
        for number, (label, category, property_type) in enumerate(kinds, start=1)
    ]


def _write_seg(
    sources: list[Dataset], pixel_array: np.ndarray, path: Path, **kwargs: object
) -> Path:
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segment_descriptions=_descriptions(),
        series_instance_uid=generate_uid(),
        series_number=200,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Reader Workstation",
        manufacturer_model_name="Contour tool",
        software_versions="1",
        device_serial_number="RW-1",
        **kwargs,  # type: ignore[arg-type]
    )
    seg.save_as(path)
    return path


def test_fractional_seg_thresholded_at_half(study: Study, tmp_path: Path) -> None:
    truth = np.stack([study.truth(n) for n in ("tumor", "loat", "liver")], axis=-1).astype(bool)
    # Inside 0.8, a one-voxel rim of 0.3 around each region (below the threshold).
    rim = np.zeros(truth.shape, dtype=bool)
    for axis in (1, 2):
        rim |= np.roll(truth, 1, axis=axis) | np.roll(truth, -1, axis=axis)
    fractions = np.where(truth, 0.8, np.where(rim, 0.3, 0.0)).astype(np.float32)
    path = _write_seg(
        _sorted_sources(study.series_files(study.arterial_uid)),
        fractions,
        tmp_path / "fractional.dcm",
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        max_fractional_value=255,
    )
    (seg,) = study.find([*study.ct_files, path]).found
    assert seg.path == path
    assert_truth_masks(study, seg)


def _shifted(mask: np.ndarray, voxels: tuple[int, int, int]) -> np.ndarray:
    """``mask`` moved by ``voxels`` = (di, dj, dk), zero-filled: out[k, j, i] = mask[k-dk, ...]."""
    di, dj, dk = voxels
    out = np.zeros_like(mask)
    size = mask.shape
    src = [slice(max(0, -d), n - max(0, d)) for d, n in zip((dk, dj, di), size, strict=True)]
    dst = [slice(max(0, d), n - max(0, -d)) for d, n in zip((dk, dj, di), size, strict=True)]
    out[tuple(dst)] = mask[tuple(src)]
    return out


def test_seg_on_the_portal_venous_series(
    cohort_factory: Callable[..., Path], tmp_path: Path
) -> None:
    cohort = cohort_factory(studies=2, seed=11, masks=True, seg=True)
    pv_study = Study(cohort, index=1)
    spacing = [float(v) for v in pv_study.arterial().GetSpacing()]
    shift_mm = [float(pv_study.row[f"pv_shift_{axis}_mm"]) for axis in "xyz"]
    # The phantom moves the viscera by shift_mm in the PV phase (on the same grid). Rounded to
    # whole voxels so the test measures the sign convention, not nearest-neighbour rounding.
    di, dj, dk = (round(s / d) for s, d in zip(shift_mm, spacing, strict=True))
    voxels = (di, dj, dk)
    assert any(voxels), "this study's PV shift must move at least one voxel"
    pv_masks = np.stack(
        [_shifted(pv_study.truth(n), voxels) for n in ("tumor", "loat", "liver")], axis=-1
    ).astype(bool)
    path = _write_seg(
        _sorted_sources(pv_study.series_files(pv_study.pv_uid)),
        pv_masks,
        tmp_path / "pv.dcm",
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
    )
    (seg,) = pv_study.find([*pv_study.ct_files, path]).found
    assert seg.referenced_phase == "portal_venous"
    assert seg.referenced_series_uid == pv_study.pv_uid
    arterial = pv_study.arterial()
    with pytest.raises(SuppliedSegError, match="pv_to_arterial"):
        supplied_masks(seg, arterial)

    # Tissue at arterial point p lies at p + shift in the PV phase. SimpleITK's registration
    # transform maps fixed (arterial) points to moving (PV) points, so it is +shift.
    shift_used = [v * d for v, d in zip(voxels, spacing, strict=True)]
    right = supplied_masks(seg, arterial, pv_to_arterial=sitk.TranslationTransform(3, shift_used))
    wrong = supplied_masks(
        seg, arterial, pv_to_arterial=sitk.TranslationTransform(3, [-v for v in shift_used])
    )
    for name in ("tumor", "loat", "liver"):
        truth = pv_study.truth(name)
        assert dice(right[name], truth) >= 0.9, name
    assert dice(wrong["tumor"], pv_study.truth("tumor")) < 0.9


def test_labelmap_seg(study: Study, tmp_path: Path) -> None:
    # A label map holds one segment per voxel: the tumor is painted over the liver, so only
    # tumor and LOAT come back exactly.
    labels = np.zeros(study.truth("liver").shape, dtype=np.uint8)
    labels[study.truth("liver") > 0] = 3
    labels[study.truth("loat") > 0] = 2
    labels[study.truth("tumor") > 0] = 1
    path = _write_seg(
        _sorted_sources(study.series_files(study.arterial_uid)),
        labels,
        tmp_path / "labelmap.dcm",
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
    )
    (seg,) = study.find([*study.ct_files, path]).found
    masks = supplied_masks(seg, study.arterial())
    assert dice(masks["tumor"], study.truth("tumor")) >= 0.99
    assert dice(masks["loat"], study.truth("loat")) >= 0.99
    assert not (masks["liver"] & masks["tumor"]).any()


def test_sparse_frames_without_spacing_stay_on_their_slices(study: Study, tmp_path: Path) -> None:
    # Empty frames are omitted: a tumor drawn on one slice and LOAT on another, four slices
    # apart, and no SpacingBetweenSlices. The stack must not take the four-slice step as its
    # spacing (that would smear each frame over the slices between).
    tumor = study.truth("tumor")
    k_tumor = int(np.argmax(tumor.sum(axis=(1, 2))))
    k_loat = k_tumor + 4 if k_tumor + 4 < tumor.shape[0] else k_tumor - 4
    sparse = np.zeros((*tumor.shape, 3), dtype=bool)
    sparse[k_tumor, ..., 0] = tumor[k_tumor] > 0
    sparse[k_loat, ..., 1] = True
    path = _write_seg(
        _sorted_sources(study.series_files(study.arterial_uid)),
        sparse,
        tmp_path / "sparse_full.dcm",
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
    )

    def no_spacing(ds: Dataset) -> None:
        del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices

    copy = edited_copy(path, tmp_path / "sparse.dcm", no_spacing)
    (seg,) = study.find([*study.ct_files, copy]).found
    masks = supplied_masks(seg, study.arterial())
    assert np.flatnonzero(masks["tumor"].sum(axis=(1, 2))).tolist() == [k_tumor]
    assert np.flatnonzero(masks["loat"].sum(axis=(1, 2))).tolist() == [k_loat]
    assert not masks["liver"].any()


class RecordingSegmenter:
    """Stands in for the U-Net: records whether it was asked, returns empty masks."""

    def __init__(self) -> None:
        self.calls = 0

    def segment(self, arterial: sitk.Image, portal_venous: sitk.Image) -> object:
        from model.segmentation import postprocess

        self.calls += 1
        shape = sitk.GetArrayViewFromImage(arterial).shape
        return postprocess(np.zeros(shape, np.uint8), np.zeros(shape), "unet")


def test_a_supplied_seg_wins_over_the_automatic_segmenter(
    cohort_factory: Callable[..., Path],
) -> None:
    from node.analysis.supplied_seg import choose_segmentation
    from node.core.settings import PipelineSection

    for seg, expected in ((True, "supplied"), (False, "unet")):
        cohort = cohort_factory(seed=14, size=64, slices=16, seg=seg, masks=True)
        row = next(csv.DictReader((cohort / "truth.csv").open()))
        paths = sorted((cohort / row["study_folder"]).rglob("*.dcm"))
        arterial = load_series(
            [
                p
                for p in paths
                if str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                == row["arterial_series_uid"]
            ]
        )
        automatic = RecordingSegmenter()
        pipeline = PipelineSection()
        choice = choose_segmentation(
            paths,
            arterial=arterial,
            portal_venous_on_arterial=arterial,
            arterial_series_uid=row["arterial_series_uid"],
            portal_venous_series_uid=row["portal_venous_series_uid"],
            pv_to_arterial=None,
            allowed_algorithm_types=pipeline.supplied_seg_algorithm_types,
            label_patterns=pipeline.supplied_seg_labels.model_dump(),
            own_series_uids=(),
            automatic=lambda a=automatic: a,
        )
        assert choice.masks.source == expected
        assert automatic.calls == (0 if seg else 1)
        if seg:
            truth = sitk.GetArrayFromImage(
                sitk.ReadImage(str(cohort / "masks" / row["study_folder"] / "tumor.nrrd"))
            )
            assert choice.supplied is not None
            assert (choice.masks.tumor == truth).mean() > 0.999


def test_a_seg_whose_frames_cannot_be_decoded_is_rejected_and_the_segmenter_runs(
    study: Study, tmp_path: Path, node_log: Callable[[], list[dict[str, object]]]
) -> None:
    from node.analysis.supplied_seg import choose_segmentation

    pixels_cut = tmp_path / "pixels_cut.dcm"
    pixels_cut.write_bytes(study.seg_path.read_bytes()[:-200])  # the header is intact
    automatic = RecordingSegmenter()
    arterial = study.arterial()
    choice = choose_segmentation(
        [*study.ct_files, pixels_cut],
        arterial=arterial,
        portal_venous_on_arterial=arterial,
        arterial_series_uid=study.arterial_uid,
        portal_venous_series_uid=study.pv_uid,
        pv_to_arterial=None,
        allowed_algorithm_types=ALGORITHM_TYPES,
        label_patterns=LABELS,
        own_series_uids=(),
        automatic=lambda: automatic,
    )
    assert choice.supplied is None and automatic.calls == 1
    (rejection,) = choice.rejected
    series_uid, sop_uid = _uids(study.seg_path)
    assert (rejection.path, rejection.series_uid, rejection.sop_instance_uid) == (
        pixels_cut,
        series_uid,
        sop_uid,
    )
    assert rejection.label == "series 100 (Manual segmentation)"
    assert rejection.reason.startswith(
        "cannot be decoded onto the arterial grid: pixels_cut.dcm: Pixel Data has"
    )
    (record,) = [r for r in node_log() if r["event"] == "supplied SEG not used"]
    assert record["level"] == "info"
    assert record["series_key"] == uid_key(series_uid)
    assert record["reason"] == rejection.reason


def test_the_segment_stage_passes_the_single_fat_setting_on(study: Study, tmp_path: Path) -> None:
    from model.registration import Registration
    from node.analysis import stages

    copy = edited_copy(study.seg_path, tmp_path / "fett" / "fett.dcm", _plain_fat(2))
    copy_series_uid, _ = _uids(copy)
    truth_series_uid, _ = _uids(study.seg_path)
    ((study_uid, series),) = scan_folder(study.folder).items()
    files = {uid: found for uid, found in series.items() if uid != truth_series_uid}
    files[copy_series_uid] = SeriesFiles(
        study_instance_uid=study_uid,
        series_instance_uid=copy_series_uid,
        modality="SEG",
        sop_class_uid=str(pydicom.dcmread(copy, stop_before_pixels=True).SOPClassUID),
        series_description="",
        paths=(copy,),
    )
    arterial = study.arterial()
    identity = Registration(sitk.Euler3DTransform(), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0.0, 1.0)
    registered = stages.Registered(identity, arterial)

    for accept, source in ((False, "unet"), (True, "supplied")):
        automatic = RecordingSegmenter()
        choice = stages.segment(
            files,
            arterial,
            registered,
            arterial_uid=study.arterial_uid,
            portal_venous_uid=study.pv_uid,
            pipeline=PipelineSection(supplied_seg_accept_single_fat=accept),
            segmenter=lambda a=automatic: a,
        )
        assert choice.masks.source == source, accept
        if accept:
            assert choice.supplied is not None and choice.supplied.loat_is_single_fat
            assert choice.rejected == []
        else:
            assert [r.reason for r in choice.rejected] == [SINGLE_FAT_OFF]


def test_the_segment_stage_reads_headers_for_segs_only_where_a_series_may_hold_one(
    study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.registration import Registration
    from node.analysis import stages
    from node.analysis import supplied_seg as module

    ((_, scanned),) = scan_folder(study.folder).items()
    seg_series_uid, _ = _uids(study.seg_path)
    assert module.SEG_CLASSES & scanned[seg_series_uid].sop_classes
    images_only = {uid: files for uid, files in scanned.items() if uid != seg_series_uid}
    # Made by a caller that does not know the files' SOP classes.
    unknown = {
        uid: dataclasses.replace(files, sop_classes=frozenset()) for uid, files in scanned.items()
    }
    arterial = study.arterial()
    identity = Registration(sitk.Euler3DTransform(), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0.0, 1.0)
    reads: list[object] = []
    real_dcmread = module.pydicom.dcmread

    def counting_dcmread(*args: object, **kwargs: object) -> object:
        reads.append(args[0])
        return real_dcmread(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(module.pydicom, "dcmread", counting_dcmread)
    for series, source, read_all in (
        (images_only, "unet", False),  # every series known to hold images only: nothing read
        (scanned, "supplied", True),  # a SEG series: every header, the SEG checked against them
        (unknown, "supplied", True),  # classes not known: as if a SEG might be there
    ):
        reads.clear()
        choice = stages.segment(
            series,
            arterial,
            stages.Registered(identity, arterial),
            arterial_uid=study.arterial_uid,
            portal_venous_uid=study.pv_uid,
            pipeline=PipelineSection(),
            segmenter=RecordingSegmenter,
        )
        assert choice.masks.source == source
        every_file = {path for files in series.values() for path in files.paths}
        assert set(reads) == (every_file if read_all else set())
