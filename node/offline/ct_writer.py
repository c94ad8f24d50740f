"""Write a HU volume as a valid DICOM CT series: classic CT Image or one Enhanced CT object.

:func:`write_ct_series` makes the phantom studies (``mvi-node phantom``, the demo, tests and
benchmarks); nothing in the analysis reads with it. Every object it writes passes ``dciodvfy``
without errors. Conventions are :mod:`node.analysis.dicomio`'s: a numpy volume is indexed
``[k, j, i]``, spacing is ``(x, y, z)`` and direction the row-major 3x3 matrix of SimpleITK.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from node.analysis.dicomio import DicomIOError
from node.core.dicom import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
from node.core.logging import get_logger, uid_key

__all__ = ["write_ct_series"]

log = get_logger(__name__)

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

# Header attributes that belong to classic CT Image objects only; an Enhanced CT object carries
# their content in functional groups or the Enhanced Contrast/Bolus module instead, and dciodvfy
# flags them as not part of the IOD when left at the top level.
_CLASSIC_ONLY = (
    "KVP",
    "Laterality",
    "SliceThickness",
    "SliceLocation",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionNumber",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusStartTime",
    "ContrastBolusStopTime",
    "ContrastBolusVolume",
    "ContrastBolusTotalDose",
    "ContrastFlowRate",
    "ContrastFlowDuration",
    "ContrastBolusIngredient",
    "ContrastBolusIngredientConcentration",
    "ConvolutionKernel",
    "DataCollectionDiameter",
    "ReconstructionDiameter",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "FilterType",
    "GeneratorPower",
    "FocalSpots",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
)

# Attributes write_ct_series computes itself; a value in the header is ignored.
_COMPUTED = frozenset(
    {
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SliceLocation",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "NumberOfFrames",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DimensionOrganizationSequence",
        "DimensionIndexSequence",
        "PlanarConfiguration",
        "LargestImagePixelValue",
        "SmallestImagePixelValue",
    }
)

# Type 2 attributes of the CT Image IODs (Patient, General Study, General Series, Frame of
# Reference, General Equipment modules) that are written empty when the header lacks them.
_TYPE2_EMPTY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "PatientPosition",
    "PositionReferenceIndicator",
    "Manufacturer",
)


def _ds(value: float) -> DSfloat:
    """A DS value formatted to fit the 16-character limit."""
    return DSfloat(float(value), auto_format=True)


def _ds_list(values: Sequence[float] | np.ndarray) -> list[DSfloat]:
    return [_ds(v) for v in values]


def _to_stored(
    volume_hu: np.ndarray, slope: float, intercept: float, pixel_representation: int
) -> np.ndarray:
    """HU -> stored values: ``round((HU - intercept) / slope)`` clipped to the dtype's range.

    Rounding is numpy's round-half-to-even; values outside int16 (signed) or uint16 (unsigned)
    saturate instead of wrapping around.
    """
    dtype = np.dtype("<i2") if pixel_representation == 1 else np.dtype("<u2")
    info = np.iinfo(dtype)
    stored = np.rint((np.asarray(volume_hu, dtype=np.float64) - intercept) / slope)
    return np.clip(stored, info.min, info.max).astype(dtype)


def _direction_axes(direction: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row (i), column (j) and slice (k) direction vectors from a SimpleITK direction."""
    matrix = np.asarray(direction, dtype=np.float64)
    if matrix.shape != (9,):
        raise DicomIOError(f"direction needs 9 values, got {matrix.size}")
    matrix = matrix.reshape(3, 3)
    # Non-orthonormal input would produce an ImageOrientationPatient that readers reject or,
    # worse, silently re-orthogonalise differently from us.
    if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-5):
        raise DicomIOError("direction is not an orthonormal 3x3 matrix")
    return matrix[:, 0], matrix[:, 1], matrix[:, 2]


def _now_date_time() -> tuple[str, str]:
    now = dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _content_date_time(header: Dataset) -> tuple[str, str]:
    """The best date/time the header offers for ContentDate/Time (Type 1 in Enhanced CT)."""
    for date_kw, time_kw in (
        ("ContentDate", "ContentTime"),
        ("AcquisitionDate", "AcquisitionTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        date = str(header.get(date_kw, "") or "")
        if date:
            return date, str(header.get(time_kw, "") or "000000")
    return _now_date_time()


def _base_dataset(header: Dataset) -> Dataset:
    """Copy the caller's header, minus file meta and everything write_ct_series computes."""
    base = Dataset()
    for element in header:
        if element.tag.group == 0x0002 or element.keyword in _COMPUTED:
            continue
        base.add(copy.deepcopy(element))
    modality = str(base.get("Modality", "") or "CT")
    if modality != "CT":
        raise DicomIOError(f"header Modality is {modality!r}; only CT can be written")
    base.Modality = "CT"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        # Type 1; one fresh UID per call keeps every instance of the series consistent.
        if not base.get(keyword):
            setattr(base, keyword, generate_uid())
    for keyword in _TYPE2_EMPTY:
        if keyword not in base:
            setattr(base, keyword, "")
    if not base.get("BodyPartExamined") and "Laterality" not in base:
        # Type 2C, required when the body part may be paired; unknown body part counts.
        base.Laterality = ""
    return base


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def _set_pixel_module(
    ds: Dataset, rows: int, cols: int, pixel_representation: int, stored: np.ndarray
) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_representation
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OW"


def write_ct_series(
    volume_hu: np.ndarray,
    out_dir: Path,
    header: Dataset,
    *,
    spacing_mm: tuple[float, float, float],
    origin_mm: tuple[float, float, float],
    direction: Sequence[float] = _IDENTITY,
    enhanced: bool = False,
    pixel_representation: int = 1,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    descending: bool = False,
    slice_thickness_mm: float | None = None,
    window: tuple[float, float] = (60.0, 400.0),
    filename_prefix: str = "IM",
) -> list[Path]:
    """Write a HU volume as a CT series (classic single-frame files or one Enhanced CT object).

    Stored pixel value = ``round((HU - rescale_intercept) / rescale_slope)`` (round half to even)
    clipped to the range of the stored type: int16 when ``pixel_representation`` is 1, uint16
    when 0. HU values outside what the type and rescale can express therefore saturate.

    Parameters
    ----------
    volume_hu
        ``(slices, rows, cols)`` HU volume indexed ``[k, j, i]``; finite values only.
    out_dir
        Folder for the files (created). Existing files of the same names are overwritten.
    header
        Patient, study, series, equipment and acquisition attributes copied into every instance
        (see the module's callers: PatientName ... KVP, optional ImageType). Attributes this
        function computes (geometry, pixel module, rescale, window, SOP UIDs) are ignored.
        Missing Type 1 UIDs are generated, missing Type 2 attributes written empty, KVP
        defaults to 120.
    spacing_mm
        ``(x, y, z)``: column spacing, row spacing, slice spacing in mm.
    origin_mm
        LPS position of the centre of voxel ``[0, 0, 0]``.
    direction
        SimpleITK direction: row-major 3x3 matrix whose columns are the i, j, k directions in
        LPS. :func:`load_series` always returns the right-handed form (k = row x column), so a
        left-handed direction comes back with the slice axis reversed.
    enhanced
        Write one Enhanced CT Image Storage object with every slice as a frame instead of one
        CT Image Storage file per slice.
    pixel_representation
        1 for signed int16, 0 for unsigned uint16 stored values.
    rescale_intercept, rescale_slope
        Rescale written to the objects.
    descending
        When true, InstanceNumber 1 (and the first file, or the first frame) is the highest
        slice, ``k = slices - 1``.
    slice_thickness_mm
        SliceThickness; defaults to the slice spacing.
    window
        ``(WindowCenter, WindowWidth)``.
    filename_prefix
        Files are named ``{prefix}{n:05d}.dcm`` with ``n`` the InstanceNumber.

    Returns
    -------
    list of Path
        The written files in InstanceNumber order.

    Raises
    ------
    DicomIOError
        For an unusable volume, geometry or option.
    """
    volume = np.asarray(volume_hu)
    if volume.ndim != 3 or 0 in volume.shape:
        raise DicomIOError(f"volume must be a non-empty 3-D array [k, j, i], got {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise DicomIOError("volume contains NaN or infinite values")
    if pixel_representation not in (0, 1):
        raise DicomIOError(f"pixel_representation must be 0 or 1, got {pixel_representation}")
    if rescale_slope == 0 or not math.isfinite(rescale_slope):
        raise DicomIOError("rescale_slope must be finite and non-zero")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise DicomIOError(f"spacing_mm must be 3 positive values, got {spacing_mm}")
    if len(origin_mm) != 3:
        raise DicomIOError(f"origin_mm must have 3 values, got {origin_mm}")
    if not filename_prefix or os.sep in filename_prefix or "/" in filename_prefix:
        raise DicomIOError(f"invalid filename_prefix {filename_prefix!r}")
    row_dir, col_dir, k_dir = _direction_axes(direction)

    n_slices, rows, cols = volume.shape
    sx, sy, sz = (float(v) for v in spacing_mm)
    thickness = float(slice_thickness_mm) if slice_thickness_mm is not None else sz
    origin = np.asarray(origin_mm, dtype=np.float64)
    positions = [origin + k * sz * k_dir for k in range(n_slices)]
    normal = np.cross(row_dir, col_dir)
    stored = _to_stored(volume, rescale_slope, rescale_intercept, pixel_representation)
    # k in InstanceNumber (file / frame) order
    order = list(range(n_slices - 1, -1, -1)) if descending else list(range(n_slices))

    base = _base_dataset(header)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    geometry = _Geometry(
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        positions=positions,
        pixel_spacing=(sy, sx),
        thickness=thickness,
        slice_spacing=sz,
        rows=rows,
        cols=cols,
    )
    if enhanced:
        path = out_dir / f"{filename_prefix}{1:05d}.dcm"
        ds = _enhanced_dataset(
            base,
            stored,
            order,
            geometry,
            pixel_representation=pixel_representation,
            rescale=(rescale_intercept, rescale_slope),
            window=window,
        )
        ds.save_as(path, enforce_file_format=True)
        # Paths are caller-chosen and may embed identifiers, so logs name the series by hash.
        log.debug("wrote enhanced CT", series_key=uid_key(base.SeriesInstanceUID), frames=n_slices)
        return [path]

    paths: list[Path] = []
    for number, k in enumerate(order, start=1):
        ds = _classic_dataset(
            base,
            stored[k],
            geometry,
            k,
            instance_number=number,
            pixel_representation=pixel_representation,
            rescale=(rescale_intercept, rescale_slope),
            window=window,
        )
        path = out_dir / f"{filename_prefix}{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    log.debug("wrote CT series", series_key=uid_key(base.SeriesInstanceUID), files=len(paths))
    return paths


@dataclass(frozen=True)
class _Geometry:
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    positions: list[np.ndarray]
    pixel_spacing: tuple[float, float]  # DICOM order: (row spacing, column spacing)
    thickness: float
    slice_spacing: float
    rows: int
    cols: int

    @property
    def orientation(self) -> list[DSfloat]:
        return _ds_list([*self.row_dir, *self.col_dir])

    def centre(self, k: int) -> np.ndarray:
        """LPS centre of slice k (for reconstruction target / table position attributes)."""
        return (
            self.positions[k]
            + self.row_dir * (self.cols - 1) / 2 * self.pixel_spacing[1]
            + self.col_dir * (self.rows - 1) / 2 * self.pixel_spacing[0]
        )


def _classic_dataset(
    base: Dataset,
    stored_slice: np.ndarray,
    geometry: _Geometry,
    k: int,
    *,
    instance_number: int,
    pixel_representation: int,
    rescale: tuple[float, float],
    window: tuple[float, float],
) -> Dataset:
    ds = copy.deepcopy(base)
    sop_instance_uid = generate_uid()
    ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_instance_uid)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    if not ds.get("ImageType"):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if not ds.get("KVP"):
        ds.KVP = _ds(120)
    if "ContentDate" not in ds or "ContentTime" not in ds:
        ds.ContentDate, ds.ContentTime = _content_date_time(base)
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = ds.get("AcquisitionNumber") or 1
    position = geometry.positions[k]
    ds.ImagePositionPatient = _ds_list(position)
    ds.ImageOrientationPatient = geometry.orientation
    ds.PixelSpacing = _ds_list(geometry.pixel_spacing)
    ds.SliceThickness = _ds(geometry.thickness)
    ds.SliceLocation = _ds(float(np.dot(position, geometry.normal)))
    ds.RescaleIntercept = _ds(rescale[0])
    ds.RescaleSlope = _ds(rescale[1])
    image_type = [str(v).upper() for v in ds.ImageType]
    if len(image_type) < 3 or image_type[2] != "LOCALIZER":
        # RescaleType is Type 1C (required unless HU); a localizer's values are not HU, so
        # dciodvfy objects to "HU" there and the attribute is left out.
        ds.RescaleType = "HU"
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(window[1])
    ds.LossyImageCompression = "00"
    _set_pixel_module(ds, geometry.rows, geometry.cols, pixel_representation, stored_slice)
    return ds


def _item(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _header_float(header: Dataset, keyword: str, default: float) -> float:
    value = header.get(keyword)
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


# BodyPartExamined -> SNOMED CT anatomic region (CID 4031) for the Frame Anatomy group.
_ANATOMY = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "LIVER": ("10200004", "Liver"),
    "CHEST": ("816094009", "Chest"),
    "THORAX": ("816094009", "Thorax"),
    "PELVIS": ("816092008", "Pelvis"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ABDOMEN_PELVIS": ("818982008", "Abdomen and Pelvis"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDOMENPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "HEAD": ("69536005", "Head"),
    "NECK": ("45048000", "Neck"),
}


def _anatomy_code(header: Dataset) -> Dataset:
    """Frame Anatomy region from BodyPartExamined; abdomen (this node's domain) otherwise."""
    body_part = str(header.get("BodyPartExamined", "") or "").upper().replace(" ", "")
    value, meaning = _ANATOMY.get(body_part, _ANATOMY["ABDOMEN"])
    return _code(value, "SCT", meaning)


def _enhanced_contrast(base: Dataset) -> tuple[DicomSequence, DicomSequence] | None:
    """Enhanced Contrast/Bolus module and Contrast/Bolus Usage functional group from the header's
    classic ContrastBolus* attributes, or None for a non-contrast series."""
    if not base.get("ContrastBolusAgent"):
        return None
    # The classic attributes are free text, which cannot be mapped to a specific coded agent
    # reliably; the generic "Contrast media" (iodine, intravenous) is true of every CT phase
    # this node writes, whereas a guessed specific agent could be wrong.
    agent = _code("385420005", "SCT", "Contrast media")
    agent.ContrastBolusAgentNumber = 1
    agent.ContrastBolusAdministrationRouteSequence = _seq(
        _code("47625008", "SCT", "Intravenous route")
    )
    agent.ContrastBolusIngredientCodeSequence = _seq(_code("44588005", "SCT", "Iodine"))
    volume = base.get("ContrastBolusVolume")
    agent.ContrastBolusVolume = _ds(float(volume)) if volume not in (None, "") else None
    agent.ContrastBolusIngredientConcentration = None
    usage = _item(
        ContrastBolusAgentNumber=1,
        ContrastBolusAgentAdministered="YES",
        ContrastBolusAgentDetected=None,
        ContrastBolusAgentPhase=None,
    )
    return _seq(agent), _seq(usage)


def _enhanced_dataset(
    base: Dataset,
    stored: np.ndarray,
    order: list[int],
    geometry: _Geometry,
    *,
    pixel_representation: int,
    rescale: tuple[float, float],
    window: tuple[float, float],
) -> Dataset:
    header = base  # the caller's attributes; ds below is the object being built
    ds = copy.deepcopy(base)
    contrast = _enhanced_contrast(header)
    for keyword in _CLASSIC_ONLY:
        if keyword in ds:
            del ds[keyword]

    sop_instance_uid = generate_uid()
    ds.file_meta = _file_meta(ENHANCED_CT_IMAGE_STORAGE, sop_instance_uid)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid

    # VOLUME is the Enhanced CT defined term for value 3 (AXIAL is the classic IOD's).
    default_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    image_type = [str(v) for v in (header.get("ImageType") or default_type)]
    image_type = ([*image_type, "NONE", "NONE", "NONE"])[:4]
    if image_type[0] not in ("ORIGINAL", "DERIVED", "MIXED"):
        image_type[0] = "ORIGINAL"
    if image_type[1] not in ("PRIMARY", "SECONDARY"):
        image_type[1] = "PRIMARY"
    ds.ImageType = image_type

    # Enhanced General Equipment: these are Type 1 here, Type 2/3 in the classic IOD.
    for keyword in ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber"):
        if not ds.get(keyword):
            setattr(ds, keyword, "UNKNOWN")
    if not ds.get("SoftwareVersions"):
        ds.SoftwareVersions = "UNKNOWN"

    content_date, content_time = _content_date_time(header)
    ds.ContentDate = content_date
    ds.ContentTime = content_time
    acq_date = str(header.get("AcquisitionDate", "") or content_date)
    acq_time = str(header.get("AcquisitionTime", "") or content_time)
    acquisition_datetime = f"{acq_date}{acq_time}"
    ds.AcquisitionDateTime = acquisition_datetime
    ds.AcquisitionDuration = _ds(1.0)
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.NumberOfFrames = len(order)

    # Enhanced CT Image module
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])
    if contrast is not None:
        ds.ContrastBolusAgentSequence = contrast[0]

    _set_pixel_module(
        ds,
        geometry.rows,
        geometry.cols,
        pixel_representation,
        stored[order],
    )

    kvp = _header_float(header, "KVP", 120.0)
    sx = geometry.pixel_spacing[1]
    sy = geometry.pixel_spacing[0]
    fov = max(geometry.cols * sx, geometry.rows * sy)
    # Nominal acquisition parameters: synthetic volumes have none, but the Enhanced CT IOD makes
    # these macros mandatory for ORIGINAL images; values the header has win.
    shared = Dataset()
    shared.PixelMeasuresSequence = _seq(
        _item(
            PixelSpacing=_ds_list(geometry.pixel_spacing),
            SliceThickness=_ds(geometry.thickness),
            SpacingBetweenSlices=_ds(geometry.slice_spacing),
        )
    )
    shared.PlaneOrientationSequence = _seq(_item(ImageOrientationPatient=geometry.orientation))
    shared.PixelValueTransformationSequence = _seq(
        _item(RescaleIntercept=_ds(rescale[0]), RescaleSlope=_ds(rescale[1]), RescaleType="HU")
    )
    shared.FrameVOILUTSequence = _seq(
        _item(WindowCenter=_ds(window[0]), WindowWidth=_ds(window[1]))
    )
    shared.CTImageFrameTypeSequence = _seq(
        _item(
            FrameType=image_type,
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
        )
    )
    shared.CTAcquisitionTypeSequence = _seq(
        _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
    )
    shared.CTAcquisitionDetailsSequence = _seq(
        _item(
            DataCollectionDiameter=_ds(_header_float(header, "DataCollectionDiameter", 500.0)),
            RevolutionTime=_ds(0.5),
            SingleCollimationWidth=_ds(0.625),
            TotalCollimationWidth=_ds(40.0),
            TableHeight=_ds(_header_float(header, "TableHeight", 150.0)),
            GantryDetectorTilt=_ds(_header_float(header, "GantryDetectorTilt", 0.0)),
        )
    )
    shared.CTTableDynamicsSequence = _seq(
        _item(TableSpeed=_ds(80.0), TableFeedPerRotation=_ds(40.0), SpiralPitchFactor=_ds(1.0))
    )
    shared.CTGeometrySequence = _seq(
        _item(
            DistanceSourceToDetector=_ds(_header_float(header, "DistanceSourceToDetector", 1040)),
            DistanceSourceToDataCollectionCenter=_ds(
                _header_float(header, "DistanceSourceToPatient", 570.0)
            ),
        )
    )
    kernel = str(header.get("ConvolutionKernel", "") or "STANDARD")
    shared.CTReconstructionSequence = _seq(
        _item(
            ReconstructionAlgorithm="FILTER_BACK_PROJ",
            ConvolutionKernel=kernel,
            ConvolutionKernelGroup="SOFT_TISSUE",
            ReconstructionDiameter=_ds(_header_float(header, "ReconstructionDiameter", fov)),
            ReconstructionAngle=_ds(360.0),
            ImageFilter="NONE",
            ReconstructionPixelSpacing=_ds_list(geometry.pixel_spacing),
        )
    )
    current = _header_float(header, "XRayTubeCurrent", 200.0)
    time_ms = _header_float(header, "ExposureTime", 500.0)
    exposure = _item(
        ExposureTimeInms=_ds(time_ms),
        XRayTubeCurrentInmA=_ds(current),
        ExposureInmAs=_ds(current * time_ms / 1000.0),
        ExposureModulationType="NONE",
    )
    if header.get("CTDIvol") not in (None, ""):
        # A dose is only meaningful with its phantom; an invented one would be worse than none.
        exposure.CTDIvol = _ds(float(header.CTDIvol))
        exposure.CTDIPhantomTypeCodeSequence = _seq(
            _code("113691", "DCM", "IEC Body Dosimetry Phantom")
        )
    shared.CTExposureSequence = _seq(exposure)
    shared.CTXRayDetailsSequence = _seq(
        _item(
            KVP=_ds(kvp),
            FilterType=str(header.get("FilterType", "") or "BODY"),
            FocalSpots=_ds_list([_header_float(header, "FocalSpots", 1.0)]),
            FilterMaterial="ALUMINUM",
        )
    )
    shared.IrradiationEventIdentificationSequence = _seq(_item(IrradiationEventUID=generate_uid()))
    if contrast is not None:
        shared.ContrastBolusUsageSequence = contrast[1]
    shared.FrameAnatomySequence = _seq(
        _item(AnatomicRegionSequence=_seq(_anatomy_code(header)), FrameLaterality="U")
    )
    ds.SharedFunctionalGroupsSequence = _seq(shared)

    per_frame: list[Dataset] = []
    for k in order:
        position = geometry.positions[k]
        centre = geometry.centre(k)
        frame = Dataset()
        frame.FrameContentSequence = _seq(
            _item(
                FrameAcquisitionNumber=1,
                FrameReferenceDateTime=acquisition_datetime,
                FrameAcquisitionDateTime=acquisition_datetime,
                FrameAcquisitionDuration=_ds(1.0),
                DimensionIndexValues=[k + 1],
            )
        )
        frame.PlanePositionSequence = _seq(_item(ImagePositionPatient=_ds_list(position)))
        frame.CTPositionSequence = _seq(
            _item(
                TablePosition=_ds(-float(position[2])),
                ReconstructionTargetCenterPatient=_ds_list(centre),
                DataCollectionCenterPatient=_ds_list(centre),
            )
        )
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)

    organization_uid = generate_uid()
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=organization_uid))
    ds.DimensionIndexSequence = _seq(
        _item(
            DimensionOrganizationUID=organization_uid,
            DimensionIndexPointer=pydicom.tag.Tag("ImagePositionPatient"),
            FunctionalGroupPointer=pydicom.tag.Tag("PlanePositionSequence"),
            DimensionDescriptionLabel="Image Position (Patient)",
        )
    )
    ds.DimensionOrganizationType = "3D"
    return ds
