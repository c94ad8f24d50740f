"""What the SEG, the SR and the Secondary Capture share.

The algorithm and the node that ran it (:class:`AlgorithmInfo`), the numbers of one analysis
(:class:`AnalysisResult`, mirroring ``result.json``), the identifiers of the objects one analysis
writes (:class:`ResultUIDs`, :func:`allocate_uids`), patient and study attributes copied from the
source images, the Contributing Equipment item and the algorithm identification the IHE AI
Results profile asks for, and the order of the arterial slices (:func:`slice_references`).

Nothing here imports :mod:`node` or reads settings: the caller passes the node's manufacturer,
model name and versions.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from dicom_sr import codes
from dicom_sr.enum import RiskCategory, Status

__all__ = [
    "DEMO_DISCLAIMER",
    "PATIENT_STUDY_KEYWORDS",
    "SC_SERIES_NUMBER",
    "SEG_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "AlgorithmInfo",
    "AnalysisResult",
    "ResultUIDs",
    "SliceReference",
    "add_coding_schemes",
    "algorithm_identification",
    "allocate_uids",
    "content_date_time",
    "contributing_equipment",
    "copy_patient_study",
    "device_observer",
    "series_description",
    "set_equipment",
    "slice_references",
]

#: What every output of a model trained on phantoms says.
DEMO_DISCLAIMER = "demo model — not for clinical use"

SEGMENTATION_SOURCES = ("unet", "supplied")

SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
SC_SERIES_NUMBER = 9003

#: Patient, General Study and Patient Study attributes copied from the source images when present.
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyDescription",
)

_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class AlgorithmInfo:
    """The AI model and the node that ran it, as written into every output.

    Attributes
    ----------
    name, version
        The MVI model's name and version (model card): algorithm identification.
    manufacturer, model_name
        The node's Manufacturer and ManufacturerModelName; the receiver recognises its own outputs
        by exactly these.
    software_version
        The node's software version (SoftwareVersions).
    demo
        Whether the model was trained on phantoms; outputs then say :data:`DEMO_DISCLAIMER`.
    disclaimer
        A site's disclaimer text (may be empty).
    device_serial_number
        The node's DeviceSerialNumber; empty means ``model_name`` (Type 1 in the SEG).
    """

    name: str
    version: str
    manufacturer: str
    model_name: str
    software_version: str
    demo: bool
    disclaimer: str = ""
    device_serial_number: str = ""

    def __post_init__(self) -> None:
        for attribute in ("name", "version", "manufacturer", "model_name", "software_version"):
            value = getattr(self, attribute)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"AlgorithmInfo.{attribute} must be a non-empty string")
            if len(value) > 64:
                raise ValueError(
                    f"AlgorithmInfo.{attribute} must be at most 64 characters (DICOM LO), "
                    f"got {len(value)}"
                )

    @property
    def serial_number(self) -> str:
        """DeviceSerialNumber written to the objects."""
        return self.device_serial_number or self.model_name

    @property
    def effective_disclaimer(self) -> str:
        """The demo disclaimer (when ``demo``) followed by the site's disclaimer, or ``""``."""
        parts = [DEMO_DISCLAIMER] if self.demo else []
        if self.disclaimer.strip() and self.disclaimer.strip() not in parts:
            parts.append(self.disclaimer.strip())
        return "; ".join(parts)

    @property
    def device_uid(self) -> str:
        """A UID of the node as an observer device, stable for a manufacturer/model/serial."""
        name = f"{self.manufacturer}|{self.model_name}|{self.serial_number}"
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"

    @property
    def label(self) -> str:
        """``"NAME VERSION"`` of the model."""
        return f"{self.name} {self.version}"


_Point = tuple[float, float]


def _check_probability(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_non_negative(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


@dataclass(frozen=True)
class AnalysisResult:
    """The numbers of one analysis, as in ``result.json`` plus where they were measured.

    Attributes
    ----------
    status
        A :class:`dicom_sr.enum.Status` (or its string). Only ``"scored"`` results carry
        measurement groups.
    reason
        Why a result is not scored (shown to the reading room), or ``None``.
    mvi_probability, combined_probability
        Calibrated deep-learning probability and the logistic (combined) model's probability.
    risk_category
        A :class:`dicom_sr.enum.RiskCategory` (``"high"``, ``"low"``) or ``None``.
    threshold
        The probability at which the risk becomes high.
    max_diameter_mm, tumor_volume_ml, tumor_count
        Tumor measurements (:class:`model.measure.Measurements`).
    loat_found, loat_max_area_cm2, loat_volume_ml
        Lesser omental adipose tissue measurements.
    diameter_slice
        ``k`` of the slice of the maximum diameter (the key slice), -1 when unknown.
    diameter_endpoints
        ``(i, j)`` continuous indices of the diameter's two ends on that slice.
    loat_area_slice
        ``k`` of the slice of the largest LOAT area, -1 when unknown.
    segmentation_source
        ``"unet"`` (automatic) or ``"supplied"`` (a SEG found in the study).
    segmentation_algorithm
        What made the masks, named as the measurements' algorithm: the segmenter's name and
        version (``"mvi-seg-unet 3"``) or ``"manual SEG <series>"``; ``""`` when unknown.
    checks
        One line per quality gate of the analysis, passed or not, with its figures
        (``"registration: passed (metric -0.71, body overlap 0.98)"``); the SR and SC show them.
    notes
        Further lines the reader must see, e.g. ``"Supplied segmentation not used: series 7
        (LIVER SEG): no LOAT segment"``.
    """

    status: Status | str
    reason: str | None = None
    mvi_probability: float | None = None
    combined_probability: float | None = None
    risk_category: RiskCategory | str | None = None
    threshold: float | None = None
    max_diameter_mm: float | None = None
    tumor_volume_ml: float | None = None
    tumor_count: int = 0
    loat_found: bool = False
    loat_max_area_cm2: float | None = None
    loat_volume_ml: float | None = None
    diameter_slice: int = -1
    diameter_endpoints: tuple[_Point, _Point] | None = None
    loat_area_slice: int = -1
    segmentation_source: str = "unet"
    segmentation_algorithm: str = ""
    checks: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        statuses = tuple(Status)
        if self.status not in statuses:
            raise ValueError(
                f"status must be one of {tuple(map(str, statuses))}, got {self.status!r}"
            )
        if self.risk_category is not None and self.risk_category not in tuple(RiskCategory):
            raise ValueError(
                f"risk_category must be 'high', 'low' or None, got {self.risk_category!r}"
            )
        if self.segmentation_source not in SEGMENTATION_SOURCES:
            raise ValueError(
                f"segmentation_source must be one of {SEGMENTATION_SOURCES}, "
                f"got {self.segmentation_source!r}"
            )
        for name in ("mvi_probability", "combined_probability", "threshold"):
            _check_probability(name, getattr(self, name))
        for name in ("max_diameter_mm", "tumor_volume_ml", "loat_max_area_cm2", "loat_volume_ml"):
            _check_non_negative(name, getattr(self, name))
        if self.tumor_count < 0:
            raise ValueError(f"tumor_count must be >= 0, got {self.tumor_count}")
        if self.status == Status.SCORED:
            missing = [
                name
                for name in ("mvi_probability", "risk_category", "max_diameter_mm")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"a scored result needs {', '.join(missing)}")
            if self.diameter_slice < 0:
                raise ValueError("a scored result needs diameter_slice (the key slice) >= 0")
        elif self.reason is None or not self.reason.strip():
            raise ValueError(f"a {self.status!r} result needs a reason")

    @property
    def scored(self) -> bool:
        """Whether the result carries measurements."""
        return self.status == Status.SCORED

    @property
    def status_text(self) -> str:
        """One line a radiologist reads: what happened."""
        return {
            Status.SCORED: "MVI scored",
            Status.NO_TUMOR: "No liver tumor found — MVI not scored",
            Status.NOT_APPLICABLE: "Study not applicable — MVI not scored",
            Status.NEEDS_REVIEW: "Needs review — MVI not scored",
            Status.FAILED: "Analysis failed — MVI not scored",
        }[Status(self.status)]


@dataclass(frozen=True)
class ResultUIDs:
    """Series/instance UIDs, series numbers and tracking UIDs of one analysis's objects.

    Keep it with the analysis (outbox): a resend after a crash must reuse the same UIDs.
    ``predecessor_sr`` is a reference (Study/Series/SOP Class/SOP Instance UID) to the SR a
    superseding analysis replaces; :func:`dicom_sr.sr.build_sr` names it in the Predecessor
    Documents Sequence. ``analysis_time`` (UTC) is when the analysis ran: the objects' content
    date/time and their series description carry it, so a re-analysis can be told apart.
    """

    seg_series_uid: str
    seg_instance_uid: str
    sr_series_uid: str
    sr_instance_uid: str
    sc_series_uid: str
    sc_instance_uid: str
    tumor_tracking_uid: str
    loat_tracking_uid: str
    key_slice_tracking_uid: str
    seg_series_number: int = SEG_SERIES_NUMBER
    sr_series_number: int = SR_SERIES_NUMBER
    sc_series_number: int = SC_SERIES_NUMBER
    predecessor_sr: Dataset | None = field(default=None, compare=False)
    analysis_time: datetime = field(default_factory=lambda: datetime.now(UTC), compare=False)


def allocate_uids(
    *,
    series_numbers: tuple[int, int, int] = (SEG_SERIES_NUMBER, SR_SERIES_NUMBER, SC_SERIES_NUMBER),
    predecessor_sr: Dataset | None = None,
) -> ResultUIDs:
    """New UIDs for one analysis (every analysis gets new series and instances).

    Parameters
    ----------
    series_numbers
        ``(SEG, SR, SC)`` series numbers.
    predecessor_sr
        The SR this analysis supersedes (or a dataset with its StudyInstanceUID,
        SeriesInstanceUID, SOPClassUID and SOPInstanceUID).

    Returns
    -------
    ResultUIDs
        Fresh ``2.25`` UIDs.

    Raises
    ------
    ValueError
        For series numbers that are not distinct positive integers, or a predecessor that lacks
        its UIDs.
    """
    if len(set(series_numbers)) != 3 or min(series_numbers) < 1:
        raise ValueError(f"series_numbers must be 3 distinct positive integers: {series_numbers}")
    reference = None
    if predecessor_sr is not None:
        reference = Dataset()
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
            value = predecessor_sr.get(keyword)
            if not value:
                raise ValueError(f"predecessor_sr lacks {keyword}")
            setattr(reference, keyword, value)
    seg, sr, sc = series_numbers
    return ResultUIDs(
        seg_series_uid=hd.UID(),
        seg_instance_uid=hd.UID(),
        sr_series_uid=hd.UID(),
        sr_instance_uid=hd.UID(),
        sc_series_uid=hd.UID(),
        sc_instance_uid=hd.UID(),
        tumor_tracking_uid=hd.UID(),
        loat_tracking_uid=hd.UID(),
        key_slice_tracking_uid=hd.UID(),
        seg_series_number=seg,
        sr_series_number=sr,
        sc_series_number=sc,
        predecessor_sr=reference,
    )


def copy_patient_study(target: Dataset, source: Dataset) -> None:
    """Copy :data:`PATIENT_STUDY_KEYWORDS` present in ``source`` into ``target``."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = source[keyword]


def contributing_equipment(algorithm: AlgorithmInfo) -> Any:
    """The Contributing Equipment item of the algorithm (IHE AIR "Processing Algorithm").

    Manufacturer is the node's; Manufacturer's Model Name and Software Versions identify the MVI
    model; the description names the node software that ran it.

    Returns
    -------
    highdicom.ContributingEquipment
    """
    # highdicom accepts only CID 7005 codes: build with "Processing Equipment" and put the IHE
    # AIR code in its place.
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.serial_number,
        contribution_description=(
            f"MVI scoring by {algorithm.model_name} {algorithm.software_version}"
        )[:64],
    )
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(codes.PROCESSING_ALGORITHM)]
    return item


def algorithm_identification(algorithm: AlgorithmInfo) -> Any:
    """Algorithm Identification Sequence of the model (family Artificial Intelligence).

    Returns
    -------
    highdicom.AlgorithmIdentificationSequence
    """
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=algorithm.version,
        source=algorithm.manufacturer,
    )


@dataclass(frozen=True)
class SliceReference:
    """One slice ``k`` of the arterial grid: the image (and frame) it comes from.

    Attributes
    ----------
    dataset
        The source image dataset (a classic CT image, or the Enhanced CT multi-frame object).
    frame_number
        1-based frame number in an Enhanced CT object, ``None`` for a single-frame image.
    """

    dataset: Dataset
    frame_number: int | None

    @property
    def sop_class_uid(self) -> str:
        """Referenced SOP Class UID."""
        return str(self.dataset.SOPClassUID)

    @property
    def sop_instance_uid(self) -> str:
        """Referenced SOP Instance UID."""
        return str(self.dataset.SOPInstanceUID)


def _normal(orientation: Sequence[Any]) -> np.ndarray:
    row = np.asarray([float(v) for v in orientation[:3]])
    column = np.asarray([float(v) for v in orientation[3:6]])
    return np.cross(row, column)


def _source_check(source_images: Sequence[Dataset]) -> None:
    if len(source_images) == 0:
        raise ValueError("source_images is empty")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in source_images}
    if len(series) != 1:
        raise ValueError(f"source_images must come from one series, got {len(series)}")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in source_images}
    if len(studies) != 1 or "" in studies:
        raise ValueError("source_images must share one StudyInstanceUID")
    for ds in source_images:
        # Rows and Columns (Type 1 in the Image Pixel module), not PixelData: the images are read
        # without their pixels (stop_before_pixels), which no output needs.
        if "Rows" not in ds or "Columns" not in ds:
            raise ValueError(f"source image {ds.get('SOPInstanceUID')} is not an image")


def slice_references(source_images: Sequence[Dataset]) -> list[SliceReference]:
    """The source image (and frame) of each slice ``k`` of the arterial grid.

    ``k`` ascends along the slice normal (row direction × column direction), which is how
    :func:`node.analysis.dicomio.load_series` orders the volume the masks were made on
    (k ascending = z ascending for axial images).

    Parameters
    ----------
    source_images
        Classic single-frame CT images of one series (any order), or exactly one Enhanced CT
        multi-frame image; their headers are enough.

    Returns
    -------
    list of SliceReference
        Index ``k`` is slice ``k``.

    Raises
    ------
    ValueError
        For an empty list, several series, datasets that are not images, mixed
        single/multi-frame images or images without position and orientation.
    """
    _source_check(source_images)
    if len(source_images) == 1 and int(source_images[0].get("NumberOfFrames", 1)) > 1:
        return _frame_references(source_images[0])
    if any(int(ds.get("NumberOfFrames", 1)) > 1 for ds in source_images):
        raise ValueError("give either single-frame images or exactly one multi-frame image")
    try:
        normal = _normal(source_images[0].ImageOrientationPatient)
        keys = [
            float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
            for ds in source_images
        ]
    except AttributeError as error:
        raise ValueError(f"a source image lacks its geometry: {error}") from error
    order = np.argsort(keys, kind="stable")
    return [SliceReference(source_images[int(i)], None) for i in order]


def _frame_references(image: Dataset) -> list[SliceReference]:
    try:
        shared = image.SharedFunctionalGroupsSequence[0]
        frames = image.PerFrameFunctionalGroupsSequence
        orientation = (
            shared.PlaneOrientationSequence[0].ImageOrientationPatient
            if "PlaneOrientationSequence" in shared
            else frames[0].PlaneOrientationSequence[0].ImageOrientationPatient
        )
        normal = _normal(orientation)
        keys = [
            float(
                np.dot(
                    normal,
                    [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                )
            )
            for frame in frames
        ]
    except (AttributeError, IndexError) as error:
        raise ValueError(f"the multi-frame image lacks its plane geometry: {error}") from error
    order = np.argsort(keys, kind="stable")
    return [SliceReference(image, int(i) + 1) for i in order]


def _utc(when: datetime, name: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got a naive datetime")
    return when.astimezone(UTC)


def device_observer(algorithm: AlgorithmInfo) -> hd.sr.ObserverContext:
    """The node as the device observer of an SR or a key object selection."""
    return hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.model_name,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.model_name,
            serial_number=algorithm.serial_number,
        ),
    )


def series_description(kind: str, algorithm: AlgorithmInfo, analysis_time: datetime) -> str:
    """SeriesDescription of an output series, which tells re-analyses apart.

    ``"MVI AI <kind> v<model version> <YYYY-MM-DD HH:MM>Z"``, then ``" [DEMO]"`` for demo models:
    the PACS lists several analyses of one study side by side, and only the version and the time
    say which is which. At most 64 characters (LO): a long kind or version is cut, never the
    time or the demo mark.

    Parameters
    ----------
    kind
        What the series is (``"report"``, ``"segmentation"``, ``"summary"``, ``"rejection note"``).
    algorithm
        The model (its version) and whether it is a demo model.
    analysis_time
        When the analysis ran (:attr:`ResultUIDs.analysis_time`), timezone-aware; written in UTC.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        For a naive ``analysis_time``.
    """
    version = algorithm.version
    # "v1.2", not "vv1.2", for versions that already say so.
    if version[:1] in "vV" and version[1:2].isdigit():
        version = version[1:]
    tail = f" {_utc(analysis_time, 'analysis_time'):%Y-%m-%d %H:%M}Z"
    if algorithm.demo:
        tail += " [DEMO]"
    head = f"MVI AI {kind} v{version}"[: 64 - len(tail)].rstrip()
    return head + tail


def content_date_time(analysis_time: datetime, source: Dataset | None = None) -> tuple[date, time]:
    """ContentDate and ContentTime of the objects of an analysis that ran at ``analysis_time``.

    DICOM dates and times are local unless the instance says its TimezoneOffsetFromUTC. The
    outputs copy the source's study date and time but not its offset, so the content time is
    given in the source's offset when it declares one, else in the node's local time (as
    highdicom writes InstanceCreationTime).

    Parameters
    ----------
    analysis_time
        Timezone-aware time of the analysis (:attr:`ResultUIDs.analysis_time`).
    source
        An instance of the study (its TimezoneOffsetFromUTC, ``"+HHMM"``/``"-HHMM"``, if any).

    Returns
    -------
    tuple of datetime.date and datetime.time
        Without timezone, seconds resolution.

    Raises
    ------
    ValueError
        For a naive ``analysis_time``.
    """
    when = _utc(analysis_time, "analysis_time")
    offset = str(source.get("TimezoneOffsetFromUTC", "") or "") if source is not None else ""
    if len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        minutes = int(offset[1:3]) * 60 + int(offset[3:5])
        zone = timezone(timedelta(minutes=minutes if offset[0] == "+" else -minutes))
        local = when.astimezone(zone)
    else:
        local = when.astimezone()
    local = local.replace(microsecond=0)
    return local.date(), local.time().replace(tzinfo=None)


def set_equipment(target: Dataset, algorithm: AlgorithmInfo) -> None:
    """Write the node's General Equipment attributes into ``target``."""
    target.Manufacturer = algorithm.manufacturer
    target.ManufacturerModelName = algorithm.model_name
    target.SoftwareVersions = algorithm.software_version
    target.DeviceSerialNumber = algorithm.serial_number


def add_coding_schemes(target: Dataset, *, private_codes: bool = False) -> None:
    """Describe the private coding schemes an object uses (Coding Scheme Identification).

    ``99IHE`` (Contributing Equipment) always; ``99MVINODE`` when ``private_codes`` (the SR).
    """
    schemes = (
        (
            codes.PRIVATE_SCHEME_DESIGNATOR,
            codes.PRIVATE_SCHEME_NAME,
            codes.PRIVATE_SCHEME_ORGANIZATION,
        ),
        ("99IHE", "IHE placeholder codes (AI Results profile)", "IHE International"),
    )
    items = []
    for designator, name, organization in schemes:
        if designator == codes.PRIVATE_SCHEME_DESIGNATOR and not private_codes:
            continue
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = organization
        items.append(item)
    target.CodingSchemeIdentificationSequence = items
