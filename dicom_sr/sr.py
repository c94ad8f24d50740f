"""The node's TID 1500 Measurement Report.

Content of a scored result::

    Imaging Measurement Report (DCM 126000, TID 1500)
      language, observation context (the node as DEVICE observer), procedure reported (LN 25045-6)
      Image Library: the arterial source images
      Imaging Measurements
        Liver tumor (volumetric, SEG segment 1): maximum diameter mm, volume ml, number of tumor
            components (an integer), MVI probability (deep learning) %, MVI probability
            (combined model) %, high-risk threshold %, Lesion Risk = High risk | Low risk
        Lesser omental adipose tissue (volumetric, SEG segment 2): maximum area cm2, volume ml
        Liver tumor, key slice (planar, closed POLYLINE on the diameter slice): the tumor's numbers
            again, so that viewers that only draw SCOORD groups (OHIF) show them
      Qualitative Evaluations: Analysis note = each of the result's notes, Quality check = each
          of its checks, Comment = model name, version, disclaimer, segmentation source

Algorithm identification (TID 4019): each tumor group names the MVI model (it made the risk);
each NUM names its own algorithm, sizes and counts the segmentation
(``AnalysisResult.segmentation_algorithm``) and probabilities the MVI model; the LOAT group names
the segmentation.

A result that is not scored (no tumor, needs review, failed, not applicable) has no Imaging
Measurements: its Qualitative Evaluations container (TID 1500 row 10, which satisfies the
template's "at least one of" condition on its own) says the status and the reason in text, then
the notes and checks. It lists the images of whatever series the caller gives (the arterial one,
or e.g. the portal-venous one of a study without arterial series), or none: a study-level report
with an empty Image Library whose evidence is one instance of the study.

Codes of the private scheme ``99MVINODE`` (see :mod:`dicom_sr.codes`)::

    MVIPROBDL    Probability of microvascular invasion (deep learning)      NUM, %
    MVIPROBCOMB  Probability of microvascular invasion (combined model)     NUM, %
    MVITHRESH    High-risk threshold of microvascular invasion probability  NUM, %
    NTUMORS      Number of tumor components                                 NUM, {lesions}
    MVISTATUS    MVI analysis status                                        TEXT
    MVIREASON    Reason MVI was not scored                                  TEXT
    MVINOTE      Analysis note                                              TEXT
    MVIQC        Quality check                                              TEXT

Probabilities are written in percent (UCUM ``%``), so a viewer's label reads "Probability of
microvascular invasion (deep learning): 83 %".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.valuerep import DS

from dicom_sr import codes
from dicom_sr.common import (
    AlgorithmInfo,
    AnalysisResult,
    ResultUIDs,
    SliceReference,
    add_coding_schemes,
    content_date_time,
    contributing_equipment,
    copy_patient_study,
    device_observer,
    series_description,
    set_equipment,
    slice_references,
)
from dicom_sr.enum import RiskCategory
from dicom_sr.seg import LOAT_LABEL, LOAT_SEGMENT, TUMOR_LABEL, TUMOR_SEGMENT

__all__ = ["SOP_CLASSES", "ImageLibrary", "build_sr", "image_library", "tumor_outline"]

#: ``sop_class`` argument → SOP Class UID.
SOP_CLASSES = {
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
}


def _num(
    name: Any, value: float, unit: Any, derivation: Any = None, algorithm_id: Any = None
) -> Any:
    return hd.sr.Measurement(
        name=name, value=float(value), unit=unit, derivation=derivation, algorithm_id=algorithm_id
    )


def _count(name: Any, count: int, unit: Any, algorithm_id: Any = None) -> Any:
    """A NUM item whose value is written as an integer ("3", not highdicom's "3.0")."""
    measurement = hd.sr.Measurement(
        name=name, value=int(count), unit=unit, algorithm_id=algorithm_id
    )
    # highdicom formats every value as a float DS; a count is an integer string (no
    # FloatingPointValue is written for an int).
    measurement[0].MeasuredValueSequence[0].NumericValue = DS(str(int(count)))
    return measurement


def _percent(probability: float) -> float:
    return round(100.0 * probability, 1)


def _tumor_measurements(
    result: AnalysisResult, *, volumetric: bool, segmentation_id: Any, classifier_id: Any
) -> list[Any]:
    """The tumor's numbers: sizes name the segmentation, probabilities the classifier."""
    assert result.max_diameter_mm is not None and result.mvi_probability is not None
    items = [
        _num(
            codes.DIAMETER,
            round(result.max_diameter_mm, 2),
            codes.UNIT_MM,
            codes.MAXIMUM,
            algorithm_id=segmentation_id,
        ),
    ]
    if volumetric and result.tumor_volume_ml is not None:
        items.append(
            _num(
                codes.VOLUME,
                round(result.tumor_volume_ml, 3),
                codes.UNIT_ML,
                algorithm_id=segmentation_id,
            )
        )
    if volumetric and result.tumor_count > 0:
        items.append(
            _count(
                codes.NUMBER_OF_TUMORS,
                result.tumor_count,
                codes.UNIT_LESIONS,
                algorithm_id=segmentation_id,
            )
        )
    items.append(
        _num(
            codes.MVI_PROBABILITY_DL,
            _percent(result.mvi_probability),
            codes.UNIT_PERCENT,
            algorithm_id=classifier_id,
        )
    )
    if result.combined_probability is not None:
        items.append(
            _num(
                codes.MVI_PROBABILITY_COMBINED,
                _percent(result.combined_probability),
                codes.UNIT_PERCENT,
                algorithm_id=classifier_id,
            )
        )
    if volumetric and result.threshold is not None:
        items.append(
            _num(
                codes.MVI_RISK_THRESHOLD,
                _percent(result.threshold),
                codes.UNIT_PERCENT,
                algorithm_id=classifier_id,
            )
        )
    return items


def _risk(result: AnalysisResult) -> list[Any]:
    value = codes.HIGH_RISK if result.risk_category == RiskCategory.HIGH else codes.LOW_RISK
    return [hd.sr.QualitativeEvaluation(name=codes.LESION_RISK, value=value)]


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; ``points`` (n, 2), returns the hull counter-clockwise, open."""
    unique = np.unique(points, axis=0)  # sorted by x, then y
    if len(unique) < 3:
        return unique

    def half(sequence: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in sequence:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) <= 0:
                    chain.pop()
                else:
                    break
            chain.append(p)
        return chain

    lower = half(unique)
    upper = half(unique[::-1])
    return np.asarray(lower[:-1] + upper[:-1])


def tumor_outline(mask2d: np.ndarray) -> np.ndarray:
    """Closed outline of a 2-D mask as SCOORD ``(column, row)`` points.

    The outline is the convex hull of the corners of the mask's pixels, in image pixel
    coordinates whose origin is the top left corner of the top left pixel (PS3.3 C.18.6.1.1), so
    it encloses every mask pixel. The first point is repeated at the end (a closed POLYLINE).

    Parameters
    ----------
    mask2d
        ``(rows, cols)`` mask, nonzero inside.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` float32 points, ``n >= 4``; empty ``(0, 2)`` for an empty mask.
    """
    mask = np.asarray(mask2d).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask2d must be 2-D, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((0, 2), dtype=np.float32)
    sub = mask[rows]
    first = np.argmax(sub, axis=1)
    last = sub.shape[1] - np.argmax(sub[:, ::-1], axis=1)
    columns = np.concatenate([first, first, last, last]).astype(np.float64)
    row_edges = np.concatenate([rows, rows + 1, rows, rows + 1]).astype(np.float64)
    hull = _convex_hull(np.stack([columns, row_edges], axis=1))
    return np.concatenate([hull, hull[:1]]).astype(np.float32)


def _key_slice_mask(seg: Any, reference: SliceReference) -> np.ndarray | None:
    """Tumor pixels of the SEG on the key slice, or ``None`` if the SEG cannot say."""
    try:
        if reference.frame_number is None:
            pixels = seg.get_pixels_by_source_instance(
                [reference.sop_instance_uid], segment_numbers=[TUMOR_SEGMENT]
            )
        else:
            pixels = seg.get_pixels_by_source_frame(
                reference.sop_instance_uid,
                [reference.frame_number],
                segment_numbers=[TUMOR_SEGMENT],
            )
    except (ValueError, KeyError, RuntimeError):
        return None
    return np.asarray(pixels)[0, :, :, 0].astype(bool)


def _key_slice_region(
    result: AnalysisResult, seg: Any, references: Sequence[SliceReference]
) -> Any:
    k = result.diameter_slice
    if not 0 <= k < len(references):
        raise ValueError(
            f"diameter_slice {k} is outside the source images' {len(references)} slices"
        )
    reference = references[k]
    mask = _key_slice_mask(seg, reference)
    points = tumor_outline(mask) if mask is not None else np.zeros((0, 2), np.float32)
    if len(points) < 4:
        if result.diameter_endpoints is None:
            raise ValueError(
                "the SEG has no tumor pixels on the key slice and the result has no "
                "diameter_endpoints"
            )
        # Continuous indices (pixel centres at integers) → SCOORD (centres at +0.5).
        points = np.asarray(result.diameter_endpoints, dtype=np.float32) + 0.5
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=reference.sop_class_uid,
            referenced_sop_instance_uid=reference.sop_instance_uid,
            referenced_frame_numbers=(
                None if reference.frame_number is None else [reference.frame_number]
            ),
        ),
    )


def _library_entry(image: Dataset) -> Dataset:
    """What highdicom's Image Library needs of an image (TID 1604 descriptors).

    Single-frame images are used as they are. For an Enhanced CT object the spacing, thickness,
    orientation and position live in functional groups: a header-only copy gets them at the top
    level, the position being frame 1's.
    """
    if int(image.get("NumberOfFrames", 1)) <= 1:
        return image
    entry = Dataset()
    for element in image:
        if element.keyword not in ("PixelData", "PerFrameFunctionalGroupsSequence"):
            entry.add(element)
    shared = image.SharedFunctionalGroupsSequence[0]
    frame = image.PerFrameFunctionalGroupsSequence[0]

    def group(name: str) -> Dataset:
        return (shared if name in shared else frame)[name][0]

    measures = group("PixelMeasuresSequence")
    entry.PixelSpacing = measures.PixelSpacing
    entry.SliceThickness = measures.get("SliceThickness", "")
    entry.ImageOrientationPatient = group("PlaneOrientationSequence").ImageOrientationPatient
    entry.ImagePositionPatient = frame.PlanePositionSequence[0].ImagePositionPatient
    return entry


#: What TID 1602/1604 describe of an image besides its UIDs and its position (highdicom's
#: ImageLibraryEntryDescriptors reads these).
_DESCRIBED = (
    "SOPClassUID",
    "Modality",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "ImageOrientationPatient",
    "SpacingBetweenSlices",
)
_POSITION_NAMES = (
    dcm_codes.DCM.ImagePositionPatientX,
    dcm_codes.DCM.ImagePositionPatientY,
    dcm_codes.DCM.ImagePositionPatientZ,
)


def _described(image: Dataset) -> tuple[str | None, ...]:
    return tuple(str(image[keyword].value) if keyword in image else None for keyword in _DESCRIBED)


def _image_library(images: Sequence[Dataset]) -> Any:
    """TID 1600 of ``images``: highdicom's ``ImageLibrary(images)`` with what every entry
    describes alike said once, in the group.

    highdicom builds some 17 content items per image, 1.3-1.7 s for 200 slices, and writing
    them out took another second (42,000 data elements, 0.77 MB of SR). The slices of a series
    differ only in their UIDs and Image Position, and TID 1600 lets an Image Library Group carry
    the descriptors (TID 1602) its entries share: highdicom builds the library of the first
    slice, its descriptors other than the position go to the group, and each entry is the
    slice's IMAGE item with its own three position items (0.19 MB; OHIF's and dcmqi's readers
    take the entries' references as before). Images that differ in anything else the entries
    describe get highdicom's library as it is.
    """
    first, *others = images
    described = _described(first)
    if not others or any(_described(image) != described for image in others):
        return hd.sr.ImageLibrary(images)
    library = hd.sr.ImageLibrary([first])
    # One container with one group (one modality and frame of reference) whose last item is
    # the entry; anything else (another highdicom) gets highdicom's library.
    groups: list[Any] = list(library[0].ContentSequence) if len(library) == 1 else []
    if len(groups) != 1 or groups[0].ContentSequence[-1].value_type != hd.sr.ValueTypeValues.IMAGE:
        return hd.sr.ImageLibrary(images)
    (group,) = groups
    *head, template = group.ContentSequence
    descriptors = list(template.ContentSequence)
    axes = {
        index: _POSITION_NAMES.index(item.name)
        for index, item in enumerate(descriptors)
        if item.name in _POSITION_NAMES
    }
    if len(axes) != 3:
        return hd.sr.ImageLibrary(images)
    shared = [item for index, item in enumerate(descriptors) if index not in axes]
    named = {item.name for item in head}
    shared = [item for item in shared if item.name not in named]
    template.ContentSequence = [descriptors[index] for index in sorted(axes)]
    entries = [template]
    for image in others:
        # Any: highdicom types ContentSequence as a Sequence, and its __setattr__ wraps a list.
        entry: Any = hd.sr.ImageContentItem(
            name=template.name,
            referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
            relationship_type=template.relationship_type,
        )
        position = image.ImagePositionPatient
        entry.ContentSequence = [
            hd.sr.NumContentItem(
                name=descriptors[index].name,
                value=position[axes[index]],
                unit=descriptors[index].unit,
                relationship_type=descriptors[index].relationship_type,
            )
            for index in sorted(axes)
        ]
        entries.append(entry)
    group.ContentSequence = [*head, *shared, *entries]
    return library


@dataclass(frozen=True)
class ImageLibrary:
    """The TID 1600 Image Library of a report, made before the report (:func:`image_library`).

    Attributes
    ----------
    items
        The library's content items, as :func:`build_sr` inserts them.
    sop_instance_uids
        The images it lists, in slice order: :func:`build_sr` takes it only for the same images.
    """

    items: tuple[Any, ...]
    sop_instance_uids: tuple[str, ...]


def _slice_ordered(source_images: Sequence[Dataset]) -> tuple[list[Any], list[Dataset]]:
    """Slice references and the images in slice order (one entry for an Enhanced CT object)."""
    references = slice_references(source_images)
    return references, list({ref.sop_instance_uid: ref.dataset for ref in references}.values())


def image_library(source_images: Sequence[Dataset]) -> ImageLibrary:
    """The Image Library :func:`build_sr` would make of ``source_images``.

    It needs the source headers only, so the node makes it while the study is registered
    (0.17 s of a 512 x 512 x 200 report otherwise made after the model) and passes it on.
    Raises ValueError for unusable sources, as :func:`build_sr` does.
    """
    return _library_of(_slice_ordered(source_images)[1])


def _library_of(sources: Sequence[Dataset]) -> ImageLibrary:
    """The library of images already in slice order."""
    items = _image_library([_library_entry(image) for image in sources])
    return ImageLibrary(tuple(items), tuple(str(ds.SOPInstanceUID) for ds in sources))


def _insert_image_library(sr: Any, library: Sequence[Any]) -> None:
    """Put the Image Library into a built report where TID 1500 has it: after the procedure
    reported, before the first CONTAINS item (Imaging Measurements or Qualitative Evaluations).

    highdicom's SR constructor deep-copies the content tree, parses the copy back and searches
    the tree three times (references, evidence, SCOORD3D): with 200 library entries in it, 2.6 s
    of a 4.6 s report. The library names only source images, which are the evidence anyway
    (``build_sr`` passes every source image), so the document is the same when the library
    joins the tree after the constructor: in the dataset and in highdicom's view of it
    (``sr.content``).
    """
    for root in (sr.ContentSequence, sr.content[0].ContentSequence):
        at = next(
            index
            for index, item in enumerate(root)
            if item.get("RelationshipType") == hd.sr.RelationshipTypeValues.CONTAINS.value
        )
        for offset, item in enumerate(library):
            root.insert(at + offset, item)


def _classifier_id(algorithm: AlgorithmInfo) -> Any:
    """TID 4019 of the MVI model: it made the probabilities and the risk."""
    return hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)


#: Algorithm Version (TID 4019 requires one) of a supplied segmentation, which has none of ours.
SUPPLIED_VERSION = "n/a (supplied)"


def _segmentation_id(result: AnalysisResult) -> Any | None:
    """TID 4019 of what made the masks the sizes were measured on, ``None`` when unknown.

    The segmenter's ``"NAME VERSION"`` is split at its last space. A supplied segmentation
    (``"manual SEG series 7"``) is named as given, with :data:`SUPPLIED_VERSION`: its last word
    is a series number, not a version.
    """
    text = result.segmentation_algorithm.strip()
    if not text:
        return None
    name, _, version = text.rpartition(" ")
    if result.segmentation_source == "supplied":
        name, version = text, SUPPLIED_VERSION
    elif not name or not any(character.isdigit() for character in version):
        name, version = text, "unknown"
    return hd.sr.AlgorithmIdentification(name=name, version=version)


def _referenced_segment(seg: Any, segment_number: int) -> Any:
    """The SEG segment, with its source as the series (TID 1411 row 12, "Source series for
    segmentation") rather than every source image: two groups would otherwise list each slice
    twice (about 0.9 MB of SR for 200 slices)."""
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(
            str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        ),
    )


def _measurement_groups(
    result: AnalysisResult,
    seg: Any,
    references: Sequence[SliceReference],
    algorithm: AlgorithmInfo,
    uids: ResultUIDs,
) -> list[Any]:
    # Group level: the classifier, which made the group's risk evaluation (a QualitativeEvaluation
    # carries no algorithm of its own). Each NUM names its own algorithm (TID 300), which takes
    # precedence over the group's: sizes the segmentation, probabilities the classifier.
    classifier_id = _classifier_id(algorithm)
    segmentation_id = _segmentation_id(result)
    tumor_site = [hd.sr.FindingSite(anatomic_location=codes.LIVER)]
    groups: list[Any] = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.tumor_tracking_uid, identifier=TUMOR_LABEL
            ),
            referenced_segment=_referenced_segment(seg, TUMOR_SEGMENT),
            finding_type=codes.NEOPLASM,
            finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            finding_sites=tumor_site,
            algorithm_id=classifier_id,
            measurements=_tumor_measurements(
                result,
                volumetric=True,
                segmentation_id=segmentation_id,
                classifier_id=classifier_id,
            ),
            qualitative_evaluations=_risk(result),
        )
    ]
    if result.loat_found:
        loat_measurements = []
        if result.loat_max_area_cm2 is not None:
            loat_measurements.append(
                _num(
                    codes.AREA,
                    round(result.loat_max_area_cm2, 3),
                    codes.UNIT_CM2,
                    codes.MAXIMUM,
                    algorithm_id=segmentation_id,
                )
            )
        if result.loat_volume_ml is not None:
            loat_measurements.append(
                _num(
                    codes.VOLUME,
                    round(result.loat_volume_ml, 3),
                    codes.UNIT_ML,
                    algorithm_id=segmentation_id,
                )
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.loat_tracking_uid, identifier=LOAT_LABEL
                ),
                referenced_segment=_referenced_segment(seg, LOAT_SEGMENT),
                finding_type=codes.ADIPOSE_TISSUE,
                finding_category=codes.TISSUE,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.OMENTUM)],
                # Only sizes here: the segmentation's group, the classifier's if it is unknown
                # (IHE AIR asks every group to name an algorithm).
                algorithm_id=segmentation_id or classifier_id,
                measurements=loat_measurements or None,
            )
        )
    groups.append(
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.key_slice_tracking_uid, identifier=f"{TUMOR_LABEL}, key slice"
            ),
            referenced_region=_key_slice_region(result, seg, references),
            finding_type=codes.NEOPLASM,
            finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            finding_sites=tumor_site,
            algorithm_id=classifier_id,
            measurements=_tumor_measurements(
                result,
                volumetric=False,
                segmentation_id=segmentation_id,
                classifier_id=classifier_id,
            ),
            qualitative_evaluations=_risk(result),
        )
    )
    return groups


def _comment(result: AnalysisResult, algorithm: AlgorithmInfo) -> str:
    parts = [f"Model {algorithm.label}"]
    if algorithm.effective_disclaimer:
        parts.append(algorithm.effective_disclaimer)
    source = "automatic" if result.segmentation_source == "unet" else "supplied in the study"
    parts.append(f"segmentation {source}")
    if result.scored and result.threshold is not None:
        parts.append(f"high risk at MVI probability >= {_percent(result.threshold):g} %")
    return "; ".join(parts)


def _qualitative_container(result: AnalysisResult, algorithm: AlgorithmInfo) -> Any:
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items = []
    if not result.scored:
        items.append((codes.MVI_ANALYSIS_STATUS, result.status_text))
        items.append((codes.MVI_ANALYSIS_REASON, str(result.reason)))
    # Blank lines are dropped: a TEXT item's value is Type 1.
    items.extend((codes.ANALYSIS_NOTE, note.strip()) for note in result.notes if note.strip())
    items.extend((codes.QUALITY_CHECK, check.strip()) for check in result.checks if check.strip())
    items.append((codes.COMMENT, _comment(result, algorithm)))
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for name, value in items
        ]
    )
    return container


def _observation_context(algorithm: AlgorithmInfo) -> Any:
    return hd.sr.ObservationContext(observer_device_context=device_observer(algorithm))


def _status_report(
    result: AnalysisResult, source_images: Sequence[Dataset], algorithm: AlgorithmInfo
) -> Any:
    """TID 1500 root without Imaging Measurements (what MeasurementReport does not allow).

    With source images, the Image Library is left out: :func:`_insert_image_library` adds it.
    """
    root = hd.sr.ContainerContentItem(name=codes.IMAGING_MEASUREMENT_REPORT, template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE))
    content.extend(_observation_context(algorithm))
    content.append(
        hd.sr.CodeContentItem(
            name=dcm_codes.DCM.ProcedureReported,
            value=codes.CT_UNSPECIFIED_BODY_REGION,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    if not source_images:
        # A study-level report lists no images. highdicom refuses an empty Image Library, but
        # TID 1500 requires the container and OHIF reads it without checking it exists, so it is
        # written by hand without groups.
        content.append(
            hd.sr.ContainerContentItem(
                name=dcm_codes.DCM.ImageLibrary,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    content.append(_qualitative_container(result, algorithm))
    root.ContentSequence = content
    return hd.sr.ContentSequence([root], is_root=True)


def _study_instance(study: Dataset) -> Dataset:
    """The study instance as evidence: what highdicom reads of it, none of its pixels."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        if not study.get(keyword):
            raise ValueError(f"the study instance lacks {keyword}")
    header = Dataset()
    for element in study:
        if element.keyword != "PixelData":
            header.add(element)
    # highdicom reads these of its first evidence item; Type 2 in every IOD's Patient and
    # General Study modules, but a header may have been read without them.
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
    ):
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def build_sr(
    result: AnalysisResult,
    source_images: Sequence[Dataset],
    seg: Any | None,
    *,
    algorithm: AlgorithmInfo,
    uids: ResultUIDs,
    sop_class: str = "comprehensive",
    predecessor: Dataset | None = None,
    study: Dataset | None = None,
    library: ImageLibrary | None = None,
) -> Any:
    """Build the TID 1500 measurement report of one analysis.

    Parameters
    ----------
    result
        The analysis. A scored result gives tumor, LOAT and key-slice measurement groups; any
        other status gives a report whose text says the status and the reason. Its checks and
        notes are TEXT items of the Qualitative Evaluations in either case.
    source_images
        The series the report is about (classic images or one Enhanced CT image of one series);
        they make the Image Library and the evidence. A scored result needs the arterial series
        the SEG was made on. A result that is not scored may hang on whatever series the study
        has (e.g. the portal-venous one when there is no arterial series), or on none: ``[]``
        gives a study-level report (empty Image Library, ``study`` as the evidence).
    seg
        The node's SEG of this analysis (:func:`dicom_sr.seg.build_seg`); required for a scored
        result, optional otherwise (it is then listed as evidence); needs ``source_images``.
    algorithm
        The model and the node.
    uids
        UIDs of this analysis (the SR's series/instance UIDs, tracking UIDs equal to the SEG's,
        the analysis time: content date/time and series description).
    sop_class
        ``"comprehensive"`` (Comprehensive SR) or ``"comprehensive3d"`` (Comprehensive 3D SR).
    predecessor
        The SR this one supersedes (Predecessor Documents Sequence); defaults to
        ``uids.predecessor_sr``.
    study
        Any instance of the study (a header is enough, pixels are not read): the patient and
        study attributes are copied from it, and it is the evidence of a study-level report.
        Required when ``source_images`` is empty; otherwise optional (the first source image is
        used), and then of the same study.
    library
        The Image Library as :func:`image_library` made it of the same ``source_images``
        (made here when None, or when it lists other images); its items join this report,
        so it serves one report.

    Returns
    -------
    highdicom.sr.ComprehensiveSR or highdicom.sr.Comprehensive3DSR

    Raises
    ------
    ValueError
        For an unknown ``sop_class``, a scored result without SEG or source images, no source
        images and no study, a SEG without source images, a SEG or study of another study than
        the source images, a SEG of another series, or a key slice outside the source images.
    """
    if sop_class not in SOP_CLASSES:
        raise ValueError(f"sop_class must be one of {sorted(SOP_CLASSES)}, got {sop_class!r}")
    references: list[SliceReference] = []
    sources: list[Dataset] = []
    if len(source_images) > 0:
        # Image Library and evidence in slice order.
        references, sources = _slice_ordered(source_images)
    elif result.scored:
        raise ValueError("a scored result needs its source images")
    elif study is None:
        raise ValueError("give the source images or, for a study-level report, the study")
    elif seg is not None:
        raise ValueError("a SEG needs its source images")
    # Where the patient and study attributes come from.
    patient_study = study if study is not None else sources[0]
    study_uid = str(patient_study.get("StudyInstanceUID", ""))
    if not study_uid:
        raise ValueError("the study instance lacks StudyInstanceUID")
    if sources and str(sources[0].StudyInstanceUID) != study_uid:
        raise ValueError("the study instance belongs to another study than the source images")
    if seg is not None:
        first = sources[0]
        if str(seg.StudyInstanceUID) != str(first.StudyInstanceUID):
            raise ValueError("the SEG belongs to another study than the source images")
        referenced_series = {
            str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])
        }
        if referenced_series and str(first.SeriesInstanceUID) not in referenced_series:
            raise ValueError("the SEG does not reference the source images' series")
    if result.scored:
        if seg is None:
            raise ValueError("a scored result needs the SEG")
        content = hd.sr.MeasurementReport(
            observation_context=_observation_context(algorithm),
            procedure_reported=codes.CT_UNSPECIFIED_BODY_REGION,
            imaging_measurements=_measurement_groups(result, seg, references, algorithm, uids),
            title=codes.IMAGING_MEASUREMENT_REPORT,
            # The Image Library joins after the constructor (_insert_image_library).
            referenced_images=None,
        )
        content[0].ContentSequence.append(_qualitative_container(result, algorithm))
    else:
        content = _status_report(result, sources, algorithm)

    if predecessor is None:
        predecessor = uids.predecessor_sr
    if sources:
        evidence = [*sources, *([seg] if seg is not None else [])]
    else:
        assert study is not None
        evidence = [_study_instance(study)]
    content_date, content_time = content_date_time(uids.analysis_time, patient_study)
    kwargs: dict[str, Any] = {
        "evidence": evidence,
        "content": content,
        "series_instance_uid": uids.sr_series_uid,
        "series_number": uids.sr_series_number,
        "sop_instance_uid": uids.sr_instance_uid,
        "instance_number": 1,
        "manufacturer": algorithm.manufacturer,
        "is_complete": True,
        "is_final": True,
        "is_verified": False,
        "previous_versions": [predecessor] if predecessor is not None else None,
        "contributing_equipment": [contributing_equipment(algorithm)],
        "series_description": series_description("report", algorithm, uids.analysis_time),
        "content_date": content_date,
        "content_time": content_time,
    }
    sr: Any
    if sop_class == "comprehensive3d":
        sr = hd.sr.Comprehensive3DSR(**kwargs)
    else:
        sr = hd.sr.ComprehensiveSR(**kwargs)
    if sources:
        listed = tuple(str(ds.SOPInstanceUID) for ds in sources)
        if library is None or library.sop_instance_uids != listed:
            library = _library_of(sources)
        _insert_image_library(sr, library.items)
    copy_patient_study(sr, patient_study)
    set_equipment(sr, algorithm)
    add_coding_schemes(sr, private_codes=True)
    return sr
