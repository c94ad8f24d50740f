"""Specification of one analysis, offline: `mvi-node analyze` on a phantom study."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from model.measure import measure
from model.segmentation import FAT_HU, dice
from node.analysis.dicomio import load_series
from node.analysis.result import SCHEMA_VERSION, Result, to_json
from node.core.settings import to_toml
from tests.conftest import require_tool, run_tool
from tests.node.cli.test_main import mvi_node
from tests.nodeproc import tiny_models

RESULT_KEYS = {
    "study_instance_uid",
    "status",
    "reason",
    "phases",
    "tumor",
    "loat",
    "mvi_probability",
    "combined_probability",
    "risk_category",
    "model",
    "segmentation",
    "gates",
    "timings_s",
    "outputs",
}


def analyze_config(tmp_path: Path, gates: dict[str, Any] | None = None, **pipeline: str) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(tmp_path / "data")},
                "pipeline": {"device": "cpu", **tiny_models(), **pipeline},
                "gates": gates or {},
            }
        )
    )
    return config


def test_analyze_writes_result_json_and_valid_objects(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=95, size=64, slices=16)
    out = tmp_path / "out"
    result = mvi_node(
        "analyze", cohort / "study_0001", "--out", out, "--config", analyze_config(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "result.json").read_text())
    assert set(data) == {"schema_version", *RESULT_KEYS}  # a worker adds "device", not analyze
    # The file is the typed result: it validates, and writing it again gives the same JSON.
    typed = Result.model_validate(data)
    assert typed.schema_version == SCHEMA_VERSION
    assert to_json(typed) == data
    assert data["status"] in {"scored", "no_tumor", "needs_review"}
    assert data["phases"]["pairing"] == "tags"
    assert len(data["phases"]["registration_shift_mm"]) == 3
    assert data["segmentation"]["source"] == "unet"
    assert data["model"]["demo"] is True
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    for name in data["outputs"].values():
        ds = pydicom.dcmread(out / name)
        assert ds.StudyInstanceUID == data["study_instance_uid"]
        check = run_tool(dciodvfy, out / name, check=False)
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], f"{name}: {errors}"
    assert "status" in result.stdout and "timings" in result.stdout


def test_analyze_takes_exactly_one_study(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=2, seed=96, size=48, slices=16)
    result = mvi_node(
        "analyze", cohort, "--out", tmp_path / "out", "--config", analyze_config(tmp_path)
    )
    assert result.returncode == 2
    assert "holds 2 studies" in result.stderr


def test_analyze_without_models_says_how_to_get_them(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=95, size=64, slices=16)
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"pipeline": {"segmenter_dir": str(tmp_path / "none")}}))
    result = mvi_node(
        "analyze", cohort / "study_0001", "--out", tmp_path / "out", "--config", config
    )
    assert result.returncode == 2
    assert "mvi-node demo" in result.stderr and "train-seg" in result.stderr


# -- numbers against the phantom's truth --------------------------------------------------------


def truth_row(cohort: Path) -> dict[str, str]:
    """The first study's row of the cohort's truth.csv."""
    with (cohort / "truth.csv").open(newline="") as handle:
        return next(csv.DictReader(handle))


def relative_error(value: float, truth: float) -> float:
    return abs(value - truth) / truth


def arterial_series(study: Path, row: dict[str, str]) -> tuple[Any, list[pydicom.Dataset]]:
    """The arterial volume (SimpleITK, as the node loads it) and its files' headers."""
    paths = sorted(study.rglob("*.dcm"))
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    chosen = [
        (path, ds)
        for path, ds in zip(paths, headers, strict=True)
        if ds.SeriesInstanceUID == row["arterial_series_uid"]
    ]
    return load_series([path for path, _ in chosen]), [ds for _, ds in chosen]


def truth_masks(cohort: Path, arterial: Any) -> dict[str, np.ndarray]:
    """The phantom's truth masks (NRRD beside the cohort) on the arterial grid, ``[k, j, i]``.

    ``loat_fat`` is the LOAT truth within the fat window, as the node keeps it (:data:`FAT_HU`).
    """
    masks = {}
    for name in ("tumor", "loat"):
        image = sitk.ReadImage(str(cohort / "masks" / "study_0001" / f"{name}.nrrd"))
        on_grid = sitk.Resample(image, arterial, sitk.Transform(), sitk.sitkNearestNeighbor)
        masks[name] = sitk.GetArrayFromImage(on_grid) > 0
    hu = sitk.GetArrayFromImage(arterial)
    masks["loat_fat"] = masks["loat"] & (hu >= FAT_HU[0]) & (hu <= FAT_HU[1])
    return masks


def seg_masks(
    path: Path, arterial: Any, headers: list[pydicom.Dataset]
) -> tuple[dict[str, np.ndarray], pydicom.Dataset]:
    """The node's SEG decoded back onto the arterial grid (segment 1 tumor, 2 LOAT)."""
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in headers],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    volume = np.zeros((*sitk.GetArrayViewFromImage(arterial).shape, 2), dtype=bool)
    for ds, frame in zip(headers, pixels, strict=True):
        point = [float(v) for v in ds.ImagePositionPatient]
        volume[arterial.TransformPhysicalPointToIndex(point)[2]] = frame > 0
    return {"tumor": volume[..., 0], "loat": volume[..., 1]}, seg


def analyze_study(tmp_path: Path, study: Path, config: Path) -> dict[str, Any]:
    out = tmp_path / "out"
    result = mvi_node("analyze", study, "--out", out, "--config", config)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads((out / "result.json").read_text())
    assert data["status"] == "scored", data["reason"]
    return data


def test_analyze_measures_the_truth_when_the_study_supplies_it_as_a_seg(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    # The study carries the phantom's truth as a manual SEG: the node must use it instead of
    # its U-Net, and measure, encode and report exactly the truth.
    cohort = cohort_factory(seed=95, seg=True, masks=True)
    study = cohort / "study_0001"
    row = truth_row(cohort)
    # The tiny segmenter's card knows the volumes of 3 phantoms only: a wider range for them.
    config = analyze_config(tmp_path, gates={"volume_range_factor": 4.0})
    data = analyze_study(tmp_path, study, config)
    truth_seg = pydicom.dcmread(next(study.rglob("SEG*.dcm")), stop_before_pixels=True)
    assert data["segmentation"] == {
        "source": "supplied",
        "supplied_seg": str(truth_seg.SOPInstanceUID),
        "rejected_segs": 0,
        "rejected": [],
        "algorithm": f"manual SEG series {truth_seg.SeriesNumber} ({truth_seg.SeriesDescription})",
    }
    # Every gate ran on the reader's masks and passed; no segmenter uncertainty was judged.
    assert [(g["name"], g["passed"]) for g in data["gates"]] == [
        ("input", True),
        ("registration", True),
        ("segmentation", True),
        ("intensity", True),
        ("roi", True),
    ]
    assert "uncertainty" not in data["gates"][2]["figures"]

    tumor, loat = data["tumor"], data["loat"]
    assert tumor["max_diameter_mm"] == pytest.approx(float(row["max_diameter_mm"]), abs=0.011)
    assert tumor["volume_ml"] == pytest.approx(float(row["tumor_volume_ml"]), abs=0.0011)
    assert tumor["count"] == 1
    # LOAT: the node keeps only fat (FAT_HU on the arterial image) of any segmentation, a
    # radiologist's included. On this 4-mm grid a few partial-volume voxels of the truth are
    # brighter than -30 HU, so the area is exactly that of the truth within the fat window,
    # and 7 % under truth.csv's, inside the segmentation goal of 15 %.
    arterial, headers = arterial_series(study, row)
    truth = truth_masks(cohort, arterial)
    spacing = tuple(float(v) for v in arterial.GetSpacing())
    expected = measure(truth["tumor"], truth["loat_fat"], spacing)
    assert loat["found"] is True
    assert loat["max_area_cm2"] == pytest.approx(expected.loat_max_area_cm2, abs=0.0011)
    assert loat["volume_ml"] == pytest.approx(expected.loat_volume_ml, abs=0.0011)
    assert loat["area_slice"] == expected.loat_area_slice
    assert relative_error(loat["max_area_cm2"], float(row["loat_max_area_cm2"])) <= 0.15

    # The SEG the node sends back holds these very masks, on the arterial series, as MANUAL.
    masks, seg = seg_masks(tmp_path / "out" / "seg.dcm", arterial, headers)
    assert dice(masks["tumor"], truth["tumor"]) == 1.0
    assert dice(masks["loat"], truth["loat_fat"]) == 1.0
    assert {str(s.SegmentAlgorithmType) for s in seg.SegmentSequence} == {"MANUAL"}


@pytest.fixture(scope="module")
def briefly_trained_segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Net trained for seconds: 6 phantoms of 64×64×16, 1,000 iterations, 4-mm grid.

    The session's tiny segmenter (:func:`tests.nodeproc.tiny_models`, 20 iterations) finds no
    tumor at all; this one takes 15–35 s on 2 shared cores and finds it, roughly.
    """
    from model.train_seg import train_segmenter
    from node.offline.train_seg import phantom_samples

    out = tmp_path_factory.mktemp("segmenter") / "unet"
    samples, _ = phantom_samples(6, seed=1, size=64, slices=16, spacing_mm=4.0)
    train_segmenter(
        samples, out, spacing_mm=4.0, iterations=1000, patch=(32, 32, 16), device="cpu", demo=True
    )
    return out


def test_analyze_with_a_briefly_trained_unet_comes_near_the_truth(
    tmp_path: Path, cohort_factory: Callable[..., Path], briefly_trained_segmenter: Path
) -> None:
    # The segmentation goals (bench/segmentation.py: Dice tumor >= 0.85, LOAT >= 0.80, diameter
    # error <= 10 %, LOAT area error <= 15 %) are for the demo segmenter (1,000 iterations on 12
    # phantoms of 256×256×64). This U-Net had seconds on small phantoms, and training on the CPU
    # is not bit-reproducible: on this study, over six trainings, Dice tumor 0.84-0.85, diameter
    # error 4-11 %, tumor volume error 0-14 %, Dice LOAT 0.59-0.68 and LOAT area error 18-32 %
    # (7 points of it are the fat window, see above). The bounds leave a margin over those; a
    # wrong geometry anywhere between the files and the SEG would give Dice near 0.
    cohort = cohort_factory(seed=95, masks=True)
    study = cohort / "study_0001"
    row = truth_row(cohort)
    # Its masks, not the gates, are under test here.
    config = analyze_config(
        tmp_path, gates={"enabled": False}, segmenter_dir=str(briefly_trained_segmenter)
    )
    data = analyze_study(tmp_path, study, config)
    assert data["segmentation"]["source"] == "unet"

    arterial, headers = arterial_series(study, row)
    truth = truth_masks(cohort, arterial)
    masks, _ = seg_masks(tmp_path / "out" / "seg.dcm", arterial, headers)
    figures = {
        "dice_tumor": dice(masks["tumor"], truth["tumor"]),
        "dice_loat": dice(masks["loat"], truth["loat"]),
        "diameter_error": relative_error(
            data["tumor"]["max_diameter_mm"], float(row["max_diameter_mm"])
        ),
        "volume_error": relative_error(data["tumor"]["volume_ml"], float(row["tumor_volume_ml"])),
        "loat_area_error": relative_error(
            data["loat"]["max_area_cm2"], float(row["loat_max_area_cm2"])
        ),
    }
    assert figures["dice_tumor"] >= 0.7, figures
    assert figures["diameter_error"] <= 0.2, figures
    assert figures["volume_error"] <= 0.3, figures
    assert figures["dice_loat"] >= 0.45, figures
    assert figures["loat_area_error"] <= 0.5, figures


# --- A notice for every study ---------------------------------------------------------------


def _analysis_settings(tmp_path: Path, **sections: Any) -> Any:
    from node.core.settings import Settings

    data: dict[str, Any] = {
        "node": {"data_dir": str(tmp_path / "data")},
        "pipeline": {"device": "cpu", **tiny_models()},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Settings.model_validate(data)


def _analyse(folder: Path, settings: Any, **kwargs: Any) -> Any:
    from node.analysis.dicomio import scan_folder
    from node.analysis.models import Models
    from node.analysis.pipeline import analyse_study

    ((study_uid, series),) = scan_folder(folder).items()
    return analyse_study(study_uid, series, settings, Models(settings, device="cpu"), **kwargs)


def _dciodvfy_errors(path: Path) -> list[str]:
    check = run_tool(require_tool("dciodvfy", "dicom3tools"), path, check=False)
    return [line for line in check.stderr.splitlines() if line.startswith("Error")]


def _sr_texts(sr: pydicom.Dataset) -> list[str]:
    texts: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return texts


def _written(analysis: Any, folder: Path) -> dict[str, pydicom.Dataset]:
    from node.analysis.pipeline import write_outputs

    paths = write_outputs(analysis, folder)
    for kind, path in paths.items():
        assert _dciodvfy_errors(path) == [], kind
    return {kind: pydicom.dcmread(path) for kind, path in paths.items()}


def test_a_study_without_an_arterial_series_gets_its_notice_on_the_portal_venous_series(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=96, size=64, slices=16, phases=("non_contrast", "portal_venous"))
    analysis = _analyse(cohort / "study_0001", _analysis_settings(tmp_path))
    result = analysis.result
    assert result.status == "needs_review" and result.mvi_probability is None
    objects = _written(analysis, tmp_path / "out")
    assert sorted(objects) == ["sc", "sr"]
    # Not the one-image localizer: a CT series of the study with all its slices.
    evidence = objects["sr"].CurrentRequestedProcedureEvidenceSequence[0]
    (referenced,) = evidence.ReferencedSeriesSequence
    assert len(referenced.ReferencedSOPSequence) == 16
    assert any(result.reason in text for text in _sr_texts(objects["sr"]))


def test_not_applicable_is_the_one_status_without_a_notice(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=97, size=64, slices=16, non_liver=True)
    analysis = _analyse(cohort / "study_0001", _analysis_settings(tmp_path))
    assert analysis.result.status == "not_applicable"
    assert analysis.objects == {}


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("no_tumor", "no liver tumor was found"),
        ("needs_review", "no LOAT was found"),
        ("needs_review", "quality check failed — segmentation: tumor components 9 (limit 3)"),
        ("failed", "the analysis failed: RuntimeError: boom"),
    ],
)
def test_every_notified_status_sends_an_sr_and_sc_saying_what_happened(
    tmp_path: Path, cohort_factory: Callable[..., Path], status: str, reason: str
) -> None:
    from node.analysis.dicomio import scan_folder
    from node.analysis.pipeline import Analysis, encode_objects
    from node.analysis.result import Gate, Result

    cohort = cohort_factory(seed=98, size=64, slices=16)
    ((study_uid, series),) = scan_folder(cohort / "study_0001").items()
    some = next(files for files in series.values() if len(files.paths) > 1)
    result = Result(
        study_instance_uid=study_uid,
        status=status,
        reason=reason,
        gates=[Gate(name="input", passed=True, figures={"arterial_slices": 16})],
    )
    analysis = Analysis(result)
    analysis.objects = encode_objects(
        result, _analysis_settings(tmp_path), None, some.paths, None, None, None
    )
    objects = _written(analysis, tmp_path / "out")
    assert sorted(objects) == ["sc", "sr"]
    texts = _sr_texts(objects["sr"])
    assert reason in texts
    assert "input: passed (arterial_slices 16)" in texts


def test_a_study_with_loat_but_no_tumor_gets_a_summary_of_the_loat_slice(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    # Found on phantoms: the anatomical rules left no tumour but a LOAT; the SC builder was
    # handed the LOAT view without the tumour slice beside it and raised.
    from model.measure import measure
    from model.segmentation import Masks
    from node.analysis.dicomio import scan_folder
    from node.analysis.pipeline import Analysis, encode_objects
    from node.analysis.result import Result

    cohort = cohort_factory(seed=98, size=64, slices=16)
    ((study_uid, series),) = scan_folder(cohort / "study_0001").items()
    some = next(files for files in series.values() if len(files.paths) > 1)
    arterial = sitk.ReadImage([str(p) for p in sorted(some.paths)])
    shape = sitk.GetArrayViewFromImage(arterial).shape
    loat = np.zeros(shape, dtype=np.uint8)
    loat[6:9, 20:30, 20:30] = 1
    empty = np.zeros(shape, dtype=np.uint8)
    masks = Masks(liver=empty, tumor=empty, loat=loat, tumor_components=0, source="unet")
    measured = measure(masks.tumor, masks.loat, arterial.GetSpacing())
    assert measured.diameter_slice < 0 <= measured.loat_area_slice
    result = Result(
        study_instance_uid=study_uid, status="no_tumor", reason="no liver tumor was found"
    )
    analysis = Analysis(result)
    analysis.objects = encode_objects(
        result, _analysis_settings(tmp_path), None, some.paths, arterial, masks, measured
    )
    objects = _written(analysis, tmp_path / "out")
    assert sorted(objects) == ["sc", "sr"]
    assert "no liver tumor was found" in _sr_texts(objects["sr"])


def test_a_study_with_no_image_series_gets_a_study_level_notice(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    from node.analysis.pipeline import Analysis, encode_objects
    from node.analysis.result import Result

    cohort = cohort_factory(seed=98, size=64, slices=16)
    any_file = next((cohort / "study_0001").rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(any_file, stop_before_pixels=True).StudyInstanceUID)
    result = Result(study_instance_uid=study_uid, status="failed", reason="the analysis failed")
    analysis = Analysis(result)
    analysis.objects = encode_objects(
        result, _analysis_settings(tmp_path), None, [], None, None, None, study_file=any_file
    )
    objects = _written(analysis, tmp_path / "out")
    assert sorted(objects) == ["sc", "sr"]
    assert all(ds.StudyInstanceUID == study_uid for ds in objects.values())
    assert "the analysis failed" in _sr_texts(objects["sr"])


def test_a_failed_gate_ends_needs_review_with_its_figures_and_no_probability(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    # 16 slices where this site's input check wants 20: nothing after loading runs.
    cohort = cohort_factory(seed=99, size=64, slices=16)
    strict = _analysis_settings(tmp_path, gates={"min_slices": 20})
    analysis = _analyse(cohort / "study_0001", strict)
    result = analysis.result
    assert result.status == "needs_review"
    assert result.reason.startswith("quality check failed — input: arterial slices 16")
    assert result.mvi_probability is None and result.risk_category is None
    (gate,) = result.gates
    assert gate.name == "input" and gate.passed is False
    assert gate.figures["arterial_slices"] == 16 and gate.limits["min_arterial_slices"] == 20
    objects = _written(analysis, tmp_path / "out")
    assert any(text.startswith("input: FAILED") for text in _sr_texts(objects["sr"]))
    # With the gates off the same study goes on (and is no longer stopped by its slice count).
    off = _analysis_settings(tmp_path, gates={"enabled": False, "min_slices": 20})
    relaxed = _analyse(cohort / "study_0001", off)
    assert relaxed.result.gates == []
    assert "input" not in (relaxed.result.reason or "")


def test_a_reanalysis_names_its_predecessor_and_can_send_a_rejection_note(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=98, size=64, slices=16)
    first = _analyse(cohort / "study_0001", _analysis_settings(tmp_path))
    before = _written(first, tmp_path / "first")
    superseded = list(before.values())
    quiet = _analyse(cohort / "study_0001", _analysis_settings(tmp_path), superseded=superseded)
    assert "ko" not in quiet.objects  # off by default
    settings = _analysis_settings(tmp_path, results={"send_rejection_notes": True})
    second = _analyse(cohort / "study_0001", settings, superseded=superseded)
    after = _written(second, tmp_path / "second")
    predecessor = after["sr"].PredecessorDocumentsSequence[0]
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == before["sr"].SOPInstanceUID
    note = after["ko"]
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    named = {
        str(sop.ReferencedSOPInstanceUID)
        for series in note.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert named == {str(ds.SOPInstanceUID) for ds in superseded}
    # The series descriptions carry the model version and the analysis time.
    for kind, ds in after.items():
        assert " 20" in str(ds.SeriesDescription) and "Z" in str(ds.SeriesDescription), kind
