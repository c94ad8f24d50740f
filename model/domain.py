"""Domain randomisation of the phantom generator: every range in one place.

A segmenter trained on one phantom appearance learns that appearance: on studies from another
generator it fell apart (12 to 16 tumour components per study, a median diameter error of
238 %). SynthSeg (Billot et al., Medical Image Analysis 2023) trained on synthetic images whose
shapes and intensities are randomised far beyond realism and generalised to real scans of any
contrast and resolution. :func:`model.phantom.make_study` with ``PhantomSpec(domain=...)`` does
the same for this project's phantoms; this module holds what it draws from.

Three kinds of study (:class:`DomainKind`):

* ``standard``: the phantom as it always was (the MVI model's cohorts, the demo study, the
  tests); nothing here is drawn.
* ``randomised``: segmenter training. Every parameter of :data:`TRAINING_RANGES` is drawn
  uniformly from its :class:`Span`, per study. The standard phantom's own values lie inside every
  span, so a standard study is in distribution; and every :data:`STANDARD_EVERY`-th training
  phantom keeps the standard appearance (:func:`training_domain`).
* ``shifted``: evaluation only. The parameters named in :data:`SHIFTED` are drawn *outside* their
  training span, between :data:`SHIFT_BEYOND` and ``SHIFT_BEYOND + SHIFT_REACH`` of the span's
  width beyond it (on the side the entry names); the others are drawn as in training. The
  anatomy arrangement also differs (:attr:`Domain.arrangement`): a long left lateral lobe
  reaching over the stomach and the spleen ("beaver-tail" liver, a normal variant), and the
  tumour in another part of the right lobe.

What the parameters mean (all per study; HU as the scanner would write them):

Intensities
    ``tissue_hu_offset``: added to one tissue's HU in every phase, drawn per tissue
    (:data:`TISSUES`). ``enhancement_gain``: multiplies every tissue's enhancement over its
    non-contrast HU, per phase (contrast dose, cardiac output). ``arterial_timing`` and
    ``portal_timing``: where in its window the phase was acquired, as a fraction of the way
    toward the previous (negative) or the next (positive) phase's HU. ``hu_offset``: added to every
    voxel (calibration).
Noise and texture
    ``noise_hu``: standard deviation of the noise. ``noise_correlation_mm``: Gaussian sigma (mm,
    in plane) that correlates it (0 = white). ``kernel_sigma_mm``: in-plane Gaussian blur of the
    image (a smooth reconstruction kernel); ``sharpen``: unsharp-mask amount on top (a sharp
    kernel's edge overshoot). ``bias_field_hu``: peak of a smooth additive field inside the body
    (beam hardening, cupping). ``streak_hu``: peak of streaks radiating from the spine.
Geometry
    ``slice_spacing_mm`` and ``slice_thickness_ratio`` (thickness = ratio × spacing, a Gaussian
    slice profile of that FWHM: partial volume along z). ``field_of_view_mm``, ``z_extent_mm``.
    ``table_offset_mm``: where the patient lies relative to the centre of the field of view, per
    axis (x, y, z).
Anatomy
    ``organ_shift_mm``: per organ (:data:`ORGANS`) and per axis, a displacement of the organ; the
    LOAT moves by the mean of the liver's and the stomach's, so it stays between the left lobe and
    the lesser curvature; the tumour and the intrahepatic vessels move with the liver.
    ``organ_scale``: per organ, a factor on its size (about its own centre; the liver's vessels and
    tumour position scale with it, the tumour's size does not: it is a latent of the MVI label).
    ``left_lobe_scale``: the left lateral lobe's size relative to the rest of the liver;
    ``left_lobe_reach``: a further factor on its width alone, its medial edge kept (how far the
    lobe runs toward the spleen). ``tumor_offset_mm``: per axis, where in the right lobe the
    tumour lies, relative to the standard phantom's position (kept inside the lobe).
    ``stomach_scale``: distension. ``body_scale``: the abdominal cavity's width and depth;
    ``subcutaneous_fat_mm``: fat outside the muscle wall (body habitus).

The last two were added after a segmenter trained with the tumour always in one place (±3 mm)
missed tumours elsewhere in the liver: an HCC may lie in any segment. They are drawn last, so
every earlier draw of a seed is what it was.

Nothing here renders; :func:`draw_domain` returns the numbers a study is rendered with.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "DOMAIN_VERSION",
    "ORGANS",
    "SHIFTED",
    "SHIFT_BEYOND",
    "SHIFT_REACH",
    "STANDARD_EVERY",
    "TISSUES",
    "TRAINING_RANGES",
    "Arrangement",
    "Domain",
    "DomainKind",
    "DomainRanges",
    "Shift",
    "Span",
    "draw_domain",
    "shifted_spans",
    "training_domain",
]

DOMAIN_VERSION: str = "5"
"""Bump whenever a range, a shift or the way :func:`draw_domain` draws changes (cache keys)."""


class DomainKind(enum.StrEnum):
    """Which appearance a phantom study is rendered with (see the module docstring)."""

    STANDARD = "standard"
    RANDOMISED = "randomised"
    SHIFTED = "shifted"


class Arrangement(enum.StrEnum):
    """How the viscera are laid out."""

    STANDARD = "standard"
    #: Long left lateral lobe over the stomach and spleen; tumour elsewhere in the right lobe.
    VARIANT = "variant"


#: Tissues with their own HU offset (:attr:`Domain.tissue_hu_offset`).
TISSUES: tuple[str, ...] = (
    "liver",
    "tumor",
    "vessels",
    "spleen",
    "kidney",
    "muscle",
    "bowel",
    "stomach_wall",
    "fat",
)

#: Organs with their own displacement and size (:attr:`Domain.organ_shift_mm`, ``organ_scale``).
ORGANS: tuple[str, ...] = ("liver", "stomach", "spleen", "kidneys")


@dataclass(frozen=True)
class Span:
    """A closed interval ``[lo, hi]`` of one parameter."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.lo > self.hi:
            raise ValueError(f"a span needs finite lo <= hi, got [{self.lo}, {self.hi}]")

    @property
    def width(self) -> float:
        return self.hi - self.lo

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int | float) and self.lo <= float(value) <= self.hi

    def draw(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.lo, self.hi)) if self.width > 0 else self.lo


@dataclass(frozen=True)
class DomainRanges:
    """The training spans of every randomised parameter (meanings in the module docstring)."""

    tissue_hu_offset: Span
    enhancement_gain: Span
    arterial_timing: Span
    portal_timing: Span
    hu_offset: Span
    noise_hu: Span
    noise_correlation_mm: Span
    kernel_sigma_mm: Span
    sharpen: Span
    bias_field_hu: Span
    streak_hu: Span
    slice_spacing_mm: Span
    slice_thickness_ratio: Span
    field_of_view_mm: Span
    z_extent_mm: Span
    table_offset_mm: Span
    organ_shift_mm: Span
    organ_scale: Span
    left_lobe_scale: Span
    stomach_scale: Span
    body_scale: Span
    subcutaneous_fat_mm: Span
    left_lobe_reach: Span
    tumor_offset_mm: Span


#: Segmenter training ranges. Each holds the standard phantom's value (offsets 0, gains and
#: scales 1, noise 10 HU, 2.5 mm slices, 380 mm field of view, 160 mm coverage, 18 mm of fat).
TRAINING_RANGES = DomainRanges(
    tissue_hu_offset=Span(-12.0, 12.0),
    enhancement_gain=Span(0.75, 1.3),
    arterial_timing=Span(-0.25, 0.35),
    portal_timing=Span(-0.25, 0.35),
    hu_offset=Span(-15.0, 15.0),
    noise_hu=Span(4.0, 22.0),
    noise_correlation_mm=Span(0.0, 1.2),
    kernel_sigma_mm=Span(0.3, 1.2),
    sharpen=Span(0.0, 0.8),
    bias_field_hu=Span(0.0, 25.0),
    streak_hu=Span(0.0, 40.0),
    slice_spacing_mm=Span(1.0, 5.0),
    slice_thickness_ratio=Span(1.0, 1.5),
    field_of_view_mm=Span(340.0, 450.0),
    z_extent_mm=Span(150.0, 230.0),
    table_offset_mm=Span(-20.0, 20.0),
    organ_shift_mm=Span(-10.0, 10.0),
    organ_scale=Span(0.88, 1.15),
    left_lobe_scale=Span(0.75, 1.3),
    stomach_scale=Span(0.75, 1.3),
    body_scale=Span(0.95, 1.15),
    subcutaneous_fat_mm=Span(6.0, 40.0),
    left_lobe_reach=Span(0.85, 1.25),
    tumor_offset_mm=Span(-25.0, 25.0),
)


@dataclass(frozen=True)
class Shift:
    """How a shifted-cohort parameter leaves its training span: below, above or either side."""

    side: Literal["low", "high", "both"]


#: Parameters the shifted cohort draws outside their training span: the HU (calibration offset
#: and contrast gain), the noise, the slice spacing and the organ positions. For the organs, one
#: axis per organ (drawn) is shifted and the other two are drawn as in training.
SHIFTED: Mapping[str, Shift] = {
    "hu_offset": Shift("both"),
    "enhancement_gain": Shift("both"),
    "noise_hu": Shift("high"),
    "slice_spacing_mm": Shift("high"),
    "organ_shift_mm": Shift("both"),
}

#: A shifted value lies at least this fraction of its span's width beyond the span…
SHIFT_BEYOND: float = 0.2
#: …and at most ``SHIFT_BEYOND + SHIFT_REACH`` of it.
SHIFT_REACH: float = 0.2


def shifted_spans(name: str, ranges: DomainRanges = TRAINING_RANGES) -> tuple[Span, ...]:
    """Where the shifted cohort draws ``name`` from: one span per side it may leave by."""
    span: Span = getattr(ranges, name)
    shift = SHIFTED[name]
    near, far = SHIFT_BEYOND * span.width, (SHIFT_BEYOND + SHIFT_REACH) * span.width
    low = Span(span.lo - far, span.lo - near)
    high = Span(span.hi + near, span.hi + far)
    return {"low": (low,), "high": (high,), "both": (low, high)}[shift.side]


Vec = tuple[float, float, float]


@dataclass(frozen=True)
class Domain:
    """The parameter values one study is rendered with (see the module docstring)."""

    kind: DomainKind
    arrangement: Arrangement
    tissue_hu_offset: Mapping[str, float]
    enhancement_gain: Mapping[str, float]  # per phase: arterial, portal_venous, delayed
    arterial_timing: float
    portal_timing: float
    hu_offset: float
    noise_hu: float
    noise_correlation_mm: float
    kernel_sigma_mm: float
    sharpen: float
    bias_field_hu: float
    streak_hu: float
    slice_spacing_mm: float
    slice_thickness_ratio: float
    field_of_view_mm: float
    z_extent_mm: float
    table_offset_mm: Vec
    organ_shift_mm: Mapping[str, Vec]
    organ_scale: Mapping[str, float]
    left_lobe_scale: float
    stomach_scale: float
    body_scale: tuple[float, float]
    subcutaneous_fat_mm: float
    left_lobe_reach: float
    tumor_offset_mm: Vec

    @property
    def slice_thickness_mm(self) -> float:
        return self.slice_spacing_mm * self.slice_thickness_ratio

    def values(self, name: str) -> list[float]:
        """Every number drawn for parameter ``name`` (a mapping's or a tuple's entries)."""
        value = getattr(self, name)
        if isinstance(value, Mapping):
            out: list[float] = []
            for item in value.values():
                out.extend(item if isinstance(item, tuple) else [item])
            return [float(v) for v in out]
        if isinstance(value, tuple):
            return [float(v) for v in value]
        return [float(value)]


_PHASES = ("arterial", "portal_venous", "delayed")


def draw_domain(
    rng: np.random.Generator,
    kind: DomainKind | str,
    ranges: DomainRanges = TRAINING_RANGES,
) -> Domain:
    """Draw one study's parameters (``randomised`` or ``shifted``; see the module docstring).

    The draw order is fixed, so a seed gives the same study whatever is rendered of it.
    """
    kind = DomainKind(kind)
    if kind is DomainKind.STANDARD:
        raise ValueError("a standard study has no domain to draw")
    shifted = kind is DomainKind.SHIFTED

    def draw(name: str) -> float:
        span: Span = getattr(ranges, name)
        if shifted and name in SHIFTED:
            sides = shifted_spans(name, ranges)
            return sides[int(rng.integers(len(sides)))].draw(rng)
        return span.draw(rng)

    def plain(name: str) -> float:
        return float(getattr(ranges, name).draw(rng))

    gain = {phase: draw("enhancement_gain") for phase in _PHASES}
    shifts: dict[str, Vec] = {}
    for organ in ORGANS:
        axes = [plain("organ_shift_mm") for _ in range(3)]
        if shifted:
            # One axis per organ goes beyond the span, the others stay within it.
            axis = int(rng.integers(3))
            axes[axis] = draw("organ_shift_mm")
        shifts[organ] = (axes[0], axes[1], axes[2])
    return Domain(
        kind=kind,
        arrangement=Arrangement.VARIANT if shifted else Arrangement.STANDARD,
        tissue_hu_offset={tissue: plain("tissue_hu_offset") for tissue in TISSUES},
        enhancement_gain=gain,
        arterial_timing=plain("arterial_timing"),
        portal_timing=plain("portal_timing"),
        hu_offset=draw("hu_offset"),
        noise_hu=draw("noise_hu"),
        noise_correlation_mm=plain("noise_correlation_mm"),
        kernel_sigma_mm=plain("kernel_sigma_mm"),
        sharpen=plain("sharpen"),
        bias_field_hu=plain("bias_field_hu"),
        streak_hu=plain("streak_hu"),
        slice_spacing_mm=draw("slice_spacing_mm"),
        slice_thickness_ratio=plain("slice_thickness_ratio"),
        field_of_view_mm=plain("field_of_view_mm"),
        z_extent_mm=plain("z_extent_mm"),
        table_offset_mm=(
            plain("table_offset_mm"),
            plain("table_offset_mm"),
            plain("table_offset_mm"),
        ),
        organ_shift_mm=shifts,
        organ_scale={organ: plain("organ_scale") for organ in ORGANS},
        left_lobe_scale=plain("left_lobe_scale"),
        stomach_scale=plain("stomach_scale"),
        body_scale=(plain("body_scale"), plain("body_scale")),
        subcutaneous_fat_mm=plain("subcutaneous_fat_mm"),
        # Keyword arguments are evaluated in order: these two are drawn after everything above.
        left_lobe_reach=plain("left_lobe_reach"),
        tumor_offset_mm=(
            plain("tumor_offset_mm"),
            plain("tumor_offset_mm"),
            plain("tumor_offset_mm"),
        ),
    )


#: Every third phantom of a randomised training cohort is rendered standard: the MVI model's and
#: the demo's studies are standard, and at the demo budget (1,500 steps) a cohort without them
#: left 4 of 8 held-out standard studies with more than 3 tumour components (1 of 6 with them),
#: for the same figures on the shifted cohort.
STANDARD_EVERY: int = 3


def training_domain(index: int, kind: DomainKind | str = DomainKind.RANDOMISED) -> DomainKind:
    """The appearance of training phantom ``index`` (0-based) of a ``kind`` cohort."""
    kind = DomainKind(kind)
    if kind is DomainKind.SHIFTED:
        raise ValueError("the shifted cohort is for evaluation only, not training")
    if kind is DomainKind.RANDOMISED and index % STANDARD_EVERY == STANDARD_EVERY - 1:
        return DomainKind.STANDARD
    return kind
