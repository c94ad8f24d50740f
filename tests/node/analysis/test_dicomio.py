"""node.analysis.dicomio: CT series written by us, transcoded by real tools, loaded back."""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.analysis.dicomio import (
    DicomIOError,
    SeriesFiles,
    image_from_volume,
    load_series,
    scan_folder,
    volume_from_image,
)
from node.core.dicom import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
from node.offline.ct_writer import write_ct_series
from tests.conftest import require_tool, run_tool

SHAPE = (12, 40, 48)  # (k, j, i)
SPACING = (0.7, 0.8, 2.5)  # (x, y, z) mm: deliberately non-isotropic
ORIGIN = (-123.4, 56.7, -789.25)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042"


def _oblique_direction() -> tuple[float, ...]:
    """Rotation about z by 20 degrees then about x by 15 degrees (right-handed)."""
    a, b = math.radians(20), math.radians(15)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(v) for v in (rx @ rz).ravel())


OBLIQUE = _oblique_direction()
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)  # row L, column -S (down), normal P


def make_volume(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Gradient plus a bright sphere, with fractional HU so rounding is exercised."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    volume = -900.0 + 37.3 * k + 11.7 * j + 5.1 * i
    centre = np.array(shape) / 2.0
    radius = min(shape) / 3.0
    inside = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 < radius**2
    volume[inside] += 250.25
    return volume


def make_header(**overrides: object) -> Dataset:
    """Header of a contrast-enhanced portal venous liver CT series, as the callers build it."""
    h = Dataset()
    h.SpecificCharacterSet = "ISO_IR 100"
    h.PatientName = PATIENT_NAME
    h.PatientID = PATIENT_ID
    h.PatientBirthDate = "19610203"
    h.PatientSex = "F"
    h.StudyInstanceUID = generate_uid()
    h.StudyDate = "20240315"
    h.StudyTime = "101010"
    h.AccessionNumber = "ACC123"
    h.ReferringPhysicianName = "Ref^Doctor"
    h.StudyID = "77"
    h.StudyDescription = "CT ABDOMEN"
    h.SeriesInstanceUID = generate_uid()
    h.SeriesNumber = 4
    h.SeriesDate = "20240315"
    h.SeriesTime = "101500"
    h.Modality = "CT"
    h.SeriesDescription = "Portal venous"
    h.ProtocolName = "Liver 3-phase"
    h.FrameOfReferenceUID = generate_uid()
    h.PositionReferenceIndicator = ""
    h.Manufacturer = "ACME"
    h.ManufacturerModelName = "Scanner 9000"
    h.DeviceSerialNumber = "SN1"
    h.SoftwareVersions = "1.2.3"
    h.InstitutionName = "General Hospital"
    h.BodyPartExamined = "ABDOMEN"
    h.ContrastBolusAgent = "Iohexol 350"
    h.ContrastBolusRoute = "IV"
    h.ContrastBolusStartTime = "101300"
    h.ContrastBolusVolume = 100
    h.AcquisitionDate = "20240315"
    h.AcquisitionTime = "101420"
    h.ContentDate = "20240315"
    h.ContentTime = "101430"
    h.KVP = 100
    for keyword, value in overrides.items():
        setattr(h, keyword, value)
    return h


def expected_hu(volume: np.ndarray, intercept: float, slope: float, signed: bool) -> np.ndarray:
    info = np.iinfo(np.int16 if signed else np.uint16)
    stored = np.clip(np.rint((volume - intercept) / slope), info.min, info.max)
    return (stored * slope + intercept).astype(np.float32)


def assert_geometry(
    image: sitk.Image,
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
    direction: Sequence[float] = IDENTITY,
) -> None:
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-6)


def write(
    tmp: Path,
    name: str,
    volume: np.ndarray | None = None,
    *,
    header: Dataset | None = None,
    **options: Any,
) -> list[Path]:
    """write_ct_series with this module's defaults: test volume, fresh header, SPACING, ORIGIN."""
    options = {"spacing_mm": SPACING, "origin_mm": ORIGIN, **options}
    return write_ct_series(
        make_volume() if volume is None else volume,
        tmp / name,
        make_header() if header is None else header,
        **options,
    )


def dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy", "dicom3tools")
    result = run_tool(tool, path, check=False)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if "error" in line.lower()]


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixel_representation", "intercept", "slope"),
    [(1, -1024.0, 1.0), (0, -1024.0, 1.0), (1, 0.0, 0.5), (0, -2048.0, 2.0)],
)
def test_classic_round_trip(
    tmp_path: Path, pixel_representation: int, intercept: float, slope: float
) -> None:
    volume = make_volume()
    paths = write(
        tmp_path,
        "s",
        volume,
        pixel_representation=pixel_representation,
        rescale_intercept=intercept,
        rescale_slope=slope,
    )
    assert [p.name for p in paths] == [f"IM{n:05d}.dcm" for n in range(1, SHAPE[0] + 1)]
    image = load_series(paths)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0])
    loaded = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(
        loaded, expected_hu(volume, intercept, slope, signed=pixel_representation == 1)
    )
    assert_geometry(image)

    first = pydicom.dcmread(paths[0])
    assert first.SOPClassUID == CT_IMAGE_STORAGE
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.PixelRepresentation == pixel_representation
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([SPACING[1], SPACING[0]])
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first.RescaleType == "HU"
    assert first.InstanceNumber == 1
    assert [float(v) for v in first.ImagePositionPatient] == pytest.approx(ORIGIN)


def test_unsigned_clips_below_intercept(tmp_path: Path) -> None:
    volume = make_volume()
    volume[0, 0, 0] = -3000.0  # below what uint16 with intercept -1024 can store
    paths = write(tmp_path, "s", volume, pixel_representation=0)
    loaded = sitk.GetArrayFromImage(load_series(paths))
    assert loaded[0, 0, 0] == -1024.0
    np.testing.assert_array_equal(loaded, expected_hu(volume, -1024.0, 1.0, signed=False))


def test_descending_and_shuffled_load_identically(tmp_path: Path) -> None:
    volume = make_volume()
    ascending = load_series(write(tmp_path, "asc", volume))
    descending_paths = write(tmp_path, "desc", volume, descending=True)
    first = pydicom.dcmread(descending_paths[0])
    last = pydicom.dcmread(descending_paths[-1])
    assert first.InstanceNumber == 1
    assert float(first.ImagePositionPatient[2]) > float(last.ImagePositionPatient[2])

    descending = load_series(descending_paths)
    shuffled_paths = list(descending_paths)
    random.Random(7).shuffle(shuffled_paths)
    shuffled = load_series(shuffled_paths)
    datasets = load_series([pydicom.dcmread(p) for p in reversed(shuffled_paths)])
    for image in (descending, shuffled, datasets):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ascending)
        )
        assert_geometry(image)


@pytest.mark.parametrize("enhanced", [False, True])
def test_oblique_round_trip(tmp_path: Path, enhanced: bool) -> None:
    volume = make_volume()
    paths = write(tmp_path, "obl", volume, direction=OBLIQUE, enhanced=enhanced, descending=True)
    image = load_series(paths)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image), expected_hu(volume, -1024.0, 1.0, signed=True)
    )
    assert_geometry(image, direction=OBLIQUE)


@pytest.mark.parametrize("descending", [False, True])
def test_enhanced_round_trip(tmp_path: Path, descending: bool) -> None:
    volume = make_volume()
    paths = write(tmp_path, "enh", volume, enhanced=True, descending=descending)
    assert len(paths) == 1
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE
    assert int(ds.NumberOfFrames) == SHAPE[0]
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    assert len(ds.PerFrameFunctionalGroupsSequence) == SHAPE[0]
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert float(shared.PixelValueTransformationSequence[0].RescaleIntercept) == -1024.0
    assert "KVP" not in ds  # moved into the CT X-Ray Details functional group
    assert float(shared.CTXRayDetailsSequence[0].KVP) == 100.0

    image = load_series(paths)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image), expected_hu(volume, -1024.0, 1.0, signed=True)
    )
    assert_geometry(image)


def test_enhanced_per_frame_rescale(tmp_path: Path) -> None:
    """A per-frame Pixel Value Transformation overrides the shared one."""
    volume = make_volume()
    path = write(tmp_path, "enh", volume, enhanced=True)[0]
    ds = pydicom.dcmread(path)
    transform = Dataset()
    transform.RescaleIntercept = -1000
    transform.RescaleSlope = 1
    transform.RescaleType = "HU"
    ds.PerFrameFunctionalGroupsSequence[3].PixelValueTransformationSequence = [transform]
    loaded = sitk.GetArrayFromImage(load_series([ds]))
    expected = expected_hu(volume, -1024.0, 1.0, signed=True)
    np.testing.assert_array_equal(loaded[3], expected[3] + 24.0)
    np.testing.assert_array_equal(loaded[4], expected[4])


def test_localizer_single_coronal_slice(tmp_path: Path) -> None:
    scout = make_volume((1, 40, 48))
    header = make_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    paths = write(tmp_path, "loc", scout, header=header, direction=CORONAL, slice_thickness_mm=3.0)
    assert len(paths) == 1
    image = load_series(paths)
    assert image.GetSize() == (48, 40, 1)
    assert_geometry(image, spacing=(SPACING[0], SPACING[1], 3.0), direction=CORONAL)
    assert list(pydicom.dcmread(paths[0]).ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def test_image_volume_helpers_round_trip() -> None:
    volume = make_volume().astype(np.float32)
    image = image_from_volume(volume, SPACING, ORIGIN, OBLIQUE)
    back, spacing, origin, direction = volume_from_image(image)
    np.testing.assert_array_equal(back, volume)
    np.testing.assert_allclose(spacing, SPACING)
    np.testing.assert_allclose(origin, ORIGIN)
    np.testing.assert_allclose(direction, OBLIQUE)
    assert image.GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0])


# ---------------------------------------------------------------------------------------------
# validity of what we write
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# compressed transfer syntaxes made by real tools
# ---------------------------------------------------------------------------------------------

COMPRESSIONS = [
    # (tool, package, arguments before "in out", expected transfer syntax)
    ("dcmcjpeg", "dcmtk", ["+e1"], "1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1
    ("dcmcjpls", "dcmtk", ["+el"], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    ("dcmcrle", "dcmtk", [], "1.2.840.10008.1.2.5"),  # RLE Lossless
    ("gdcmconv", "libgdcm-tools", ["--j2k"], "1.2.840.10008.1.2.4.90"),  # J2K reversible
    ("dcmconv", "dcmtk", ["+td"], "1.2.840.10008.1.2.1.99"),  # Deflated Explicit VR LE
]


@pytest.mark.parametrize(
    ("tool", "package", "arguments", "transfer_syntax"),
    COMPRESSIONS,
    ids=[c[0] for c in COMPRESSIONS],
)
@pytest.mark.parametrize("pixel_representation", [1, 0])
def test_compressed_round_trip(
    tmp_path: Path,
    tool: str,
    package: str,
    arguments: list[str],
    transfer_syntax: str,
    pixel_representation: int,
) -> None:
    executable = require_tool(tool, package)
    original = write(tmp_path, "orig", pixel_representation=pixel_representation, direction=OBLIQUE)
    out_dir = tmp_path / "compressed"
    out_dir.mkdir()
    compressed = []
    for path in original:
        target = out_dir / path.name
        run_tool(executable, *arguments, path, target)
        compressed.append(target)

    dump = run_tool(require_tool("dcmdump", "dcmtk"), "+P", "0002,0010", "-Un", compressed[0])
    assert transfer_syntax in dump.stdout
    for path in compressed:
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        assert meta.file_meta.TransferSyntaxUID == transfer_syntax

    reference = load_series(original)
    image = load_series(compressed)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    assert_geometry(image, direction=OBLIQUE)


def test_compressed_enhanced_round_trip(tmp_path: Path) -> None:
    executable = require_tool("dcmcjpls", "dcmtk")
    original = write(tmp_path, "orig", enhanced=True, descending=True)[0]
    target = tmp_path / "enh_jls.dcm"
    run_tool(executable, "+el", original, target)
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(load_series([target])),
        sitk.GetArrayFromImage(load_series([original])),
    )


# ---------------------------------------------------------------------------------------------
# refused series
# ---------------------------------------------------------------------------------------------


def test_gap_is_refused(tmp_path: Path) -> None:
    paths = write(tmp_path, "s")
    del paths[5]
    with pytest.raises(DicomIOError, match=r"gap between slice positions -?\d+\.\d+ and -?\d+"):
        load_series(paths)


def test_duplicate_position_is_refused(tmp_path: Path) -> None:
    paths = write(tmp_path, "s")
    duplicate = pydicom.dcmread(paths[4])
    duplicate.SOPInstanceUID = generate_uid()
    datasets = [pydicom.dcmread(p) for p in paths] + [duplicate]
    with pytest.raises(DicomIOError, match="duplicate slice position"):
        load_series(datasets)


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    header = make_header()
    axial = write(tmp_path, "a", header=header)
    oblique = write(tmp_path, "o", header=header, direction=OBLIQUE)
    with pytest.raises(DicomIOError, match="mixed orientations"):
        load_series([*axial[:6], *oblique[6:]])


def test_mixed_sizes_are_refused(tmp_path: Path) -> None:
    header = make_header()
    big = write(tmp_path, "big", header=header)
    small = write(tmp_path, "small", make_volume((12, 32, 48)), header=header)
    with pytest.raises(DicomIOError, match="mixed image sizes: 40x48"):
        load_series([*big[:6], *small[6:]])


def test_mixed_pixel_spacing_is_refused(tmp_path: Path) -> None:
    header = make_header()
    fine = write(tmp_path, "fine", header=header)
    coarse = write(tmp_path, "coarse", header=header, spacing_mm=(0.9, 0.9, 2.5))
    with pytest.raises(DicomIOError, match="mixed PixelSpacing"):
        load_series([*fine[:6], *coarse[6:]])


def test_missing_pixel_data_is_refused(tmp_path: Path) -> None:
    paths = write(tmp_path, "s")
    broken = pydicom.dcmread(paths[2])
    del broken.PixelData
    broken_path = tmp_path / "nopixels.dcm"
    broken.save_as(broken_path)
    with pytest.raises(DicomIOError, match=r"nopixels\.dcm: missing Pixel Data"):
        load_series([*paths[:2], broken_path, *paths[3:]])


def test_non_image_object_is_refused(tmp_path: Path) -> None:
    paths = write(tmp_path, "s")
    report = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for keyword in ("Rows", "Columns"):
        del report[keyword]
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    with pytest.raises(DicomIOError, match="not an image object"):
        load_series([report, *paths[1:]])


def test_empty_input_is_refused() -> None:
    with pytest.raises(DicomIOError, match="empty series"):
        load_series([])


def test_two_series_are_refused(tmp_path: Path) -> None:
    first = write(tmp_path, "a")
    second = write(tmp_path, "b")
    with pytest.raises(DicomIOError, match="files of 2 series mixed") as excinfo:
        load_series([*first, *second])
    message = str(excinfo.value)
    for phi in (PATIENT_NAME, PATIENT_ID, "Doe", "ACC123", "19610203"):
        assert phi not in message
    assert pydicom.dcmread(first[0]).SeriesInstanceUID not in message


def test_tilted_stack_is_refused(tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in write(tmp_path, "s")]
    for index, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * index, z]  # shear: y drifts with z
    with pytest.raises(DicomIOError, match="do not line up along the slice normal"):
        load_series(datasets)


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_text("not dicom")
    with pytest.raises(DicomIOError, match=r"junk\.dcm: not a readable DICOM file"):
        load_series([junk])


# ---------------------------------------------------------------------------------------------
# scan_folder
# ---------------------------------------------------------------------------------------------


def test_scan_folder_groups_by_study_and_series(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    study_a = make_header()
    series_a2 = make_header(StudyInstanceUID=study_a.StudyInstanceUID, SeriesDescription="Arterial")
    study_b = make_header()
    a1 = write(root / "patient" / "a" / "deep", "s1", header=study_a)
    a2 = write(root / "patient" / "a", "s2", make_volume((4, 40, 48)), header=series_a2)
    b1 = write(root / "other", "s", make_volume((3, 40, 48)), header=study_b, enhanced=True)
    # a file of series a1 elsewhere in the tree still belongs to it
    stray = root / "stray" / "moved.dcm"
    stray.parent.mkdir(parents=True)
    shutil.move(a1.pop(), stray)
    a1.append(stray)
    (root / "README.txt").write_text("not a DICOM file\n")
    truncated = root / "patient" / "truncated.dcm"
    truncated.write_bytes(a2[0].read_bytes()[:300])
    (root / "empty.dcm").write_bytes(b"")

    found = scan_folder(root)
    assert set(found) == {study_a.StudyInstanceUID, study_b.StudyInstanceUID}
    assert set(found[study_a.StudyInstanceUID]) == {
        study_a.SeriesInstanceUID,
        series_a2.SeriesInstanceUID,
    }
    s1 = found[study_a.StudyInstanceUID][study_a.SeriesInstanceUID]
    assert isinstance(s1, SeriesFiles)
    assert s1.paths == tuple(sorted(a1))
    assert s1.modality == "CT"
    assert s1.sop_class_uid == CT_IMAGE_STORAGE
    assert s1.series_description == "Portal venous"
    s2 = found[study_a.StudyInstanceUID][series_a2.SeriesInstanceUID]
    assert s2.paths == tuple(a2)
    assert s2.series_description == "Arterial"
    (b,) = found[study_b.StudyInstanceUID].values()
    assert b.paths == tuple(b1)
    assert b.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE

    # what scan_folder groups, load_series accepts
    assert load_series(list(s1.paths)).GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0])
