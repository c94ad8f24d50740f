"""Specification of the synthetic liver CT phantom (model/phantom.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pytest
import statsmodels.api as sm

from model.phantom import (
    MVI_LOGIT_COEFFICIENTS,
    PHANTOM_VERSION,
    PHASE_NAMES,
    PhantomSpec,
    PhantomStudy,
    draw_latents,
    feret_diameter_mm,
    localizer,
    make_study,
    max_axial_diameter_mm,
    measure_truth,
)

SMALL = PhantomSpec(size=96, slices=24)
NOISELESS = PhantomSpec(size=96, slices=24, noise_hu=0.0)


@pytest.fixture(scope="module")
def study() -> PhantomStudy:
    return make_study(11, SMALL)


@pytest.fixture(scope="module")
def clean() -> PhantomStudy:
    return make_study(11, NOISELESS)


def auc(score: npt.ArrayLike, label: npt.ArrayLike) -> float:
    """Rank-based (Mann-Whitney) AUC; scores are continuous so ties do not occur."""
    s = np.asarray(score, dtype=float)
    y = np.asarray(label).astype(bool)
    ranks = np.empty(s.size)
    ranks[np.argsort(s)] = np.arange(1, s.size + 1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    ra = np.argsort(np.argsort(np.asarray(a)))
    rb = np.argsort(np.argsort(np.asarray(b)))
    return float(np.corrcoef(ra, rb)[0, 1])


def brute_force_diameter(mask2d: npt.NDArray[np.uint8], sx: float, sy: float) -> float:
    """Largest distance between any two corners of any two region pixels."""
    j, i = np.nonzero(mask2d)
    corners = np.array(
        [((i + di) * sx, (j + dj) * sy) for di, dj in itertools.product((0, 1), repeat=2)]
    )
    pts = corners.transpose(0, 2, 1).reshape(-1, 2)
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(axis=-1)
    return math.sqrt(float(d2.max()))


def lps_index(study: PhantomStudy, x: float, y: float) -> tuple[int, int]:
    """(row, column) of the voxel whose centre is nearest to LPS (x, y)."""
    sx, sy, _ = study.spacing_mm
    ox, oy, _ = study.origin_mm
    return round((y - oy) / sy), round((x - ox) / sx)


# ------------------------------------------------------------------------------------------
# Determinism and geometry
# ------------------------------------------------------------------------------------------


def test_version_and_phase_names_are_public_constants() -> None:
    assert isinstance(PHANTOM_VERSION, str) and PHANTOM_VERSION
    assert PHASE_NAMES == ("non_contrast", "arterial", "portal_venous", "delayed")


def test_same_seed_gives_identical_study(study: PhantomStudy) -> None:
    again = make_study(11, SMALL)
    for name in PHASE_NAMES:
        np.testing.assert_array_equal(again.phases[name].hu, study.phases[name].hu)
        assert again.phases[name].shift_mm == study.phases[name].shift_mm
    for key in ("liver", "tumor", "loat"):
        np.testing.assert_array_equal(again.masks[key], study.masks[key])
    assert again.truth == study.truth
    assert again.latents == study.latents


def test_different_seeds_give_different_studies(study: PhantomStudy) -> None:
    other = make_study(12, SMALL)
    assert not np.array_equal(other.phases["arterial"].hu, study.phases["arterial"].hu)
    assert not np.array_equal(other.masks["tumor"], study.masks["tumor"])
    assert other.latents["aggressiveness"] != study.latents["aggressiveness"]


def test_volumes_have_the_spec_shape_and_dtypes(study: PhantomStudy) -> None:
    assert list(study.phases) == list(PHASE_NAMES)
    for name, phase in study.phases.items():
        assert phase.name == name
        assert phase.hu.dtype == np.float32
        assert phase.hu.shape == (24, 96, 96)
    assert set(study.masks) == {"liver", "tumor", "loat", "stomach", "aorta"}
    for mask in study.masks.values():
        assert mask.dtype == np.uint8
        assert mask.shape == (24, 96, 96)
        assert set(np.unique(mask)) <= {0, 1}


def test_spacing_comes_from_field_of_view_and_grid_is_centred() -> None:
    spec = PhantomSpec(size=64, slices=16, field_of_view_mm=320.0, z_extent_mm=80.0)
    s = make_study(3, spec)
    assert s.spacing_mm == pytest.approx((5.0, 5.0, 5.0))
    ox, oy, oz = s.origin_mm
    assert ox + (64 - 1) / 2 * 5.0 == pytest.approx(0.0)
    assert oy + (64 - 1) / 2 * 5.0 == pytest.approx(0.0)
    # The z centre of the grid is a fixed table position, whatever the slice count.
    other = make_study(3, SMALL)
    z_centre = oz + (16 - 1) / 2 * 5.0
    assert other.origin_mm[2] + (24 - 1) / 2 * other.spacing_mm[2] == pytest.approx(z_centre)


def test_body_fills_the_field_of_view_but_fits_inside(clean: PhantomStudy) -> None:
    hu = clean.phases["arterial"].hu
    body = hu > -500
    # Air all round the body: the outer frame of every slice is empty.
    assert not body[:, 0, :].any() and not body[:, -1, :].any()
    assert not body[:, :, 0].any() and not body[:, :, -1].any()
    columns = np.flatnonzero(body[12].any(axis=0))
    width_mm = (columns[-1] - columns[0] + 1) * clean.spacing_mm[0]
    assert 280.0 < width_mm < 370.0


def test_liver_is_on_patient_right_and_masks_are_nested(study: PhantomStudy) -> None:
    liver, tumor, loat = (study.masks[k].astype(bool) for k in ("liver", "tumor", "loat"))
    assert tumor.any() and liver.any() and loat.any()
    assert not (tumor & ~liver).any(), "tumour voxels must be inside the liver mask"
    assert not (loat & liver).any()
    # Patient right is -x, i.e. low column indices.
    _, _, cols = np.nonzero(liver)
    x = study.origin_mm[0] + cols * study.spacing_mm[0]
    assert np.mean(x) < -20.0
    _, _, tumor_cols = np.nonzero(tumor)
    assert np.all(study.origin_mm[0] + tumor_cols * study.spacing_mm[0] < 0.0)


def test_stomach_and_aorta_masks_are_their_organs_apart_from_liver_and_loat(
    clean: PhantomStudy,
) -> None:
    masks = {k: m.astype(bool) for k, m in clean.masks.items()}
    stomach, aorta = masks["stomach"], masks["aorta"]
    assert stomach.any() and aorta.any()
    for organ in (stomach, aorta):
        assert not (organ & masks["liver"]).any()
        assert not (organ & masks["loat"]).any()
    assert not (stomach & aorta).any()
    arterial = clean.phases["arterial"].hu
    # The stomach mask is the whole organ: wall, fluid and the gas bubble, not the wall alone.
    assert (arterial[stomach] < -500.0).any() and (np.abs(arterial[stomach] - 10.0) < 5.0).any()
    # The aorta is the brightest vessel in the arterial phase and fainter in the portal-venous.
    aorta_arterial = float(np.median(arterial[aorta]))
    assert aorta_arterial > 200.0
    assert float(np.median(clean.phases["portal_venous"].hu[aorta])) < aorta_arterial - 80.0
    # It runs cranio-caudally through every slice, on the patient's left of the midline or on it.
    assert aorta.any(axis=(1, 2)).all()
    _, _, cols = np.nonzero(aorta)
    assert abs(float(np.mean(clean.origin_mm[0] + cols * clean.spacing_mm[0]))) < 40.0


# ------------------------------------------------------------------------------------------
# Enhancement and breathing
# ------------------------------------------------------------------------------------------


def test_loat_is_fat(clean: PhantomStudy) -> None:
    hu = clean.phases["arterial"].hu[clean.masks["loat"] > 0]
    assert -190.0 < float(hu.mean()) < -30.0


def test_tumor_is_hyperenhancing_then_washes_out(study: PhantomStudy) -> None:
    tumor = study.masks["tumor"] > 0
    parenchyma = (study.masks["liver"] > 0) & ~tumor

    def means(phase: str) -> tuple[float, float]:
        hu = study.phases[phase].hu
        return float(hu[tumor].mean()), float(hu[parenchyma].mean())

    tumor_art, liver_art = means("arterial")
    tumor_pv, liver_pv = means("portal_venous")
    tumor_nc, liver_nc = means("non_contrast")
    assert tumor_art > liver_art + 20.0
    assert tumor_pv < liver_pv  # by the study's washout (next test); the masks are arterial
    assert tumor_nc < liver_nc
    assert 40.0 < liver_nc < 70.0


def test_the_portal_venous_washout_carries_a_latent_that_size_does_not() -> None:
    spec = PhantomSpec(size=96, slices=24, phases=("arterial", "portal_venous"), noise_hu=0.0)
    washout, arterial, z3, z1, diameter = [], [], [], [], []
    for seed in range(24):
        s = make_study(seed, spec)
        tumor = s.masks["tumor"] > 0
        liver = (s.masks["liver"] > 0) & ~tumor
        # The portal-venous phase is breathing-shifted: compare it on its own frame's means.
        pv, art = s.phases["portal_venous"].hu, s.phases["arterial"].hu
        washout.append(float(np.median(pv[liver])) - float(np.median(pv[tumor])))
        arterial.append(float(np.median(art[tumor])) - float(np.median(art[liver])))
        z3.append(s.latents["washout"])
        z1.append(s.latents["aggressiveness"])
        diameter.append(s.truth.max_diameter_mm)
    assert spearman(washout, z3) > 0.7
    assert abs(spearman(washout, z1)) < 0.4
    assert abs(spearman(diameter, z3)) < 0.4
    # The arterial phase shows z1, not z3: only the later phase can add z3.
    assert abs(spearman(arterial, z3)) < 0.4


def test_aorta_is_brightest_in_the_arterial_phase(clean: PhantomStudy) -> None:
    j, i = lps_index(clean, clean.latents["aorta_x_mm"], clean.latents["aorta_y_mm"])
    aorta = {name: float(p.hu[:, j, i].mean()) for name, p in clean.phases.items()}
    assert aorta["arterial"] > 250.0
    assert aorta["arterial"] == max(aorta.values())
    assert aorta["non_contrast"] < 60.0
    liver_art = clean.phases["arterial"].hu[clean.masks["liver"] > 0]
    assert aorta["arterial"] > float(liver_art.mean()) + 150.0


def test_breathing_shift_is_a_few_millimetres(study: PhantomStudy) -> None:
    assert study.phases["arterial"].shift_mm == (0.0, 0.0, 0.0)
    for name in ("portal_venous", "delayed"):
        x, y, z = study.phases[name].shift_mm
        assert 2.0 <= abs(z) <= 8.0
        assert abs(x) <= 3.0 and abs(y) <= 3.0
    assert all(abs(v) <= 3.0 for v in study.phases["non_contrast"].shift_mm)
    delays = [study.phases[name].delay_s for name in PHASE_NAMES]
    assert delays == sorted(delays) and delays[0] < 0.0 < delays[1]


def test_portal_venous_anatomy_is_displaced_by_the_recorded_shift() -> None:
    spec = PhantomSpec(size=128, slices=80, noise_hu=0.0, phases=("arterial", "portal_venous"))
    s = make_study(5, spec)
    spacing = np.array(s.spacing_mm)
    tumor = s.masks["tumor"] > 0
    idx = np.asarray(np.nonzero(tumor))
    lo = idx.min(axis=1) - 4
    hi = idx.max(axis=1) + 5
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))

    def centroid_xyz(region: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        k, j, i = np.nonzero(region)
        return np.array([i.mean(), j.mean(), k.mean()]) * spacing

    # In the portal-venous phase the tumour is the washed-out (darker than liver) blob near it.
    pv = s.phases["portal_venous"].hu[box]
    washed_out = (pv > 50.0) & (pv < 95.0)
    moved = centroid_xyz(washed_out) - centroid_xyz(tumor[box])
    np.testing.assert_allclose(moved, s.phases["portal_venous"].shift_mm, atol=1.5)


def test_phase_subset_renders_the_same_volumes() -> None:
    full = make_study(4, SMALL)
    part = make_study(4, PhantomSpec(size=96, slices=24, phases=("portal_venous", "arterial")))
    assert list(part.phases) == ["arterial", "portal_venous"]
    for name in part.phases:
        np.testing.assert_array_equal(part.phases[name].hu, full.phases[name].hu)
    assert part.truth == full.truth


# ------------------------------------------------------------------------------------------
# Truth
# ------------------------------------------------------------------------------------------


def test_truth_matches_an_independent_measurement(study: PhantomStudy) -> None:
    sx, sy, sz = study.spacing_mm
    tumor = study.masks["tumor"]
    loat = study.masks["loat"]
    expected_diameter = max(
        brute_force_diameter(tumor[k], sx, sy) for k in range(tumor.shape[0]) if tumor[k].any()
    )
    truth = study.truth
    assert truth.max_diameter_mm == pytest.approx(expected_diameter, rel=1e-12)
    assert truth.tumor_volume_ml == pytest.approx(tumor.sum() * sx * sy * sz / 1000.0)
    assert truth.loat_volume_ml == pytest.approx(loat.sum() * sx * sy * sz / 1000.0)
    assert truth.loat_max_area_cm2 == pytest.approx(loat.sum(axis=(1, 2)).max() * sx * sy / 100.0)
    assert truth.mvi == int(study.latents["mvi"])
    assert measure_truth(study.masks, study.spacing_mm, truth.mvi) == truth


@pytest.mark.parametrize("radius_px", [3, 10, 50])
def test_diameter_of_a_pixelated_disk(radius_px: int) -> None:
    spacing = 0.7
    n = 2 * radius_px + 9
    j, i = np.mgrid[:n, :n]
    centre = n // 2
    disk = ((j - centre) ** 2 + (i - centre) ** 2 <= radius_px**2).astype(np.uint8)
    diameter = feret_diameter_mm(disk, (spacing, spacing))
    assert abs(diameter - 2 * radius_px * spacing) <= math.sqrt(2) * spacing
    if radius_px <= 10:  # the brute force is quadratic in the pixel count
        assert diameter == pytest.approx(brute_force_diameter(disk, spacing, spacing))


def test_diameter_uses_pixel_corners_and_anisotropic_spacing() -> None:
    single = np.zeros((5, 5), dtype=np.uint8)
    single[2, 2] = 1
    assert feret_diameter_mm(single, (0.5, 2.0)) == pytest.approx(math.hypot(0.5, 2.0))
    bar = np.zeros((5, 5), dtype=np.uint8)
    bar[1, 1:4] = 1
    assert feret_diameter_mm(bar, (1.0, 3.0)) == pytest.approx(math.hypot(3.0, 3.0))
    assert feret_diameter_mm(np.zeros((4, 4), dtype=np.uint8), (1.0, 1.0)) == 0.0
    # Disconnected pixels: the diameter spans the gap.
    pair = np.zeros((10, 10), dtype=np.uint8)
    pair[0, 0] = pair[9, 9] = 1
    assert feret_diameter_mm(pair, (1.0, 1.0)) == pytest.approx(10.0 * math.sqrt(2))


def test_max_axial_diameter_is_the_largest_slice() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((6, 20, 20)) < 0.05).astype(np.uint8)
    expected = max(brute_force_diameter(m, 0.8, 1.1) for m in mask if m.any())
    assert max_axial_diameter_mm(mask, (0.8, 1.1)) == pytest.approx(expected)
    assert max_axial_diameter_mm(np.zeros((3, 4, 4), dtype=np.uint8), (1.0, 1.0)) == 0.0


def test_measure_truth_counts_missing_masks_as_empty() -> None:
    truth = measure_truth({}, (1.0, 1.0, 1.0), None)
    assert truth.mvi is None
    assert truth.max_diameter_mm == truth.tumor_volume_ml == 0.0
    assert truth.loat_volume_ml == truth.loat_max_area_cm2 == 0.0
    with pytest.raises(ValueError, match="mvi"):
        measure_truth({}, (1.0, 1.0, 1.0), 2)


# ------------------------------------------------------------------------------------------
# Study variants
# ------------------------------------------------------------------------------------------


def test_no_tumor_study_has_liver_but_no_tumor() -> None:
    s = make_study(11, PhantomSpec(size=96, slices=24, tumor=False))
    assert not s.masks["tumor"].any()
    assert s.masks["liver"].any() and s.masks["loat"].any()
    assert s.truth.mvi is None
    assert s.truth.max_diameter_mm == 0.0 and s.truth.tumor_volume_ml == 0.0
    assert s.truth.loat_volume_ml > 0.0
    assert list(s.phases) == list(PHASE_NAMES)


def test_non_liver_study_is_a_single_non_contrast_phase_with_empty_masks() -> None:
    s = make_study(11, PhantomSpec(size=96, slices=24, non_liver=True))
    assert list(s.phases) == ["non_contrast"]
    assert s.phases["non_contrast"].shift_mm == (0.0, 0.0, 0.0)
    assert all(not s.masks[k].any() for k in ("liver", "tumor", "loat", "stomach"))
    # The thoracic aorta is there, and its mask says so.
    assert s.masks["aorta"].any()
    assert s.truth.mvi is None and s.truth.loat_volume_ml == 0.0
    hu = s.phases["non_contrast"].hu
    assert (hu < -700).mean() > 0.3  # lungs and air: it is not an abdomen
    assert s.phases["non_contrast"].hu.shape == (24, 96, 96)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 16},
        {"size": 2048},
        {"slices": 4},
        {"slices": 1001},
        {"field_of_view_mm": 0.0},
        {"field_of_view_mm": float("nan")},
        {"z_extent_mm": -1.0},
        {"noise_hu": -1.0},
        {"phases": ()},
        {"phases": ("venous",)},
        {"phases": ("arterial", "arterial")},
        {"phases": "arterial"},
    ],
)
def test_spec_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PhantomSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_seed_must_be_a_non_negative_integer(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        draw_latents(seed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        make_study(seed, SMALL)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# The MVI label model
# ------------------------------------------------------------------------------------------


def test_draw_latents_is_the_draw_make_study_uses(study: PhantomStudy) -> None:
    latents = draw_latents(11)
    for key, value in latents.items():
        assert study.latents[key] == value
    assert latents["mvi"] in (0.0, 1.0)
    assert draw_latents(11) == latents


def test_label_model_prevalence_and_auc() -> None:
    draws = [draw_latents(seed) for seed in range(2000)]
    z1 = np.array([d["aggressiveness"] for d in draws])
    z2 = np.array([d["loat"] for d in draws])
    mvi = np.array([d["mvi"] for d in draws])
    assert abs(float(np.corrcoef(z1, z2)[0, 1])) < 0.08, "latents must be independent"
    z3 = np.array([d["washout"] for d in draws])
    assert abs(float(np.corrcoef(z1, z3)[0, 1])) < 0.08
    a, b, d, _ = MVI_LOGIT_COEFFICIENTS
    ideal = auc(a * z1 + b * z2 + d * z3, mvi)
    tumour = auc(a * z1 + d * z3, mvi)
    arterial = auc(a * z1 + b * z2, mvi)
    assert 0.35 <= mvi.mean() <= 0.50
    assert 0.87 <= ideal <= 0.92
    # The LOAT adds to the tumour, the portal-venous phase to the arterial one.
    assert ideal - tumour >= 0.04
    assert ideal - arterial >= 0.06
    assert auc(z2, mvi) > 0.6 and auc(z3, mvi) > 0.6


def test_a_clinical_model_of_size_and_loat_area_stays_well_below_the_ideal_score() -> None:
    draws = [draw_latents(seed) for seed in range(4000)]
    mvi = np.array([d["mvi"] for d in draws])
    a, b, d, _ = MVI_LOGIT_COEFFICIENTS
    ideal = auc(
        np.array([a * x["aggressiveness"] + b * x["loat"] + d * x["washout"] for x in draws]),
        mvi,
    )
    # The two clinical predictors, on the scales the latents set them (log size, LOAT scale).
    log_d = np.log([x["tumor_nominal_diameter_mm"] for x in draws])
    log_loat = np.log([x["loat_scale"] for x in draws])
    design = np.column_stack([np.ones_like(log_d), log_d, log_loat])
    fit = sm.Logit(mvi, design).fit(disp=0)
    clinical = auc(design @ fit.params, mvi)
    assert ideal - clinical >= 0.10, (ideal, clinical)


def test_a_site_shifts_the_prevalence_not_the_latents() -> None:
    plain = [draw_latents(seed) for seed in range(1500)]
    referral = [draw_latents(seed, logit_offset=1.0) for seed in range(1500)]
    assert [p["washout"] for p in plain] == [r["washout"] for r in referral]
    assert np.mean([r["mvi"] for r in referral]) - np.mean([p["mvi"] for p in plain]) > 0.08
    with pytest.raises(ValueError, match="logit_offset"):
        draw_latents(1, logit_offset=float("nan"))


def test_image_truth_follows_the_latents() -> None:
    spec = PhantomSpec(size=96, slices=24, phases=("arterial",))
    studies = [make_study(seed, spec) for seed in range(40)]
    z1 = [s.latents["aggressiveness"] for s in studies]
    z2 = [s.latents["loat"] for s in studies]
    diameter = [s.truth.max_diameter_mm for s in studies]
    loat_area = [s.truth.loat_max_area_cm2 for s in studies]
    # Size tells of z1, but only half its variance is z1's (see draw_latents).
    assert spearman(diameter, z1) > 0.3
    assert spearman(loat_area, z2) > 0.6
    # Each image feature carries one latent, not the other.
    assert abs(spearman(diameter, z2)) < 0.4
    assert abs(spearman(loat_area, z1)) < 0.4
    assert min(diameter) > 10.0 and max(diameter) < 85.0


# ------------------------------------------------------------------------------------------
# Localizer
# ------------------------------------------------------------------------------------------


def test_localizer_is_a_coronal_projection(study: PhantomStudy) -> None:
    image, spacing = localizer(study)
    assert image.dtype == np.float32
    assert image.shape == (24, 96)
    assert spacing == (study.spacing_mm[2], study.spacing_mm[0])
    first = study.phases["non_contrast"].hu
    # Row 0 is the most superior slice.
    np.testing.assert_allclose(image[0], first[-1].mean(axis=0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(image[-1], first[0].mean(axis=0), rtol=1e-5, atol=1e-3)


def test_localizer_is_brightest_over_the_spine(study: PhantomStudy) -> None:
    image, _ = localizer(study)
    x = study.origin_mm[0] + np.arange(image.shape[1]) * study.spacing_mm[0]
    profile = image.mean(axis=0)
    central = np.abs(x) < 100.0
    assert abs(x[central][np.argmax(profile[central])]) < 10.0
    spine = profile[np.argmin(np.abs(x))]
    assert spine > profile[np.argmin(np.abs(x + 50.0))] + 30.0
    assert spine > profile[np.argmin(np.abs(x - 50.0))] + 30.0
