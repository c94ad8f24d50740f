"""The decision: :func:`pair_phases` weighs names, timing and the image check.

The result is a :class:`Pairing`: the chosen pair, or why there is none, and the evidence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from node.analysis.pairing.headers import SeriesInfo
from node.analysis.pairing.image_check import check_images
from node.analysis.pairing.rules import (
    _OTHER_REGIONS,
    PHASES,
    _compile_rules,
    _exclusion,
    _phase_by_name,
    _phases_by_timing,
)
from node.core.logging import get_logger, uid_key

__all__ = ["Pairing", "PhaseEvidence", "pair_phases"]

log = get_logger("node.analysis.pairing")

_HUMAN = {
    "non_contrast": "non-contrast",
    "arterial": "arterial",
    "portal_venous": "portal-venous",
    "delayed": "delayed",
}


@dataclass(frozen=True)
class PhaseEvidence:
    """Why one series got (or did not get) its phase.

    Attributes
    ----------
    series_instance_uid
        The series.
    phase
        Final classification; None when the series is not a candidate or its phase is unknown.
    candidate
        Whether the series is an axial CT volume usable for analysis.
    excluded_because
        Why it is not a candidate (``"LOCALIZER"``, ``"DERIVED"``, ``"not axial"``, ...).
    by_name, by_timing, by_image
        The phase each kind of evidence gave; None for no answer (or, for ``by_image``, when the
        image check did not run).
    image_metrics
        What the image check measured (see :func:`image_metrics`).
    """

    series_instance_uid: str
    phase: str | None
    candidate: bool
    excluded_because: str | None
    by_name: str | None
    by_timing: str | None
    by_image: str | None
    image_metrics: dict[str, float]


@dataclass(frozen=True)
class Pairing:
    """The chosen arterial and portal-venous series of a study, with the evidence.

    Attributes
    ----------
    status
        ``"paired"``; ``"needs_review"`` when contrast phases are present but no usable pair;
        ``"not_applicable"`` when the study is not a contrast liver CT.
    reason
        A sentence for ``needs_review`` and ``not_applicable``; None when paired.
    arterial, portal_venous
        SeriesInstanceUIDs of the chosen pair (None unless paired).
    method
        How the chosen pair was decided: ``"tags"`` (names and timing), ``"image"`` (the image
        check alone) or ``"tags+image"`` (both used, or the image check overruled the tags).
    evidence
        One entry per series given to :func:`pair_phases`, in the same order.
    """

    status: Literal["paired", "needs_review", "not_applicable"]
    reason: str | None
    arterial: str | None
    portal_venous: str | None
    method: Literal["tags", "image", "tags+image"] | None
    evidence: tuple[PhaseEvidence, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable record of the choice and the evidence.

        Metrics are rounded to 0.01 and non-finite values become None, so the record is strict
        JSON.
        """
        evidence = []
        for item in self.evidence:
            record = asdict(item)
            record["image_metrics"] = {
                key: round(value, 2) if math.isfinite(value) else None
                for key, value in item.image_metrics.items()
            }
            evidence.append(record)
        return {
            "status": self.status,
            "reason": self.reason,
            "arterial": self.arterial,
            "portal_venous": self.portal_venous,
            "method": self.method,
            "evidence": evidence,
        }


@dataclass
class _Work:
    """Mutable evidence of one series while :func:`pair_phases` decides."""

    info: SeriesInfo
    excluded: str | None
    by_name: str | None = None
    by_timing: str | None = None
    by_image: str | None = None
    image_confident: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    phase: str | None = None
    decided_by: Literal["tags", "image", "tags+image"] | None = None

    @property
    def tag_phase(self) -> str | None:
        # Names come first: a radiographer's label beats an inferred order.
        return self.by_name or self.by_timing

    @property
    def conflict(self) -> bool:
        return (
            self.by_name is not None
            and self.by_timing is not None
            and (self.by_name != self.by_timing)
        )


def _run_image_check(candidates: Sequence[_Work]) -> None:
    verdicts = check_images([work.info.paths for work in candidates])
    for work, verdict in zip(candidates, verdicts, strict=True):
        if verdict.excluded is not None:
            work.excluded = verdict.excluded
            continue
        work.metrics = verdict.metrics
        work.by_image = verdict.phase
        work.image_confident = verdict.confident


def _pair_key(
    arterial: _Work, portal: _Work, working_spacing_mm: float
) -> tuple[int, float, int, int]:
    a, p = arterial.info, portal.info
    same_frame = bool(a.frame_of_reference_uid) and (
        a.frame_of_reference_uid == p.frame_of_reference_uid
    )

    def distance(spacing: float | None) -> float:
        return abs(spacing - working_spacing_mm) if spacing is not None else math.inf

    # Tags and image agreeing beats either alone, but only after geometry: the pair must be
    # analysable first.
    agreement = sum(w.decided_by == "tags+image" for w in (arterial, portal))
    return (
        0 if same_frame else 1,
        round(distance(a.slice_spacing) + distance(p.slice_spacing), 3),
        -(a.slices + p.slices),
        -agreement,
    )


def _join(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _missing_pair_reason(found: Sequence[str]) -> str:
    missing = [p for p in ("arterial", "portal_venous") if p not in found]
    missing_text = " and no ".join(_HUMAN[p] for p in missing)
    if not found:
        return f"no contrast phase could be identified; no {missing_text} series"
    if len(found) == 1:
        name = _HUMAN[found[0]]
        return f"only {_article(name)} {name} series was found; no {missing_text} series"
    return f"found {_join([_HUMAN[p] for p in found])} series; no {missing_text} series"


def pair_phases(
    series: Sequence[SeriesInfo],
    rules: Mapping[str, Sequence[str]],
    *,
    working_spacing_mm: float = 2.0,
    min_slices: int = 16,
    image_check: bool | Literal["auto"] = "auto",
) -> Pairing:
    """Choose the arterial and portal-venous series of one study.

    Parameters
    ----------
    series
        Every series of the study (:func:`series_info`), whatever its kind: non-CT objects,
        localizers and reformats are recorded and ignored.
    rules
        Phase -> regular expressions on SeriesDescription and ProtocolName
        (``settings.phases.model_dump()``); case-insensitive ``re.search``.
    working_spacing_mm
        The pipeline's slice spacing: between candidates of one phase, the series whose slice
        spacing is nearest wins (not simply the thinnest).
    min_slices
        Fewer slices than this and a series is not a volume.
    image_check
        ``"auto"``: measure the volumes when names and timing do not give an unambiguous pair or
        disagree; ``True``: always (the image then overrules tags it disagrees with);
        ``False``: never.

    Returns
    -------
    Pairing
        The decision and the evidence of every series.

    Raises
    ------
    ValueError
        For an invalid regular expression in ``rules`` (configuration, not data).
    """
    compiled = _compile_rules(rules)
    works = [_Work(info=info, excluded=_exclusion(info, min_slices)) for info in series]
    for work in works:
        work.by_name = _phase_by_name(work.info, compiled)
    candidates = [w for w in works if w.excluded is None]
    by_timing = _phases_by_timing([w.info for w in candidates])
    for work in candidates:
        work.by_timing = by_timing.get(work.info.series_instance_uid)

    for work in candidates:
        _decide(work)  # from the tags; decided again below if the image check runs

    contrast_tags = any(w.info.contrast_agent for w in works if w.info.modality == "CT")
    body_parts = {w.info.body_part.replace(" ", "").replace("_", "") for w in candidates}
    other_region = bool(body_parts) and body_parts <= _OTHER_REGIONS
    if other_region and not contrast_tags:
        region = _join(sorted(body_parts))
        return _finish(
            works,
            "not_applicable",
            f"not a contrast liver CT: body part {region} and no contrast tags",
        )

    tags_found = {w.tag_phase for w in candidates}
    tags_clear = {"arterial", "portal_venous"} <= tags_found and not any(
        w.conflict for w in candidates
    )
    run_image = bool(candidates) and (
        image_check is True or (image_check == "auto" and not tags_clear)
    )
    if run_image:
        _run_image_check(candidates)
        candidates = [w for w in candidates if w.excluded is None]
        for work in candidates:
            _decide(work)

    if not candidates:
        if contrast_tags:
            return _finish(
                works, "needs_review", "contrast CT, but no usable axial CT volume was found"
            )
        return _finish(works, "not_applicable", "no axial CT volume in the study")

    found = [p for p in PHASES if any(w.phase == p for w in candidates)]
    contrast_found = [p for p in found if p != "non_contrast"]
    if not contrast_tags and not contrast_found:
        return _finish(
            works,
            "not_applicable",
            "not a contrast liver CT: no contrast tags and no contrast phase in names or images",
        )

    arterials = [w for w in candidates if w.phase == "arterial"]
    portals = [w for w in candidates if w.phase == "portal_venous"]
    if not arterials or not portals:
        reason = _missing_pair_reason(found)
        unknown = sum(w.phase is None for w in candidates)
        if unknown:
            reason += f" ({unknown} series of unknown phase)"
        return _finish(works, "needs_review", reason)

    arterial, portal = min(
        ((a, p) for a in arterials for p in portals),
        key=lambda pair: _pair_key(pair[0], pair[1], working_spacing_mm),
    )
    methods = {arterial.decided_by, portal.decided_by}
    method: Literal["tags", "image", "tags+image"]
    if methods == {"tags"}:
        method = "tags"
    elif methods == {"image"}:
        method = "image"
    else:
        method = "tags+image"
    return _finish(works, "paired", None, arterial=arterial, portal=portal, method=method)


def _decide(work: _Work) -> None:
    """Final phase of a candidate and what decided it."""
    tag, image = work.tag_phase, work.by_image
    if image is not None and tag is not None and tag != image and not work.image_confident:
        # A guess from the images does not overrule the tags.
        work.phase = tag
        work.decided_by = "tags"
    elif image is not None and tag != image:
        work.phase = image
        # Without tags the image alone decided; otherwise it overruled them (or settled their
        # disagreement), so both were used.
        work.decided_by = "image" if tag is None else "tags+image"
    elif image is not None:
        work.phase = tag
        work.decided_by = "tags+image"
    else:
        work.phase = tag
        work.decided_by = "tags" if tag is not None else None


def _finish(
    works: Sequence[_Work],
    status: Literal["paired", "needs_review", "not_applicable"],
    reason: str | None,
    *,
    arterial: _Work | None = None,
    portal: _Work | None = None,
    method: Literal["tags", "image", "tags+image"] | None = None,
) -> Pairing:
    evidence = tuple(
        PhaseEvidence(
            series_instance_uid=w.info.series_instance_uid,
            phase=w.phase if w.excluded is None else None,
            candidate=w.excluded is None,
            excluded_because=w.excluded,
            by_name=w.by_name,
            by_timing=w.by_timing,
            by_image=w.by_image,
            image_metrics=dict(w.metrics),
        )
        for w in works
    )
    pairing = Pairing(
        status=status,
        reason=reason,
        arterial=arterial.info.series_instance_uid if arterial else None,
        portal_venous=portal.info.series_instance_uid if portal else None,
        method=method,
        evidence=evidence,
    )
    log.info(
        "paired phases" if status == "paired" else "no phase pair",
        status=status,
        method=method,
        arterial_key=uid_key(pairing.arterial) if pairing.arterial else None,
        portal_venous_key=uid_key(pairing.portal_venous) if pairing.portal_venous else None,
        series=len(works),
        candidates=sum(e.candidate for e in evidence),
    )
    return pairing
