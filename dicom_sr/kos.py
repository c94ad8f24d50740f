"""The IHE IOCM rejection note that withdraws the objects of an earlier analysis.

When a study is analysed again, the SEG, SR and Secondary Capture of the earlier analysis stay in
the PACS beside the new ones. The rejection note is a Key Object Selection document (TID 2010)
titled (113001, DCM, "Rejected for Quality Reasons") from CID 7010 that lists them, in the
Current Requested Procedure Evidence Sequence and as IMAGE (SEG, SC) or COMPOSITE (SR) content
items, so that an archive implementing IHE Imaging Object Change Management (IOCM) can hide them.
Whether an archive acts on it is the archive's business (see docs/DESIGN.md); one that does not
keeps it as an ordinary KO instance.

The note is in the same patient and study as the objects it rejects, in its own new series
(:data:`REJECTION_SERIES_NUMBER`), with the node's General Equipment attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_sr import codes
from dicom_sr.common import (
    AlgorithmInfo,
    content_date_time,
    copy_patient_study,
    device_observer,
    series_description,
    set_equipment,
)

__all__ = ["REJECTION_SERIES_NUMBER", "build_rejection_note"]

#: Series number of the rejection note (after the SEG 9001, SR 9002 and SC 9003).
REJECTION_SERIES_NUMBER = 9004

_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")

# What highdicom reads of its first evidence item (Type 2 in every IOD's Patient and General
# Study modules, but a header may have been read without them).
_REQUIRED_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def _reference(dataset: Dataset, *, patient_study: bool) -> Dataset:
    """A header-only copy of what the note needs of one rejected instance.

    Rows and Columns are kept where present: highdicom references an instance that has them as
    IMAGE (the SEG, the SC) and any other as COMPOSITE (the SR).
    """
    reference = Dataset()
    for keyword in (*_UID_KEYWORDS, "Rows", "Columns"):
        if keyword in dataset:
            reference[keyword] = dataset[keyword]
    if patient_study:
        copy_patient_study(reference, dataset)
        for keyword in _REQUIRED_PATIENT_STUDY:
            if keyword not in reference:
                setattr(reference, keyword, None)
    return reference


def _check(superseded: Sequence[Dataset]) -> None:
    if len(superseded) == 0:
        raise ValueError("superseded is empty: a rejection note must reference an instance")
    seen: set[str] = set()
    for dataset in superseded:
        for keyword in _UID_KEYWORDS:
            if not dataset.get(keyword):
                raise ValueError(f"a superseded instance lacks {keyword}")
        uid = str(dataset.SOPInstanceUID)
        if uid in seen:
            raise ValueError(f"instance {uid} is listed twice")
        seen.add(uid)
    studies = {str(dataset.StudyInstanceUID) for dataset in superseded}
    if len(studies) != 1:
        raise ValueError(f"the superseded instances must be of one study, got {len(studies)}")
    patients = {str(dataset.PatientID) for dataset in superseded if "PatientID" in dataset}
    if len(patients) > 1:
        raise ValueError(f"the superseded instances must be of one patient, got {len(patients)}")


def build_rejection_note(
    superseded: Sequence[Dataset],
    *,
    algorithm: AlgorithmInfo,
    series_uid: str | None = None,
    instance_uid: str | None = None,
    series_number: int = REJECTION_SERIES_NUMBER,
    analysis_time: datetime | None = None,
    description: str | None = None,
) -> Dataset:
    """Build the IOCM rejection note of the objects of an earlier analysis.

    Parameters
    ----------
    superseded
        The SEG, SR and SC instances of one earlier analysis, as datasets or headers read from
        disk (pixels are not needed): SOP Class/Instance, Series and Study Instance UIDs of
        each, patient and study attributes of the first.
    algorithm
        The node (Manufacturer, model name, versions, observer) and the model (the version in
        the series description).
    series_uid, instance_uid
        Series and SOP Instance UIDs of the note; new ones when ``None``. Keep them with the
        analysis so that a resend after a crash reuses them.
    series_number
        Series number of the note.
    analysis_time
        Timezone-aware time of the analysis that supersedes the objects
        (:attr:`dicom_sr.common.ResultUIDs.analysis_time`): the note's content date/time and
        series description. Now when ``None``.
    description
        Key Object Description (TID 2010 row 5) the archive or a viewer may show; a sentence
        saying the objects were superseded by a re-analysis when ``None``.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        Key Object Selection Document Storage, titled (113001, DCM, "Rejected for Quality
        Reasons").

    Raises
    ------
    ValueError
        For no instances, an instance without its UIDs, one listed twice, instances of several
        studies or patients, or a naive ``analysis_time``.
    """
    _check(superseded)
    when = analysis_time if analysis_time is not None else datetime.now(UTC)
    first = superseded[0]
    # First: it refuses a naive time, which the description below would misread as local.
    content_date, content_time = content_date_time(when, first)
    references = [
        _reference(dataset, patient_study=index == 0) for index, dataset in enumerate(superseded)
    ]
    if description is None:
        description = (
            f"{len(references)} MVI AI object(s) superseded by a re-analysis of this study "
            f"at {when.astimezone(UTC):%Y-%m-%d %H:%M}Z"
        )
    content = hd.ko.KeyObjectSelection(
        document_title=codes.REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=references,
        observer_device_context=device_observer(algorithm),
        description=description,
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=references,
        content=content,
        series_instance_uid=series_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        series_description=series_description("rejection note", algorithm, when),
        content_date=content_date,
        content_time=content_time,
    )
    copy_patient_study(note, first)
    set_equipment(note, algorithm)
    return note
