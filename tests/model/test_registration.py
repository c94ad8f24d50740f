"""Specification of the arterial ↔ portal-venous registration (model/registration.py).

Sign convention under test: the phantom's ``PhaseVolume.shift_mm`` is the displacement of the
portal-venous viscera relative to the arterial phase, and ``Registration.translation_mm`` is the
same displacement with the same sign (``translation_mm ≈ +shift_mm``): the transform maps an
arterial point ``p`` to ``p + shift`` in the portal-venous image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk

from model.phantom import PhantomSpec, PhantomStudy, make_study
from model.registration import (
    Registration,
    RegistrationError,
    register,
    resample_onto,
    working_grid,
)

SPEC = PhantomSpec(size=96, slices=32, phases=("arterial", "portal_venous"))


def as_image(
    volume: npt.NDArray[np.generic],
    study: PhantomStudy,
    origin: Sequence[float] | None = None,
) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume))
    image.SetSpacing(study.spacing_mm)
    image.SetOrigin(tuple(study.origin_mm if origin is None else origin))
    return image


@pytest.fixture(scope="module")
def study() -> PhantomStudy:
    return make_study(3, SPEC)


@pytest.fixture(scope="module")
def images(study: PhantomStudy) -> tuple[sitk.Image, sitk.Image]:
    return (
        as_image(study.phases["arterial"].hu, study),
        as_image(study.phases["portal_venous"].hu, study),
    )


@pytest.fixture(scope="module")
def registration(images: tuple[sitk.Image, sitk.Image]) -> Registration:
    return register(*images)


@pytest.mark.parametrize("seed", [3, 8, 21])
def test_recovers_the_phantom_shift_within_a_voxel(seed: int) -> None:
    study = make_study(seed, SPEC)
    result = register(
        as_image(study.phases["arterial"].hu, study),
        as_image(study.phases["portal_venous"].hu, study),
    )
    shift = np.array(study.phases["portal_venous"].shift_mm)
    assert np.linalg.norm(shift) > 2.0  # the phantom does move the viscera
    error = np.array(result.translation_mm) - shift  # same sign: translation ≈ +shift
    assert np.all(np.abs(error) <= np.array(study.spacing_mm)), (result, shift)
    assert max(abs(a) for a in result.rotation_deg) < 2.0
    assert result.overlap > 0.9
    assert result.metric < 0.0


def test_transform_maps_arterial_points_to_portal_venous(
    study: PhantomStudy, registration: Registration
) -> None:
    assert isinstance(registration.transform, sitk.Euler3DTransform)
    assert registration.translation_mm == tuple(registration.transform.GetTranslation())
    centre = np.array(registration.transform.GetCenter())
    moved = np.array(registration.transform.TransformPoint(tuple(centre)))
    np.testing.assert_allclose(moved - centre, registration.translation_mm, atol=1e-9)


def test_identical_inputs_give_zero_motion(images: tuple[sitk.Image, sitk.Image]) -> None:
    arterial = images[0]
    result = register(arterial, arterial)
    assert np.all(np.abs(result.translation_mm) < 0.5)
    assert np.all(np.abs(result.rotation_deg) < 0.5)
    assert result.overlap > 0.99


def test_is_deterministic(
    images: tuple[sitk.Image, sitk.Image], registration: Registration
) -> None:
    again = register(*images)
    # Same samples (seeded); multithreaded sums may differ in the last bits only.
    np.testing.assert_allclose(again.translation_mm, registration.translation_mm, atol=1e-3)
    np.testing.assert_allclose(again.rotation_deg, registration.rotation_deg, atol=1e-3)


def test_resampling_with_the_transform_aligns_the_liver(
    study: PhantomStudy, images: tuple[sitk.Image, sitk.Image], registration: Registration
) -> None:
    # Correlation inside the liver is no alignment measure across phases: the tumour and the
    # hepatic veins invert their contrast between arterial and portal-venous. Alignment shows as
    # homogeneity instead: under the arterial liver mask, the aligned portal-venous volume is
    # parenchyma (one HU level) instead of a mix with the organs and fat the liver moved past.
    arterial, portal_venous = images
    liver = study.masks["liver"].astype(bool) & ~study.masks["tumor"].astype(bool)

    def spread(transform: sitk.Transform | None) -> float:
        pv = sitk.GetArrayFromImage(resample_onto(portal_venous, arterial, transform))[liver]
        return float(np.mean(np.abs(pv - np.median(pv))))

    before, after = spread(None), spread(registration.transform)
    assert after < 0.8 * before, (before, after)


def test_labels_are_resampled_with_nearest_neighbour(
    study: PhantomStudy, images: tuple[sitk.Image, sitk.Image], registration: Registration
) -> None:
    labels = (study.masks["liver"] * 3 + study.masks["tumor"] * 4).astype(np.uint8)  # 0, 3, 7
    image = as_image(labels, study)
    moved = resample_onto(image, images[0], registration.transform, label=True)
    assert moved.GetPixelID() == sitk.sitkUInt8
    values = set(np.unique(sitk.GetArrayFromImage(moved)).tolist())
    assert values == {0, 3, 7}
    outside = resample_onto(image, images[0], sitk.TranslationTransform(3, (1e4, 0, 0)), label=True)
    assert not sitk.GetArrayFromImage(outside).any()  # labels default to 0 outside
    hu = resample_onto(images[0], images[0], sitk.TranslationTransform(3, (1e4, 0, 0)))
    assert hu.GetPixelID() == sitk.sitkFloat32
    assert np.all(sitk.GetArrayFromImage(hu) == -1024.0)


def test_non_overlapping_volumes_raise(study: PhantomStudy) -> None:
    ox, oy, oz = study.origin_mm
    arterial = as_image(study.phases["arterial"].hu, study)
    far = as_image(study.phases["portal_venous"].hu, study, (ox + 500.0, oy, oz))
    with pytest.raises(RegistrationError, match=r"overlap.*0\.0%"):
        register(arterial, far)
    assert issubclass(RegistrationError, ValueError)


def test_working_grid_is_isotropic_and_covers_the_image() -> None:
    image = sitk.Image([50, 40, 12], sitk.sitkInt16)
    image.SetSpacing((0.7, 0.9, 5.0))
    image.SetOrigin((-10.0, 20.0, -300.0))
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated in-plane
    image.SetDirection(direction)
    image += 40
    grid = working_grid(image, 2.0)
    assert grid.GetSpacing() == (2.0, 2.0, 2.0)
    assert grid.GetDirection() == direction
    assert grid.GetPixelID() == sitk.sitkFloat32
    assert grid.GetSize() == (18, 18, 30)  # ceil(35 / 2), ceil(36 / 2), ceil(60 / 2)
    for n_new, n_old, s_old in zip(
        grid.GetSize(), image.GetSize(), image.GetSpacing(), strict=True
    ):
        assert n_new * 2.0 >= n_old * s_old  # the new voxel boxes cover the old ones
        assert (n_new - 1) * 2.0 < n_old * s_old  # with no voxel more than needed

    # Same centre of extent, so the origin moves by less than half a voxel of the coarser grid.
    def centre(im: sitk.Image) -> npt.NDArray[np.float64]:
        return np.array(
            im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()])
        )

    np.testing.assert_allclose(centre(grid), centre(image), atol=1e-9)
    moved = np.abs(np.subtract(grid.GetOrigin(), image.GetOrigin()))
    assert np.all(moved < np.maximum(2.0, np.array(image.GetSpacing())[[1, 0, 2]]) / 2)
    # Every new voxel centre lies inside the image: no band of default (-1024) values.
    assert np.all(sitk.GetArrayViewFromImage(grid) == 40.0)


def test_invalid_arguments_raise(images: tuple[sitk.Image, sitk.Image]) -> None:
    arterial, portal_venous = images
    with pytest.raises(ValueError, match="spacing_mm"):
        working_grid(arterial, 0.0)
    with pytest.raises(ValueError, match="3-D"):
        register(arterial[:, :, 0], portal_venous)
    with pytest.raises(ValueError, match="working_spacing_mm"):
        register(arterial, portal_venous, working_spacing_mm=-1.0)
    with pytest.raises(ValueError, match="seed"):
        register(arterial, portal_venous, seed=-1)
    with pytest.raises(ValueError, match="transform"):
        resample_onto(arterial, arterial, "identity")


def test_runtime_at_256(capsys: pytest.CaptureFixture[str]) -> None:
    study = make_study(4, PhantomSpec(size=256, slices=64, phases=("arterial", "portal_venous")))
    arterial = as_image(study.phases["arterial"].hu, study)
    portal_venous = as_image(study.phases["portal_venous"].hu, study)
    start = time.perf_counter()
    result = register(arterial, portal_venous)
    elapsed = time.perf_counter() - start
    error = np.array(result.translation_mm) - np.array(study.phases["portal_venous"].shift_mm)
    with capsys.disabled():
        print(
            f"\nregister() 256x256x64: {elapsed:.2f} s, translation error "
            f"{np.round(error, 2).tolist()} mm"
        )
