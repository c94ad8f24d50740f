"""Phantom cases for the SEG, SR and SC tests: sources, masks, measurements and built objects.

Each case (classic single-frame or Enhanced CT arterial series) is built once per session; the
objects are written to a temporary folder so that DICOM tools read exactly what a PACS would get.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_sr.common import (
    AlgorithmInfo,
    AnalysisResult,
    ResultUIDs,
    allocate_uids,
)
from dicom_sr.sc import build_sc
from dicom_sr.seg import build_seg
from dicom_sr.sr import build_sr
from model.measure import Measurements, measure
from node.analysis.dicomio import load_series
from tests.conftest import require_tool, run_tool

ARTERIAL_FOLDER = "SE0003"

ALGORITHM = AlgorithmInfo(
    name="mvi-fusion-resnet18",
    version="0.1.0-demo",
    manufacturer="mvi-node project",
    model_name="mvi-node",
    software_version="0.1.0",
    demo=True,
    device_serial_number="MVI_NODE",
)

# dciodvfy warnings that are expected, each with its reason. Anything else fails the test.
ALLOWED_WARNINGS = {
    # The SR's probabilities, threshold, tumor count and status texts use the project's private
    # coding scheme (no standard codes exist, see dicom_sr/codes.py); dciodvfy knows only the
    # registered designators. The scheme is described in CodingSchemeIdentificationSequence.
    "Unrecognized defined term <99MVINODE> for value 1 of attribute <Coding Scheme Designator>",
}


@dataclass
class Case:
    """One phantom study's arterial series with everything built from it."""

    kind: str
    folder: Path
    sources: list[Dataset]
    tumor: np.ndarray
    loat: np.ndarray
    hu: np.ndarray
    spacing: tuple[float, float, float]
    measurements: Measurements
    result: AnalysisResult
    uids: ResultUIDs
    seg: Any
    out: Path
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def source_uids(self) -> set[str]:
        """SOP Instance UIDs of the source images."""
        return {str(ds.SOPInstanceUID) for ds in self.sources}


def scored_result(m: Measurements, **changes: Any) -> AnalysisResult:
    """A scored result with made-up probabilities and the phantom's measurements."""
    values: dict[str, Any] = {
        "status": "scored",
        "mvi_probability": 0.83,
        "combined_probability": 0.79,
        "risk_category": "high",
        "threshold": 0.41,
        "max_diameter_mm": m.max_diameter_mm,
        "tumor_volume_ml": m.tumor_volume_ml,
        "tumor_count": m.tumor_components,
        "loat_found": m.loat_found,
        "loat_max_area_cm2": m.loat_max_area_cm2,
        "loat_volume_ml": m.loat_volume_ml,
        "diameter_slice": m.diameter_slice,
        "diameter_endpoints": m.diameter_endpoints,
        "loat_area_slice": m.loat_area_slice,
    }
    values.update(changes)
    return AnalysisResult(**values)


def _make_case(kind: str, folder: Path, out: Path) -> Case:
    study = folder / "study_0001"
    files = sorted((study / ARTERIAL_FOLDER).glob("*.dcm"))
    sources: list[Dataset] = [pydicom.dcmread(path) for path in files]
    image = load_series(files)
    hu = sitk.GetArrayFromImage(image)
    masks = folder / "masks" / "study_0001"
    tumor = sitk.GetArrayFromImage(sitk.ReadImage(str(masks / "tumor.nrrd"))).astype(bool)
    loat = sitk.GetArrayFromImage(sitk.ReadImage(str(masks / "loat.nrrd"))).astype(bool)
    assert tumor.shape == hu.shape
    spacing = tuple(float(v) for v in image.GetSpacing())
    m = measure(tumor, loat, spacing)
    uids = allocate_uids()
    seg = build_seg(sources, tumor, loat, algorithm=ALGORITHM, uids=uids)
    case = Case(
        kind=kind,
        folder=folder,
        sources=sources,
        tumor=tumor,
        loat=loat,
        hu=hu,
        spacing=(spacing[0], spacing[1], spacing[2]),
        measurements=m,
        result=scored_result(m),
        uids=uids,
        seg=seg,
        out=out,
    )
    out.mkdir(parents=True, exist_ok=True)
    case.paths["seg"] = out / "seg.dcm"
    seg.save_as(case.paths["seg"])
    for sop_class in ("comprehensive", "comprehensive3d"):
        sr = build_sr(
            case.result, sources, seg, algorithm=ALGORITHM, uids=uids, sop_class=sop_class
        )
        case.paths[f"sr_{sop_class}"] = out / f"sr_{sop_class}.dcm"
        sr.save_as(case.paths[f"sr_{sop_class}"])
    k, kl = m.diameter_slice, m.loat_area_slice
    sc = build_sc(
        case.result,
        hu[k],
        tumor[k],
        loat[k],
        (spacing[0], spacing[1]),
        sources,
        algorithm=ALGORITHM,
        uids=uids,
        loat_view=(hu[kl], loat[kl]),
    )
    case.paths["sc"] = out / "sc.dcm"
    sc.save_as(case.paths["sc"])

    # The no-tumor analysis: empty tumor segment, status-only SR and SC.
    no_tumor = AnalysisResult(status="no_tumor", reason="The segmenter found no liver tumor.")
    empty_uids = allocate_uids()
    empty_seg = build_seg(sources, np.zeros_like(tumor), loat, algorithm=ALGORITHM, uids=empty_uids)
    case.paths["seg_empty"] = out / "seg_empty.dcm"
    empty_seg.save_as(case.paths["seg_empty"])
    sr = build_sr(no_tumor, sources, empty_seg, algorithm=ALGORITHM, uids=empty_uids)
    case.paths["sr_no_tumor"] = out / "sr_no_tumor.dcm"
    sr.save_as(case.paths["sr_no_tumor"])
    middle = hu.shape[0] // 2
    sc = build_sc(
        no_tumor,
        hu[middle],
        None,
        loat[middle],
        (spacing[0], spacing[1]),
        sources,
        algorithm=ALGORITHM,
        uids=empty_uids,
        slice_index=middle,
    )
    case.paths["sc_no_tumor"] = out / "sc_no_tumor.dcm"
    sc.save_as(case.paths["sc_no_tumor"])
    failed = AnalysisResult(status="failed", reason="Registration did not converge.")
    sc = build_sc(
        failed, None, None, None, None, sources, algorithm=ALGORITHM, uids=allocate_uids()
    )
    case.paths["sc_failed"] = out / "sc_failed.dcm"
    sc.save_as(case.paths["sc_failed"])
    return case


@pytest.fixture(scope="session")
def case_factory(
    cohort_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Case]:
    """``case_factory("classic" | "enhanced")``: the built phantom case (cached)."""
    cache: dict[str, Case] = {}

    def make(kind: str) -> Case:
        if kind not in cache:
            folder = cohort_factory(seed=1, masks=True, enhanced=kind == "enhanced")
            cache[kind] = _make_case(kind, folder, tmp_path_factory.mktemp(f"objects_{kind}"))
        return cache[kind]

    return make


@pytest.fixture(params=["classic", "enhanced"])
def case(request: pytest.FixtureRequest, case_factory: Callable[[str], Case]) -> Case:
    """Both source kinds."""
    return case_factory(str(request.param))


@pytest.fixture(scope="session")
def classic(case_factory: Callable[[str], Case]) -> Case:
    """The classic single-frame case."""
    return case_factory("classic")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Errors and unexpected warnings dciodvfy reports for ``path``."""
    tool = require_tool("dciodvfy", "dicom3tools")
    output = run_tool(tool, path, check=False)
    lines = (output.stdout + output.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [
        line
        for line in lines
        if line.startswith("Warning")
        and line.removeprefix("Warning - ").strip() not in ALLOWED_WARNINGS
    ]
    return errors, warnings


def referenced_uids(dataset: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in a dataset."""
    found: set[str] = set()

    def walk(ds: Dataset) -> None:
        for element in ds:
            if element.keyword == "ReferencedSOPInstanceUID":
                found.add(str(element.value))
            elif element.VR == "SQ":
                for item in element.value:
                    walk(item)

    walk(dataset)
    return found


PATIENT_STUDY = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "SpecificCharacterSet",
)


def assert_study_attributes(ds: Dataset, source: Dataset) -> None:
    """Patient/study attributes equal the source's; equipment is the node's; new series."""
    for keyword in PATIENT_STUDY:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.Manufacturer == ALGORITHM.manufacturer
    assert ds.ManufacturerModelName == ALGORITHM.model_name
    assert ds.SoftwareVersions == ALGORITHM.software_version
    assert ds.DeviceSerialNumber == ALGORITHM.serial_number
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    # highdicom adds the scanner (Acquisition Equipment) and itself (Processing Equipment).
    items = [
        item
        for item in ds.ContributingEquipmentSequence
        if (
            item.PurposeOfReferenceCodeSequence[0].CodeValue,
            item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator,
            item.PurposeOfReferenceCodeSequence[0].CodeMeaning,
        )
        == ("Newcode1", "99IHE", "Processing Algorithm")
    ]
    assert len(items) == 1
    (item,) = items
    assert item.Manufacturer == ALGORITHM.manufacturer
    assert item.ManufacturerModelName == ALGORITHM.name
    assert item.SoftwareVersions == ALGORITHM.version
