"""The quality gates between the stages: a study whose automatic steps did not work gets no score.

Each check takes what a stage produced, measures it (:mod:`model.quality`) and judges the
figures against the ``[gates]`` limits and, for the training ranges and the uncertainty limit,
the segmenter's model card. It returns a :class:`node.analysis.result.Gate`: passed, failed
with a reason a radiologist can read, or not run (``passed=None``) with why — a supplied SEG has
no segmenter uncertainty, an older segmenter no stomach label. The pipeline stops at the first
stage whose gate failed and ends the study ``needs_review`` with the failed gates' reasons; no
MVI probability or risk category is reported for it. Every gate that ran is in result.json, the
SR, the SC and ``studies list``.

Order: ``input`` (slice count and tilt right after loading, the liver's coverage once it is
segmented) → ``registration`` → ``segmentation`` → ``intensity`` → ``roi``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from node.analysis.result import Gate, GateName
from node.core.settings import GatesSection

if TYPE_CHECKING:
    import SimpleITK as sitk

    from model.roi import RoiSpec
    from model.segmentation import Masks
    from node.analysis.stages import Registered

__all__ = [
    "Verdict",
    "check_geometry",
    "check_input",
    "check_intensity",
    "check_registration",
    "check_roi",
    "check_segmentation",
    "failed_reason",
    "registration_failed",
]


@dataclass
class Verdict:
    """Collects one gate's figures, limits and failures while it is judged."""

    name: GateName
    figures: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def at_most(self, key: str, value: float | None, limit: float, what: str) -> None:
        """Fail when ``value`` exceeds ``limit`` (``None`` values are recorded and not judged)."""
        self.figures[key] = value
        self.limits[f"max_{key}"] = limit
        if value is not None and value > limit:
            self.failures.append(f"{what} {_fmt(value)} (limit {_fmt(limit)})")

    def at_least(self, key: str, value: float | None, limit: float, what: str) -> None:
        """Fail when ``value`` is below ``limit``."""
        self.figures[key] = value
        self.limits[f"min_{key}"] = limit
        if value is not None and value < limit:
            self.failures.append(f"{what} {_fmt(value)} (at least {_fmt(limit)})")

    def within(self, key: str, value: float | None, bounds: Sequence[float], what: str) -> None:
        """Fail when ``value`` lies outside ``[low, high]``."""
        low, high = round(float(bounds[0]), 2), round(float(bounds[1]), 2)
        self.figures[key] = value
        self.limits[key] = [low, high]
        if value is not None and not low <= value <= high:
            self.failures.append(f"{what} {_fmt(value)} outside {_fmt(low)}–{_fmt(high)}")

    def gate(self) -> Gate:
        """The outcome: failed when anything failed, not run when nothing could be judged."""
        if self.failures:
            return Gate(
                name=self.name,
                passed=False,
                reason="; ".join(self.failures),
                figures=self.figures,
                limits=self.limits,
            )
        judged = any(v is not None for v in self.figures.values())
        if not judged:
            return Gate(
                name=self.name,
                passed=None,
                reason="; ".join(self.skipped) or "nothing to measure",
                figures=self.figures,
                limits=self.limits,
            )
        return Gate(name=self.name, passed=True, figures=self.figures, limits=self.limits)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def failed_reason(gates: Sequence[Gate]) -> str | None:
    """The study's reason when any gate failed: each failed gate's name and reason."""
    failed = [g for g in gates if g.passed is False]
    if not failed:
        return None
    return "quality check failed — " + "; ".join(f"{g.name}: {g.reason}" for g in failed)


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------


def check_geometry(limits: GatesSection, phases: Mapping[str, sitk.Image]) -> Gate:
    """Right after loading: each phase has enough slices and is axial."""
    from model.quality import geometry

    verdict = Verdict(GateName.INPUT)
    for phase, image in phases.items():
        shape = geometry(image)
        verdict.at_least(f"{phase}_slices", shape.slices, limits.min_slices, f"{phase} slices")
        verdict.at_most(
            f"{phase}_tilt_deg", shape.tilt_deg, limits.max_tilt_deg, f"{phase} slice tilt (°)"
        )
    return verdict.gate()


def check_input(geometry_gate: Gate, limits: GatesSection, masks: Masks) -> Gate:
    """Once segmented: the geometry's figures plus how much of the liver the field of view cuts."""
    from model.quality import liver_cut_fraction

    verdict = Verdict(GateName.INPUT, dict(geometry_gate.figures), dict(geometry_gate.limits))
    if masks.liver.any():
        verdict.at_most(
            "liver_cut_fraction",
            liver_cut_fraction(masks.liver),
            limits.max_liver_cut_fraction,
            "liver cut off by the field of view: border cross-section / largest",
        )
    else:
        verdict.figures["liver_cut_fraction"] = None
    return verdict.gate()


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def registration_failed(reason: str) -> Gate:
    """The registration itself gave up (no overlap, divergence)."""
    return Gate(name=GateName.REGISTRATION, passed=False, reason=f"registration failed: {reason}")


def check_registration(
    limits: GatesSection,
    registered: Registered,
    arterial_hu: npt.NDArray[Any],
    portal_on_arterial_hu: npt.NDArray[Any],
    region: npt.NDArray[Any] | None,
    spacing_mm: Sequence[float],
) -> Gate:
    """The final metric, the body overlap and the misalignment left around ``region`` (liver)."""
    from model.quality import residual_shift_mm

    reg = registered.registration
    verdict = Verdict(GateName.REGISTRATION)
    verdict.at_most(
        "metric", round(float(reg.metric), 3), limits.registration_max_metric, "final metric"
    )
    verdict.at_least(
        "body_overlap",
        round(float(reg.overlap), 3),
        limits.registration_min_overlap,
        "body overlap",
    )
    verdict.figures["shift_mm"] = registered.shift_mm
    residual = None
    if region is not None and np.any(region):
        vector = residual_shift_mm(arterial_hu, portal_on_arterial_hu, region, spacing_mm)
        if vector is not None:
            residual = round(float(np.linalg.norm(vector)), 2)
    verdict.at_most(
        "residual_mm",
        residual,
        limits.registration_max_residual_mm,
        "misalignment left around the liver (mm)",
    )
    return verdict.gate()


# --------------------------------------------------------------------------------------------
# Segmentation and intensity
# --------------------------------------------------------------------------------------------


def _voxel_ml(spacing_mm: Sequence[float]) -> float:
    return float(np.prod([float(s) for s in spacing_mm])) / 1000.0


def _limit(
    configured: float | None,
    card: Mapping[str, Any] | None,
    of_card: Callable[[Mapping[str, Any]], float | None],
) -> float | None:
    if configured is not None or card is None:
        return configured
    return of_card(card)


def _judge_uncertainty(
    verdict: Verdict, key: str, value: float | None, limit: float | None, what: str
) -> None:
    if limit is not None and value is not None:
        verdict.at_most(key, round(float(value), 4), float(limit), what)
    else:
        verdict.figures[key] = value


def _range(bounds: Sequence[float], factor: float) -> list[float]:
    return [float(bounds[0]) / factor, float(bounds[1]) * factor]


def check_segmentation(
    limits: GatesSection,
    masks: Masks,
    spacing_mm: Sequence[float],
    card: Mapping[str, Any] | None,
) -> Gate:
    """Tumor components and size, tumor in the liver, volumes, LOAT's place, uncertainty.

    A supplied SEG (``masks.source == "supplied"``) is a reader's work: only its volumes and
    places are judged, not the segmenter's uncertainty.
    """
    from model.quality import liver_contact, median_distance_mm
    from model.segmentation import (
        training_range_of,
        tumor_uncertainty_limit_of,
        uncertainty_limit_of,
    )

    verdict = Verdict(GateName.SEGMENTATION)
    voxel_ml = _voxel_ml(spacing_mm)
    tumor_ml = round(int(np.count_nonzero(masks.tumor)) * voxel_ml, 3)
    loat_ml = round(int(np.count_nonzero(masks.loat)) * voxel_ml, 3)
    sizes = masks.tumor_component_voxels or (
        (int(np.count_nonzero(masks.tumor)),) if tumor_ml else ()
    )
    counted = sum(1 for size in sizes if size * voxel_ml >= limits.min_component_ml)
    verdict.at_most(
        "tumor_components",
        counted,
        limits.max_tumor_components,
        f"tumor components of at least {limits.min_component_ml:g} ml",
    )
    if tumor_ml > 0:
        satellites = round(sum(sizes[1:]) * voxel_ml / tumor_ml, 3)
        verdict.at_most(
            "satellite_fraction",
            satellites,
            limits.max_satellite_fraction,
            "volume of the other tumor components / the largest",
        )
    verdict.at_least("tumor_ml", tumor_ml, limits.min_tumor_volume_ml, "largest tumor (ml)")
    if masks.source != "supplied" or _has_parenchyma(masks):
        verdict.at_least(
            "liver_contact",
            liver_contact(masks.tumor, masks.liver),
            limits.min_liver_contact,
            "share of the tumor surface touching liver",
        )
    trained = training_range_of(card) if card is not None else None
    if trained is not None:
        factor = limits.volume_range_factor
        verdict.within(
            "tumor_volume_ml",
            tumor_ml,
            _range(trained.tumor_volume_ml, factor),
            "tumor volume (ml) outside the training range",
        )
        verdict.within(
            "loat_volume_ml",
            loat_ml,
            _range(trained.loat_volume_ml, factor),
            "LOAT volume (ml) outside the training range",
        )
    else:
        verdict.skipped.append("the segmenter's card has no training range")
    if masks.stomach is not None and masks.loat.any():
        # An empty stomach is a segmenter that never learned one (site training from SEGs
        # without it), not a patient without a stomach: that distance is then not judged.
        # A LOAT in place lies well within half the limit of both: its distances are measured
        # around it alone; a farther one pays for the box of both masks.
        reach = limits.max_loat_distance_mm / 2
        for organ, mask in (("liver", masks.liver), ("stomach", masks.stomach)):
            verdict.at_most(
                f"loat_to_{organ}_mm",
                median_distance_mm(masks.loat, mask, spacing_mm, exact_within_mm=reach),
                limits.max_loat_distance_mm,
                f"LOAT not between liver and stomach: median distance to the {organ} (mm)",
            )
    else:
        verdict.figures["loat_to_stomach_mm"] = None
    if masks.source != "supplied":
        # The configured limit, else the card's (set from its validation studies); none (an
        # older card): the figure is recorded, not judged.
        _judge_uncertainty(
            verdict,
            "uncertainty",
            masks.uncertainty,
            _limit(limits.uncertainty_limit, card, uncertainty_limit_of),
            "segmenter uncertainty (mean entropy)",
        )
        if tumor_ml > 0:
            _judge_uncertainty(
                verdict,
                "tumor_uncertainty",
                masks.tumor_uncertainty,
                _limit(limits.tumor_uncertainty_limit, card, tumor_uncertainty_limit_of),
                "tumor extent uncertain: the segmenter's mean entropy on it",
            )
        if masks.dropped_voxels:
            kept = int(np.count_nonzero(masks.liver))
            stray = masks.dropped_voxels.get("liver", 0)
            verdict.at_most(
                "stray_liver_fraction",
                round(stray / kept, 3) if kept else float(stray > 0),
                limits.max_stray_liver_fraction,
                "liver labelled outside the main liver / the liver kept",
            )
    return verdict.gate()


def _has_parenchyma(masks: Masks) -> bool:
    # A supplied SEG's liver segment is optional; without one there is nothing to touch.
    return bool(np.any(masks.liver > masks.tumor))  # 0/1 masks: liver and not tumor


def check_intensity(
    limits: GatesSection,
    arterial_hu: npt.NDArray[Any],
    portal_on_arterial_hu: npt.NDArray[Any],
    masks: Masks,
    card: Mapping[str, Any] | None,
) -> Gate:
    """Mean HU of liver (without tumor) and aorta per phase within the training range."""
    from model.quality import mean_hu
    from model.segmentation import training_range_of

    verdict = Verdict(GateName.INTENSITY)
    trained = training_range_of(card) if card is not None else None
    if trained is None:
        verdict.skipped.append("the segmenter's card has no training range")
        return verdict.gate()
    margin = limits.hu_margin
    # Liver without tumor: for 0/1 masks one comparison instead of a test and an "and".
    parenchyma = masks.liver > masks.tumor
    regions: list[tuple[str, npt.NDArray[Any] | None, Mapping[str, Sequence[float]] | None]] = [
        ("liver", parenchyma, trained.liver_hu),
        ("aorta", masks.aorta, trained.aorta_hu),
    ]
    for organ, mask, ranges in regions:
        if mask is None or ranges is None:
            verdict.skipped.append(f"no {organ} mask")
            continue
        phases = [
            (phase, volume, ranges[phase])
            for phase, volume in (
                ("arterial", arterial_hu),
                ("portal_venous", portal_on_arterial_hu),
            )
            if ranges.get(phase) is not None
        ]
        if not phases:
            continue
        means = mean_hu([volume for _, volume, _ in phases], mask)
        for (phase, _, bounds), value in zip(phases, means, strict=True):
            key = f"{organ}_{phase}_hu"
            if value is None:
                verdict.figures[key] = None
                verdict.failures.append(f"no {organ} found on the {phase.replace('_', '-')} series")
                continue
            verdict.within(
                key,
                round(value, 1),
                [float(bounds[0]) - margin, float(bounds[1]) + margin],
                f"{organ} HU on the {phase.replace('_', '-')} series",
            )
    return verdict.gate()


# --------------------------------------------------------------------------------------------
# ROI
# --------------------------------------------------------------------------------------------


def check_roi(
    limits: GatesSection, masks: Masks, spacing_mm: Sequence[float], spec: RoiSpec
) -> Gate:
    """Each branch's model input crop lies inside the volume."""
    from model.quality import roi_outside_fraction

    verdict = Verdict(GateName.ROI)
    for branch, mask in (("tumor", masks.tumor), ("loat", masks.loat)):
        verdict.at_most(
            f"{branch}_outside_fraction",
            roi_outside_fraction(mask, spacing_mm, spec.margin_mm, spec.slices),
            limits.max_roi_outside_fraction,
            f"share of the {branch} crop outside the volume",
        )
    return verdict.gate()
