"""The quality gates: each check passes what is plausible, fails what is not, and says why."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from model.registration import Registration
from model.roi import RoiSpec
from model.segmentation import Masks
from node.analysis import gates
from node.analysis.result import Gate, GateName
from node.analysis.stages import Registered
from node.core.settings import GatesSection

LIMITS = GatesSection()
SPACING = (2.0, 2.0, 2.0)
SHAPE = (40, 80, 80)


def _ball(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    k, j, i = np.indices(SHAPE)
    inside = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2
    return inside.astype(np.uint8)


def _card(**quality: Any) -> dict[str, Any]:
    return {
        "training_range": {
            "tumor_volume_ml": [2.0, 40.0],
            "loat_volume_ml": [1.0, 20.0],
            "liver_hu": {"arterial": [60.0, 90.0], "portal_venous": [95.0, 130.0]},
            "aorta_hu": {"arterial": [250.0, 350.0], "portal_venous": [130.0, 180.0]},
        },
        "quality": {
            "uncertainty_limit": 0.2,
            "uncertainty_validation": [0.05, 0.1, 0.12],
            "tumor_uncertainty_limit": 0.15,
            "tumor_uncertainty_validation": [0.06, 0.1, 0.11],
        },
        **quality,
    }


def _masks(**changes: Any) -> Masks:
    """A plausible abdomen: tumor inside the liver, LOAT between liver and stomach."""
    liver = _ball((20, 40, 28), 14)
    tumor = _ball((20, 40, 26), 6)  # 4.2 ml inside the liver
    stomach = _ball((20, 40, 58), 8)
    loat = _ball((20, 40, 45), 3)  # between the liver (edge at 42) and the stomach (from 50)
    aorta = _ball((20, 62, 40), 3)
    fields: dict[str, Any] = {
        "liver": liver | tumor,
        "tumor": tumor,
        "loat": loat,
        "tumor_components": 1,
        "source": "unet",
        "stomach": stomach,
        "aorta": aorta,
        "tumor_component_voxels": (int(tumor.sum()),),
        "uncertainty": 0.08,
        "tumor_uncertainty": 0.07,
    }
    fields.update(changes)
    return Masks(**fields)


def test_a_segmenter_that_put_much_liver_outside_the_liver_fails_the_segmentation_check() -> None:
    masks = _masks()
    liver = int(masks.liver.sum())
    lost = _masks(dropped_voxels={"liver": liver, "tumor": 40, "loat": 0})
    gate = gates.check_segmentation(LIMITS, lost, SPACING, _card())
    assert "liver labelled outside the main liver / the liver kept 1" in _failed(gate)
    assert gate.figures["stray_liver_fraction"] == 1.0
    # A few stray voxels, as the anatomical rules remove on most studies, pass.
    few = _masks(dropped_voxels={"liver": liver // 10, "tumor": 0, "loat": 5})
    gate = gates.check_segmentation(LIMITS, few, SPACING, _card())
    assert gate.passed is True and gate.figures["stray_liver_fraction"] == pytest.approx(
        0.1, abs=1e-3
    )
    # No rule ran (a supplied SEG): nothing to judge.
    drawn = _masks(source="supplied", uncertainty=None)
    assert (
        "stray_liver_fraction"
        not in gates.check_segmentation(LIMITS, drawn, SPACING, _card()).figures
    )


def _phases(masks: Masks, liver_hu: float = 75.0, aorta_hu: float = 300.0):
    arterial = np.full(SHAPE, -100.0, dtype=np.float32)
    arterial[masks.liver > 0] = liver_hu
    arterial[masks.tumor > 0] = 120.0
    assert masks.aorta is not None
    arterial[masks.aorta > 0] = aorta_hu
    portal = arterial.copy()
    portal[(masks.liver > 0) & (masks.tumor == 0)] = 110.0
    portal[masks.aorta > 0] = 150.0
    return arterial, portal


def _failed(gate: Gate) -> str:
    assert gate.passed is False, gate
    assert gate.reason is not None
    return gate.reason


# --- input ---------------------------------------------------------------------------------


def _image(slices: int, direction: tuple[float, ...] | None = None) -> sitk.Image:
    image = sitk.Image(64, 64, slices, sitk.sitkFloat32)
    if direction is not None:
        image.SetDirection(direction)
    return image


def test_axial_phases_with_enough_slices_pass_the_input_check() -> None:
    gate = gates.check_geometry(LIMITS, {"arterial": _image(40), "portal_venous": _image(40)})
    assert gate.passed is True
    assert gate.figures["arterial_slices"] == 40


def test_a_two_slice_stack_fails_the_input_check_naming_the_phase() -> None:
    gate = gates.check_geometry(LIMITS, {"arterial": _image(40), "portal_venous": _image(2)})
    assert "portal_venous slices 2 (at least 16)" in _failed(gate)


def test_a_sagittal_series_fails_the_input_check_on_its_tilt() -> None:
    sagittal = _image(40, (0, 0, 1, 1, 0, 0, 0, 1, 0))
    gate = gates.check_geometry(LIMITS, {"arterial": sagittal, "portal_venous": _image(40)})
    assert "arterial slice tilt" in _failed(gate)


def test_a_liver_cut_off_by_the_field_of_view_fails_the_input_check() -> None:
    whole = gates.check_input(Gate(name=GateName.INPUT, passed=True), LIMITS, _masks())
    assert whole.passed is True and whole.figures["liver_cut_fraction"] == 0.0
    masks = _masks()
    cut = Masks(
        **{
            **masks.__dict__,
            "liver": np.ascontiguousarray(masks.liver[20:]),
            "tumor": masks.tumor[20:],
        }
    )
    assert "liver cut off" in _failed(
        gates.check_input(Gate(name=GateName.INPUT, passed=True), LIMITS, cut)
    )


# --- registration --------------------------------------------------------------------------


def _registered(metric: float, overlap: float, portal: np.ndarray) -> Registered:
    image = sitk.GetImageFromArray(portal)
    registration = Registration(
        transform=sitk.Euler3DTransform(),
        translation_mm=(1.0, 2.0, 0.0),
        rotation_deg=(0.0, 0.0, 0.0),
        metric=metric,
        overlap=overlap,
    )
    return Registered(registration, image)


def test_a_good_registration_passes_with_its_figures() -> None:
    masks = _masks()
    arterial, portal = _phases(masks)
    gate = gates.check_registration(
        LIMITS, _registered(-0.6, 0.99, portal), arterial, portal, masks.liver, SPACING
    )
    assert gate.passed is True, gate.reason
    assert gate.figures["metric"] == -0.6
    assert gate.figures["residual_mm"] is not None and gate.figures["residual_mm"] < 1.0


def test_a_liver_left_misaligned_fails_the_registration_check() -> None:
    masks = _masks()
    arterial, portal = _phases(masks)
    moved = np.roll(portal, 5, axis=2)  # 10 mm along x left after registration
    gate = gates.check_registration(
        LIMITS, _registered(-0.6, 0.99, moved), arterial, moved, masks.liver, SPACING
    )
    assert "misalignment left around the liver" in _failed(gate)


def test_a_poor_metric_or_overlap_fails_the_registration_check() -> None:
    masks = _masks()
    arterial, portal = _phases(masks)
    reason = _failed(
        gates.check_registration(
            LIMITS, _registered(-0.05, 0.7, portal), arterial, portal, masks.liver, SPACING
        )
    )
    assert "final metric" in reason and "body overlap" in reason


# --- segmentation --------------------------------------------------------------------------


def test_a_plausible_segmentation_passes() -> None:
    gate = gates.check_segmentation(LIMITS, _masks(), SPACING, _card())
    assert gate.passed is True, gate.reason
    assert gate.figures["tumor_components"] == 1
    assert gate.figures["liver_contact"] == 1.0


def test_many_tumor_components_fail_and_specks_below_the_size_limit_do_not_count() -> None:
    masks = _masks()
    big = int(masks.tumor.sum())
    specks = _masks(tumor_components=30, tumor_component_voxels=(big, *([2] * 29)))
    assert gates.check_segmentation(LIMITS, specks, SPACING, _card()).passed is True
    many = _masks(tumor_components=5, tumor_component_voxels=(big, 200, 150, 120, 100))
    reason = _failed(gates.check_segmentation(LIMITS, many, SPACING, _card()))
    assert "tumor components of at least 0.1 ml 5 (limit 3)" in reason
    assert "volume of the other tumor components" in reason


def test_a_tumor_outside_the_liver_fails() -> None:
    stray = _ball((20, 40, 60), 5)  # in the stomach
    masks = _masks(tumor=stray, tumor_component_voxels=(int(stray.sum()),))
    assert "tumor surface touching liver" in _failed(
        gates.check_segmentation(LIMITS, masks, SPACING, _card())
    )


def test_volumes_outside_the_training_range_fail() -> None:
    huge = _ball((20, 40, 28), 13)  # 73 ml of "tumor" > 40 ml × 1.5
    masks = _masks(tumor=huge, tumor_component_voxels=(int(huge.sum()),))
    assert "tumor volume (ml) outside the training range" in _failed(
        gates.check_segmentation(LIMITS, masks, SPACING, _card())
    )


def test_loat_away_from_liver_and_stomach_fails() -> None:
    far = _ball((20, 8, 8), 3)
    assert "LOAT not between liver and stomach" in _failed(
        gates.check_segmentation(LIMITS, _masks(loat=far), SPACING, _card())
    )


def test_an_uncertain_segmenter_fails_at_its_cards_limit_or_the_configured_one() -> None:
    uncertain = _masks(uncertainty=0.35)
    assert "segmenter uncertainty" in _failed(
        gates.check_segmentation(LIMITS, uncertain, SPACING, _card())
    )
    relaxed = GatesSection(uncertainty_limit=0.5)
    assert gates.check_segmentation(relaxed, uncertain, SPACING, _card()).passed is True


def test_a_faint_tumor_fails_on_its_own_uncertainty_though_the_whole_is_certain() -> None:
    # The liver's many confident voxels keep the whole's mean low; the tumour's own is high.
    faint = _masks(uncertainty=0.1, tumor_uncertainty=0.36)
    gate = gates.check_segmentation(LIMITS, faint, SPACING, _card())
    assert gate.passed is False
    assert "tumor extent uncertain: the segmenter's mean entropy on it 0.36 (limit 0.15)" in (
        _failed(gate)
    )
    assert gate.figures["tumor_uncertainty"] == 0.36
    assert gate.limits["max_tumor_uncertainty"] == 0.15
    assert "segmenter uncertainty (mean entropy)" not in _failed(gate)
    # The configured limit replaces the card's.
    relaxed = GatesSection(tumor_uncertainty_limit=0.4)
    assert gates.check_segmentation(relaxed, faint, SPACING, _card()).passed is True


def test_a_card_without_a_tumor_limit_records_the_figure_and_judges_the_rest() -> None:
    older = _card(quality={"uncertainty_limit": 0.2})  # trained before the tumour's own limit
    gate = gates.check_segmentation(LIMITS, _masks(tumor_uncertainty=0.9), SPACING, older)
    assert gate.passed is True, gate.reason
    assert gate.figures["tumor_uncertainty"] == 0.9
    assert "max_tumor_uncertainty" not in gate.limits
    # No tumour found: nothing to judge the tumour's uncertainty on (the volume check fails).
    empty = _masks(tumor=np.zeros(SHAPE, np.uint8), tumor_components=0, tumor_component_voxels=())
    gate = gates.check_segmentation(LIMITS, empty, SPACING, _card())
    assert "tumor_uncertainty" not in gate.figures


def test_a_supplied_seg_is_not_judged_on_segmenter_uncertainty() -> None:
    supplied = _masks(
        source="supplied", uncertainty=None, tumor_uncertainty=None, stomach=None, aorta=None
    )
    gate = gates.check_segmentation(LIMITS, supplied, SPACING, _card())
    assert gate.passed is True, gate.reason
    assert "uncertainty" not in gate.figures
    assert "tumor_uncertainty" not in gate.figures


def test_without_a_training_range_the_volume_checks_are_not_run_but_the_rest_is() -> None:
    gate = gates.check_segmentation(LIMITS, _masks(), SPACING, {})
    assert gate.passed is True
    assert "tumor_volume_ml" not in gate.figures


# --- intensity -----------------------------------------------------------------------------


def test_contrast_enhanced_phases_pass_the_intensity_check() -> None:
    masks = _masks()
    arterial, portal = _phases(masks)
    gate = gates.check_intensity(LIMITS, arterial, portal, masks, _card())
    assert gate.passed is True, gate.reason
    assert gate.figures["aorta_arterial_hu"] == pytest.approx(300.0)


def test_a_non_contrast_series_labelled_arterial_fails_the_intensity_check() -> None:
    masks = _masks()
    arterial, portal = _phases(masks, liver_hu=55.0, aorta_hu=40.0)
    reason = _failed(gates.check_intensity(LIMITS, arterial, portal, masks, _card()))
    assert "aorta HU on the arterial series 40 outside 220–380" in reason


def test_without_an_aorta_label_only_the_liver_is_checked() -> None:
    masks = _masks(aorta=None)
    arterial = np.full(SHAPE, 75.0, dtype=np.float32)
    gate = gates.check_intensity(LIMITS, arterial, arterial + 35.0, masks, _card())
    assert gate.passed is True, gate.reason
    assert "aorta_arterial_hu" not in gate.figures


def test_without_a_training_range_the_intensity_check_is_not_run() -> None:
    masks = _masks()
    arterial, portal = _phases(masks)
    gate = gates.check_intensity(LIMITS, arterial, portal, masks, None)
    assert gate.passed is None and gate.reason
    assert gate.text.startswith("intensity: not checked")


# --- ROI and the study's reason ------------------------------------------------------------


def test_a_crop_reaching_outside_the_volume_fails_the_roi_check() -> None:
    spec = RoiSpec(size=32, margin_mm=10.0, slices=3)
    assert gates.check_roi(LIMITS, _masks(), SPACING, spec).passed is True
    edge = np.zeros(SHAPE, np.uint8)
    edge[0, 0:6, 0:6] = 1
    assert "share of the tumor crop outside the volume" in _failed(
        gates.check_roi(LIMITS, _masks(tumor=edge), SPACING, spec)
    )


def test_the_studys_reason_names_every_failed_gate() -> None:
    passed = Gate(name=GateName.INPUT, passed=True)
    failed = Gate(name=GateName.SEGMENTATION, passed=False, reason="tumor components 9 (limit 3)")
    assert gates.failed_reason([passed]) is None
    assert gates.failed_reason([passed, failed]) == (
        "quality check failed — segmentation: tumor components 9 (limit 3)"
    )
