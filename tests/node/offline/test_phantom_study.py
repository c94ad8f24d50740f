"""Specification of the phantom cohort on disk: valid DICOM, realistic tags, truth that matches."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from node.analysis.dicomio import load_series, scan_folder
from tests.conftest import require_tool, run_tool
from tests.node.analysis.test_dicomio import COMPRESSIONS

CONTRAST_PHASES = ("arterial", "portal_venous", "delayed")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def first_study(cohort: Path) -> Path:
    return sorted(cohort.glob("study_*"))[0]


def series_headers(study: Path) -> dict[str, pydicom.Dataset]:
    """One header per series of a study folder, keyed by SeriesInstanceUID."""
    headers = {}
    for path in sorted(study.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers.setdefault(str(ds.SeriesInstanceUID), ds)
    return headers


def test_every_object_of_a_study_passes_dciodvfy(small_cohort: Path) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    files = sorted(first_study(small_cohort).rglob("*.dcm"))
    by_series: dict[str, list[Path]] = {}
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        by_series.setdefault(uid, []).append(path)
    assert len(by_series) == 6  # localizer, four phases, the truth SEG
    for paths in by_series.values():
        for path in paths:
            result = run_tool(dciodvfy, path, check=False)
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
            assert errors == [], f"{path.relative_to(small_cohort)}: {errors}"


def test_truth_csv_matches_the_masks_and_the_files(small_cohort: Path) -> None:
    rows = read_csv(small_cohort / "truth.csv")
    assert len(rows) == 2
    for row in rows:
        study = small_cohort / row["study_folder"]
        headers = series_headers(study)
        for phase in ("localizer", "non_contrast", *CONTRAST_PHASES):
            assert row[f"{phase}_series_uid"] in headers
        masks = {
            name: sitk.ReadImage(str(small_cohort / "masks" / row["study_folder"] / f"{name}.nrrd"))
            for name in ("liver", "tumor", "loat")
        }
        sx, sy, sz = masks["tumor"].GetSpacing()
        tumor = sitk.GetArrayFromImage(masks["tumor"]).astype(bool)
        loat = sitk.GetArrayFromImage(masks["loat"]).astype(bool)
        liver = sitk.GetArrayFromImage(masks["liver"]).astype(bool)
        assert tumor.any() and loat.any()
        assert not (tumor & ~liver).any(), "the tumor lies inside the liver"
        voxel_ml = sx * sy * sz / 1000.0
        assert float(row["tumor_volume_ml"]) == pytest.approx(tumor.sum() * voxel_ml, abs=1e-3)
        assert float(row["loat_volume_ml"]) == pytest.approx(loat.sum() * voxel_ml, abs=1e-3)
        max_area = loat.sum(axis=(1, 2)).max() * sx * sy / 100.0
        assert float(row["loat_max_area_cm2"]) == pytest.approx(max_area, abs=1e-3)
        assert float(row["max_diameter_mm"]) == pytest.approx(brute_force_diameter(tumor, sx, sy))


def brute_force_diameter(mask: np.ndarray, sx: float, sy: float) -> float:
    """Largest distance between pixel corners of the tumor in any axial slice (all pairs)."""
    best = 0.0
    for plane in mask:
        rows, cols = np.nonzero(plane)
        if rows.size == 0:
            continue
        corners = np.concatenate(
            [
                np.stack([(cols + dx) * sx, (rows + dy) * sy], axis=1)
                for dx in (-0.5, 0.5)
                for dy in (-0.5, 0.5)
            ]
        )
        diff = corners[:, None, :] - corners[None, :, :]
        best = max(best, float(np.sqrt((diff**2).sum(-1)).max()))
    return round(best, 2)


def test_masks_live_outside_study_folders(small_cohort: Path) -> None:
    assert (small_cohort / "masks").is_dir()
    for study in small_cohort.glob("study_*"):
        assert not list(study.rglob("*.nrrd"))


def test_labels_csv_lists_every_labelled_study(small_cohort: Path) -> None:
    labels = read_csv(small_cohort / "labels.csv")
    truth = read_csv(small_cohort / "truth.csv")
    assert [r["study_instance_uid"] for r in labels] == [r["study_instance_uid"] for r in truth]
    assert {r["mvi"] for r in labels} <= {"0", "1"}


def test_phases_are_ordered_by_contrast_timing_and_tagged(small_cohort: Path) -> None:
    row = read_csv(small_cohort / "truth.csv")[0]
    headers = series_headers(small_cohort / row["study_folder"])
    by_phase = {p: headers[row[f"{p}_series_uid"]] for p in ("non_contrast", *CONTRAST_PHASES)}
    times = [float(by_phase[p].AcquisitionTime) for p in by_phase]
    assert times == sorted(times)
    assert "ContrastBolusAgent" not in by_phase["non_contrast"]
    for phase in CONTRAST_PHASES:
        assert by_phase[phase].ContrastBolusRoute == "IV"
        assert float(by_phase[phase].ContrastBolusStartTime) < float(
            by_phase[phase].AcquisitionTime
        )
    frames = {str(ds.FrameOfReferenceUID) for ds in headers.values() if ds.Modality == "CT"}
    assert len(frames) == 1
    localizer = headers[row["localizer_series_uid"]]
    assert list(localizer.ImageType)[2] == "LOCALIZER"


def test_series_load_back_to_the_phantom_volumes(small_cohort: Path) -> None:
    from model.phantom import PhantomSpec, make_study

    row = read_csv(small_cohort / "truth.csv")[0]
    study = scan_folder(small_cohort / row["study_folder"])[row["study_instance_uid"]]
    phantom = make_study(int(row["seed"]), PhantomSpec(size=96, slices=24))
    for phase in ("arterial", "portal_venous"):
        paths = study[row[f"{phase}_series_uid"]].paths
        image = load_series(paths)
        volume = sitk.GetArrayFromImage(image)
        # Unsigned storage cannot go below its intercept (air noise under -1024 HU is clipped).
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        floor = float(first.RescaleIntercept) - (32768 if first.PixelRepresentation else 0)
        expected = np.clip(np.round(phantom.phases[phase].hu), floor, None)
        assert volume.shape == expected.shape
        assert np.abs(volume - expected).max() <= 0.5
        assert image.GetSpacing() == pytest.approx(phantom.spacing_mm)
        assert image.GetOrigin() == pytest.approx(phantom.origin_mm)


def test_truth_seg_references_the_arterial_series(small_cohort: Path) -> None:
    row = read_csv(small_cohort / "truth.csv")[0]
    study = small_cohort / row["study_folder"]
    (seg_path,) = [p for p in study.rglob("*.dcm") if pydicom.dcmread(p).Modality == "SEG"]
    seg = pydicom.dcmread(seg_path)
    referenced = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    assert referenced == {row["arterial_series_uid"]}
    assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == ["MANUAL"] * 3
    assert seg.StudyInstanceUID == row["study_instance_uid"]


def test_same_seed_same_cohort(cohort_factory: Callable[..., Path], small_cohort: Path) -> None:
    again = cohort_factory(studies=2, seed=11, masks=True)
    assert read_csv(again / "truth.csv") == read_csv(small_cohort / "truth.csv")


def test_no_descriptions_leaves_them_empty(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(seed=3, descriptions=False)
    for ds in series_headers(first_study(cohort)).values():
        assert ds.SeriesDescription == "" and ds.ProtocolName == ""


def test_phase_subset(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(seed=4, phases=("portal_venous",))
    row = read_csv(cohort / "truth.csv")[0]
    assert row["arterial_series_uid"] == "" and row["portal_venous_series_uid"] != ""
    assert len(series_headers(first_study(cohort))) == 2  # localizer + portal-venous


def test_no_tumor_study_has_no_label(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(seed=5, tumor=False)
    row = read_csv(cohort / "truth.csv")[0]
    assert row["mvi"] == "" and float(row["max_diameter_mm"]) == 0.0
    assert read_csv(cohort / "labels.csv") == []


def test_non_liver_study_has_no_contrast_phase(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(seed=6, non_liver=True)
    headers = series_headers(first_study(cohort)).values()
    assert all("ContrastBolusAgent" not in ds for ds in headers)
    assert {ds.BodyPartExamined for ds in headers} <= {"CHEST", "HEAD"}


def test_dates_spread_over_the_range(cohort_factory: Callable[..., Path]) -> None:
    cohort = cohort_factory(studies=4, seed=8, dates=(dt.date(2016, 1, 1), dt.date(2023, 12, 31)))
    dates = set()
    for study in cohort.glob("study_*"):
        ds = next(iter(series_headers(study).values()))
        date = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        assert dt.date(2016, 1, 1) <= date <= dt.date(2023, 12, 31)
        dates.add(date)
    assert len(dates) > 1


def test_enhanced_cohort_is_one_multiframe_object_per_phase(
    cohort_factory: Callable[..., Path],
) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    cohort = cohort_factory(seed=9, enhanced=True, seg=True)
    row = read_csv(cohort / "truth.csv")[0]
    study = scan_folder(cohort / row["study_folder"])[row["study_instance_uid"]]
    arterial = study[row["arterial_series_uid"]]
    assert len(arterial.paths) == 1
    assert arterial.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1"
    assert sitk.GetArrayFromImage(load_series(arterial.paths)).shape == (24, 96, 96)
    for series in study.values():
        for path in series.paths:
            result = run_tool(dciodvfy, path, check=False)
            assert not [line for line in result.stderr.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize(
    ("tool", "package", "arguments", "transfer_syntax"),
    [c for c in COMPRESSIONS if c[0] != "dcmconv"],
    ids=[c[0] for c in COMPRESSIONS if c[0] != "dcmconv"],
)
def test_compressed_phantom_loads_to_the_same_volume(
    small_cohort: Path,
    tmp_path: Path,
    tool: str,
    package: str,
    arguments: list[str],
    transfer_syntax: str,
) -> None:
    executable = require_tool(tool, package)
    row = read_csv(small_cohort / "truth.csv")[0]
    study = scan_folder(small_cohort / row["study_folder"])[row["study_instance_uid"]]
    original = study[row["arterial_series_uid"]].paths
    compressed = []
    for path in original:
        run_tool(executable, *arguments, path, tmp_path / path.name)
        compressed.append(tmp_path / path.name)
    syntaxes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in compressed
    }
    assert syntaxes == {transfer_syntax}
    reference, image = load_series(original), load_series(compressed)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetDirection() == reference.GetDirection()


def test_enhanced_and_classic_phantoms_load_identically(
    cohort_factory: Callable[..., Path],
) -> None:
    volumes = []
    for enhanced in (False, True):
        cohort = cohort_factory(seed=9, enhanced=enhanced, seg=enhanced)
        row = read_csv(cohort / "truth.csv")[0]
        study = scan_folder(cohort / row["study_folder"])[row["study_instance_uid"]]
        volumes.append(load_series(study[row["portal_venous_series_uid"]].paths))
    classic, enhanced_image = volumes
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(classic), sitk.GetArrayFromImage(enhanced_image)
    )
    assert classic.GetOrigin() == pytest.approx(enhanced_image.GetOrigin())
    assert classic.GetSpacing() == pytest.approx(enhanced_image.GetSpacing())


def test_a_shifted_cohort_is_written_with_its_own_geometry(
    cohort_factory: Callable[..., Path],
) -> None:
    from model.domain import TRAINING_RANGES

    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    cohort = cohort_factory(seed=4, domain="shifted", seg=True)
    row = read_csv(cohort / "truth.csv")[0]
    study = scan_folder(cohort / row["study_folder"])[row["study_instance_uid"]]
    arterial = study[row["arterial_series_uid"]]
    image = load_series(arterial.paths)
    first = pydicom.dcmread(arterial.paths[0], stop_before_pixels=True)
    # Slices beyond what the segmenter trains on, and thicker than their spacing or as thick.
    assert image.GetSpacing()[2] > TRAINING_RANGES.slice_spacing_mm.hi
    assert float(first.SliceThickness) >= image.GetSpacing()[2] - 1e-6
    for series in study.values():
        for path in series.paths[:3]:
            result = run_tool(dciodvfy, path, check=False)
            assert not [line for line in result.stderr.splitlines() if line.startswith("Error")]


def test_a_multi_centre_cohort_names_patients_and_centres(
    cohort_factory: Callable[..., Path],
) -> None:
    from node.offline.train_fusion import read_labels

    cohort = cohort_factory(studies=8, seed=21, sites=2, repeat_share=0.6)
    labels = read_csv(cohort / "labels.csv")
    assert list(labels[0]) == ["study_instance_uid", "mvi", "patient_id", "centre"]
    assert {row["centre"] for row in labels} == {"centre-a", "centre-b"}
    by_patient: dict[str, list[dict[str, str]]] = {}
    for row in labels:
        by_patient.setdefault(row["patient_id"], []).append(row)
    repeats = [rows for rows in by_patient.values() if len(rows) == 2]
    assert repeats, "a 0.6 repeat share gives at least one patient two studies"
    for first, second in repeats:
        # The same patient: one label, one centre, two studies.
        assert first["mvi"] == second["mvi"] and first["centre"] == second["centre"]
        assert first["study_instance_uid"] != second["study_instance_uid"]
    # The DICOM says the same: PatientID as in labels.csv, the centre's institution.
    truth = {
        row["study_instance_uid"]: row["study_folder"] for row in read_csv(cohort / "truth.csv")
    }
    for row in labels:
        ds = next(iter(series_headers(cohort / truth[row["study_instance_uid"]]).values()))
        assert ds.PatientID == row["patient_id"]
        assert str(ds.InstitutionName).endswith(row["centre"])
    read = read_labels(cohort / "labels.csv")
    assert {label.centre for label in read.values()} == {"centre-a", "centre-b"}


def test_sites_need_the_standard_domain(tmp_path: Path) -> None:
    from node.offline.phantom_study import CohortOptions

    with pytest.raises(ValueError, match="standard domain only"):
        CohortOptions(sites=2, domain="shifted")
    with pytest.raises(ValueError, match=r"sites must be in 0\.\.3"):
        CohortOptions(sites=4)
