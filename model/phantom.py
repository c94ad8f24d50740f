"""Synthetic multi-phase contrast liver CT with known truth.

The phantom is a numerical abdomen rendered in continuous millimetre coordinates (LPS, identity
direction) and sampled onto a voxel grid, so anatomy does not depend on the grid resolution. Each
study is driven by a seed and three independent latent variables:

* ``z1`` ("aggressiveness") drives margin irregularity, peritumoral arterial enhancement and,
  loosely (half its variance is independent jitter), tumour size;
* ``z2`` ("loat") drives the size of the lesser omental adipose tissue (LOAT) pad between the
  left lateral liver lobe and the lesser curvature of the stomach;
* ``z3`` ("washout") is visible only after the arterial phase: the tumour's portal-venous and
  delayed washout against the liver and its enhancing capsule. Size does not carry it.

``PhantomSpec(domain=...)`` renders the same patient with a randomised appearance, geometry and
organ layout for segmenter training (``"randomised"``) or further away for evaluation only
(``"shifted"``); :mod:`model.domain` holds every range and says what each parameter does.

The microvascular-invasion label is drawn from a logistic model of the three latents (see
:data:`MVI_LOGIT_COEFFICIENTS`), so an image model that sees the tumour in both phases and the
LOAT can do better than one that only sees the tumour, one that only sees the arterial phase, or
a clinical model of the maximum diameter and the LOAT area (which see z2 well but z1 only
partly and z3 not at all).

Multi-centre cohorts: ``PhantomSpec(site=...)`` renders a study as a :class:`model.site.Site`'s
scanner would (noise, kernel, HU offset) with that site's case mix; ``make_study(seed, spec,
patient=...)`` renders a repeat study of a patient (same latents, label and anatomy, new noise).
:func:`model.cohort.make_cohort` assembles both.

Array index order is ``[k, j, i] = [slice, row, column]``; the centre of voxel ``[k, j, i]`` is at
``x = origin_x + i * spacing_x``, ``y = origin_y + j * spacing_y``, ``z = origin_z + k * spacing_z``
(columns toward patient left, rows toward posterior, slices toward superior). The liver is on the
negative-x side.

Nothing here does file I/O, DICOM or settings; everything is numpy.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from model.domain import Arrangement, Domain, DomainKind, draw_domain

# The diameter definition lives in model.measure; re-exported here for existing callers.
from model.measure import feret_diameter_mm, max_axial_diameter_mm, measure
from model.site import KERNELS, Site

__all__ = [
    "MVI_LOGIT_COEFFICIENTS",
    "PHANTOM_VERSION",
    "PHASE_NAMES",
    "PhantomSpec",
    "PhantomStudy",
    "PhaseVolume",
    "Truth",
    "draw_latents",
    "feret_diameter_mm",
    "localizer",
    "make_study",
    "max_axial_diameter_mm",
    "measure_truth",
]

PHANTOM_VERSION: str = "2"
"""Bump whenever :func:`make_study` output changes for a given seed and spec (cache key)."""

PHASE_NAMES: tuple[str, ...] = ("non_contrast", "arterial", "portal_venous", "delayed")

# Label model: mvi ~ Bernoulli(sigmoid(a*z1 + b*z2 + d*z3 + c)), z1, z2, z3 iid N(0, 1).
# Tuned by Monte Carlo (200k draws) with the size model of draw_latents: prevalence 0.44; AUC of
# the ideal score 0.90, of the tumour's latents (z1, z3) 0.84, of the arterial phase's (z1, z2)
# 0.80, of a logistic model of log diameter and LOAT area 0.74, of the diameter alone 0.66.
# (Version 1 had no z3 and size nearly fixed by z1: that clinical model reached 0.88 of 0.90,
# so no image model could show what it adds.)
MVI_LOGIT_COEFFICIENTS: tuple[float, float, float, float] = (1.5, 1.3, 1.6, -0.5)

FloatVolume = npt.NDArray[np.float32]
MaskVolume = npt.NDArray[np.uint8]
_Bool = npt.NDArray[np.bool_]
_F64 = npt.NDArray[np.float64]
_F32 = npt.NDArray[np.float32]
_Vec = tuple[float, float, float]

# LPS z of the anatomy's origin (liver hilum level); the grid is centred on it.
_Z_CENTRE_MM = -100.0
# Slices per block when blurring and adding noise: bounds temporaries for 512x512x200 volumes.
_SLAB = 16

# --------------------------------------------------------------------------------------------
# Labels and their HU per phase
# --------------------------------------------------------------------------------------------

(
    _AIR,
    _FAT,
    _MUSCLE,
    _CAVITY,
    _LIVER,
    _TUMOR,
    _TUMOR_CORE,
    _RIM,
    _PORTAL,
    _HEPATIC_VEIN,
    _AORTA,
    _IVC,
    _STOMACH_WALL,
    _STOMACH_FLUID,
    _STOMACH_AIR,
    _SPLEEN,
    _KIDNEY,
    _RETRO_FAT,
    _BONE,
    _CORTEX,
    _DISC,
    _CSF,
    _LOAT,
    _LUNG,
    _HEART,
) = range(25)
_N_LABELS = 25

# (non_contrast, arterial, portal_venous, delayed). _CAVITY stands for bowel and mesentery.
# Per study (see _study_tables): _TUMOR's arterial value and the arterial _RIM carry z1; the
# tumour's portal-venous and delayed values (washout) and the later _RIM (capsule) carry z3.
_HU_TABLE: dict[int, tuple[float, float, float, float]] = {
    _AIR: (-1000.0, -1000.0, -1000.0, -1000.0),
    _FAT: (-100.0, -100.0, -100.0, -100.0),
    _MUSCLE: (50.0, 58.0, 65.0, 62.0),
    _CAVITY: (35.0, 55.0, 75.0, 65.0),
    _LIVER: (55.0, 70.0, 110.0, 90.0),
    _TUMOR: (40.0, 120.0, 80.0, 60.0),
    _TUMOR_CORE: (35.0, 95.0, 75.0, 60.0),
    _RIM: (55.0, 70.0, 110.0, 90.0),
    _PORTAL: (40.0, 120.0, 180.0, 110.0),
    _HEPATIC_VEIN: (40.0, 55.0, 160.0, 110.0),
    _AORTA: (40.0, 300.0, 150.0, 110.0),
    _IVC: (40.0, 75.0, 140.0, 110.0),
    _STOMACH_WALL: (40.0, 90.0, 100.0, 85.0),
    _STOMACH_FLUID: (10.0, 10.0, 10.0, 10.0),
    _STOMACH_AIR: (-1000.0, -1000.0, -1000.0, -1000.0),
    _SPLEEN: (45.0, 120.0, 120.0, 95.0),
    _KIDNEY: (35.0, 170.0, 180.0, 140.0),
    _RETRO_FAT: (-100.0, -100.0, -100.0, -100.0),
    _BONE: (400.0, 400.0, 400.0, 400.0),
    _CORTEX: (700.0, 700.0, 700.0, 700.0),
    _DISC: (80.0, 80.0, 80.0, 80.0),
    _CSF: (10.0, 10.0, 10.0, 10.0),
    _LOAT: (-100.0, -100.0, -100.0, -100.0),
    _LUNG: (-850.0, -850.0, -850.0, -850.0),
    _HEART: (40.0, 250.0, 140.0, 110.0),
}

_PHASE_DELAY_S: dict[str, tuple[float, float]] = {
    # (nominal, half-width of the per-study uniform jitter)
    "non_contrast": (-60.0, 0.0),
    "arterial": (35.0, 5.0),
    "portal_venous": (70.0, 8.0),
    "delayed": (180.0, 15.0),
}


def _overwrite(*labels: int) -> _Bool:
    """Boolean lookup table: which existing labels a structure may paint over."""
    table = np.zeros(256, dtype=bool)
    table[list(labels)] = True
    return table


_IN_CAVITY = _overwrite(_CAVITY)


# --------------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomSpec:
    """What to render.

    Parameters
    ----------
    size
        Rows and columns of each axial slice (32..1024).
    slices
        Number of axial slices (8..1000).
    field_of_view_mm
        In-plane field of view; pixel spacing is ``field_of_view_mm / size``.
    z_extent_mm
        Cranio-caudal coverage; slice spacing is ``z_extent_mm / slices``.
    tumor
        ``False`` renders a liver study without a tumour (``Truth.mvi`` is ``None``).
    non_liver
        ``True`` renders a chest phantom with a single non-contrast phase and empty liver,
        tumour, LOAT and stomach masks (the aorta runs through the chest and keeps its mask);
        ``phases`` is then ignored.
    phases
        Subset of :data:`PHASE_NAMES` to render (rendered in canonical order).
    noise_hu
        Standard deviation of the additive Gaussian noise.
    domain
        :class:`model.domain.DomainKind`: ``"standard"`` (default), ``"randomised"`` (segmenter
        training) or ``"shifted"`` (evaluation only). Other than standard, the study draws its
        own field of view, coverage, slice spacing, noise and the rest of
        :data:`model.domain.TRAINING_RANGES`: ``size`` is kept, the number of slices follows from
        the drawn coverage and spacing, and ``field_of_view_mm``, ``z_extent_mm``, ``slices`` and
        ``noise_hu`` are not used.
    site
        A :class:`model.site.Site` (standard domain only): its noise replaces ``noise_hu``, its
        kernel and HU offset are applied to every phase, its logit offset to the MVI label.
    """

    size: int = 256
    slices: int = 64
    field_of_view_mm: float = 380.0
    z_extent_mm: float = 160.0
    tumor: bool = True
    non_liver: bool = False
    phases: tuple[str, ...] = PHASE_NAMES
    noise_hu: float = 10.0
    domain: DomainKind = DomainKind.STANDARD
    site: Site | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "domain", DomainKind(self.domain))
        except ValueError:
            raise ValueError(
                f"domain must be one of {', '.join(k.value for k in DomainKind)}, "
                f"got {self.domain!r}"
            ) from None
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size must be in 32..1024, got {self.size}")
        if not 8 <= self.slices <= 1000:
            raise ValueError(f"slices must be in 8..1000, got {self.slices}")
        if not (math.isfinite(self.field_of_view_mm) and 100.0 <= self.field_of_view_mm <= 1000.0):
            raise ValueError(
                f"field_of_view_mm must be in 100..1000 mm, got {self.field_of_view_mm}"
            )
        if not (math.isfinite(self.z_extent_mm) and 20.0 <= self.z_extent_mm <= 2000.0):
            raise ValueError(f"z_extent_mm must be in 20..2000 mm, got {self.z_extent_mm}")
        if not (math.isfinite(self.noise_hu) and self.noise_hu >= 0.0):
            raise ValueError(f"noise_hu must be finite and >= 0, got {self.noise_hu}")
        if isinstance(self.phases, str) or not isinstance(self.phases, Sequence):
            raise ValueError(f"phases must be a tuple of phase names, got {self.phases!r}")
        # A list is accepted for convenience but stored as a tuple to keep the spec hashable.
        object.__setattr__(self, "phases", tuple(self.phases))
        if not self.phases:
            raise ValueError("phases must not be empty")
        unknown = [p for p in self.phases if p not in PHASE_NAMES]
        if unknown:
            raise ValueError(f"unknown phases {unknown}; expected a subset of {PHASE_NAMES}")
        if len(set(self.phases)) != len(self.phases):
            raise ValueError(f"duplicate phases in {self.phases}")
        if self.site is not None:
            if not isinstance(self.site, Site):
                raise ValueError(f"site must be a model.site.Site, got {self.site!r}")
            if self.domain is not DomainKind.STANDARD:
                # A randomised domain already draws noise, kernel and offsets of its own.
                raise ValueError(f"site applies to the standard domain only, not {self.domain}")

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing ``(x, y, z)`` in mm."""
        pixel = self.field_of_view_mm / self.size
        return (pixel, pixel, self.z_extent_mm / self.slices)

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """LPS position of the centre of voxel ``[0, 0, 0]``: the grid is centred on the body."""
        sx, sy, sz = self.spacing_mm
        return (
            -self.field_of_view_mm / 2.0 + sx / 2.0,
            -self.field_of_view_mm / 2.0 + sy / 2.0,
            _Z_CENTRE_MM - self.z_extent_mm / 2.0 + sz / 2.0,
        )

    @property
    def rendered_phases(self) -> tuple[str, ...]:
        """Phases :func:`make_study` renders, in canonical order."""
        if self.non_liver:
            return ("non_contrast",)
        return tuple(p for p in PHASE_NAMES if p in self.phases)


@dataclass(frozen=True)
class Truth:
    """Ground truth measured on the arterial-frame masks (see :func:`measure_truth`)."""

    mvi: int | None
    max_diameter_mm: float
    tumor_volume_ml: float
    loat_max_area_cm2: float
    loat_volume_ml: float


@dataclass
class PhaseVolume:
    """One rendered contrast phase.

    ``shift_mm`` is the displacement ``(x, y, z)`` of the abdominal viscera relative to the
    arterial phase (breathing); body wall, spine and aorta do not move.
    """

    name: str
    hu: FloatVolume
    shift_mm: tuple[float, float, float]
    delay_s: float


@dataclass
class PhantomStudy:
    """A rendered study; masks are on the arterial frame (viscera without breathing shift).

    ``masks`` holds uint8 0/1 volumes ``"liver"`` (tumour included), ``"tumor"``, ``"loat"``,
    ``"stomach"`` (wall, fluid and gas) and ``"aorta"``; stomach and aorta never overlap the
    liver or the LOAT.
    """

    seed: int
    spec: PhantomSpec
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    phases: dict[str, PhaseVolume]
    masks: dict[str, MaskVolume]
    latents: dict[str, float]
    truth: Truth
    domain: Domain | None = None
    """What a randomised or shifted study was rendered with (``None`` for a standard one)."""


# --------------------------------------------------------------------------------------------
# Latents and the MVI label
# --------------------------------------------------------------------------------------------


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _streams(
    seed: int,
) -> tuple[np.random.SeedSequence, np.random.SeedSequence, list[np.random.SeedSequence]]:
    """Independent streams: latents, anatomy, and one noise stream per phase.

    Separate streams keep the latents cheap to draw and make a phase's noise independent of which
    other phases are rendered.
    """
    latent_ss, anatomy_ss, noise_ss = np.random.SeedSequence(int(seed)).spawn(3)
    return latent_ss, anatomy_ss, noise_ss.spawn(len(PHASE_NAMES))


def _domain_stream(seed: int) -> np.random.SeedSequence:
    """The fourth stream: domain randomisation (the first three are as :func:`_streams` has them,
    so a randomised study is the same patient, with the same latents, as the standard one)."""
    return np.random.SeedSequence(int(seed)).spawn(4)[3]


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def draw_latents(seed: int, logit_offset: float = 0.0) -> dict[str, float]:
    """Draw the per-patient latents and MVI label without rendering anything.

    :func:`make_study` uses exactly this draw, so ``draw_latents(s)["mvi"]`` is the label of
    ``make_study(s)`` (when it has a tumour; of ``make_study(t, spec, patient=s)`` for a repeat
    study, with ``logit_offset`` the spec's site's).

    Parameters
    ----------
    seed
        Non-negative patient (or study) seed.
    logit_offset
        Added to the label's logit (a site's case mix, :attr:`model.site.Site.mvi_logit_offset`).

    Returns
    -------
    dict
        ``aggressiveness`` (z1), ``loat`` (z2), ``washout`` (z3), ``mvi_probability``, ``mvi``
        (0.0 or 1.0), the independent jitters ``diameter_jitter`` and ``loat_jitter``, and the
        derived ``tumor_nominal_diameter_mm``, ``tumor_irregularity``,
        ``peritumoral_enhancement_hu``, ``tumor_arterial_hu``, ``tumor_washout_hu``,
        ``capsule_hu`` and ``loat_scale``.
    """
    _check_seed(seed)
    if not math.isfinite(logit_offset):
        raise ValueError(f"logit_offset must be finite, got {logit_offset!r}")
    rng = np.random.default_rng(_streams(seed)[0])
    z1, z2 = (float(v) for v in rng.standard_normal(2))
    u = float(rng.random())
    e_diameter, e_loat = (float(v) for v in rng.standard_normal(2))
    # Drawn last, so z1, z2 and the jitters of a seed are those of phantom version 1.
    z3 = float(rng.standard_normal())
    a, b, d, c = MVI_LOGIT_COEFFICIENTS
    probability = _sigmoid(a * z1 + b * z2 + d * z3 + c + logit_offset)
    return {
        "aggressiveness": z1,
        "loat": z2,
        "washout": z3,
        "mvi_probability": probability,
        "mvi": 1.0 if u < probability else 0.0,
        "diameter_jitter": e_diameter,
        "loat_jitter": e_loat,
        # Log-linear in z1 with as much independent jitter: size tells of z1, but only half.
        "tumor_nominal_diameter_mm": float(
            np.clip(34.0 * math.exp(0.22 * z1 + 0.22 * e_diameter), 14.0, 64.0)
        ),
        "tumor_irregularity": 0.04 + 0.08 * _sigmoid(1.5 * z1),
        "peritumoral_enhancement_hu": float(np.clip(20.0 + 14.0 * z1, 0.0, 55.0)),
        "tumor_arterial_hu": 118.0 + 6.0 * float(np.clip(z1, -2.0, 2.0)),
        # Portal-venous (and delayed) washout below the liver, from almost none (iso-dense: the
        # tumour is then seen in the arterial phase only) to 70 HU; version 1 had a fixed 30.
        "tumor_washout_hu": float(np.clip(30.0 + 16.0 * z3, 4.0, 70.0)),
        # The enhancing capsule: the peritumoral ring above the liver after the arterial phase.
        "capsule_hu": float(np.clip(10.0 + 10.0 * z3, 0.0, 35.0)),
        "loat_scale": math.exp(0.25 * z2 + 0.08 * e_loat),
    }


# --------------------------------------------------------------------------------------------
# Anatomy parameters (per seed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipsoid:
    centre: _Vec
    semi: _Vec
    power: float = 2.0


@dataclass(frozen=True)
class _Anatomy:
    # fixed frame (does not breathe)
    body_semi: tuple[float, float]
    fat_mm: float
    wall_mm: float
    spine_y: float
    disc_phase_mm: float
    aorta: tuple[float, float, float]  # x, y, radius
    # viscera (arterial frame)
    liver_right: _Ellipsoid
    liver_left: _Ellipsoid
    ivc: tuple[float, float, float, float]  # x, y, semi-x, semi-y
    portal: tuple[tuple[_Vec, ...], ...]  # polylines
    portal_radius: tuple[float, ...]
    hepatic_veins: tuple[tuple[_Vec, _Vec], ...]
    stomach: _Ellipsoid
    air_level: float  # y of the air-fluid level relative to the stomach centre
    spleen: _Ellipsoid
    spleen_wave: tuple[float, float, float, float, float, float]  # wavelengths, phases
    kidneys: tuple[_Ellipsoid, _Ellipsoid]
    loat: _Ellipsoid
    tumor_centre: _Vec
    tumor_radius: float
    tumor_irregularity: float
    harmonics: tuple[tuple[int, float, _Vec], ...]  # (degree, weight, axis)
    rim_mm: float
    core_fraction: float
    # contrast
    gains: tuple[float, float, float, float]
    tumor_arterial_hu: float
    peritumoral_hu: float
    tumor_washout_hu: float
    capsule_hu: float
    shifts: dict[str, _Vec]
    delays: dict[str, float]
    # chest phantom (non_liver)
    lungs: tuple[_Ellipsoid, _Ellipsoid]
    heart: _Ellipsoid
    # The LOAT pad may displace liver parenchyma (:func:`_clear_loat`): domain studies only.
    loat_in_fissure: bool = False
    # The perirenal fat displaces liver parenchyma, so a kidney pushed up never touches the
    # liver bare (domain studies only; the standard phantom keeps its pixels).
    kidney_fat_over_liver: bool = False


def _draw_anatomy(rng: np.random.Generator, latents: Mapping[str, float]) -> _Anatomy:
    """Per-seed anatomy. The draw order is fixed, independent of the spec."""

    def jit(sd: float, n: int = 1) -> _F64:
        # Truncated at 2 sd so no draw can push an organ through the body wall.
        return np.clip(rng.standard_normal(n), -2.0, 2.0) * sd

    def vec(base: _Vec, sd: float) -> _Vec:
        d = jit(sd, 3)
        return (base[0] + float(d[0]), base[1] + float(d[1]), base[2] + float(d[2]))

    def scaled(base: _Vec, sd: float) -> _Vec:
        f = 1.0 + jit(sd, 3)
        return (base[0] * float(f[0]), base[1] * float(f[1]), base[2] * float(f[2]))

    body = 1.0 + jit(0.03, 2)
    body_semi = (165.0 * float(body[0]), 120.0 * float(body[1]))
    fat_mm = 18.0 + float(jit(3.0)[0])
    wall_mm = 10.0 + float(jit(1.0)[0])
    spine_y = 52.0 + float(jit(2.0)[0])
    disc_phase_mm = float(rng.uniform(0.0, 30.0))
    aorta_xy = vec((18.0, 22.0, 0.0), 1.5)
    aorta = (aorta_xy[0], aorta_xy[1], 12.0 + float(jit(0.8)[0]))

    liver_right = _Ellipsoid(vec((-62.0, 0.0, -5.0), 3.0), scaled((72.0, 80.0, 68.0), 0.04), 2.2)
    liver_left = _Ellipsoid(vec((20.0, -50.0, 15.0), 3.0), scaled((55.0, 28.0, 35.0), 0.06), 2.2)
    ivc_xy = vec((-25.0, 30.0, 0.0), 1.5)
    ivc = (ivc_xy[0], ivc_xy[1], 13.0, 10.0)

    hilum = vec((-30.0, 5.0, -20.0), 2.0)
    portal = (
        (vec((0.0, 0.0, -85.0), 2.0), hilum),
        (hilum, vec((-60.0, -5.0, -5.0), 3.0), vec((-95.0, -25.0, 15.0), 3.0)),
        (hilum, vec((-5.0, -30.0, 10.0), 2.0), vec((20.0, -55.0, 20.0), 3.0)),
    )
    portal_radius = (7.0, 5.5, 4.5)
    confluence = (ivc[0], ivc[1] - 5.0, 50.0)
    hepatic_veins = tuple(
        (confluence, vec(end, 4.0))
        for end in ((-100.0, 0.0, 40.0), (-55.0, -45.0, 45.0), (-5.0, -50.0, 45.0))
    )

    loat_scale = latents["loat_scale"]
    # A larger LOAT pad pushes the stomach laterally, as it would in a patient.
    stomach = _Ellipsoid(
        vec((80.0 + 10.0 * (loat_scale - 1.0), -5.0, 22.0), 3.0),
        scaled((38.0, 38.0, 40.0), 0.05),
        2.2,
    )
    air_level = -stomach.semi[1] * float(rng.uniform(0.15, 0.55))
    spleen = _Ellipsoid(vec((105.0, 50.0, 15.0), 3.0), scaled((26.0, 42.0, 45.0), 0.06), 2.2)
    spleen_wave = (
        float(rng.uniform(12.0, 20.0)),
        float(rng.uniform(12.0, 20.0)),
        float(rng.uniform(14.0, 24.0)),
        float(rng.uniform(0.0, 2.0 * math.pi)),
        float(rng.uniform(0.0, 2.0 * math.pi)),
        float(rng.uniform(0.0, 2.0 * math.pi)),
    )
    kidneys = (
        _Ellipsoid(vec((-72.0, 60.0, -70.0), 3.0), scaled((24.0, 22.0, 38.0), 0.05), 2.2),
        _Ellipsoid(vec((72.0, 58.0, -55.0), 3.0), scaled((24.0, 22.0, 38.0), 0.05), 2.2),
    )
    loat_semi = (16.0 * loat_scale, 12.0 * loat_scale, 18.0 * loat_scale)
    loat = _Ellipsoid(vec((28.0, -12.0, 10.0), 1.5), loat_semi, 2.0)

    tumor_centre = vec((-85.0, 15.0, -15.0), 3.0)
    tumor_radius = latents["tumor_nominal_diameter_mm"] / 2.0
    axes = rng.standard_normal((3, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    weights = rng.standard_normal(3)
    weights /= np.linalg.norm(weights)
    harmonics = tuple(
        (degree, float(w), (float(v[0]), float(v[1]), float(v[2])))
        for degree, w, v in zip((2, 3, 4), weights, axes, strict=True)
    )
    rim_mm = 4.0 + float(jit(0.5)[0])
    # Large tumours get a hypo-enhancing (necrotic) core.
    core_fraction = float(np.clip((2.0 * tumor_radius - 35.0) / 70.0, 0.0, 0.5))

    gains = np.clip(1.0 + rng.standard_normal(4) * 0.06, 0.85, 1.15)
    gains[0] = 1.0

    def breath(z_lo: float, z_hi: float, xy: float) -> _Vec:
        z = float(rng.uniform(z_lo, z_hi)) * (1.0 if rng.random() < 0.5 else -1.0)
        x, y = (float(v) for v in rng.uniform(-xy, xy, 2))
        return (x, y, z)

    shifts = {
        "non_contrast": breath(0.0, 3.0, 1.5),
        "arterial": (0.0, 0.0, 0.0),
        "portal_venous": breath(2.0, 8.0, 3.0),
        "delayed": breath(2.0, 8.0, 3.0),
    }
    delays = {
        name: nominal + float(rng.uniform(-half, half)) if half else nominal
        for name, (nominal, half) in _PHASE_DELAY_S.items()
    }
    lung_jit = scaled((1.0, 1.0, 1.0), 0.04)
    lungs = (
        _Ellipsoid((-75.0, 5.0, 0.0), (60.0 * lung_jit[0], 80.0 * lung_jit[1], 400.0), 2.5),
        _Ellipsoid((75.0, 5.0, 0.0), (60.0 * lung_jit[0], 80.0 * lung_jit[1], 400.0), 2.5),
    )
    heart = _Ellipsoid(vec((20.0, -25.0, -20.0), 4.0), scaled((60.0, 55.0, 70.0), 0.05), 2.0)
    return _Anatomy(
        body_semi=body_semi,
        fat_mm=fat_mm,
        wall_mm=wall_mm,
        spine_y=spine_y,
        disc_phase_mm=disc_phase_mm,
        aorta=aorta,
        liver_right=liver_right,
        liver_left=liver_left,
        ivc=ivc,
        portal=portal,
        portal_radius=portal_radius,
        hepatic_veins=hepatic_veins,
        stomach=stomach,
        air_level=air_level,
        spleen=spleen,
        spleen_wave=spleen_wave,
        kidneys=kidneys,
        loat=loat,
        tumor_centre=tumor_centre,
        tumor_radius=tumor_radius,
        tumor_irregularity=latents["tumor_irregularity"],
        harmonics=harmonics,
        rim_mm=rim_mm,
        core_fraction=core_fraction,
        gains=(float(gains[0]), float(gains[1]), float(gains[2]), float(gains[3])),
        tumor_arterial_hu=latents["tumor_arterial_hu"],
        peritumoral_hu=latents["peritumoral_enhancement_hu"],
        tumor_washout_hu=latents["tumor_washout_hu"],
        capsule_hu=latents["capsule_hu"],
        shifts=shifts,
        delays=delays,
        lungs=lungs,
        heart=heart,
    )


# --------------------------------------------------------------------------------------------
# Domain randomisation of the anatomy (model.domain has the ranges)
# --------------------------------------------------------------------------------------------

# Where the variant arrangement puts the tumour, relative to the right lobe's centre (mm, before
# the liver's scale): anterior-superior (segment 8), inferior (segment 6), medial (segment 4).
_VARIANT_TUMOR_OFFSETS: tuple[_Vec, ...] = (
    (-15.0, -25.0, 25.0),
    (-25.0, 20.0, -30.0),
    (10.0, -30.0, -5.0),
)


def _add(a: _Vec, b: _Vec) -> _Vec:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


#: Most of the LOAT pad an organ may cover before :func:`_clear_loat` moves the pad…
_LOAT_COVER_MAX: float = 0.25
#: …by at most this far (mm), in steps of ``_LOAT_STEP_MM``.
_LOAT_MOVE_MAX_MM: float = 40.0
_LOAT_STEP_MM: float = 2.0
_AXES: tuple[_Vec, ...] = (
    (1.0, 0.0, 0.0),
    (-1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, -1.0, 0.0),
    (0.0, 0.0, 1.0),
    (0.0, 0.0, -1.0),
)


#: How deep in the right lobe a moved tumour's centre must stay (superquadric radius, 1 = surface).
_TUMOR_DEPTH_MAX: float = 0.7


def _inside_lobe(lobe: _Ellipsoid, centre: _Vec, offset: _Vec) -> _Vec:
    """``centre + offset``, the offset shortened until the point lies inside the lobe.

    A tumour pushed out of the liver would be clipped to nothing (it only replaces parenchyma).
    """
    for fraction in (1.0, 0.75, 0.5, 0.25):
        point = _add(centre, _times(offset, fraction))
        d = np.abs((np.asarray(point) - np.asarray(lobe.centre)) / np.asarray(lobe.semi))
        if float((d**lobe.power).sum()) ** (1.0 / lobe.power) <= _TUMOR_DEPTH_MAX:
            return point
    return centre


def _inside(e: _Ellipsoid, points: _F64) -> npt.NDArray[np.bool_]:
    """Which of ``points`` (n × 3, mm) lie inside the superquadric ``e``."""
    t = np.abs((points - np.asarray(e.centre)) / np.asarray(e.semi)) ** e.power
    return np.asarray(t.sum(axis=1) <= 1.0)


def _clear_loat(loat: _Ellipsoid, organs: Sequence[_Ellipsoid]) -> tuple[_Ellipsoid, bool]:
    """The LOAT pad moved out from under ``organs`` when they cover most of it, and whether it
    must instead displace liver parenchyma where it lies.

    The LOAT is painted last and only into free cavity. Displaced and resized organs (most often
    the liver pushed onto it) could bury it: 3 of 24 shifted studies had under 5 ml of it (one
    none), where a patient always has the lesser omentum between the liver and the lesser
    curvature. The pad is pushed along the axis direction that frees it soonest, as the organ
    would push the fat. Where no push of up to ``_LOAT_MOVE_MAX_MM`` frees it, the liver has
    engulfed its place and the pad is painted into the parenchyma instead, as the lesser omentum
    lies in the fissure for the ligamentum venosum. The draw itself is not repeated, so the seed
    still fixes the study.
    """
    unit = np.linspace(-0.9, 0.9, 7)
    grid = np.stack(np.meshgrid(unit, unit, unit, indexing="ij"), axis=-1).reshape(-1, 3)
    grid = grid[(np.abs(grid) ** loat.power).sum(axis=1) <= 1.0] * np.asarray(loat.semi)

    def covered(centre: _F64) -> float:
        points = grid + centre
        hit = np.zeros(len(points), dtype=bool)
        for organ in organs:
            hit |= _inside(organ, points)
        return float(hit.mean())

    start = np.asarray(loat.centre)
    if covered(start) <= _LOAT_COVER_MAX:
        return loat, False
    steps = np.arange(_LOAT_STEP_MM, _LOAT_MOVE_MAX_MM + 1e-9, _LOAT_STEP_MM)
    best: tuple[float, float, _F64] | None = None  # (distance, cover, centre)
    for distance in steps:
        for axis in _AXES:
            centre = start + distance * np.asarray(axis)
            cover = covered(centre)
            if cover <= _LOAT_COVER_MAX and (best is None or cover < best[1]):
                best = (float(distance), cover, centre)
        if best is not None:
            break
    if best is None:
        return loat, True
    c = best[2]
    return _Ellipsoid((float(c[0]), float(c[1]), float(c[2])), loat.semi, loat.power), False


def _times(a: _Vec, f: float) -> _Vec:
    return (a[0] * f, a[1] * f, a[2] * f)


def _apply_domain(anat: _Anatomy, dom: Domain, rng: np.random.Generator) -> _Anatomy:
    """The anatomy displaced and resized as ``dom`` says (see :mod:`model.domain`)."""
    shift_l, scale_l = dom.organ_shift_mm["liver"], dom.organ_scale["liver"]
    centre = anat.liver_right.centre

    def in_liver(p: _Vec) -> _Vec:
        # Scaled about the right lobe's centre, then moved with the liver.
        return _add(_add(centre, _times(_add(p, _times(centre, -1.0)), scale_l)), shift_l)

    right = _Ellipsoid(
        _add(centre, shift_l), _times(anat.liver_right.semi, scale_l), anat.liver_right.power
    )
    left_semi = _times(anat.liver_left.semi, scale_l * dom.left_lobe_scale)
    left_centre = in_liver(anat.liver_left.centre)
    # A longer or shorter lobe toward the spleen, its medial edge where it was.
    reach = dom.left_lobe_reach
    left_centre = (left_centre[0] + (reach - 1.0) * left_semi[0], left_centre[1], left_centre[2])
    left_semi = (left_semi[0] * reach, left_semi[1], left_semi[2])
    tumor_centre = _inside_lobe(
        right, in_liver(anat.tumor_centre), _times(dom.tumor_offset_mm, scale_l)
    )
    if dom.arrangement is Arrangement.VARIANT:
        # "Beaver-tail" liver: the left lateral lobe runs on over the stomach toward the spleen.
        left_centre = (left_centre[0] + 0.45 * left_semi[0], left_centre[1], left_centre[2])
        left_semi = (left_semi[0] * 1.45, left_semi[1], left_semi[2])
        offset = _VARIANT_TUMOR_OFFSETS[int(rng.integers(len(_VARIANT_TUMOR_OFFSETS)))]
        tumor_centre = in_liver(_add(centre, offset))

    shift_s, scale_s = dom.organ_shift_mm["stomach"], dom.stomach_scale
    stomach = _Ellipsoid(
        _add(anat.stomach.centre, shift_s), _times(anat.stomach.semi, scale_s), anat.stomach.power
    )
    # The LOAT lies behind the left lobe and against the lesser curvature: it follows the lobe's
    # posterior surface (y), the stomach's medial wall (x) and both halfway in z, so neither a
    # larger lobe nor a larger stomach buries it.
    left = _Ellipsoid(left_centre, left_semi, anat.liver_left.power)
    loat_shift = (
        (stomach.centre[0] - stomach.semi[0]) - (anat.stomach.centre[0] - anat.stomach.semi[0]),
        (left.centre[1] + left.semi[1]) - (anat.liver_left.centre[1] + anat.liver_left.semi[1]),
        0.5 * (shift_l[2] + shift_s[2]),
    )
    loat, loat_in_fissure = _clear_loat(
        _Ellipsoid(_add(anat.loat.centre, loat_shift), anat.loat.semi, anat.loat.power),
        (right, left, stomach),
    )
    shift_k, scale_k = dom.organ_shift_mm["kidneys"], dom.organ_scale["kidneys"]
    shift_p, scale_p = dom.organ_shift_mm["spleen"], dom.organ_scale["spleen"]

    cavity = (
        anat.body_semi[0] - anat.fat_mm - anat.wall_mm,
        anat.body_semi[1] - anat.fat_mm - anat.wall_mm,
    )
    outer = anat.wall_mm + dom.subcutaneous_fat_mm
    body_semi = (cavity[0] * dom.body_scale[0] + outer, cavity[1] * dom.body_scale[1] + outer)
    return dataclasses.replace(
        anat,
        body_semi=body_semi,
        fat_mm=dom.subcutaneous_fat_mm,
        liver_right=right,
        liver_left=left,
        ivc=(anat.ivc[0] + shift_l[0], anat.ivc[1] + shift_l[1], anat.ivc[2], anat.ivc[3]),
        portal=tuple(tuple(in_liver(p) for p in path) for path in anat.portal),
        hepatic_veins=tuple((in_liver(a), in_liver(b)) for a, b in anat.hepatic_veins),
        stomach=stomach,
        air_level=anat.air_level * scale_s,
        spleen=_Ellipsoid(
            _add(anat.spleen.centre, shift_p), _times(anat.spleen.semi, scale_p), anat.spleen.power
        ),
        kidneys=tuple(
            _Ellipsoid(_add(k.centre, shift_k), _times(k.semi, scale_k), k.power)
            for k in anat.kidneys
        ),  # type: ignore[arg-type]
        loat=loat,
        loat_in_fissure=loat_in_fissure,
        # Displaced organs made the kidney indent the liver with no fat between them: on the
        # shifted cohort the segmenter read the bright kidney inside the liver's outline as a
        # hypervascular tumour (6.7 to 18 ml components). Gerota's fat is always there.
        kidney_fat_over_liver=True,
        tumor_centre=tumor_centre,
    )


# --------------------------------------------------------------------------------------------
# Geometry: shapes evaluated only inside their bounding boxes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Voxel grid in anatomy coordinates (LPS with z measured from ``_Z_CENTRE_MM``)."""

    shape: tuple[int, int, int]  # (slices, rows, cols)
    origin: _Vec  # x, y, z
    spacing: _Vec  # x, y, z

    def axis(self, a: int, start: int = 0, stop: int | None = None) -> _F64:
        """Coordinates (mm) of voxel centres along axis ``a`` (0 = x, 1 = y, 2 = z)."""
        n = self.shape[2 - a]
        stop = n if stop is None else stop
        return self.origin[a] + np.arange(start, stop, dtype=np.float64) * self.spacing[a]

    def index_range(self, a: int, lo: float, hi: float) -> slice | None:
        n = self.shape[2 - a]
        o, s = self.origin[a], self.spacing[a]
        i0 = max(0, math.ceil((lo - o) / s - 1e-9))
        i1 = min(n, math.floor((hi - o) / s + 1e-9) + 1)
        return slice(i0, i1) if i1 > i0 else None


def _grid(spec: PhantomSpec) -> _Grid:
    """The spec's grid in anatomy coordinates: LPS shifted so z = 0 is at ``_Z_CENTRE_MM``."""
    ox, oy, oz = spec.origin_mm
    return _Grid((spec.slices, spec.size, spec.size), (ox, oy, oz - _Z_CENTRE_MM), spec.spacing_mm)


@dataclass
class _Shape:
    """A boolean mask on a sub-box of the grid, with the box's voxel-centre coordinates."""

    region: tuple[slice, slice, slice]
    mask: _Bool
    x: _F64
    y: _F64
    z: _F64


def _box(
    grid: _Grid, lo: _Vec, hi: _Vec
) -> tuple[tuple[slice, slice, slice], _F64, _F64, _F64] | None:
    ranges = [grid.index_range(a, lo[a], hi[a]) for a in range(3)]
    sx, sy, sz = ranges
    if sx is None or sy is None or sz is None:
        return None
    return (
        (sz, sy, sx),
        grid.axis(0, sx.start, sx.stop),
        grid.axis(1, sy.start, sy.stop),
        grid.axis(2, sz.start, sz.stop),
    )


def _moved(centre: _Vec, shift: _Vec) -> _Vec:
    return (centre[0] + shift[0], centre[1] + shift[1], centre[2] + shift[2])


def _superquadric(grid: _Grid, e: _Ellipsoid, shift: _Vec = (0.0, 0.0, 0.0)) -> _Shape | None:
    """``|dx/a|^p + |dy/b|^p + |dz/c|^p <= 1``; separable, so only 1-D powers are computed."""
    c = _moved(e.centre, shift)
    lo = (c[0] - e.semi[0], c[1] - e.semi[1], c[2] - e.semi[2])
    hi = (c[0] + e.semi[0], c[1] + e.semi[1], c[2] + e.semi[2])
    b = _box(grid, lo, hi)
    if b is None:
        return None
    region, x, y, z = b
    tx = (np.abs((x - c[0]) / e.semi[0]) ** e.power).astype(np.float32)
    ty = (np.abs((y - c[1]) / e.semi[1]) ** e.power).astype(np.float32)
    tz = (np.abs((z - c[2]) / e.semi[2]) ** e.power).astype(np.float32)
    mask = (tz[:, None, None] + ty[None, :, None]) + tx[None, None, :] <= 1.0
    return _Shape(region, mask, x, y, z)


def _capsule(grid: _Grid, a: _Vec, b: _Vec, radius: float, shift: _Vec) -> _Shape | None:
    """Points within ``radius`` of segment ``ab`` (a vessel segment)."""
    a = _moved(a, shift)
    b = _moved(b, shift)
    lo = (min(a[0], b[0]) - radius, min(a[1], b[1]) - radius, min(a[2], b[2]) - radius)
    hi = (max(a[0], b[0]) + radius, max(a[1], b[1]) + radius, max(a[2], b[2]) + radius)
    box = _box(grid, lo, hi)
    if box is None:
        return None
    region, x, y, z = box
    d = (b[0] - a[0], b[1] - a[1], b[2] - a[2])
    dd = max(d[0] ** 2 + d[1] ** 2 + d[2] ** 2, 1e-12)
    px = (x - a[0]).astype(np.float32)[None, None, :]
    py = (y - a[1]).astype(np.float32)[None, :, None]
    pz = (z - a[2]).astype(np.float32)[:, None, None]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
    dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
    return _Shape(region, dist2 <= radius * radius, x, y, z)


def _paint(labels: npt.NDArray[np.uint8], shape: _Shape | None, value: int, over: _Bool) -> None:
    """Set ``value`` where the shape is and the current label may be overwritten."""
    if shape is None:
        return
    sub = labels[shape.region]
    sub[shape.mask & over[sub]] = value


def _plane_superquadric(
    x: _F64, y: _F64, cx: float, cy: float, ax: float, ay: float, p: float
) -> _Bool:
    if ax <= 0.0 or ay <= 0.0:
        return np.zeros((y.size, x.size), dtype=bool)
    tx = np.abs((x - cx) / ax) ** p
    ty = np.abs((y - cy) / ay) ** p
    return np.asarray(ty[:, None] + tx[None, :] <= 1.0)


# --------------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------------


def _fixed_labels(grid: _Grid, anat: _Anatomy) -> npt.NDArray[np.uint8]:
    """Body wall, spine and aorta: extruded along z and not moved by breathing."""
    x = grid.axis(0)
    y = grid.axis(1)
    plane = np.zeros((y.size, x.size), dtype=np.uint8)
    ax, ay = anat.body_semi
    plane[_plane_superquadric(x, y, 0.0, 0.0, ax, ay, 2.4)] = _FAT
    inner = anat.fat_mm
    plane[_plane_superquadric(x, y, 0.0, 0.0, ax - inner, ay - inner, 2.4)] = _MUSCLE
    inner += anat.wall_mm
    plane[_plane_superquadric(x, y, 0.0, 0.0, ax - inner, ay - inner, 2.4)] = _CAVITY

    sy = anat.spine_y
    for side in (-1.0, 1.0):
        para = _plane_superquadric(x, y, 32.0 * side, sy + 36.0, 24.0, 20.0, 2.2)
        plane[para & ((plane == _CAVITY) | (plane == _MUSCLE))] = _MUSCLE
    tissue = plane != _AIR
    body_outer = _plane_superquadric(x, y, 0.0, sy, 22.0, 18.0, 2.2)
    body_inner = _plane_superquadric(x, y, 0.0, sy, 19.5, 15.5, 2.2)
    arch = _plane_superquadric(x, y, 0.0, sy + 30.0, 15.0, 14.0, 2.0)
    canal = _plane_superquadric(x, y, 0.0, sy + 30.0, 9.0, 8.5, 2.0)
    spinous = _plane_superquadric(x, y, 0.0, sy + 48.0, 5.0, 14.0, 2.0)
    plane[tissue & (arch | spinous)] = _BONE
    plane[tissue & arch & ~_plane_superquadric(x, y, 0.0, sy + 30.0, 13.0, 12.0, 2.0)] = _CORTEX
    plane[canal] = _CSF
    plane[tissue & body_outer] = _CORTEX
    plane[body_inner] = _BONE
    aorta = _plane_superquadric(
        x, y, anat.aorta[0], anat.aorta[1], anat.aorta[2], anat.aorta[2], 2.0
    )
    plane[aorta & (plane == _CAVITY)] = _AORTA

    labels = np.empty(grid.shape, dtype=np.uint8)
    labels[:] = plane
    # Intervertebral discs: 6 mm every 30 mm, replacing the vertebral body.
    z_rel = grid.axis(2)
    in_disc = np.mod(z_rel - anat.disc_phase_mm, 30.0) < 6.0
    for k in np.flatnonzero(in_disc):
        labels[k][body_outer] = _DISC
    return labels


def _tumor_shapes(grid: _Grid, anat: _Anatomy, shift: _Vec) -> tuple[_Shape, _Bool, _Bool] | None:
    """Tumour (with margin harmonics), its necrotic core and the peritumoral rim.

    The radius in direction ``u`` is ``R0 * (1 + irregularity * sum_l w_l P_l(u . v_l))``: low-order
    Legendre lobes around random axes, a smooth analogue of low-order spherical harmonics.
    """
    c = _moved(anat.tumor_centre, shift)
    reach = anat.tumor_radius * (1.0 + anat.tumor_irregularity * 1.8) + anat.rim_mm + 1.0
    box = _box(
        grid, (c[0] - reach, c[1] - reach, c[2] - reach), (c[0] + reach, c[1] + reach, c[2] + reach)
    )
    if box is None:
        return None
    region, x, y, z = box
    px = (x - c[0]).astype(np.float32)[None, None, :]
    py = (y - c[1]).astype(np.float32)[None, :, None]
    pz = (z - c[2]).astype(np.float32)[:, None, None]
    r = np.sqrt(px * px + py * py + pz * pz)
    inv_r = 1.0 / np.maximum(r, np.float32(1e-3))
    f = np.zeros_like(r)
    for degree, weight, v in anat.harmonics:
        cos = (px * v[0] + py * v[1] + pz * v[2]) * inv_r
        if degree == 2:
            legendre = 1.5 * cos * cos - 0.5
        elif degree == 3:
            legendre = (2.5 * cos * cos - 1.5) * cos
        else:
            c2 = cos * cos
            legendre = (4.375 * c2 - 3.75) * c2 + 0.375
        f += weight * legendre
    radius = anat.tumor_radius * (1.0 + anat.tumor_irregularity * f)
    tumor = r <= radius
    rim = (r <= radius + anat.rim_mm) & ~tumor
    core = r <= radius * anat.core_fraction
    return _Shape(region, tumor, x, y, z), core, rim


def _draw_viscera(
    labels: npt.NDArray[np.uint8], grid: _Grid, anat: _Anatomy, tumor: bool, shift: _Vec
) -> None:
    """Paint the abdominal viscera, displaced by ``shift``; later structures overwrite earlier."""
    liver_over = _overwrite(_CAVITY)
    _paint(labels, _superquadric(grid, anat.liver_right, shift), _LIVER, liver_over)
    _paint(labels, _superquadric(grid, anat.liver_left, shift), _LIVER, liver_over)

    stomach = _superquadric(grid, anat.stomach, shift)
    _paint(labels, stomach, _STOMACH_WALL, _overwrite(_CAVITY, _LIVER))
    wall = 4.0
    semi = anat.stomach.semi
    lumen_e = _Ellipsoid(
        anat.stomach.centre, (semi[0] - wall, semi[1] - wall, semi[2] - wall), anat.stomach.power
    )
    lumen = _superquadric(grid, lumen_e, shift)
    if lumen is not None:
        level = anat.stomach.centre[1] + shift[1] + anat.air_level
        # Supine patient: gas rises anteriorly (toward -y) above the fluid level.
        is_air = np.broadcast_to((lumen.y < level)[None, :, None], lumen.mask.shape)
        sub = labels[lumen.region]
        inside = lumen.mask & (sub == _STOMACH_WALL)
        sub[inside & is_air] = _STOMACH_AIR
        sub[inside & ~is_air] = _STOMACH_FLUID

    _paint(labels, _superquadric(grid, anat.spleen, shift), _SPLEEN, _IN_CAVITY)
    for kidney in anat.kidneys:
        fat = _Ellipsoid(
            kidney.centre, (kidney.semi[0] + 8.0, kidney.semi[1] + 8.0, kidney.semi[2] + 8.0)
        )
        fat_over = _overwrite(_CAVITY, _LIVER) if anat.kidney_fat_over_liver else _IN_CAVITY
        _paint(labels, _superquadric(grid, fat, shift), _RETRO_FAT, fat_over)
        _paint(
            labels,
            _superquadric(grid, kidney, shift),
            _KIDNEY,
            _overwrite(_CAVITY, _RETRO_FAT, _LIVER, _SPLEEN),
        )

    ivc = _Ellipsoid((anat.ivc[0], anat.ivc[1], 0.0), (anat.ivc[2], anat.ivc[3], 1e6))
    _paint(labels, _superquadric(grid, ivc, shift), _IVC, _overwrite(_CAVITY, _LIVER, _RETRO_FAT))
    vessel_over = _overwrite(_CAVITY, _LIVER)
    for path, radius in zip(anat.portal, anat.portal_radius, strict=True):
        for a, b in itertools.pairwise(path):
            _paint(labels, _capsule(grid, a, b, radius, shift), _PORTAL, vessel_over)
    for a, b in anat.hepatic_veins:
        _paint(labels, _capsule(grid, a, b, 4.0, shift), _HEPATIC_VEIN, _overwrite(_LIVER))

    if tumor:
        shapes = _tumor_shapes(grid, anat, shift)
        if shapes is not None:
            shape, core, rim = shapes
            sub = labels[shape.region]
            # The tumour replaces parenchyma and the intrahepatic vessels it engulfs.
            tumor_voxels = shape.mask & _overwrite(_LIVER, _PORTAL, _HEPATIC_VEIN)[sub]
            sub[tumor_voxels] = _TUMOR
            sub[tumor_voxels & core] = _TUMOR_CORE
            sub[rim & (sub == _LIVER)] = _RIM

    loat_over = _overwrite(_CAVITY, _LIVER) if anat.loat_in_fissure else _IN_CAVITY
    _paint(labels, _superquadric(grid, anat.loat, shift), _LOAT, loat_over)


def _draw_chest(labels: npt.NDArray[np.uint8], grid: _Grid, anat: _Anatomy) -> None:
    for lung in anat.lungs:
        _paint(labels, _superquadric(grid, lung), _LUNG, _IN_CAVITY)
    _paint(labels, _superquadric(grid, anat.heart), _HEART, _overwrite(_CAVITY, _LUNG))


def _masks(labels: npt.NDArray[np.uint8]) -> dict[str, MaskVolume]:
    def lut(*members: int) -> MaskVolume:
        table = np.zeros(256, dtype=np.uint8)
        table[list(members)] = 1
        return np.take(table, labels)

    return {
        "liver": lut(_LIVER, _RIM, _TUMOR, _TUMOR_CORE),
        "tumor": lut(_TUMOR, _TUMOR_CORE),
        "loat": lut(_LOAT),
        # The whole organ, lumen included: a segmenter that learns only the wall would leave a
        # fluid-filled stomach as a hole that the quality gates cannot tell from missing anatomy.
        "stomach": lut(_STOMACH_WALL, _STOMACH_FLUID, _STOMACH_AIR),
        "aorta": lut(_AORTA),
    }


# --------------------------------------------------------------------------------------------
# Intensities
# --------------------------------------------------------------------------------------------


def _study_tables(anat: _Anatomy) -> _F64:
    """HU per phase and label of this study: the table with the latents' tumour and rim values."""
    tables = np.zeros((len(PHASE_NAMES), 256), dtype=np.float64)
    for label, values in _HU_TABLE.items():
        tables[:, label] = values
    tables[1, _TUMOR] = anat.tumor_arterial_hu
    tables[1, _RIM] = tables[1, _LIVER] + anat.peritumoral_hu
    for later in (2, 3):
        tables[later, _TUMOR] = tables[later, _LIVER] - anat.tumor_washout_hu
        tables[later, _RIM] = tables[later, _LIVER] + anat.capsule_hu
    return tables


def _phase_lut(anat: _Anatomy, phase: int) -> _F32:
    tables = _study_tables(anat)
    base, target = tables[0], tables[phase]
    # One gain per phase scales every enhancement: contrast dose/timing varies between patients.
    return (base + anat.gains[phase] * (target - base)).astype(np.float32)


def _blur_in_plane(block: _F32) -> None:
    """In-place [1, 2, 1]/4 smoothing along rows and columns (partial-volume softening)."""
    tmp = block.copy()
    tmp[:, :, 1:-1] = 0.5 * block[:, :, 1:-1] + 0.25 * (block[:, :, :-2] + block[:, :, 2:])
    block[:, 1:-1, :] = 0.5 * tmp[:, 1:-1, :] + 0.25 * (tmp[:, :-2, :] + tmp[:, 2:, :])
    block[:, 0, :] = tmp[:, 0, :]
    block[:, -1, :] = tmp[:, -1, :]


def _add_spleen_wave(
    hu: FloatVolume, labels: npt.NDArray[np.uint8], grid: _Grid, anat: _Anatomy, shift: _Vec
) -> None:
    """Arterial-phase splenic heterogeneity, in place: a smooth separable wave pattern."""
    spleen = _superquadric(grid, anat.spleen, shift)
    if spleen is None:
        return
    lx, ly, lz, phx, phy, phz = anat.spleen_wave
    c = _moved(anat.spleen.centre, shift)
    wx = np.sin(2.0 * math.pi * (spleen.x - c[0]) / lx + phx).astype(np.float32)
    wy = np.sin(2.0 * math.pi * (spleen.y - c[1]) / ly + phy).astype(np.float32)
    wz = np.sin(2.0 * math.pi * (spleen.z - c[2]) / lz + phz).astype(np.float32)
    wave = 30.0 * anat.gains[1] * wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
    sub = hu[spleen.region]
    is_spleen = labels[spleen.region] == _SPLEEN
    sub[is_spleen] += wave[is_spleen]


def _render_phase(
    labels: npt.NDArray[np.uint8],
    grid: _Grid,
    anat: _Anatomy,
    phase: int,
    shift: _Vec,
    noise_hu: float,
    noise_ss: np.random.SeedSequence,
    chest: bool,
) -> FloatVolume:
    hu: FloatVolume = np.take(_phase_lut(anat, phase), labels)
    if phase == 1 and not chest:
        _add_spleen_wave(hu, labels, grid, anat, shift)
    rng = np.random.default_rng(noise_ss)
    sigma = np.float32(noise_hu)
    for k0 in range(0, hu.shape[0], _SLAB):
        block = hu[k0 : k0 + _SLAB]
        _blur_in_plane(block)
        if noise_hu > 0.0:
            noise = rng.standard_normal(block.shape, dtype=np.float32)
            noise *= sigma
            block += noise
    return hu


# --------------------------------------------------------------------------------------------
# Intensities and grids of a randomised or shifted study
# --------------------------------------------------------------------------------------------

# Labels of each model.domain tissue (air, bone, CSF and lung keep their HU).
_TISSUE_LABELS: dict[str, tuple[int, ...]] = {
    "liver": (_LIVER, _RIM),
    "tumor": (_TUMOR, _TUMOR_CORE),
    "vessels": (_PORTAL, _HEPATIC_VEIN, _AORTA, _IVC, _HEART),
    "spleen": (_SPLEEN,),
    "kidney": (_KIDNEY,),
    "muscle": (_MUSCLE,),
    "bowel": (_CAVITY,),
    "stomach_wall": (_STOMACH_WALL,),
    "fat": (_FAT, _RETRO_FAT, _LOAT),
}
# Finest z step (mm) of the sub-slices a thick slice averages (partial volume along z).
_SUB_SLICE_MM = 2.0


def _domain_lut(anat: _Anatomy, phase: int, dom: Domain) -> _F32:
    """HU per label: timing blended toward the neighbouring phase, enhancement scaled, offsets."""
    tables = _study_tables(anat)
    base = tables[0]
    timed = tables[phase].copy()
    if phase in (1, 2):
        timing = dom.arterial_timing if phase == 1 else dom.portal_timing
        toward = tables[phase - 1] if timing < 0 else tables[phase + 1]
        timed += abs(timing) * (toward - timed)
    offset = np.zeros(256, dtype=np.float64)
    for tissue, labels in _TISSUE_LABELS.items():
        offset[list(labels)] = dom.tissue_hu_offset[tissue]
    gain = 1.0 if phase == 0 else dom.enhancement_gain[PHASE_NAMES[phase]] * anat.gains[phase]
    lut = base + offset + gain * (timed - base) + dom.hu_offset
    return lut.astype(np.float32)


def _domain_grids(spec: PhantomSpec, dom: Domain) -> tuple[_Grid, _Grid, int]:
    """The study's grid, the finer-in-z grid its labels are drawn on, and sub-slices per slice.

    The patient lies ``table_offset_mm`` off the centre of the field of view: the grid moves the
    other way in anatomy coordinates. The sub-slice count is odd, so the middle sub-slice of each
    slice is its centre (where the masks are sampled).
    """
    slices = int(np.clip(round(dom.z_extent_mm / dom.slice_spacing_mm), 8, 1000))
    pixel = dom.field_of_view_mm / spec.size
    spacing = (pixel, pixel, dom.slice_spacing_mm)
    tx, ty, tz = dom.table_offset_mm
    origin = (
        -dom.field_of_view_mm / 2.0 + pixel / 2.0 - tx,
        -dom.field_of_view_mm / 2.0 + pixel / 2.0 - ty,
        -slices * dom.slice_spacing_mm / 2.0 + dom.slice_spacing_mm / 2.0 - tz,
    )
    grid = _Grid((slices, spec.size, spec.size), origin, spacing)
    half = max(0, math.ceil((dom.slice_thickness_mm / _SUB_SLICE_MM - 1.0) / 2.0))
    sub = 2 * half + 1
    step = dom.slice_spacing_mm / sub
    fine = _Grid(
        (slices * sub, spec.size, spec.size),
        (origin[0], origin[1], origin[2] - half * step),
        (pixel, pixel, step),
    )
    return grid, fine, sub


def _slice_profile(fine: FloatVolume, sub: int, dom: Domain) -> FloatVolume:
    """Each slice the mean of the sub-slices within its thickness (a box profile)."""
    if sub == 1 and dom.slice_thickness_ratio <= 1.0:
        return fine
    step = dom.slice_spacing_mm / sub
    reach = math.floor(dom.slice_thickness_mm / 2.0 / step + 1e-9)
    n = fine.shape[0] // sub
    centres = np.arange(n) * sub + sub // 2
    lo = np.clip(centres - reach, 0, fine.shape[0] - 1)
    hi = np.clip(centres + reach, 0, fine.shape[0] - 1)
    out = np.empty((n, *fine.shape[1:]), dtype=np.float32)
    for k in range(n):
        out[k] = fine[lo[k] : hi[k] + 1].mean(axis=0, dtype=np.float32)
    return out


def _gaussian(
    volume: FloatVolume, grid: _Grid, sigma_mm: tuple[float, float, float]
) -> FloatVolume:
    """Gaussian smoothing with per-axis sigma (x, y, z) in mm; 0 leaves an axis alone."""
    if max(sigma_mm) <= 0.0:
        return volume
    # Imported here: a standard study (and whoever only draws latents) stays numpy-only.
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume)
    image.SetSpacing([float(v) for v in grid.spacing])
    variance = [float(s) ** 2 for s in sigma_mm]
    smoothed = sitk.DiscreteGaussian(image, variance, 32, 0.01, True)
    return sitk.GetArrayFromImage(smoothed).astype(np.float32, copy=False)


def _reconstruction_kernel(
    hu: FloatVolume, grid: _Grid, sigma_mm: float, sharpen: float
) -> FloatVolume:
    """In-plane blur, then an unsharp mask's overshoot for a sharp kernel."""
    hu = _gaussian(hu, grid, (sigma_mm, sigma_mm, 0.0))
    if sharpen > 0.0:
        hu += np.float32(sharpen) * (hu - _gaussian(hu, grid, (1.5, 1.5, 0.0)))
    return hu


def _site_effects(hu: FloatVolume, grid: _Grid, site: Site) -> FloatVolume:
    """A site's kernel (on the noisy image, as a scanner reconstructs it) and HU offset."""
    sigma_mm, sharpen = KERNELS[site.kernel]
    hu = _reconstruction_kernel(hu, grid, sigma_mm, sharpen)
    if site.hu_offset:
        hu += np.float32(site.hu_offset)
    return hu


def _artefacts(grid: _Grid, anat: _Anatomy, dom: Domain, rng: np.random.Generator) -> FloatVolume:
    """Bias field plus streaks, inside the body; the same for every phase of the study."""
    x, y, z = grid.axis(0), grid.axis(1), grid.axis(2)
    field = np.zeros(grid.shape, dtype=np.float32)
    if dom.bias_field_hu > 0.0:
        # Two smooth separable waves of 250-600 mm: a cupping- or beam-hardening-like drift.
        total = np.zeros(grid.shape, dtype=np.float32)
        for _ in range(2):
            lx, ly, lz = (float(v) for v in rng.uniform(250.0, 600.0, 3))
            px, py, pz = (float(v) for v in rng.uniform(0.0, 2.0 * math.pi, 3))
            fx = np.cos(2.0 * math.pi * x / lx + px).astype(np.float32)
            fy = np.cos(2.0 * math.pi * y / ly + py).astype(np.float32)
            fz = np.cos(2.0 * math.pi * z / lz + pz).astype(np.float32)
            total += fz[:, None, None] * fy[None, :, None] * fx[None, None, :]
        peak = float(np.abs(total).max())
        if peak > 0.0:
            field += total * np.float32(dom.bias_field_hu / peak)
    if dom.streak_hu > 0.0:
        # Narrow bright and dark rays from the vertebral body, fading with distance; each slice
        # its own strength (streaks come and go with the dense bone in the slice).
        theta = np.arctan2((y - anat.spine_y)[:, None], x[None, :])
        radius = np.hypot((y - anat.spine_y)[:, None], x[None, :])
        plane = np.zeros(theta.shape, dtype=np.float64)
        for angle, sign in zip(
            rng.uniform(-math.pi, math.pi, 8), rng.choice([-1.0, 1.0], 8), strict=True
        ):
            delta = np.angle(np.exp(1j * (theta - angle)))
            plane += sign * np.exp(-0.5 * (delta / 0.015) ** 2)
        plane *= np.exp(-radius / 150.0) * dom.streak_hu
        strength = rng.uniform(0.3, 1.0, grid.shape[0]).astype(np.float32)
        field += strength[:, None, None] * plane.astype(np.float32)[None]
    return field


def _render_domain_phase(
    fine_labels: npt.NDArray[np.uint8],
    fine: _Grid,
    grid: _Grid,
    sub: int,
    anat: _Anatomy,
    phase: int,
    shift: _Vec,
    dom: Domain,
    artefacts: FloatVolume,
    body: _Bool,
    noise_ss: np.random.SeedSequence,
) -> FloatVolume:
    hu_fine: FloatVolume = np.take(_domain_lut(anat, phase, dom), fine_labels)
    if phase == 1:
        _add_spleen_wave(hu_fine, fine_labels, fine, anat, shift)
    hu = _slice_profile(hu_fine, sub, dom)
    del hu_fine
    hu[body] += artefacts[body]
    hu = _reconstruction_kernel(hu, grid, dom.kernel_sigma_mm, dom.sharpen)
    rng = np.random.default_rng(noise_ss)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    texture = dom.noise_correlation_mm
    if texture > 0.0:
        noise = _gaussian(noise, grid, (texture, texture, 0.0))
        noise /= max(float(noise.std()), 1e-6)
    hu += noise * np.float32(dom.noise_hu)
    return hu


# --------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------


def measure_truth(
    masks: Mapping[str, npt.NDArray[np.generic]],
    spacing_mm: tuple[float, float, float],
    mvi: int | None,
) -> Truth:
    """Measure the ground truth from masks.

    Parameters
    ----------
    masks
        ``"tumor"`` and ``"loat"`` volumes ``(slices, rows, cols)``, nonzero inside; a missing key
        counts as an empty mask.
    spacing_mm
        ``(x, y, z)`` voxel spacing.
    mvi
        The label to carry over (1, 0 or ``None``).

    Returns
    -------
    Truth
        ``max_diameter_mm``: largest axial :func:`feret_diameter_mm` of the tumour (pixels as
        squares, distance between extreme pixel corners); ``tumor_volume_ml`` and
        ``loat_volume_ml``: voxel count times voxel volume; ``loat_max_area_cm2``: largest axial
        LOAT pixel count times pixel area.
    """
    if mvi not in (None, 0, 1):
        raise ValueError(f"mvi must be 0, 1 or None, got {mvi!r}")
    tumor = masks.get("tumor")
    loat = masks.get("loat")
    # A missing mask is an empty one on the other's grid (any grid when both are missing).
    if tumor is None:
        tumor = np.zeros((1, 1, 1) if loat is None else np.shape(loat), dtype=np.uint8)
    if loat is None:
        loat = np.zeros(np.shape(tumor), dtype=np.uint8)
    measured = measure(tumor, loat, spacing_mm)
    return Truth(
        mvi=None if mvi is None else int(mvi),
        max_diameter_mm=measured.max_diameter_mm,
        tumor_volume_ml=measured.tumor_volume_ml,
        loat_max_area_cm2=measured.loat_max_area_cm2,
        loat_volume_ml=measured.loat_volume_ml,
    )


# --------------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------------


def make_study(
    seed: int, spec: PhantomSpec | None = None, *, patient: int | None = None
) -> PhantomStudy:
    """Render one synthetic study.

    Deterministic per ``(seed, spec, patient)``; the anatomy and latents depend on the seed only
    (the patient's, when given), so the same seed at a different resolution is the same patient.

    Parameters
    ----------
    seed
        Non-negative study seed.
    spec
        What to render; defaults to ``PhantomSpec()``.
    patient
        A repeat study: the latents, label and anatomy are those of seed ``patient`` (the same
        tumour, LOAT and breathing), the noise is this study's. ``None``: the study is its own
        patient.

    Returns
    -------
    PhantomStudy
        Phases in canonical order, arterial-frame masks and the measured :class:`Truth`.
    """
    _check_seed(seed)
    spec = PhantomSpec() if spec is None else spec
    patient = seed if patient is None else patient
    _check_seed(patient)
    latents = draw_latents(patient, spec.site.mvi_logit_offset if spec.site else 0.0)
    _, anatomy_ss, _ = _streams(patient)
    noise_ss = _streams(seed)[2]
    anat = _draw_anatomy(np.random.default_rng(anatomy_ss), latents)
    chest = spec.non_liver
    with_tumor = spec.tumor and not chest
    if spec.domain is not DomainKind.STANDARD:
        return _make_domain_study(seed, spec, latents, anat, noise_ss, with_tumor)
    grid = _grid(spec)

    base = _fixed_labels(grid, anat)
    if chest:
        _draw_chest(base, grid, anat)
        arterial_labels = base
    else:
        arterial_labels = base.copy()
        _draw_viscera(arterial_labels, grid, anat, with_tumor, (0.0, 0.0, 0.0))
    masks = _masks(arterial_labels)

    phases: dict[str, PhaseVolume] = {}
    for name in spec.rendered_phases:
        index = PHASE_NAMES.index(name)
        shift = (0.0, 0.0, 0.0) if chest else anat.shifts[name]
        if shift == (0.0, 0.0, 0.0):
            labels = arterial_labels
        else:
            labels = base.copy()
            _draw_viscera(labels, grid, anat, with_tumor, shift)
        noise_hu = spec.site.noise_hu if spec.site else spec.noise_hu
        hu = _render_phase(labels, grid, anat, index, shift, noise_hu, noise_ss[index], chest)
        if spec.site is not None:
            hu = _site_effects(hu, grid, spec.site)
        phases[name] = PhaseVolume(name=name, hu=hu, shift_mm=shift, delay_s=anat.delays[name])
        del labels

    return PhantomStudy(
        seed=int(seed),
        spec=spec,
        spacing_mm=spec.spacing_mm,
        origin_mm=spec.origin_mm,
        phases=phases,
        masks=masks,
        latents=_study_latents(latents, anat),
        truth=measure_truth(masks, spec.spacing_mm, int(latents["mvi"]) if with_tumor else None),
    )


def _make_domain_study(
    seed: int,
    spec: PhantomSpec,
    latents: dict[str, float],
    anat: _Anatomy,
    noise_ss: list[np.random.SeedSequence],
    with_tumor: bool,
) -> PhantomStudy:
    """:func:`make_study` for a randomised or shifted study (see :mod:`model.domain`)."""
    rng = np.random.default_rng(_domain_stream(seed))
    dom = draw_domain(rng, spec.domain)
    anat = _apply_domain(anat, dom, rng)
    grid, fine, sub = _domain_grids(spec, dom)
    chest = spec.non_liver
    base = _fixed_labels(fine, anat)
    if chest:
        _draw_chest(base, fine, anat)
        arterial_labels = base
    else:
        arterial_labels = base.copy()
        _draw_viscera(arterial_labels, fine, anat, with_tumor, (0.0, 0.0, 0.0))
    centres = slice(sub // 2, None, sub)
    masks = {name: np.ascontiguousarray(m[centres]) for name, m in _masks(arterial_labels).items()}
    body = np.ascontiguousarray(base[centres] != _AIR)
    artefacts = _artefacts(grid, anat, dom, rng)

    phases: dict[str, PhaseVolume] = {}
    for name in spec.rendered_phases:
        index = PHASE_NAMES.index(name)
        shift = (0.0, 0.0, 0.0) if chest else anat.shifts[name]
        if shift == (0.0, 0.0, 0.0):
            labels = arterial_labels
        else:
            labels = base.copy()
            _draw_viscera(labels, fine, anat, with_tumor, shift)
        hu = _render_domain_phase(
            labels, fine, grid, sub, anat, index, shift, dom, artefacts, body, noise_ss[index]
        )
        phases[name] = PhaseVolume(name=name, hu=hu, shift_mm=shift, delay_s=anat.delays[name])
        del labels
    spacing = grid.spacing
    origin = (grid.origin[0], grid.origin[1], grid.origin[2] + _Z_CENTRE_MM)
    return PhantomStudy(
        seed=int(seed),
        spec=spec,
        spacing_mm=spacing,
        origin_mm=origin,
        phases=phases,
        masks=masks,
        latents=_study_latents(latents, anat),
        truth=measure_truth(masks, spacing, int(latents["mvi"]) if with_tumor else None),
        domain=dom,
    )


def _study_latents(latents: Mapping[str, float], anat: _Anatomy) -> dict[str, float]:
    study_latents = dict(latents)
    study_latents.update(
        {
            "tumor_radius_mm": anat.tumor_radius,
            "tumor_core_fraction": anat.core_fraction,
            "peritumoral_rim_mm": anat.rim_mm,
            "loat_semi_x_mm": anat.loat.semi[0],
            "loat_semi_y_mm": anat.loat.semi[1],
            "loat_semi_z_mm": anat.loat.semi[2],
            # LPS positions (arterial frame) for tests and sanity checks of later modules.
            "tumor_centre_x_mm": anat.tumor_centre[0],
            "tumor_centre_y_mm": anat.tumor_centre[1],
            "tumor_centre_z_mm": anat.tumor_centre[2] + _Z_CENTRE_MM,
            "aorta_x_mm": anat.aorta[0],
            "aorta_y_mm": anat.aorta[1],
            "aorta_radius_mm": anat.aorta[2],
        }
    )
    return study_latents


def localizer(study: PhantomStudy) -> tuple[FloatVolume, tuple[float, float]]:
    """Coronal projection "scout" of the first rendered phase.

    The mean HU along y (anterior-posterior) of each ``(z, x)`` ray, so values stay HU-like
    (air -1000, soft tissue around 0..100, brighter over bone).

    Returns
    -------
    image, spacing
        ``image`` float32 ``(slices, cols)`` with row 0 the most superior slice and columns along
        +x; ``spacing`` ``(row spacing = z, column spacing = x)`` in mm.
    """
    if not study.phases:
        raise ValueError("study has no rendered phase")
    hu = next(iter(study.phases.values())).hu
    image = np.ascontiguousarray(hu.mean(axis=1, dtype=np.float64)[::-1].astype(np.float32))
    return image, (study.spacing_mm[2], study.spacing_mm[0])
