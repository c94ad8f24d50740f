"""Rigid registration of the portal-venous phase onto the arterial phase.

Both phases of a study share the scanner's frame of reference, so they differ only by the
patient's motion between the acquisitions (mostly breathing). A rigid Euler 3-D transform is
estimated with Mattes mutual information on a coarse isotropic working grid.

Conventions
-----------
The transform follows SimpleITK's fixed → moving convention: it maps a point of the arterial
(fixed) image to the corresponding point of the portal-venous (moving) image, which is what
:func:`resample_onto` needs to bring the portal-venous volume onto the arterial grid. If the
portal-venous anatomy is displaced by ``d`` relative to the arterial anatomy, an arterial point
``p`` is found at ``p + d`` in the portal-venous image, so the transform's translation (the
displacement of its centre of rotation) is ``d`` itself: :attr:`Registration.translation_mm` has
the sign of :attr:`model.phantom.PhaseVolume.shift_mm`.

Images are SimpleITK images (spacing and origin ``(x, y, z)`` LPS mm, SimpleITK direction).
Nothing here imports :mod:`node` or reads settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = [
    "BODY_THRESHOLD_HU",
    "MAX_ROTATION_DEG",
    "MAX_TRANSLATION_MM",
    "MIN_OVERLAP",
    "Registration",
    "RegistrationError",
    "register",
    "resample_onto",
    "working_grid",
]

BODY_THRESHOLD_HU: float = -500.0
"""Voxels above this HU count as body (for the overlap check)."""

MIN_OVERLAP: float = 0.5
"""Smallest accepted fraction of the arterial body covered by the moved portal-venous body."""

MAX_TRANSLATION_MM: float = 50.0
"""A larger translation means the optimizer diverged: breathing moves the liver a few cm at most."""

MAX_ROTATION_DEG: float = 30.0
"""A larger rotation about any axis means the optimizer diverged (patients lie on the table)."""

# Soft-tissue window for the metric: without it air (-1000) and cortical bone dominate the joint
# histogram and the liver, whose alignment matters, contributes almost nothing.
_CLAMP_HU: tuple[float, float] = (-200.0, 400.0)
_AIR_HU = -1024.0
_HISTOGRAM_BINS = 50
_SHRINK_FACTORS = (4, 2, 1)
_SMOOTHING_SIGMAS_MM = (2.0, 1.0, 0.0)
_SAMPLING_FRACTIONS = (0.25, 0.15, 0.05)
_ITERATIONS = 200
# The metric looks at the abdominal cavity only: the body wall and the spine do not move with
# breathing and, left in, anchor the transform near zero while the liver has moved (the
# phantom's viscera shift alone; real body walls move far less than the liver).
_WALL_MM = 30.0
_BONE_HU = 250.0
_BONE_MARGIN_MM = 10.0
# Below this fraction of the body the cavity mask is not trusted (tiny field of view, a body
# cut by the image edge) and the whole image is used.
_MIN_MASK_FRACTION = 0.05


class RegistrationError(ValueError):
    """The phases cannot be registered (no overlap, divergence, metric failure)."""


@dataclass(frozen=True)
class Registration:
    """Result of :func:`register`.

    Attributes
    ----------
    transform
        ``sitk.Euler3DTransform`` mapping arterial-space points to portal-venous space
        (SimpleITK's fixed → moving convention); pass it to :func:`resample_onto` to bring the
        portal-venous volume (or its labels) onto the arterial grid.
    translation_mm
        Displacement ``(x, y, z)`` LPS mm of the portal-venous anatomy relative to the arterial
        anatomy at the centre of rotation (the arterial image centre); same sign convention as
        :attr:`model.phantom.PhaseVolume.shift_mm`.
    rotation_deg
        Euler angles about x, y and z, in degrees.
    metric
        Final Mattes mutual information value (negative; lower is better).
    overlap
        Fraction of the arterial body (HU > -500) covered by the moved portal-venous body.
    """

    transform: Any
    translation_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    metric: float
    overlap: float


def _check_3d(image: Any, name: str) -> None:
    if not isinstance(image, sitk.Image):
        raise ValueError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise ValueError(f"{name} must be 3-D, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{name} must be a scalar image")


def working_grid(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Resample ``image`` (linearly) onto an isotropic grid of ``spacing_mm`` that covers it.

    The grid keeps the image's direction and the centre of its extent; along each axis it has
    the fewest voxels whose boxes cover the image's voxel boxes. Its origin therefore moves by
    less than half a voxel (of the coarser grid) from the image's origin: anchoring the grid at
    the original origin instead would either leave part of the image out or put the last voxels
    outside the image (a band of -1024 that reads as air at the edge of the field of view).

    Parameters
    ----------
    image
        3-D scalar image.
    spacing_mm
        Spacing of the new grid in all three axes.

    Returns
    -------
    SimpleITK.Image
        Float32 image on the new grid; every voxel centre lies inside the image.
    """
    _check_3d(image, "image")
    if not (math.isfinite(spacing_mm) and spacing_mm > 0.0):
        raise ValueError(f"spacing_mm must be a positive number, got {spacing_mm}")
    old_size = np.array(image.GetSize(), dtype=np.float64)
    old_spacing = np.array(image.GetSpacing(), dtype=np.float64)
    # The epsilon keeps an exact multiple from gaining a voxel through rounding.
    size = np.maximum(1, np.ceil(old_size * old_spacing / spacing_mm - 1e-6)).astype(int)
    # Offset (mm, along the image axes) of the new first voxel centre from the old one, so that
    # both grids share the centre of their extents.
    offset = ((old_size - 1.0) * old_spacing - (size - 1.0) * spacing_mm) / 2.0
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.array(image.GetOrigin(), dtype=np.float64) + direction @ offset
    reference = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    reference.SetSpacing([float(spacing_mm)] * 3)
    reference.SetOrigin([float(v) for v in origin])
    reference.SetDirection(image.GetDirection())
    return resample_onto(image, reference)


def resample_onto(
    image: sitk.Image,
    reference: sitk.Image,
    transform: Any | None = None,
    *,
    label: bool = False,
    default: float | None = None,
) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference``.

    Parameters
    ----------
    image
        3-D scalar image (intensities, or a label map when ``label``).
    reference
        Image whose grid (size, spacing, origin, direction) the result takes; its voxels are
        not read.
    transform
        Maps reference-space points to ``image``-space points (e.g.
        :attr:`Registration.transform` with the arterial image as reference and the
        portal-venous image as ``image``); ``None`` is the identity.
    label
        Nearest-neighbour interpolation and the input pixel type (labels keep their values);
        otherwise linear interpolation to float32.
    default
        Value outside ``image``; ``None`` means -1024 (air) for images and 0 for labels.

    Returns
    -------
    SimpleITK.Image
        The resampled image.
    """
    _check_3d(image, "image")
    _check_3d(reference, "reference")
    if default is None:
        default = 0.0 if label else _AIR_HU
    if not math.isfinite(default):
        raise ValueError(f"default must be finite, got {default}")
    if transform is None:
        transform = sitk.Transform(3, sitk.sitkIdentity)
    elif not isinstance(transform, sitk.Transform) or transform.GetDimension() != 3:
        raise ValueError("transform must be a 3-D SimpleITK transform or None")
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    pixel_type = image.GetPixelID() if label else sitk.sitkFloat32
    return sitk.Resample(image, reference, transform, interpolator, float(default), pixel_type)


def _overlap(fixed: sitk.Image, moving: sitk.Image, transform: Any) -> float:
    """Fraction of the fixed body covered by the moving body mapped through ``transform``."""
    fixed_body = sitk.GetArrayViewFromImage(fixed) > BODY_THRESHOLD_HU
    n_fixed = int(np.count_nonzero(fixed_body))
    if n_fixed == 0:
        raise RegistrationError(
            f"the arterial volume contains no body (no voxel above {BODY_THRESHOLD_HU:g} HU)"
        )
    moved = resample_onto(moving, fixed, transform)
    moved_body = sitk.GetArrayViewFromImage(moved) > BODY_THRESHOLD_HU
    return float(np.count_nonzero(fixed_body & moved_body)) / n_fixed


def _fill_slices(body: sitk.Image) -> sitk.Image:
    """Fill holes slice by slice (bowel gas, lungs reaching the image's top are not outside)."""
    filled = [
        sitk.BinaryFillhole(body[:, :, k], fullyConnected=False, foregroundValue=1)
        for k in range(body.GetSize()[2])
    ]
    result = sitk.JoinSeries(filled)
    result.CopyInformation(body)
    return result


def _distance_inside(mask: sitk.Image, in_plane: bool) -> np.ndarray:
    """Distance (mm) of each voxel of ``mask`` to the nearest voxel outside it."""
    image = sitk.Image(mask)
    if in_plane:
        # A huge slice spacing makes the nearest outside voxel always lie in the same slice.
        sx, sy, _ = image.GetSpacing()
        image.SetSpacing((sx, sy, 1e6))
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True
    )
    return sitk.GetArrayFromImage(distance)


def _cavity_mask(fixed_hu: sitk.Image) -> sitk.Image | None:
    """Metric mask on the fixed grid: the body eroded in-plane by the wall, minus bone.

    ``None`` when the mask would be too small to be trusted (the whole image is used then).
    """
    hu = sitk.GetArrayViewFromImage(fixed_hu)
    body = fixed_hu > BODY_THRESHOLD_HU
    n_body = int(np.count_nonzero(hu > BODY_THRESHOLD_HU))
    filled = _fill_slices(body)
    if not np.any(sitk.GetArrayViewFromImage(filled) == 0):
        return None  # the body fills the field of view: no wall to find
    keep = _distance_inside(filled, in_plane=True) > _WALL_MM
    bone = hu > _BONE_HU
    if np.any(bone):
        keep &= _distance_inside(fixed_hu <= _BONE_HU, in_plane=False) > _BONE_MARGIN_MM
    if np.count_nonzero(keep) < _MIN_MASK_FRACTION * n_body:
        return None
    mask = sitk.GetImageFromArray(keep.astype(np.uint8))
    mask.CopyInformation(fixed_hu)
    return mask


def _euler(transform: Any) -> Any:
    """The Euler3DTransform inside what Execute returned (SimpleITK 2 wraps it in a composite)."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(transform.GetNumberOfTransforms() - 1)
    return sitk.Euler3DTransform(transform)


def register(
    arterial: sitk.Image,
    portal_venous: sitk.Image,
    *,
    working_spacing_mm: float = 2.0,
    seed: int = 0,
) -> Registration:
    """Rigidly register the portal-venous phase (moving) onto the arterial phase (fixed).

    Both images are resampled onto isotropic working grids of ``working_spacing_mm`` and clamped
    to a soft-tissue window [-200, 400] HU; the Euler 3-D transform is optimised for Mattes mutual
    information (50 bins; random samples, 25 / 15 / 5 % of the voxels per level, drawn with
    ``seed``) with regular-step gradient descent over three resolution levels (shrink 4, 2, 1;
    smoothing 2, 1, 0 mm). The metric samples the abdominal cavity of the arterial image only:
    the body eroded in-plane by 30 mm (body wall) minus bone and 10 mm around it, because these
    do not move with breathing and would hold the transform near zero while the liver moved;
    the whole image is used when that mask is under 5 % of the body.

    The result is reproducible: the samples depend on ``seed`` only, and the multithreaded metric
    sums make runs differ by about 1e-6 mm at most.

    The rotation centre is the arterial image's centre and the initial translation is zero:
    the phases share the scanner's frame of reference, and centring the two images on each
    other (SimpleITK's GEOMETRY initializer) would invent a shift whenever their coverage
    differs.

    Parameters
    ----------
    arterial
        Fixed image, HU.
    portal_venous
        Moving image, HU, in the same frame of reference.
    working_spacing_mm
        Spacing of the working grids.
    seed
        Seed of the metric's random sampling.

    Returns
    -------
    Registration
        The transform (arterial → portal-venous points), its parameters, the final metric and
        the body overlap.

    Raises
    ------
    RegistrationError
        When the bodies overlap by less than :data:`MIN_OVERLAP` (before or after registration),
        the optimizer diverges (translation over :data:`MAX_TRANSLATION_MM` or rotation over
        :data:`MAX_ROTATION_DEG`) or the metric cannot be evaluated.
    ValueError
        When the inputs are not 3-D scalar images or the parameters are invalid.
    """
    _check_3d(arterial, "arterial")
    _check_3d(portal_venous, "portal_venous")
    if not (math.isfinite(working_spacing_mm) and working_spacing_mm > 0.0):
        raise ValueError(f"working_spacing_mm must be a positive number, got {working_spacing_mm}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    fixed_hu = working_grid(arterial, working_spacing_mm)
    moving_hu = working_grid(portal_venous, working_spacing_mm)

    centre_index = [(n - 1) / 2.0 for n in fixed_hu.GetSize()]
    initial = sitk.Euler3DTransform()
    initial.SetCenter(fixed_hu.TransformContinuousIndexToPhysicalPoint(centre_index))

    before = _overlap(fixed_hu, moving_hu, initial)
    if before < MIN_OVERLAP:
        raise RegistrationError(
            f"the volumes do not overlap: {before:.1%} of the arterial body is covered by the "
            f"portal-venous body before registration (at least {MIN_OVERLAP:.0%} needed)"
        )

    low, high = _CLAMP_HU
    fixed = sitk.Clamp(fixed_hu, sitk.sitkFloat32, low, high)
    moving = sitk.Clamp(moving_hu, sitk.sitkFloat32, low, high)

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=_HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # Coarse levels have few voxels and need a larger share; the full level has plenty.
    # SimpleITK reads seed 0 as "seed from the wall clock", hence the + 1.
    method.SetMetricSamplingPercentagePerLevel(list(_SAMPLING_FRACTIONS), int(seed) + 1)
    mask = _cavity_mask(fixed_hu)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,  # mm (the scales make one unit of every parameter ~1 mm of motion)
        minStep=1e-3,
        numberOfIterations=_ITERATIONS,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(_SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(_SMOOTHING_SIGMAS_MM))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    try:
        result = _euler(method.Execute(fixed, moving))
    except RuntimeError as error:
        raise RegistrationError(
            f"registration failed ({before:.1%} body overlap before registration): {error}"
        ) from error

    tx, ty, tz = (float(v) for v in result.GetTranslation())
    angles = (
        math.degrees(result.GetAngleX()),
        math.degrees(result.GetAngleY()),
        math.degrees(result.GetAngleZ()),
    )
    shift = math.sqrt(tx * tx + ty * ty + tz * tz)
    if shift > MAX_TRANSLATION_MM or max(abs(a) for a in angles) > MAX_ROTATION_DEG:
        raise RegistrationError(
            f"registration diverged: translation {shift:.1f} mm (limit {MAX_TRANSLATION_MM:g}), "
            f"rotation {max(abs(a) for a in angles):.1f}° (limit {MAX_ROTATION_DEG:g})"
        )
    after = _overlap(fixed_hu, moving_hu, result)
    if after < MIN_OVERLAP:
        raise RegistrationError(
            f"the volumes do not overlap: {after:.1%} of the arterial body is covered by the "
            f"portal-venous body after registration (at least {MIN_OVERLAP:.0%} needed)"
        )
    return Registration(
        transform=result,
        translation_mm=(tx, ty, tz),
        rotation_deg=angles,
        metric=float(method.GetMetricValue()),
        overlap=after,
    )
