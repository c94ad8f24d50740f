"""node.analysis.pairing: choosing the arterial and portal-venous series of phantom studies."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from node.analysis.dicomio import load_series, scan_folder
from node.analysis.pairing import (
    PHASES,
    Pairing,
    PhaseEvidence,
    SeriesInfo,
    image_metrics,
    pair_phases,
    series_info,
)
from node.core.settings import PhasesSection

RULES: dict[str, list[str]] = PhasesSection().model_dump()

# Tags a test strips to take timing away from the pairing.
CONTRAST_AND_TIME = (
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusVolume",
    "ContrastBolusStartTime",
    "ContrastBolusIngredient",
    "ContrastBolusAgentSequence",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "ContentTime",
    "SeriesTime",
)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _truth(cohort: Path) -> list[dict[str, str]]:
    with (cohort / "truth.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _phase_of(row: dict[str, str]) -> dict[str, str]:
    """SeriesInstanceUID -> phase name (localizer included) for one truth row."""
    return {
        row[f"{phase}_series_uid"]: phase
        for phase in ("localizer", *PHASES)
        if row[f"{phase}_series_uid"]
    }


def _infos(study: Path) -> list[SeriesInfo]:
    """SeriesInfo of every series under one study folder."""
    (series,) = scan_folder(study).values()
    return [series_info(files.paths) for files in series.values()]


def _copy_study(cohort: Path, tmp_path: Path, index: int = 0) -> tuple[Path, dict[str, str]]:
    """A writable copy of study ``index`` and its truth row."""
    row = _truth(cohort)[index]
    target = tmp_path / row["study_folder"]
    shutil.copytree(cohort / row["study_folder"], target)
    return target, row


def _series_files(study: Path, series_uid: str) -> list[Path]:
    (series,) = scan_folder(study).values()
    return sorted(series[series_uid].paths)


def _rewrite(paths: Iterable[Path], edit: Callable[[pydicom.Dataset], None]) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)


def _strip(*keywords: str) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                del ds[keyword]
        for group in ds.get("SharedFunctionalGroupsSequence") or []:
            if "ContrastBolusUsageSequence" in group and "ContrastBolusAgent" in keywords:
                del group.ContrastBolusUsageSequence

    return edit


def _copy_series(
    study: Path, source_uid: str, name: str, keep: Callable[[int], bool] = lambda k: True
) -> tuple[str, list[Path]]:
    """Copy (some files of) a series into a new series folder with fresh UIDs."""
    new_uid = generate_uid()
    folder = study / name
    folder.mkdir()
    written = []
    for index, path in enumerate(_series_files(study, source_uid)):
        if not keep(index):
            continue
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = new_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = folder / path.name
        ds.save_as(target)
        written.append(target)
    return new_uid, written


def _evidence(pairing: Pairing, series_uid: str) -> PhaseEvidence:
    (found,) = [e for e in pairing.evidence if e.series_instance_uid == series_uid]
    return found


def _assert_pairs_truth(pairing: Pairing, row: dict[str, str]) -> None:
    assert pairing.status == "paired", pairing.reason
    assert pairing.reason is None
    assert pairing.arterial == row["arterial_series_uid"]
    assert pairing.portal_venous == row["portal_venous_series_uid"]


@pytest.fixture(scope="module")
def cohort(cohort_factory: Callable[..., Path]) -> Path:
    """Two complete studies (localizer + four phases)."""
    return cohort_factory(studies=2, seed=21)


# ------------------------------------------------------------------------------------------------
# Headers
# ------------------------------------------------------------------------------------------------


def test_series_info_reads_classic_headers(cohort: Path) -> None:
    row = _truth(cohort)[0]
    study = cohort / row["study_folder"]
    infos = {i.series_instance_uid: i for i in _infos(study)}
    arterial = infos[row["arterial_series_uid"]]
    assert arterial.error is None
    assert arterial.modality == "CT"
    assert arterial.slices == 24 and (arterial.rows, arterial.columns) == (96, 96)
    assert arterial.slice_spacing == pytest.approx(160.0 / 24, abs=1e-3)
    assert arterial.pixel_spacing == pytest.approx((380.0 / 96, 380.0 / 96), abs=1e-3)
    assert arterial.orientation == pytest.approx((1, 0, 0, 0, 1, 0))
    assert arterial.contrast_agent and arterial.contrast_start_time
    assert arterial.image_type[0] == "ORIGINAL"
    assert arterial.body_part == "ABDOMEN"
    non_contrast = infos[row["non_contrast_series_uid"]]
    assert non_contrast.contrast_agent == ""
    assert non_contrast.acquisition_seconds is not None
    assert arterial.acquisition_seconds is not None
    assert non_contrast.acquisition_seconds < arterial.acquisition_seconds
    localizer = infos[row["localizer_series_uid"]]
    assert "LOCALIZER" in localizer.image_type and localizer.slices == 1


def test_series_info_keeps_whole_series_headers_with_pixels_left_in_the_files(
    cohort: Path, tmp_path: Path
) -> None:
    study, row = _copy_study(cohort, tmp_path)
    portal_file = _series_files(study, row["portal_venous_series_uid"])[3]
    portal_file.write_bytes(portal_file.read_bytes()[:-3000])
    infos = {i.series_instance_uid: i for i in _infos(study)}
    arterial = infos[row["arterial_series_uid"]]

    assert len(arterial.headers) == arterial.slices
    assert all(
        ds.get_item("PixelData", keep_deferred=True).value is None for ds in arterial.headers
    )
    from_headers = load_series(list(arterial.headers))
    from_files = load_series(list(arterial.paths))
    assert np.array_equal(
        sitk.GetArrayViewFromImage(from_headers), sitk.GetArrayViewFromImage(from_files)
    )
    assert from_headers.GetOrigin() == from_files.GetOrigin()
    assert from_headers.GetSpacing() == from_files.GetSpacing()
    # One file cut short: no headers, so that no volume is ever loaded with a slice missing.
    portal = infos[row["portal_venous_series_uid"]]
    assert "truncated" in str(portal.error) and portal.headers == ()


def test_series_info_reads_enhanced_ct(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(enhanced=True, seed=4)
    row = _truth(cohort)[0]
    infos = {i.series_instance_uid: i for i in _infos(cohort / row["study_folder"])}
    arterial = infos[row["arterial_series_uid"]]
    assert arterial.error is None
    assert len(arterial.paths) == 1 and arterial.slices == 24
    assert arterial.slice_spacing == pytest.approx(160.0 / 24, abs=1e-3)
    assert arterial.orientation == pytest.approx((1, 0, 0, 0, 1, 0))
    assert arterial.pixel_spacing is not None
    # The Enhanced CT writer drops the classic bolus attributes; the functional groups remain.
    assert arterial.contrast_agent != ""
    assert arterial.acquisition_seconds is not None
    assert infos[row["non_contrast_series_uid"]].contrast_agent == ""


# ------------------------------------------------------------------------------------------------
# Pairing
# ------------------------------------------------------------------------------------------------


def test_full_study_pairs_by_tags(cohort: Path) -> None:
    for row in _truth(cohort):
        pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES)
        _assert_pairs_truth(pairing, row)
        assert pairing.method == "tags"
        phases = _phase_of(row)
        for item in pairing.evidence:
            expected = phases[item.series_instance_uid]
            if expected == "localizer":
                assert not item.candidate
                assert item.excluded_because == "LOCALIZER"
                assert item.phase is None
            else:
                assert item.candidate and item.excluded_because is None
                assert item.phase == expected
                assert item.by_name == expected and item.by_timing == expected
                # "auto" does not look at the images when names and timing agree.
                assert item.by_image is None and item.image_metrics == {}


def test_image_check_true_agrees_on_every_phase(cohort: Path) -> None:
    for row in _truth(cohort):
        pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES, image_check=True)
        _assert_pairs_truth(pairing, row)
        assert pairing.method == "tags+image"
        phases = _phase_of(row)
        for item in pairing.evidence:
            if item.candidate:
                assert item.by_image == phases[item.series_instance_uid]
                assert set(item.image_metrics) >= {"parenchyma_hu", "vessel_hu"}


def test_image_check_false_never_loads(cohort: Path) -> None:
    row = _truth(cohort)[0]
    pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES, image_check=False)
    _assert_pairs_truth(pairing, row)
    assert all(e.by_image is None for e in pairing.evidence)


# Descriptions as other sites and languages write them. "HA phase" (hepatic arterial) and
# "Spätphase" are not covered by the default rules, so the test extends them.
NAMES = [
    {
        "non_contrast": "Nativ 5mm",
        "arterial": "Arteriell",
        "portal_venous": "Portalvenös",
        "delayed": "Spätphase",
    },
    {
        "non_contrast": "Leber nativ",
        "arterial": "Leber arteriell 2mm",
        "portal_venous": "PV",
        "delayed": "Delayed 5 min",
    },
    {
        "non_contrast": "Sans injection",
        "arterial": "HA phase",
        "portal_venous": "Fase portal",
        "delayed": "Equilibrio EQ",
    },
]
EXTENDED_RULES = {
    **RULES,
    "arterial": [*RULES["arterial"], r"\bha\b"],
    "delayed": [*RULES["delayed"], r"spät", r"equilibrio"],
    "non_contrast": [*RULES["non_contrast"], r"sans injection"],
}


@pytest.mark.parametrize("names", NAMES, ids=["german", "mixed", "abbreviated"])
def test_names_in_other_languages_pair(cohort: Path, tmp_path: Path, names: dict[str, str]) -> None:
    study, row = _copy_study(cohort, tmp_path)
    for phase, name in names.items():

        def rename(ds: pydicom.Dataset, name: str = name) -> None:
            ds.SeriesDescription = name
            _strip(*CONTRAST_AND_TIME)(ds)

        _rewrite(_series_files(study, row[f"{phase}_series_uid"]), rename)
    pairing = pair_phases(_infos(study), EXTENDED_RULES)
    _assert_pairs_truth(pairing, row)
    # Timing tags are gone: the names alone decided, without the image check.
    assert pairing.method == "tags"
    for phase in PHASES:
        item = _evidence(pairing, row[f"{phase}_series_uid"])
        assert item.by_name == phase and item.by_timing is None and item.by_image is None


def test_protocol_listing_several_phases_falls_back_to_description() -> None:
    info = SeriesInfo(
        series_instance_uid="1.2.3",
        frame_of_reference_uid="1.2",
        modality="CT",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_description="Arterial 2mm",
        protocol_name="Liver arterial + portal venous",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        body_part="ABDOMEN",
        contrast_agent="",
        contrast_start_time="",
        acquisition_seconds=None,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        pixel_spacing=(0.8, 0.8),
        slice_spacing=2.0,
        rows=512,
        columns=512,
        slices=100,
        paths=(),
    )
    pairing = pair_phases([info], RULES, image_check=False)
    assert pairing.evidence[0].by_name == "arterial"
    ambiguous = SeriesInfo(**{**info.__dict__, "series_description": "Arterial and portal venous"})
    assert pair_phases([ambiguous], RULES, image_check=False).evidence[0].by_name is None


def test_without_descriptions_timing_decides(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(descriptions=False, seed=8)
    row = _truth(cohort)[0]
    pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES)
    _assert_pairs_truth(pairing, row)
    assert pairing.method == "tags"
    for phase in PHASES:
        item = _evidence(pairing, row[f"{phase}_series_uid"])
        assert item.by_name is None and item.by_timing == phase


def test_without_descriptions_and_tags_the_image_decides(
    cohort_factory: Callable[..., Path], tmp_path: Path
) -> None:
    cohort = cohort_factory(descriptions=False, seed=8)
    study, row = _copy_study(cohort, tmp_path)
    for phase in ("localizer", *PHASES):
        _rewrite(_series_files(study, row[f"{phase}_series_uid"]), _strip(*CONTRAST_AND_TIME))
    infos = _infos(study)
    assert all(i.contrast_agent == "" and i.acquisition_seconds is None for i in infos)
    pairing = pair_phases(infos, RULES)
    _assert_pairs_truth(pairing, row)
    assert pairing.method == "image"
    for phase in PHASES:
        item = _evidence(pairing, row[f"{phase}_series_uid"])
        assert item.by_name is None and item.by_timing is None
        assert item.by_image == phase == item.phase
    # Without the image check nothing is left to tell the phases apart.
    blind = pair_phases(infos, RULES, image_check=False)
    assert blind.status == "not_applicable"


def test_dual_phase_study_without_tags_pairs_by_image(
    cohort_factory: Callable[..., Path], tmp_path: Path
) -> None:
    # The common dual-phase protocol, anonymised down to the pixels and geometry.
    cohort = cohort_factory(phases=("arterial", "portal_venous"), descriptions=False, seed=9)
    study, row = _copy_study(cohort, tmp_path)
    for phase in ("localizer", "arterial", "portal_venous"):
        _rewrite(_series_files(study, row[f"{phase}_series_uid"]), _strip(*CONTRAST_AND_TIME))
    pairing = pair_phases(_infos(study), RULES)
    _assert_pairs_truth(pairing, row)
    assert pairing.method == "image"


def test_disagreeing_names_image_wins(cohort: Path, tmp_path: Path) -> None:
    study, row = _copy_study(cohort, tmp_path, index=1)
    swaps = {"portal_venous": "Arterial", "arterial": "Portal venous"}
    for phase, name in swaps.items():

        def rename(ds: pydicom.Dataset, name: str = name) -> None:
            ds.SeriesDescription = name
            ds.ProtocolName = "Liver"

        _rewrite(_series_files(study, row[f"{phase}_series_uid"]), rename)
    pairing = pair_phases(_infos(study), RULES)
    _assert_pairs_truth(pairing, row)
    assert pairing.method == "tags+image"
    arterial = _evidence(pairing, row["arterial_series_uid"])
    assert (arterial.by_name, arterial.by_timing, arterial.by_image) == (
        "portal_venous",
        "arterial",
        "arterial",
    )
    # Without the image check the names (first in order) would have won.
    blind = pair_phases(_infos(study), RULES, image_check=False)
    assert blind.arterial == row["portal_venous_series_uid"]


def test_reversed_instance_numbers_pair_the_same(cohort: Path, tmp_path: Path) -> None:
    study, row = _copy_study(cohort, tmp_path)
    before = pair_phases(_infos(study), RULES, image_check=True)
    for phase in PHASES:
        files = _series_files(study, row[f"{phase}_series_uid"])
        numbers = {
            p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in files
        }
        top = max(numbers.values()) + 1

        def reverse(ds: pydicom.Dataset, top: int = top) -> None:
            ds.InstanceNumber = top - int(ds.InstanceNumber)

        _rewrite(files, reverse)
    infos = _infos(study)
    after = pair_phases(infos, RULES, image_check=True)
    _assert_pairs_truth(after, row)
    assert (after.arterial, after.portal_venous, after.method) == (
        before.arterial,
        before.portal_venous,
        before.method,
    )
    spacing = {i.series_instance_uid: i.slice_spacing for i in infos}
    assert spacing[row["arterial_series_uid"]] == pytest.approx(160.0 / 24, abs=1e-3)
    for uid in (row["arterial_series_uid"], row["portal_venous_series_uid"]):
        assert _evidence(after, uid).image_metrics == pytest.approx(
            _evidence(before, uid).image_metrics
        )


def test_delayed_phase_is_not_the_portal_venous(cohort: Path, tmp_path: Path) -> None:
    row = _truth(cohort)[0]
    for check in ("auto", True):
        pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES, image_check=check)
        assert pairing.portal_venous != row["delayed_series_uid"]
        assert _evidence(pairing, row["delayed_series_uid"]).phase == "delayed"
    # Unnamed, the delayed series is still told apart by its timing...
    study, _ = _copy_study(cohort, tmp_path)
    for phase in PHASES:
        _rewrite(
            _series_files(study, row[f"{phase}_series_uid"]),
            _strip("SeriesDescription", "ProtocolName"),
        )
    pairing = pair_phases(_infos(study), RULES)
    _assert_pairs_truth(pairing, row)
    # ...and without a start time, by the order of the contrast acquisitions.
    for phase in PHASES:
        _rewrite(_series_files(study, row[f"{phase}_series_uid"]), _strip("ContrastBolusStartTime"))
    pairing = pair_phases(_infos(study), RULES, image_check=False)
    _assert_pairs_truth(pairing, row)
    assert _evidence(pairing, row["delayed_series_uid"]).by_timing == "delayed"


@pytest.mark.parametrize(
    ("phases", "found"),
    [
        (("portal_venous",), "only a portal-venous series was found"),
        (("non_contrast", "portal_venous"), "non-contrast and portal-venous"),
        (("non_contrast", "arterial"), "only"),
    ],
)
def test_missing_phase_needs_review(
    cohort_factory: Callable[..., Path], phases: tuple[str, ...], found: str
) -> None:
    cohort = cohort_factory(phases=phases, seed=5)
    row = _truth(cohort)[0]
    for check in ("auto", True):
        pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES, image_check=check)
        assert pairing.status == "needs_review"
        assert pairing.arterial is None and pairing.portal_venous is None
        assert pairing.method is None
        assert pairing.reason is not None
        missing = "portal-venous" if "arterial" in phases else "arterial"
        assert f"no {missing} series" in pairing.reason
        if found != "only":
            assert found in pairing.reason


def test_non_liver_ct_is_not_applicable(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(non_liver=True, studies=2, seed=3)
    for row in _truth(cohort):
        pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES)
        assert pairing.status == "not_applicable"
        assert pairing.reason is not None and "not a contrast liver CT" in pairing.reason
        assert pairing.arterial is None and pairing.method is None


def test_not_applicable_without_any_contrast(cohort_factory: Callable[..., Path]) -> None:
    # An abdomen examined without contrast: no tags, names and images find no contrast phase.
    cohort = cohort_factory(phases=("non_contrast",), seed=6)
    row = _truth(cohort)[0]
    pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES)
    assert pairing.status == "not_applicable"
    assert pairing.reason is not None and "no contrast" in pairing.reason


def test_segmentation_and_mpr_and_short_series_are_ignored(
    small_cohort: Path, tmp_path: Path
) -> None:
    study, row = _copy_study(small_cohort, tmp_path)

    mpr_uid, mpr_files = _copy_series(study, row["arterial_series_uid"], "MPR")

    def derive(ds: pydicom.Dataset) -> None:
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
        ds.SeriesDescription = "Arterial MPR 1mm"

    _rewrite(mpr_files, derive)
    short_uid, _ = _copy_series(study, row["portal_venous_series_uid"], "SHORT", lambda k: k < 8)

    infos = _infos(study)
    for check in ("auto", True):
        pairing = pair_phases(infos, RULES, image_check=check)
        _assert_pairs_truth(pairing, row)
        mpr = _evidence(pairing, mpr_uid)
        assert not mpr.candidate and mpr.excluded_because == "DERIVED" and mpr.phase is None
        short = _evidence(pairing, short_uid)
        assert not short.candidate and short.excluded_because == "too few slices (8)"
        seg = [i for i in infos if i.modality == "SEG"]
        assert len(seg) == 1
        seg_evidence = _evidence(pairing, seg[0].series_instance_uid)
        assert not seg_evidence.candidate
        assert seg_evidence.excluded_because is not None
        assert seg_evidence.excluded_because.startswith("not CT")


@pytest.mark.parametrize(("working", "winner"), [(6.0, "original"), (14.0, "copy")])
def test_spacing_nearest_working_spacing_wins(
    cohort: Path, tmp_path: Path, working: float, winner: str
) -> None:
    study, row = _copy_study(cohort, tmp_path)
    # Every other slice: the same arterial volume at 13.3 mm instead of 6.7 mm.
    copy_uid, _ = _copy_series(study, row["arterial_series_uid"], "THICK", lambda k: k % 2 == 0)
    infos = _infos(study)
    thick = next(i for i in infos if i.series_instance_uid == copy_uid)
    assert thick.slice_spacing == pytest.approx(2 * 160.0 / 24, abs=1e-3)
    pairing = pair_phases(infos, RULES, working_spacing_mm=working, min_slices=8)
    assert pairing.status == "paired"
    assert _evidence(pairing, copy_uid).phase == "arterial"
    expected = row["arterial_series_uid"] if winner == "original" else copy_uid
    assert pairing.arterial == expected
    assert pairing.portal_venous == row["portal_venous_series_uid"]


def test_enhanced_ct_pairs(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(enhanced=True, seed=4)
    row = _truth(cohort)[0]
    infos = _infos(cohort / row["study_folder"])
    for check, method in (("auto", "tags"), (True, "tags+image")):
        pairing = pair_phases(infos, RULES, image_check=check)
        _assert_pairs_truth(pairing, row)
        assert pairing.method == method


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_unreadable_files_exclude_their_series(cohort: Path, tmp_path: Path) -> None:
    study, row = _copy_study(cohort, tmp_path)
    # A file cut inside its pixels: the headers read fine, the volume would not.
    arterial_file = _series_files(study, row["arterial_series_uid"])[5]
    data = arterial_file.read_bytes()
    arterial_file.write_bytes(data[: len(data) - 3000])
    # A non-contrast slice duplicated onto another's position: only loading the volume tells.
    nc_files = _series_files(study, row["non_contrast_series_uid"])
    position = pydicom.dcmread(nc_files[0], stop_before_pixels=True).ImagePositionPatient

    def duplicate(ds: pydicom.Dataset) -> None:
        ds.ImagePositionPatient = position

    _rewrite(nc_files[1:2], duplicate)

    infos = _infos(study)
    by_uid = {i.series_instance_uid: i for i in infos}
    assert by_uid[row["arterial_series_uid"]].error is not None
    assert "truncated" in str(by_uid[row["arterial_series_uid"]].error)
    pairing = pair_phases(infos, RULES, image_check=True)
    arterial = _evidence(pairing, row["arterial_series_uid"])
    assert not arterial.candidate and "truncated" in str(arterial.excluded_because)
    non_contrast = _evidence(pairing, row["non_contrast_series_uid"])
    assert not non_contrast.candidate and "duplicate" in str(non_contrast.excluded_because)
    assert pairing.status == "needs_review"
    assert pairing.reason is not None and "no arterial series" in pairing.reason

    # Garbage where a file should be: the header read fails, nothing raises.
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    broken = series_info([garbage])
    assert broken.error is not None and "garbage.dcm" in broken.error
    assert not pair_phases([broken], RULES).evidence[0].candidate


def test_pairing_to_json_round_trips(cohort: Path) -> None:
    row = _truth(cohort)[0]
    pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES, image_check=True)
    record = pairing.to_json()
    text = json.dumps(record, allow_nan=False)
    assert json.loads(text) == record
    assert record["arterial"] == row["arterial_series_uid"]
    assert record["method"] == "tags+image"
    assert len(record["evidence"]) == len(pairing.evidence)
    item: dict[str, Any] = next(
        e for e in record["evidence"] if e["series_instance_uid"] == row["arterial_series_uid"]
    )
    assert item["phase"] == "arterial" and item["image_metrics"]["vessel_hu"] > 200


def test_image_metrics_separate_the_phases(cohort: Path) -> None:
    row = _truth(cohort)[0]
    pairing = pair_phases(_infos(cohort / row["study_folder"]), RULES, image_check=True)
    metrics = {p: _evidence(pairing, row[f"{p}_series_uid"]).image_metrics for p in PHASES}
    parenchyma = {p: m["parenchyma_hu"] for p, m in metrics.items()}
    vessel = {p: m["vessel_hu"] for p, m in metrics.items()}
    assert max(parenchyma, key=parenchyma.__getitem__) == "portal_venous"
    assert min(parenchyma, key=parenchyma.__getitem__) == "non_contrast"
    assert sorted(vessel, key=vessel.__getitem__) == [
        "non_contrast",
        "delayed",
        "portal_venous",
        "arterial",
    ]
    assert image_metrics([]) == []
    assert np.isfinite(list(metrics["arterial"].values())).all()
