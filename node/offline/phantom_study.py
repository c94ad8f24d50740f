"""Synthetic phantom studies as DICOM: what a CT scanner would send, with the truth beside it.

:mod:`model.phantom` makes the anatomy, the phases and the truth as numpy arrays; this module gives
them realistic DICOM clothes (:mod:`node.analysis.dicomio`) — patient and study attributes, one
series per phase with varied descriptions, contrast-bolus tags and acquisition times that order
the phases, a localizer — and writes a cohort: ``OUT/<study>/…`` plus ``labels.csv`` and
``truth.csv``. Truth masks go under ``OUT/masks/`` (never inside a study folder), and a manual
DICOM SEG of the truth goes into the study only when asked for.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_sr import codes
from model.cohort import CohortStudy, make_cohort
from model.domain import DomainKind
from model.phantom import PHANTOM_VERSION, PhantomSpec, PhantomStudy, make_study
from model.site import SITES, Site
from node import __version__
from node.offline.ct_writer import write_ct_series

#: UID root of the phantom generator ("2.25" = UUID-derived, no registered root needed).
#: Deterministic UIDs per seed keep labels.csv stable between runs.
_UID_PREFIX = "2.25."

SCANNER_MANUFACTURER = "MVI Phantom Works"
SCANNER_MODEL = "PhantomCT 64"

# What scanners and sites actually call these series; one is drawn per study.
DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "localizer": ("Topogram 0.6 T20f", "Scout", "SURVIEW", "Localizer"),
    "non_contrast": ("Non-contrast 2.5mm", "Abdomen plain", "NC Liver 2.5", "Native 2.0 Br40"),
    "arterial": ("Arterial phase 2.5mm", "LIVER ART 2.5", "AP 2.0 Br40", "Late arterial"),
    "portal_venous": ("Portal venous 2.5mm", "PVP 2.5", "Venous phase 2.0 Br40", "PV Liver"),
    "delayed": ("Delayed 3 min", "Equilibrium phase", "DP 2.5", "Delayed 180s"),
}
PROTOCOLS = ("Liver 4-phase", "ABD LIVER MULTIPHASE", "HCC protocol", "Leber 4-Phasen")
NON_LIVER_DESCRIPTIONS = ("Thorax plain 1.5", "CHEST W/O", "Head native 5mm")
GIVEN_NAMES = ("ALICE", "BERNARD", "CHEN", "DARIA", "EMEKA", "FATIMA", "GUSTAV", "HANA")
FAMILY_NAMES = ("PHANTOM", "TESTPATIENT", "SYNTHETIC", "DEMO")

#: Series numbers in the order a scanner would assign them.
SERIES_NUMBERS = {
    "localizer": 1,
    "non_contrast": 2,
    "arterial": 3,
    "portal_venous": 4,
    "delayed": 5,
}


@dataclass(frozen=True)
class CohortOptions:
    """What `mvi-node phantom` was asked for (see its ``--help``)."""

    studies: int = 1
    seed: int = 0
    size: int = 256
    slices: int = 64
    masks: bool = False
    seg: bool = False
    tumor: bool = True
    phases: tuple[str, ...] | None = None
    descriptions: bool = True
    dates: tuple[dt.date, dt.date] | None = None
    non_liver: bool = False
    enhanced: bool = False
    #: Appearance (:class:`model.domain.DomainKind`): standard, randomised or shifted.
    domain: str = "standard"
    #: Applied to each rendered study before it is written (benchmarks' shifted cohorts).
    transform: Callable[[PhantomStudy, int], PhantomStudy] | None = None
    #: Centres (the first ``sites`` of :data:`model.site.SITES`; 0: one site-less cohort).
    sites: int = 0
    #: Share of patients with a second study (:func:`model.cohort.make_cohort`).
    repeat_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.sites <= len(SITES):
            raise ValueError(f"sites must be in 0..{len(SITES)}, got {self.sites}")
        if not 0.0 <= self.repeat_share <= 1.0:
            raise ValueError(f"repeat_share must be in 0..1, got {self.repeat_share}")
        if (self.sites or self.repeat_share) and DomainKind(self.domain) is not DomainKind.STANDARD:
            raise ValueError("sites and repeat studies apply to the standard domain only")

    @property
    def multi_centre(self) -> bool:
        """Patients, centres and repeat studies (labels.csv then has patient_id and centre)."""
        return bool(self.sites or self.repeat_share)

    def spec(self) -> PhantomSpec:
        """The anatomy generator's parameters for one study."""
        spec = PhantomSpec(size=self.size, slices=self.slices, domain=DomainKind(self.domain))
        spec = replace(spec, tumor=self.tumor and not self.non_liver, non_liver=self.non_liver)
        if self.phases is not None and not self.non_liver:
            spec = replace(spec, phases=self.phases)
        return spec


@dataclass
class WrittenStudy:
    """One study written to disk: its identifiers, its files and its truth."""

    study_instance_uid: str
    folder: Path
    series_uids: dict[str, str]
    files: dict[str, list[Path]]
    phantom: PhantomStudy
    seg_path: Path | None = None
    mask_paths: dict[str, Path] = field(default_factory=dict)


def study_seed(cohort_seed: int, index: int) -> int:
    """Seed of study ``index`` of a cohort: independent streams, stable per (seed, index)."""
    return int(np.random.SeedSequence([cohort_seed, index]).generate_state(1)[0])


def patient_id(seed: int) -> str:
    """The PatientID of a phantom patient (also labels.csv's ``patient_id``)."""
    return f"PH{seed % 10**8:08d}"


@functools.lru_cache(maxsize=4)
def _cohort(seed: int, studies: int, sites: int, repeat_share: float) -> tuple[CohortStudy, ...]:
    # As many patients as studies, cut at ``studies``: the count asked for is the count written.
    chosen = SITES[:sites] if sites else (Site("site"),)
    cohort = make_cohort(seed, studies, sites=chosen, repeat_share=repeat_share)
    return tuple(cohort[:studies])


def cohort_study(options: CohortOptions, index: int) -> CohortStudy | None:
    """Study ``index`` of a multi-centre cohort (``None`` for a plain one)."""
    if not options.multi_centre:
        return None
    return _cohort(options.seed, options.studies, options.sites, options.repeat_share)[index]


def _uid(*parts: object) -> str:
    # A 2.25 UID is a 128-bit integer; hashing the parts makes it reproducible per seed
    # (pydicom's generate_uid ignores its entropy sources when the prefix is 2.25).
    text = "/".join([PHANTOM_VERSION, *map(str, parts)])
    return _UID_PREFIX + str(int(hashlib.sha256(text.encode()).hexdigest()[:32], 16))


def _pick(rng: np.random.Generator, choices: Sequence[str]) -> str:
    return choices[int(rng.integers(len(choices)))]


def _study_header(
    seed: int,
    index: int,
    rng: np.random.Generator,
    date: dt.date,
    patient: CohortStudy | None = None,
) -> Dataset:
    """Patient, study and equipment attributes shared by every series of one study."""
    header = Dataset()
    header.SpecificCharacterSet = "ISO_IR 192"
    # A repeat study's patient keeps name and ID: drawn from the patient's seed.
    who = rng if patient is None else np.random.default_rng([patient.patient, 2])
    header.PatientName = f"{_pick(who, FAMILY_NAMES)}^{_pick(who, GIVEN_NAMES)}^^^"
    header.PatientID = patient_id(seed if patient is None else patient.patient)
    birth_year = date.year - int(rng.integers(35, 80))
    header.PatientBirthDate = f"{birth_year:04d}{int(rng.integers(1, 13)):02d}15"
    header.PatientSex = "M" if rng.random() < 0.75 else "F"  # HCC is more common in men
    header.StudyInstanceUID = _uid("study", seed, index)
    header.StudyDate = date.strftime("%Y%m%d")
    header.StudyTime = f"{int(rng.integers(7, 18)):02d}{int(rng.integers(0, 60)):02d}00"
    header.AccessionNumber = f"ACC{seed % 10**9:09d}"
    header.ReferringPhysicianName = "REFERRER^DEMO"
    header.StudyID = f"{index + 1}"
    header.StudyDescription = "CT ABDOMEN LIVER MULTIPHASE"
    header.Manufacturer = SCANNER_MANUFACTURER
    header.ManufacturerModelName = SCANNER_MODEL
    header.DeviceSerialNumber = "PH-0001"
    header.SoftwareVersions = f"mvi-node {__version__} phantom {PHANTOM_VERSION}"
    header.InstitutionName = (
        "Phantom General Hospital" if patient is None else f"Phantom Hospital {patient.site.name}"
    )
    header.StationName = "CT01"
    header.BodyPartExamined = "ABDOMEN"
    header.PatientPosition = "FFS"
    header.FrameOfReferenceUID = _uid("for", seed, index)
    header.PositionReferenceIndicator = ""
    header.KVP = 120
    return header


def _time_after(hhmmss: str, seconds: float) -> str:
    base = dt.datetime.strptime(hhmmss[:6], "%H%M%S")
    return (base + dt.timedelta(seconds=seconds)).strftime("%H%M%S.%f")[:13]


def _series_header(
    study: Dataset,
    phase: str,
    *,
    seed: int,
    index: int,
    rng: np.random.Generator,
    delay_s: float,
    options: CohortOptions,
) -> Dataset:
    header = Dataset()
    header.update(study)
    header.SeriesInstanceUID = _uid("series", phase, seed, index)
    header.SeriesNumber = SERIES_NUMBERS[phase]
    header.Modality = "CT"
    header.SeriesDate = study.StudyDate
    if options.non_liver:
        description = _pick(rng, NON_LIVER_DESCRIPTIONS)
        header.BodyPartExamined = "CHEST" if "ead" not in description else "HEAD"
        header.StudyDescription = f"CT {header.BodyPartExamined}"
        protocol = description.split()[0]
    else:
        description = _pick(rng, DESCRIPTIONS[phase])
        protocol = _pick(rng, PROTOCOLS)
    header.SeriesDescription = description if options.descriptions else ""
    header.ProtocolName = protocol if options.descriptions else ""
    # The bolus is injected two minutes after the study starts; the non-contrast and localizer
    # acquisitions come before it, so acquisition times order the phases even without names.
    injection = _time_after(study.StudyTime, 120)
    acquired = _time_after(injection, delay_s)
    header.SeriesTime = acquired
    header.AcquisitionDate = study.StudyDate
    header.AcquisitionTime = acquired
    header.ContentDate = study.StudyDate
    header.ContentTime = acquired
    if phase not in {"localizer", "non_contrast"} and not options.non_liver:
        header.ContrastBolusAgent = "Iohexol 350 mgI/ml"
        header.ContrastBolusRoute = "IV"
        header.ContrastBolusVolume = 100
        header.ContrastBolusStartTime = injection
        header.ContrastBolusIngredient = "IODINE"
    if phase == "localizer":
        header.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return header


def _pixel_storage(rng: np.random.Generator) -> tuple[int, float]:
    # Scanners differ: unsigned with intercept -1024, signed with -1024, signed with 0.
    options = ((0, -1024.0), (1, -1024.0), (1, 0.0))
    return options[int(rng.integers(len(options)))]


def write_study(
    folder: Path, index: int, options: CohortOptions, masks_dir: Path | None = None
) -> WrittenStudy:
    """Generate study ``index`` of a cohort and write it under ``folder``.

    Parameters
    ----------
    folder
        The study's folder (created); one sub-folder per series.
    index
        Position in the cohort; with ``options.seed`` it fixes the study entirely.
    options
        Cohort options.
    masks_dir
        When given, the truth masks are written there as NRRD files in patient space.
    """
    member = cohort_study(options, index)
    if member is None:
        seed = study_seed(options.seed, index)
        phantom = make_study(seed, options.spec())
    else:
        seed = member.seed
        spec = options.spec() if options.sites == 0 else member.spec(options.spec())
        phantom = make_study(seed, spec, patient=member.patient)
    if options.transform is not None:
        phantom = options.transform(phantom, index)
    rng = np.random.default_rng([seed, 1])  # identifiers and tags: separate from the anatomy
    date = _study_date(options, index, rng)
    study = _study_header(seed, index, rng, date, member)
    written = WrittenStudy(
        study_instance_uid=str(study.StudyInstanceUID),
        folder=folder,
        series_uids={},
        files={},
        phantom=phantom,
    )
    signed, intercept = _pixel_storage(rng)

    first = next(iter(phantom.phases.values()))
    header = _series_header(
        study,
        "localizer",
        seed=seed,
        index=index,
        rng=rng,
        delay_s=first.delay_s - 90.0,
        options=options,
    )
    written.series_uids["localizer"] = str(header.SeriesInstanceUID)
    written.files["localizer"] = _write_localizer(phantom, folder / "SE0001", header)

    for phase, volume in phantom.phases.items():
        header = _series_header(
            study, phase, seed=seed, index=index, rng=rng, delay_s=volume.delay_s, options=options
        )
        written.series_uids[phase] = str(header.SeriesInstanceUID)
        written.files[phase] = write_ct_series(
            volume.hu,
            folder / f"SE{SERIES_NUMBERS[phase]:04d}",
            header,
            spacing_mm=phantom.spacing_mm,
            origin_mm=phantom.origin_mm,
            # A randomised or shifted study's slices are thicker than their spacing.
            slice_thickness_mm=None
            if phantom.domain is None
            else phantom.domain.slice_thickness_mm,
            enhanced=options.enhanced,
            pixel_representation=signed,
            rescale_intercept=intercept,
            descending=bool(rng.random() < 0.4),
        )
    if options.seg and "arterial" in written.files:
        written.seg_path = _write_truth_seg(written, folder / "SE0100")
    if masks_dir is not None:
        written.mask_paths = write_masks(phantom, masks_dir / folder.name)
    return written


def _study_date(options: CohortOptions, index: int, rng: np.random.Generator) -> dt.date:
    if options.dates is None:
        return dt.date(2024, 3, 1) + dt.timedelta(days=index)
    start, end = options.dates
    span = (end - start).days
    return start + dt.timedelta(days=int(rng.integers(0, span + 1)))


def _write_localizer(phantom: PhantomStudy, folder: Path, header: Dataset) -> list[Path]:
    from model.phantom import localizer

    image, (row_spacing, column_spacing) = localizer(phantom)
    sx, _, sz = phantom.spacing_mm
    ox, _, oz = phantom.origin_mm
    # The rendered slice count: a randomised study draws its own.
    top = oz + (image.shape[0] - 1) * sz
    # A coronal image: rows run from head to feet (-z), columns to the patient's left (+x).
    direction = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)
    return write_ct_series(
        image[np.newaxis].astype(np.float32),
        folder,
        header,
        spacing_mm=(column_spacing, row_spacing, 1.0),
        origin_mm=(ox, 0.0, top),
        direction=direction,
        slice_thickness_mm=sx,
        window=(300.0, 1500.0),
        filename_prefix="LOC",
    )


def write_masks(phantom: PhantomStudy, folder: Path) -> dict[str, Path]:
    """Write the truth masks (arterial grid, LPS geometry) as compressed NRRD files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, mask in phantom.masks.items():
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetSpacing(phantom.spacing_mm)
        image.SetOrigin(phantom.origin_mm)
        path = folder / f"{name}.nrrd"
        sitk.WriteImage(image, str(path), useCompression=True)
        paths[name] = path
    return paths


def _write_truth_seg(written: WrittenStudy, folder: Path) -> Path:
    """A manual-style SEG of the truth on the arterial series, as a radiologist's tool writes it."""
    sources = [pydicom.dcmread(p) for p in written.files["arterial"]]
    phantom = written.phantom
    # highdicom pairs pixel_array[i] with source image (or frame) i and does not sort, so take
    # each mask slice by the z position of the image it goes with.
    if len(sources) == 1:
        positions = [
            float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
            for frame in sources[0].PerFrameFunctionalGroupsSequence
        ]
    else:
        sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        positions = [float(ds.ImagePositionPatient[2]) for ds in sources]
    z0, dz = phantom.origin_mm[2], phantom.spacing_mm[2]
    order = [round((z - z0) / dz) for z in positions]
    pixel_array = np.stack(
        [phantom.masks[name][order] for name in ("tumor", "loat", "liver")], axis=-1
    ).astype(bool)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="Liver tumor",
            segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            segmented_property_type=codes.NEOPLASM,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            tracking_uid=_uid("seg-tumor", written.study_instance_uid),
            tracking_id="Liver tumor",
            anatomic_regions=[codes.LIVER],
        ),
        hd.seg.SegmentDescription(
            segment_number=2,
            segment_label="Lesser omental fat",
            segmented_property_category=codes.TISSUE,
            segmented_property_type=codes.ADIPOSE_TISSUE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            tracking_uid=_uid("seg-loat", written.study_instance_uid),
            tracking_id="Lesser omental adipose tissue",
            anatomic_regions=[codes.OMENTUM],
        ),
        hd.seg.SegmentDescription(
            segment_number=3,
            segment_label="Liver",
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=codes.LIVER,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            tracking_uid=_uid("seg-liver", written.study_instance_uid),
            tracking_id="Liver",
        ),
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid("seg-series", written.study_instance_uid),
        series_number=100,
        sop_instance_uid=_uid("seg-instance", written.study_instance_uid),
        instance_number=1,
        manufacturer="Phantom Reader Workstation",
        manufacturer_model_name="Manual contouring",
        software_versions=f"phantom {PHANTOM_VERSION}",
        device_serial_number="PRW-01",
        content_label="TRUTH",
        content_description="Manual segmentation of the phantom truth",
        content_creator_name="READER^PHANTOM",
        series_description="Manual segmentation",
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "SEG00001.dcm"
    seg.save_as(path)
    return path


TRUTH_COLUMNS = (
    "study_instance_uid",
    "study_folder",
    "seed",
    "mvi",
    "localizer_series_uid",
    "non_contrast_series_uid",
    "arterial_series_uid",
    "portal_venous_series_uid",
    "delayed_series_uid",
    "max_diameter_mm",
    "tumor_volume_ml",
    "loat_max_area_cm2",
    "loat_volume_ml",
    "pv_shift_x_mm",
    "pv_shift_y_mm",
    "pv_shift_z_mm",
    "phantom_version",
)


def truth_row(written: WrittenStudy, seed: int) -> dict[str, str]:
    """One row of ``truth.csv`` for a written study."""
    truth = written.phantom.truth
    pv = written.phantom.phases.get("portal_venous")
    shift = pv.shift_mm if pv is not None else ("", "", "")
    row = {
        "study_instance_uid": written.study_instance_uid,
        "study_folder": written.folder.name,
        "seed": str(seed),
        "mvi": "" if truth.mvi is None else str(truth.mvi),
        "max_diameter_mm": f"{truth.max_diameter_mm:.2f}",
        "tumor_volume_ml": f"{truth.tumor_volume_ml:.3f}",
        "loat_max_area_cm2": f"{truth.loat_max_area_cm2:.3f}",
        "loat_volume_ml": f"{truth.loat_volume_ml:.3f}",
        "pv_shift_x_mm": _fmt(shift[0]),
        "pv_shift_y_mm": _fmt(shift[1]),
        "pv_shift_z_mm": _fmt(shift[2]),
        "phantom_version": PHANTOM_VERSION,
    }
    for phase in SERIES_NUMBERS:
        row[f"{phase}_series_uid"] = written.series_uids.get(phase, "")
    return row


def _fmt(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.2f}"


def write_cohort(
    out: Path,
    options: CohortOptions,
    on_study: Callable[[WrittenStudy], None] | None = None,
) -> list[WrittenStudy]:
    """Write ``options.studies`` phantom studies under ``out``, with labels.csv and truth.csv.

    Parameters
    ----------
    out
        Output folder; it must be empty or not exist (the caller checks, so that ``--force`` is a
        command-line decision).
    options
        Cohort options.
    on_study
        Called after each study is written (progress bars).
    """
    out.mkdir(parents=True, exist_ok=True)
    masks_dir = out / "masks" if options.masks else None
    written_all: list[WrittenStudy] = []
    truth_rows: list[dict[str, str]] = []
    groups: list[list[str]] = []  # patient_id, centre of a multi-centre cohort's studies
    for index in range(options.studies):
        written = write_study(out / f"study_{index + 1:04d}", index, options, masks_dir)
        written_all.append(written)
        member = cohort_study(options, index)
        seed = study_seed(options.seed, index) if member is None else member.seed
        truth_rows.append(truth_row(written, seed))
        if member is not None:
            groups.append([patient_id(member.patient), member.site.name if options.sites else ""])
        if on_study is not None:
            on_study(written)
    with (out / "truth.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TRUTH_COLUMNS)
        writer.writeheader()
        writer.writerows(truth_rows)
    with (out / "labels.csv").open("w", newline="") as handle:
        labels = csv.writer(handle)
        extra = ["patient_id", "centre"] if options.multi_centre else []
        labels.writerow(["study_instance_uid", "mvi", *extra])
        for number, row in enumerate(truth_rows):
            if row["mvi"] != "":
                grouping = groups[number] if extra else []
                labels.writerow([row["study_instance_uid"], row["mvi"], *grouping])
    return written_all
