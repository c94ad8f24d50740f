"""Supplied segmentations: a radiologist's DICOM SEG in the study wins over the segmenter.

A corrected segmentation comes back into the node as a DICOM SEG in the study. Following the
architecture's rule "Supplied segmentation", a SEG is used instead of the automatic segmenter
when

- the node did not write it ("Own outputs are never input": its series is not one the node
  recorded, and neither its Manufacturer nor its ManufacturerModelName is the node's),
- it belongs to the study of the arterial series, and references the arterial or the
  portal-venous series (ReferencedSeriesSequence, or else the source images its frames were
  derived from),
- its segments map to a tumor *and* a LOAT segment, by SegmentedPropertyTypeCodeSequence or else
  by the configured label patterns (or, with ``pipeline.supplied_seg_accept_single_fat``, its one
  fat segment beside one neoplasm is taken as the LOAT),
- the SegmentAlgorithmType of every segment it maps to tumor and LOAT is allowed,
- its frames can be placed in patient space (plane positions and a shared orientation).

:func:`find_supplied_segs` reads headers only and never raises on a bad file: it returns the
qualifying SEGs newest first and, beside them, every SEG (or unreadable file) it rejected as a
:class:`RejectedSeg`, which names the series as a reader knows it and says why. Every rejection
is logged at INFO: a reader whose correction was not used must be able to find out why.
:func:`supplied_masks` decodes one SEG's frames into binary masks on the arterial grid.

Decisions:

- **Tumor and LOAT are both required.** The fusion model needs both regions; a SEG with only a
  tumor segment is rejected ("no LOAT segment") rather than mixed with automatic LOAT, so one
  result never combines a radiologist's and the segmenter's work without saying so.
- **Several segments of one kind are united.** Two "Lesion" segments are two tumors;
  :attr:`SuppliedSeg.segment_groups` lists them all and :func:`supplied_masks` returns their
  union. :attr:`SuppliedSeg.segments` names the lowest-numbered one of each kind.
- **A fat segment not labelled as the omentum's is not LOAT** — the body wall and the greater
  omentum are fat too. Sites whose readers label the LOAT only as "fat" can set
  ``pipeline.supplied_seg_accept_single_fat``: a SEG with exactly one neoplasm and exactly one
  fat segment then qualifies, that fat segment being the LOAT. Two such fat segments are
  rejected whatever the setting: nothing says which one is the LOAT.
- **Liver is optional.** A liver segment is mapped when present and its algorithm type is
  allowed; a liver segment of another algorithm type is left out instead of rejecting the SEG,
  because a reader corrects the tumor and LOAT, not necessarily the liver.
- **BINARY, FRACTIONAL (>= 0.5 of MaximumFractionalValue) and LABELMAP** SEGs are read.
- **A SEG on the portal-venous series** is resampled through the PV -> arterial registration; one
  on the arterial series directly. Both use nearest neighbour, so masks stay binary.
- **Frames are placed by their Plane Position / Orientation functional groups** (a regular stack
  with missing positions allowed). A SEG whose frames can only be placed through the source
  images they reference is rejected: the node would need the source headers to do it.

Nothing here logs or returns patient identifiers: series and instances are named by
:func:`node.core.logging.uid_key`, files by path.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import iter_pixels

from node import MANUFACTURER, MODEL_NAME
from node.core.dicom import (
    LABELMAP_SEGMENTATION_STORAGE,
    SEGMENTATION_STORAGE,
    functional_group,
    functional_group_items,
)
from node.core.errors import InputError
from node.core.logging import get_logger, uid_key

__all__ = [
    "SEG_CLASSES",
    "RejectedSeg",
    "SuppliedSeg",
    "SuppliedSegError",
    "SuppliedSegSearch",
    "find_supplied_segs",
    "supplied_masks",
]

log = get_logger(__name__)

#: The SOP classes a supplied segmentation can have.
SEG_CLASSES = frozenset({SEGMENTATION_STORAGE, LABELMAP_SEGMENTATION_STORAGE})

#: The kinds a segment can map to; tumor and LOAT are required, liver is optional.
REQUIRED_KINDS = ("tumor", "loat")
KINDS = ("tumor", "loat", "liver")

# Segmented property types that are a tumor whatever their meaning says (SNOMED CT): Neoplasm,
# Hepatocellular carcinoma (morphologic abnormality), Liver cell carcinoma (disorder), Mass,
# Lesion.
_TUMOR_CODES = frozenset(
    {
        ("SCT", "108369006"),
        ("SCT", "25370001"),
        ("SCT", "109841003"),
        ("SCT", "4147007"),
        ("SCT", "52988006"),
    }
)
# Code meanings of other tumor codes (local schemes, other vocabularies).
_TUMOR_MEANING = re.compile(r"neoplasm|tumou?r|carcinoma|malignan|\bhcc\b", re.IGNORECASE)
# Adipose tissue: "Fat" the tissue (55603005) and, as some tools code it, fat the substance
# (256674009); other vocabularies by meaning.
_FAT_CODES = frozenset({("SCT", "55603005"), ("SCT", "256674009")})
_FAT_MEANING = re.compile(r"\bfat\b|adipose", re.IGNORECASE)
_OMENTUM_CODES = frozenset({("SCT", "27398004")})
_OMENTUM_TEXT = re.compile(r"omentum|omental", re.IGNORECASE)
_LIVER_CODES = frozenset({("SCT", "10200004")})
_LIVER_LABEL = re.compile(r"\s*liver\s*", re.IGNORECASE)

#: Frames whose in-plane origin differs by more than this fraction of a pixel do not stack.
_LATERAL_TOLERANCE_PX = 0.25
#: Frame positions off the slice grid by more than this fraction of the spacing are refused.
_GRID_TOLERANCE = 0.1


class SuppliedSegError(InputError):
    """A supplied SEG's frames cannot be decoded or placed on the arterial grid."""


@dataclass(frozen=True)
class SuppliedSeg:
    """One qualifying supplied segmentation.

    Attributes
    ----------
    path
        The SEG file.
    series_instance_uid, sop_instance_uid
        The SEG's own UIDs.
    created
        When it was made, ``YYYYMMDDHHMMSS.ffffff`` (ContentDate/Time, else InstanceCreation,
        Series, Study date and time); empty when the SEG carries no date. Sorts as time.
    algorithm_types
        SegmentAlgorithmType of the mapped segments, in segment order, without repeats.
    referenced_series_uid
        The arterial or portal-venous series the SEG references (arterial when both).
    referenced_phase
        ``"arterial"`` or ``"portal_venous"``: which of the two that is.
    segments
        ``"tumor"``, ``"loat"`` and, when present, ``"liver"`` -> the lowest segment number of
        that kind.
    segment_groups
        Every segment number of each kind; :func:`supplied_masks` unites them.
    series_number, series_description
        The SEG's SeriesNumber (None when absent or not a number) and SeriesDescription (empty
        when absent), to name it should it be rejected later (:class:`RejectedSeg`).
    loat_is_single_fat
        The LOAT is the SEG's one fat segment, not labelled as the omentum's, taken as the LOAT
        because ``pipeline.supplied_seg_accept_single_fat`` is on.
    """

    path: Path
    series_instance_uid: str
    sop_instance_uid: str
    created: str
    algorithm_types: tuple[str, ...]
    referenced_series_uid: str
    referenced_phase: str
    segments: dict[str, int]
    segment_groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    series_number: int | None = None
    series_description: str = ""
    loat_is_single_fat: bool = False


@dataclass(frozen=True)
class RejectedSeg:
    """A candidate SEG (or a file that could not be read, which may have been one) not used.

    Attributes
    ----------
    path
        The file.
    series_uid, sop_instance_uid
        The SEG's SeriesInstanceUID and SOPInstanceUID; None when the file could not be read or
        lacks them.
    series_number
        SeriesNumber; None when absent, not a number, or the file could not be read.
    series_description
        SeriesDescription; empty when absent.
    reason
        Why it was not used, for the reader who made it. UIDs appear only as hash keys.
    """

    path: Path
    series_uid: str | None
    sop_instance_uid: str | None
    series_number: int | None
    series_description: str
    reason: str

    @property
    def label(self) -> str:
        """How a reader names it: ``series 7 (LIVER SEG CORRECTED)``, ``series 7``, or the file.

        Only the series number and description, which the reader's viewer shows, or else the
        file name; never a UID or a patient identifier.
        """
        return series_label(self.path, self.series_number, self.series_description)


def series_label(path: Path, number: int | None, description: str) -> str:
    """A SEG as its reader names it: ``series 7 (LIVER SEG)``, ``series 7``, or the file name."""
    if number is None:
        return path.name
    description = description.strip()
    return f"series {number} ({description})" if description else f"series {number}"


class SuppliedSegSearch(NamedTuple):
    """What :func:`find_supplied_segs` found: qualifying SEGs newest first, and the rejects."""

    found: list[SuppliedSeg]
    rejected: list[RejectedSeg]


class _Rejected(Exception):
    """Internal: the SEG does not qualify, for the reason given."""


# --------------------------------------------------------------------------------------------
# Finding
# --------------------------------------------------------------------------------------------


def find_supplied_segs(
    paths: Sequence[Path],
    *,
    arterial_series_uid: str,
    portal_venous_series_uid: str,
    allowed_algorithm_types: Sequence[str],
    label_patterns: Mapping[str, Sequence[str]],
    own_series_uids: Collection[str] = (),
    accept_single_fat: bool = False,
) -> SuppliedSegSearch:
    """Find the SEGs among a study's files that qualify as supplied segmentations.

    Parameters
    ----------
    paths
        Candidate files of the study, any SOP class. Only headers are read; files that are not
        SEGs are ignored, files that cannot be read at all are reported as rejected (they may
        have been SEGs). The study is the arterial series' (read from its files here); a SEG of
        another study, or one that references only series outside it, is rejected.
    arterial_series_uid, portal_venous_series_uid
        The paired phases; a SEG must reference one of them.
    allowed_algorithm_types
        SegmentAlgorithmType values accepted for the tumor and LOAT segments (case-insensitive),
        e.g. ``["MANUAL", "SEMIAUTOMATIC"]``.
    label_patterns
        ``{"tumor": [...], "loat": [...]}``: regular expressions searched case-insensitively in
        SegmentLabel and SegmentDescription of segments whose coded type does not map.
    own_series_uids
        Series the node wrote; their SEGs never count.
    accept_single_fat
        ``pipeline.supplied_seg_accept_single_fat``: take the one fat segment of a SEG with
        exactly one neoplasm and one fat segment as the LOAT, though nothing labels it as the
        omentum's.

    Returns
    -------
    SuppliedSegSearch
        ``found``: qualifying SEGs, newest first (by :attr:`SuppliedSeg.created`, then path);
        ``rejected``: a :class:`RejectedSeg` for each SEG or unreadable file that was not used,
        each also logged at INFO. Reasons name UIDs only by their hash keys. Never raises for a
        bad file.
    """
    allowed = {value.strip().upper() for value in allowed_algorithm_types}
    patterns = _compile_patterns(label_patterns)
    own = {uid.strip() for uid in own_series_uids}
    phases = {arterial_series_uid: "arterial", portal_venous_series_uid: "portal_venous"}

    headers: list[tuple[Path, Dataset]] = []
    rejected: list[RejectedSeg] = []
    # SOP Instance UID -> series, to resolve SEGs that reference their sources only by instance.
    instance_series: dict[str, str] = {}
    # Series -> study of the images among the files: which study is the arterial series', and
    # which series are in it.
    series_study: dict[str, str] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            # The file meta still names the class when the data set is cut short.
            meta = getattr(ds, "file_meta", None) or Dataset()
            sop_class = str(
                ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or ""
            )
        except (InvalidDicomError, OSError, EOFError, ValueError, struct.error, KeyError) as exc:
            rejected.append(
                _rejected(Path(path), None, f"unreadable DICOM file ({type(exc).__name__})")
            )
            continue
        if not sop_class:
            rejected.append(_rejected(Path(path), ds, "unreadable DICOM file (no SOP Class UID)"))
        elif sop_class in SEG_CLASSES:
            headers.append((Path(path), ds))
        else:
            sop_uid = str(ds.get("SOPInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            if sop_uid:
                instance_series[sop_uid] = series_uid
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            if series_uid and study_uid:
                series_study.setdefault(series_uid, study_uid)

    # Without the arterial series' headers among the files the study is unknown; the SEGs are
    # then judged by their references alone.
    study = series_study.get(arterial_series_uid)
    study_series = {uid for uid, of in series_study.items() if of == study} if study else None
    found: list[SuppliedSeg] = []
    for path, header in headers:
        try:
            found.append(
                _qualify(
                    path,
                    header,
                    phases=phases,
                    study=study,
                    study_series=study_series,
                    instance_series=instance_series,
                    allowed=allowed,
                    patterns=patterns,
                    own=own,
                    accept_single_fat=accept_single_fat,
                )
            )
        except _Rejected as exc:
            rejected.append(_rejected(path, header, str(exc)))
        except Exception as exc:  # a malformed header can fail anywhere; never kill the job
            rejected.append(_rejected(path, header, f"malformed SEG header ({type(exc).__name__})"))

    # Newest first; the path breaks ties so the order is reproducible.
    found.sort(key=lambda seg: str(seg.path))
    found.sort(key=lambda seg: seg.created, reverse=True)
    for rejection in rejected:
        _log_rejected(rejection)
    for seg in found:
        log.debug(
            "supplied SEG qualifies",
            file=seg.path.name,
            series_key=uid_key(seg.series_instance_uid),
            references=seg.referenced_phase,
            segments=seg.segments,
            loat_is_single_fat=seg.loat_is_single_fat,
        )
    return SuppliedSegSearch(found=found, rejected=rejected)


def _rejected(path: Path, ds: Dataset | None, reason: str) -> RejectedSeg:
    """A :class:`RejectedSeg` with whatever of the series' names the header still gives."""

    def text(keyword: str) -> str:
        # A malformed element can fail on access; the rejection must still be recorded.
        try:
            return str(ds.get(keyword, "") or "").strip() if ds is not None else ""
        except Exception:
            return ""

    return RejectedSeg(
        path=path,
        series_uid=text("SeriesInstanceUID") or None,
        sop_instance_uid=text("SOPInstanceUID") or None,
        series_number=_series_number(text("SeriesNumber")),
        series_description=text("SeriesDescription"),
        reason=reason,
    )


def _series_number(value: str) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _log_rejected(rejection: RejectedSeg) -> None:
    # INFO, not DEBUG: a reader whose correction is not used asks why, and the operator must be
    # able to answer from the log at its default level.
    log.info(
        "supplied SEG not used",
        series_key=uid_key(rejection.series_uid) if rejection.series_uid else None,
        series_number=rejection.series_number,
        reason=rejection.reason,
        file=rejection.path.name,
    )


def _compile_patterns(
    label_patterns: Mapping[str, Sequence[str]],
) -> dict[str, list[re.Pattern[str]]]:
    compiled: dict[str, list[re.Pattern[str]]] = {}
    for kind in REQUIRED_KINDS:
        compiled[kind] = [re.compile(p, re.IGNORECASE) for p in label_patterns.get(kind, ())]
    return compiled


def _qualify(
    path: Path,
    ds: Dataset,
    *,
    phases: Mapping[str, str],
    study: str | None,
    study_series: Collection[str] | None,
    instance_series: Mapping[str, str],
    allowed: Collection[str],
    patterns: Mapping[str, Sequence[re.Pattern[str]]],
    own: Collection[str],
    accept_single_fat: bool,
) -> SuppliedSeg:
    """Check one SEG header against the rules; raise :class:`_Rejected` with the reason.

    ``study`` is the arterial series' StudyInstanceUID and ``study_series`` the series seen in
    it, both None when the arterial series' headers were not among the files.
    """
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    if not series_uid or not sop_uid:
        raise _Rejected("SEG without SeriesInstanceUID or SOPInstanceUID")
    if series_uid in own:
        raise _Rejected(f"written by this node (series {uid_key(series_uid)})")
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    model = str(ds.get("ManufacturerModelName", "") or "").strip()
    if manufacturer.casefold() == MANUFACTURER.casefold() or (
        model.casefold() == MODEL_NAME.casefold()
    ):
        raise _Rejected("written by this node (Manufacturer / ManufacturerModelName)")

    seg_study = str(ds.get("StudyInstanceUID", "") or "").strip()
    if study and seg_study and seg_study != study:
        # Routing or a reader's viewer can put one study's SEG beside another's images; its
        # series references could even name this study's series by copy and paste.
        raise _Rejected(
            f"belongs to another study (study {uid_key(seg_study)}; the arterial series is in "
            f"study {uid_key(study)})"
        )
    referenced = _referenced_series(ds, instance_series)
    candidates = [uid for uid in phases if uid in referenced]
    if not candidates:
        keys = ", ".join(sorted(uid_key(u) for u in referenced)) or "nothing"
        if referenced and study_series is not None and not referenced & set(study_series):
            raise _Rejected(
                "references neither the arterial nor the portal-venous series: only series "
                f"not in this study ({keys}), so it was drawn on another study's images"
            )
        raise _Rejected(
            f"references neither the arterial nor the portal-venous series (references {keys})"
        )
    referenced_series_uid = candidates[0]  # arterial first: dict order of ``phases``

    mapped = _map_segments(ds, patterns)
    groups, types = dict(mapped.groups), mapped.types
    loat_is_single_fat = False
    if groups.get("tumor") and not groups.get("loat"):
        fat = _single_fat_as_loat(ds, mapped, accept=accept_single_fat)
        groups["loat"] = (fat,)
        loat_is_single_fat = True
    missing = [kind for kind in REQUIRED_KINDS if not groups.get(kind)]
    if missing:
        raise _Rejected(
            f"no {' and no '.join(m.upper() for m in missing)} segment "
            f"(segments: {_describe_all(ds)})"
        )
    for kind in REQUIRED_KINDS:
        for number in groups[kind]:
            if types[number] not in allowed:
                raise _Rejected(
                    f"segment {number} ({kind}) has algorithm type {types[number] or 'none'}, "
                    f"allowed: {', '.join(sorted(allowed)) or 'none'}"
                )
    liver = tuple(n for n in groups.get("liver", ()) if types[n] in allowed)
    groups = {kind: groups[kind] for kind in REQUIRED_KINDS}
    if liver:
        groups["liver"] = liver

    try:
        _frame_layout(ds)
    except SuppliedSegError as exc:
        raise _Rejected(f"frames cannot be placed: {exc}") from exc

    numbers = sorted(n for group in groups.values() for n in group)
    algorithm_types = tuple(dict.fromkeys(types[n] for n in numbers))
    return SuppliedSeg(
        path=path,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        created=_created(ds),
        algorithm_types=algorithm_types,
        referenced_series_uid=referenced_series_uid,
        referenced_phase=phases[referenced_series_uid],
        segments={kind: min(group) for kind, group in groups.items()},
        segment_groups=groups,
        series_number=_series_number(str(ds.get("SeriesNumber", "") or "")),
        series_description=str(ds.get("SeriesDescription", "") or "").strip(),
        loat_is_single_fat=loat_is_single_fat,
    )


def _single_fat_as_loat(ds: Dataset, mapped: _SegmentMap, *, accept: bool) -> int:
    """The fat segment to take as the LOAT of a SEG that has a tumor but no LOAT segment.

    Raises :class:`_Rejected` unless ``accept`` is on and the SEG has exactly one segment coded
    as fat and exactly one tumor segment, coded as a neoplasm. The reasons say what the reader
    or the operator can change.
    """
    if not mapped.unlabelled_fat:
        raise _Rejected(f"no LOAT segment (segments: {_describe_all(ds)})")
    if len(mapped.unlabelled_fat) > 1:
        raise _Rejected(
            f"no LOAT segment: {len(mapped.unlabelled_fat)} fat segments; cannot tell which is "
            f"the LOAT, none is labelled as lesser omentum (segments: {_describe_all(ds)})"
        )
    (number,) = mapped.unlabelled_fat
    label = mapped.labels.get(number, "")
    fat = f"fat segment {number} ({label!r}) is not labelled as lesser omentum"
    tumors = mapped.groups["tumor"]
    if len(tumors) != 1 or tumors[0] not in mapped.neoplasms:
        raise _Rejected(
            f"no LOAT segment: {fat}, and a fat segment is taken as the LOAT only beside exactly "
            "one tumor segment coded as a neoplasm (tumor segments: "
            f"{', '.join(str(n) for n in tumors)}; coded as a neoplasm: "
            f"{', '.join(str(n) for n in mapped.neoplasms) or 'none'})"
        )
    if not accept:
        raise _Rejected(
            f"no LOAT segment: {fat}; set pipeline.supplied_seg_accept_single_fat = true to "
            "accept a SEG with one neoplasm and one fat segment"
        )
    return number


def _referenced_series(ds: Dataset, instance_series: Mapping[str, str]) -> set[str]:
    """Series the SEG references: ReferencedSeriesSequence, else its frames' source images."""
    referenced = {
        str(item.get("SeriesInstanceUID", "") or "")
        for item in ds.get("ReferencedSeriesSequence", [])
    }
    referenced.discard("")
    if referenced:
        return referenced
    for sop_uid in _source_instances(ds):
        series = instance_series.get(sop_uid)
        if series:
            referenced.add(series)
    return referenced


def _source_instances(ds: Dataset) -> set[str]:
    """SOP Instance UIDs of the source images named in the functional groups."""
    found: set[str] = set()
    for derivation in functional_group_items(ds, "DerivationImageSequence"):
        for source in derivation.get("SourceImageSequence", []):
            uid = str(source.get("ReferencedSOPInstanceUID", "") or "")
            if uid:
                found.add(uid)
    return found


def _codes(items: Iterable[Dataset]) -> list[tuple[str, str, str]]:
    return [
        (
            str(item.get("CodingSchemeDesignator", "") or "").strip().upper(),
            str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip(),
            str(item.get("CodeMeaning", "") or ""),
        )
        for item in items
    ]


def _kind_by_code(segment: Dataset) -> str | None:
    """tumor / loat / liver from the segment's coded property type and region, else None."""
    text = " ".join(str(segment.get(kw, "") or "") for kw in ("SegmentLabel", "SegmentDescription"))
    for scheme, value, meaning in _codes(segment.get("SegmentedPropertyTypeCodeSequence", [])):
        if (scheme, value) in _TUMOR_CODES or _TUMOR_MEANING.search(meaning):
            return "tumor"
        if (scheme, value) in _FAT_CODES or _FAT_MEANING.search(meaning):
            # Fat is LOAT only where it is the omentum's: by the coded region (or a type
            # modifier), or where the reader's label says so.
            regions = _codes(segment.get("AnatomicRegionSequence", []))
            type_item = segment.SegmentedPropertyTypeCodeSequence[0]
            regions += _codes(type_item.get("SegmentedPropertyTypeModifierCodeSequence", []))
            if any(
                (s, v) in _OMENTUM_CODES or _OMENTUM_TEXT.search(m) for s, v, m in regions
            ) or _OMENTUM_TEXT.search(text):
                return "loat"
        if (scheme, value) in _LIVER_CODES:
            return "liver"
    return None


def _kind_by_label(
    segment: Dataset, patterns: Mapping[str, Sequence[re.Pattern[str]]]
) -> str | None:
    texts = [str(segment.get(kw, "") or "") for kw in ("SegmentLabel", "SegmentDescription")]
    # Tumor first: "omental mass" is a tumor, not fat.
    for kind in REQUIRED_KINDS:
        if any(p.search(t) for p in patterns.get(kind, ()) for t in texts if t):
            return kind
    if _LIVER_LABEL.fullmatch(texts[0]):
        return "liver"
    return None


class _SegmentMap(NamedTuple):
    """What a SEG's segments are."""

    groups: dict[str, tuple[int, ...]]  # kind -> segment numbers, ascending
    types: dict[int, str]  # segment number -> SegmentAlgorithmType, upper case
    neoplasms: tuple[int, ...]  # segments whose coded property type is a tumor
    unlabelled_fat: tuple[int, ...]  # coded as fat, mapped to no kind (not the omentum's)
    labels: dict[int, str]  # segment number -> SegmentLabel


def _map_segments(ds: Dataset, patterns: Mapping[str, Sequence[re.Pattern[str]]]) -> _SegmentMap:
    """What each segment maps to, with what the single-fat rule needs to judge the rest.

    Besides the kinds: every segment's algorithm type and label, the segments coded as a
    neoplasm, and those coded as fat that map to no kind (nothing says they are the omentum's).
    """
    groups: dict[str, list[int]] = {}
    types: dict[int, str] = {}
    labels: dict[int, str] = {}
    neoplasms: list[int] = []
    unlabelled_fat: list[int] = []
    for segment in ds.get("SegmentSequence", []):
        number = int(segment.SegmentNumber)
        types[number] = str(segment.get("SegmentAlgorithmType", "") or "").strip().upper()
        labels[number] = str(segment.get("SegmentLabel", "") or "")
        property_types = _codes(segment.get("SegmentedPropertyTypeCodeSequence", []))
        if any((s, v) in _TUMOR_CODES or _TUMOR_MEANING.search(m) for s, v, m in property_types):
            neoplasms.append(number)
        kind = _kind_by_code(segment) or _kind_by_label(segment, patterns)
        if kind is not None:
            groups.setdefault(kind, []).append(number)
        elif any((s, v) in _FAT_CODES or _FAT_MEANING.search(m) for s, v, m in property_types):
            unlabelled_fat.append(number)
    return _SegmentMap(
        groups={kind: tuple(sorted(numbers)) for kind, numbers in groups.items()},
        types=types,
        neoplasms=tuple(sorted(neoplasms)),
        unlabelled_fat=tuple(sorted(unlabelled_fat)),
        labels=labels,
    )


def _describe_all(ds: Dataset) -> str:
    return "; ".join(_describe(item) for item in ds.get("SegmentSequence", [])) or "none"


def _describe(segment: Dataset) -> str:
    """A segment for a rejection reason: number, label and coded type."""
    label = str(segment.get("SegmentLabel", "") or "")
    codes = _codes(segment.get("SegmentedPropertyTypeCodeSequence", []))
    coded = f" {codes[0][0]} {codes[0][1]} {codes[0][2]!r}" if codes else ""
    return f"{segment.get('SegmentNumber', '?')} {label!r}{coded}"


def _normalise_time(value: str) -> str:
    """``HHMMSS.ffffff`` from a TM value of any precision (``HH``, ``HHMM``, ``HH:MM:SS``)."""
    value = value.strip().replace(":", "")
    whole, _, fraction = value.partition(".")
    if not whole.isdigit():
        return "000000.000000"
    return f"{whole[:6].ljust(6, '0')}.{(fraction if fraction.isdigit() else '')[:6].ljust(6, '0')}"


def _created(ds: Dataset) -> str:
    """When the SEG was made, as ``YYYYMMDDHHMMSS.ffffff``; empty when it carries no date."""
    for date_kw, time_kw in (
        ("ContentDate", "ContentTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        date = str(ds.get(date_kw, "") or "").strip()
        if len(date) == 8 and date.isdigit():
            return date + _normalise_time(str(ds.get(time_kw, "") or ""))
    return ""


# --------------------------------------------------------------------------------------------
# Frame geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where each frame of a SEG lies: a regular stack in the SEG's own geometry."""

    slice_of_frame: tuple[int, ...]  # frame index -> slice index of the stack
    segment_of_frame: tuple[int | None, ...]  # frame index -> segment number (None: LABELMAP)
    n_slices: int
    rows: int
    columns: int
    spacing: tuple[float, float, float]  # (column, row, slice) spacing, SimpleITK order
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def _floats(value: Any, count: int, what: str) -> np.ndarray:
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SuppliedSegError(f"{what} is missing or not numeric") from exc
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise SuppliedSegError(f"{what} needs {count} finite values")
    return array


def _frame_layout(ds: Dataset) -> _Layout:
    """Place every frame of a SEG on a regular stack from its functional groups.

    Frames are stacked by their position along the slice normal (empty frames are often
    omitted, so positions may be missing in between). The slice spacing is SpacingBetweenSlices
    when the SEG gives it, else the smallest step between frames — subdivided by the slice
    thickness when that step is a multiple of it, so that two frames far apart are not
    smeared over the slices between them.
    """
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or columns <= 0:
        raise SuppliedSegError("no Rows / Columns")
    labelmap = str(ds.get("SOPClassUID", "")) == LABELMAP_SEGMENTATION_STORAGE or (
        str(ds.get("SegmentationType", "")).upper() == "LABELMAP"
    )

    positions = []
    segments: list[int | None] = []
    orientation: np.ndarray | None = None
    pixel_spacing: np.ndarray | None = None
    for frame in range(n_frames):
        position_item = functional_group(ds, frame, "PlanePositionSequence")
        orientation_item = functional_group(ds, frame, "PlaneOrientationSequence")
        measures_item = functional_group(ds, frame, "PixelMeasuresSequence")
        if position_item is None or orientation_item is None or measures_item is None:
            raise SuppliedSegError(
                f"frame {frame + 1} has no plane position, orientation or pixel measures"
            )
        positions.append(
            _floats(position_item.get("ImagePositionPatient"), 3, "ImagePositionPatient")
        )
        this_orientation = _floats(
            orientation_item.get("ImageOrientationPatient"), 6, "ImageOrientationPatient"
        )
        this_spacing = _floats(measures_item.get("PixelSpacing"), 2, "PixelSpacing")
        if orientation is None or pixel_spacing is None:
            orientation, pixel_spacing = this_orientation, this_spacing
        elif not (
            np.allclose(this_orientation, orientation, atol=1e-4)
            and np.allclose(this_spacing, pixel_spacing, rtol=1e-4, atol=1e-4)
        ):
            raise SuppliedSegError("frames of different orientations or pixel spacings")
        if labelmap:
            segments.append(None)
        else:
            identification = functional_group(ds, frame, "SegmentIdentificationSequence")
            if identification is None or "ReferencedSegmentNumber" not in identification:
                raise SuppliedSegError(f"frame {frame + 1} names no segment")
            segments.append(int(identification.ReferencedSegmentNumber))
    if orientation is None or pixel_spacing is None:
        raise SuppliedSegError("no frames")
    if np.any(pixel_spacing <= 0):
        raise SuppliedSegError("PixelSpacing must be positive")

    row_dir = orientation[:3] / max(float(np.linalg.norm(orientation[:3])), 1e-12)
    col_dir = orientation[3:] - np.dot(orientation[3:], row_dir) * row_dir
    col_norm = float(np.linalg.norm(col_dir))
    if col_norm < 1e-6:
        raise SuppliedSegError("degenerate ImageOrientationPatient")
    col_dir = col_dir / col_norm
    normal = np.cross(row_dir, col_dir)

    points = np.stack(positions)
    distances = points @ normal
    first = int(np.argmin(distances))
    lateral = (points - points[first]) - np.outer(distances - distances[first], normal)
    # PixelSpacing is (row spacing, column spacing): the smaller of the two bounds the offset.
    if float(np.max(np.linalg.norm(lateral, axis=1))) > _LATERAL_TOLERANCE_PX * float(
        np.min(pixel_spacing)
    ):
        raise SuppliedSegError("frames do not line up along the slice normal")

    spacing = _slice_spacing(ds, np.unique(np.round(distances, 4)))
    steps = (distances - distances[first]) / spacing
    slices = np.rint(steps).astype(int)
    if float(np.max(np.abs(steps - slices))) > _GRID_TOLERANCE:
        raise SuppliedSegError(f"frame positions are not on a {spacing:.3f} mm slice grid")

    row_spacing, column_spacing = (float(v) for v in pixel_spacing)
    return _Layout(
        slice_of_frame=tuple(int(s) for s in slices),
        segment_of_frame=tuple(segments),
        n_slices=int(slices.max()) + 1,
        rows=rows,
        columns=columns,
        spacing=(column_spacing, row_spacing, spacing),
        origin=tuple(float(v) for v in points[first]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in np.column_stack([row_dir, col_dir, normal]).ravel()),
    )


def _slice_spacing(ds: Dataset, distinct: np.ndarray) -> float:
    measures = functional_group(ds, 0, "PixelMeasuresSequence")
    declared = _positive(measures.get("SpacingBetweenSlices") if measures else None)
    if declared is not None:
        return declared
    thickness = _positive(measures.get("SliceThickness") if measures else None)
    steps = np.diff(distinct)
    steps = steps[steps > 1e-3]
    if steps.size == 0:
        return thickness or 1.0
    step = float(steps.min())
    if thickness is not None:
        parts = round(step / thickness)
        if parts > 1 and abs(step / parts - thickness) <= _GRID_TOLERANCE * thickness:
            return step / parts
    return step


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def supplied_masks(
    seg: SuppliedSeg,
    arterial: sitk.Image,
    *,
    pv_to_arterial: Any | None = None,
) -> dict[str, np.ndarray]:
    """Decode a supplied SEG into binary masks on the arterial grid.

    Parameters
    ----------
    seg
        A SEG that :func:`find_supplied_segs` found.
    arterial
        The arterial volume; its grid is the output grid.
    pv_to_arterial
        SimpleITK transform mapping arterial points to portal-venous points (the fixed -> moving
        transform a registration of PV onto the arterial volume returns). Required when the SEG
        references the portal-venous series; ignored for a SEG on the arterial series.

    Returns
    -------
    dict
        ``"tumor"``, ``"loat"`` and, when the SEG has one, ``"liver"`` -> uint8 arrays
        ``[k, j, i]`` of the arterial volume's shape, 1 inside. An empty segment gives zeros.

    Raises
    ------
    SuppliedSegError
        The file cannot be read or decoded, its frames cannot be placed, or a PV SEG comes
        without ``pv_to_arterial``.
    """
    on_arterial = seg.referenced_phase == "arterial"
    if not on_arterial and pv_to_arterial is None:
        raise SuppliedSegError(
            "the supplied SEG is on the portal-venous series: pv_to_arterial is needed"
        )
    try:
        ds = pydicom.dcmread(seg.path)
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error, KeyError) as exc:
        raise SuppliedSegError(f"{seg.path.name}: unreadable ({type(exc).__name__})") from exc
    layout = _frame_layout(ds)
    volumes = _decode_frames(seg, ds, layout)

    transform = sitk.Transform() if on_arterial else pv_to_arterial
    masks: dict[str, np.ndarray] = {}
    for kind, volume in volumes.items():
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing(layout.spacing)
        image.SetOrigin(layout.origin)
        image.SetDirection(layout.direction)
        resampled = sitk.Resample(
            image, arterial, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
        )
        masks[kind] = sitk.GetArrayFromImage(resampled).astype(np.uint8)
    log.debug(
        "supplied SEG decoded",
        series_key=uid_key(seg.series_instance_uid),
        on=seg.referenced_phase,
        voxels={kind: int(mask.sum()) for kind, mask in masks.items()},
    )
    return masks


def _decode_frames(seg: SuppliedSeg, ds: Dataset, layout: _Layout) -> dict[str, np.ndarray]:
    """Binary volumes per kind in the SEG's own stack geometry."""
    groups = seg.segment_groups or {kind: (number,) for kind, number in seg.segments.items()}
    kind_of = {number: kind for kind, numbers in groups.items() for number in numbers}
    shape = (layout.n_slices, layout.rows, layout.columns)
    volumes = {kind: np.zeros(shape, dtype=np.uint8) for kind in groups}

    segmentation_type = str(ds.get("SegmentationType", "") or "BINARY").upper()
    threshold = 1.0
    if segmentation_type == "FRACTIONAL":
        maximum = _positive(ds.get("MaximumFractionalValue"))
        if maximum is None:
            raise SuppliedSegError("FRACTIONAL SEG without MaximumFractionalValue")
        threshold = 0.5 * maximum

    _check_native_length(seg, ds)
    frames_seen = 0
    try:
        for index, frame in enumerate(iter_pixels(ds)):
            if index >= len(layout.slice_of_frame):
                raise SuppliedSegError("more frames than functional groups")
            frames_seen += 1
            if frame.shape != (layout.rows, layout.columns):
                raise SuppliedSegError(f"frame {index + 1} decodes to shape {frame.shape}")
            k = layout.slice_of_frame[index]
            number = layout.segment_of_frame[index]
            if number is None:  # LABELMAP: the pixel value is the segment number
                for label, kind in kind_of.items():
                    volumes[kind][k] |= (frame == label).astype(np.uint8)
            elif number in kind_of:
                volumes[kind_of[number]][k] |= (frame >= threshold).astype(np.uint8)
    except SuppliedSegError:
        raise
    except Exception as exc:  # decoders raise anything from ValueError to their own types
        raise SuppliedSegError(
            f"{seg.path.name}: cannot decode pixel data ({type(exc).__name__}: {exc})"
        ) from exc
    if frames_seen != len(layout.slice_of_frame):
        raise SuppliedSegError(
            f"{seg.path.name}: {frames_seen} frames decoded, {len(layout.slice_of_frame)} expected"
        )
    return volumes


def _check_native_length(seg: SuppliedSeg, ds: Dataset) -> None:
    """Refuse natively encoded pixel data shorter than its frames need.

    pydicom decodes a truncated native Pixel Data without complaint (the last frames come out
    partly or wholly empty), which would silently drop what a reader drew.
    """
    if "PixelData" not in ds:
        raise SuppliedSegError(f"{seg.path.name}: no Pixel Data")
    meta = getattr(ds, "file_meta", None) or Dataset()
    syntax = meta.get("TransferSyntaxUID")
    if syntax is not None and pydicom.uid.UID(str(syntax)).is_compressed:
        return  # the decoder checks its own stream
    bits = int(ds.get("BitsAllocated", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    needed = math.ceil(frames * rows * columns * bits / 8)
    if len(ds.PixelData) < needed:
        raise SuppliedSegError(
            f"{seg.path.name}: Pixel Data has {len(ds.PixelData)} bytes, {needed} needed"
        )


@dataclass(frozen=True)
class SegmentationChoice:
    """The masks a job uses and where they came from.

    Attributes
    ----------
    masks
        :class:`model.segmentation.Masks` on the arterial grid (``masks.source`` is ``"supplied"``
        or the automatic segmenter's name).
    supplied
        The SEG that was used, when one was.
    rejected
        Candidate SEGs that were not used, each with its series and the reason (for the job's
        record and the reader who made them); each was logged at INFO.
    """

    masks: Any
    supplied: SuppliedSeg | None
    rejected: list[RejectedSeg]


def choose_segmentation(
    paths: Sequence[Path],
    *,
    arterial: Any,
    portal_venous_on_arterial: Any,
    arterial_series_uid: str,
    portal_venous_series_uid: str,
    pv_to_arterial: Any | None,
    allowed_algorithm_types: Sequence[str],
    label_patterns: Mapping[str, Sequence[str]],
    own_series_uids: Collection[str],
    automatic: Callable[[], Any],
    accept_single_fat: bool = False,
) -> SegmentationChoice:
    """A supplied SEG when the study holds a qualifying one, else the automatic segmenter.

    The newest qualifying SEG wins (a radiologist's correction beats both the segmenter and an
    older correction). Its masks get the same post-processing as the segmenter's — the largest
    tumour component (the count is kept) and LOAT within the fat range — so the numbers are
    measured the same way whichever produced them.

    Parameters
    ----------
    automatic
        Called only when no SEG qualifies; returns an object with
        ``segment(arterial, portal_venous_on_arterial) -> Masks`` (the U-Net segmenter), so the
        model is not loaded for studies that do not need it.
    accept_single_fat
        ``pipeline.supplied_seg_accept_single_fat`` (see :func:`find_supplied_segs`).

    The other parameters are :func:`find_supplied_segs`' and :func:`supplied_masks`'. A
    qualifying SEG whose frames cannot be decoded is rejected too, and the next one tried.
    """
    from model.segmentation import labels_from_masks, postprocess

    search = find_supplied_segs(
        paths,
        arterial_series_uid=arterial_series_uid,
        portal_venous_series_uid=portal_venous_series_uid,
        allowed_algorithm_types=allowed_algorithm_types,
        label_patterns=label_patterns,
        own_series_uids=own_series_uids,
        accept_single_fat=accept_single_fat,
    )
    rejected = list(search.rejected)
    for seg in search.found:
        try:
            masks = supplied_masks(seg, arterial, pv_to_arterial=pv_to_arterial)
        except SuppliedSegError as exc:
            rejection = RejectedSeg(
                path=seg.path,
                series_uid=seg.series_instance_uid,
                sop_instance_uid=seg.sop_instance_uid,
                series_number=seg.series_number,
                series_description=seg.series_description,
                reason=f"cannot be decoded onto the arterial grid: {exc}",
            )
            _log_rejected(rejection)
            rejected.append(rejection)
            continue
        liver = masks.get("liver", masks["tumor"])
        labels = labels_from_masks(liver, masks["tumor"], masks["loat"])
        hu = sitk.GetArrayViewFromImage(arterial)
        return SegmentationChoice(postprocess(labels, hu, "supplied"), seg, rejected)
    segmenter = automatic()
    return SegmentationChoice(
        segmenter.segment(arterial, portal_venous_on_arterial), None, rejected
    )
