"""Specification of the segmenter: post-processing, training on phantoms, checkpoint loading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from model.checkpoint import CheckpointError, load_checkpoint
from model.phantom import PHANTOM_VERSION, PhantomSpec, make_study
from model.registration import register, resample_onto
from model.segmentation import (
    LABELS,
    Masks,
    UNetSegmenter,
    build_network,
    dice,
    labels_from_masks,
    postprocess,
    resolve_device,
)
from model.train_seg import TrainingSample, train_segmenter

SPEC = PhantomSpec(size=96, slices=24, phases=("arterial", "portal_venous"))
SPACING_MM = 4.0
PATCH = (32, 32, 16)


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------


def test_postprocess_keeps_the_largest_tumor_and_counts_components() -> None:
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[1:9, 2:18, 2:18] = LABELS["liver"]
    labels[2:6, 3:9, 3:9] = LABELS["tumor"]  # 144 voxels
    labels[7:8, 14:16, 14:16] = LABELS["tumor"]  # 4 voxels
    hu = np.full(labels.shape, 60.0, dtype=np.float32)
    masks = postprocess(labels, hu, "unet")
    assert isinstance(masks, Masks)
    assert masks.tumor_components == 2
    assert masks.tumor.sum() == 144 and masks.tumor[2:6, 3:9, 3:9].all()
    assert masks.tumor[7, 14, 14] == 0
    # The liver includes the tumour, the kept one and the dropped one.
    assert masks.liver[2:6, 3:9, 3:9].all() and masks.liver[7, 14, 14] == 1
    assert masks.liver.sum() == 8 * 16 * 16
    assert masks.source == "unet"
    assert {m.dtype for m in (masks.liver, masks.tumor, masks.loat)} == {np.dtype(np.uint8)}


def test_postprocess_keeps_loat_only_where_it_is_fat() -> None:
    labels = np.zeros((4, 8, 8), dtype=np.uint8)
    labels[1:3, 1:7, 1:7] = LABELS["loat"]
    hu = np.full(labels.shape, -100.0, dtype=np.float32)
    hu[1, 1:7, 1] = 40.0  # stomach wall
    hu[2, 1:7, 6] = -500.0  # air
    hu[1, 3, 3] = -190.0  # the range is closed
    hu[1, 3, 4] = -30.0
    masks = postprocess(labels, hu, "supplied")
    expected = (labels == LABELS["loat"]) & (hu >= -190.0) & (hu <= -30.0)
    assert np.array_equal(masks.loat.astype(bool), expected)
    assert masks.loat[1, 3, 3] == 1 and masks.loat[1, 3, 4] == 1
    assert masks.loat.sum() == 2 * 36 - 6 - 6
    assert masks.tumor_components == 0 and masks.tumor.sum() == 0
    assert masks.source == "supplied"


def test_postprocess_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        postprocess(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), "unet")


def test_dice_and_labels_from_masks() -> None:
    a = np.zeros((2, 2, 2), dtype=np.uint8)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[0, 0, 0] = 1
    assert dice(a, b) == 0.0
    assert dice(b, b) == 1.0
    liver, tumor, loat = (np.zeros((2, 2, 2), dtype=np.uint8) for _ in range(3))
    liver[0] = 1
    tumor[0, 0] = 1
    loat[1, 1, 1] = 1
    labels = labels_from_masks(liver, tumor, loat)
    assert labels[0, 0, 0] == LABELS["tumor"] and labels[0, 1, 0] == LABELS["liver"]
    assert labels[1, 1, 1] == LABELS["loat"] and labels[1, 0, 0] == LABELS["background"]


def test_devices() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_build_network_only_builds_known_classes() -> None:
    with pytest.raises(CheckpointError, match="not supported"):
        build_network({"class": "os.system", "kwargs": {}})
    with pytest.raises(CheckpointError, match="cannot build"):
        build_network({"class": "UNet", "kwargs": {"spatial_dims": 3, "nonsense": 1}})


# --------------------------------------------------------------------------------------------
# Training and inference on small phantoms
# --------------------------------------------------------------------------------------------


def _image(volume: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]) -> Any:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _sample(seed: int) -> TrainingSample:
    phantom = make_study(seed, SPEC)
    arterial = _image(phantom.phases["arterial"].hu, phantom.spacing_mm, phantom.origin_mm)
    portal = _image(phantom.phases["portal_venous"].hu, phantom.spacing_mm, phantom.origin_mm)
    registration = register(arterial, portal, working_spacing_mm=SPACING_MM)
    aligned = resample_onto(portal, arterial, registration.transform)
    labels = labels_from_masks(**phantom.masks)
    return TrainingSample(arterial, aligned, labels, name=f"seed{seed}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A tiny U-Net trained on four small phantoms (well under a minute on two CPU cores)."""
    out = tmp_path_factory.mktemp("segmenter") / "model"
    steps: list[tuple[int, int, float]] = []
    card = train_segmenter(
        [_sample(seed) for seed in (1, 2, 3, 4)],
        out,
        spacing_mm=SPACING_MM,
        patch=PATCH,
        iterations=300,
        batch_size=2,
        seed=0,
        validation=[_sample(5)],
        demo=True,
        progress=lambda step, total, loss: steps.append((step, total, loss)),
    )
    assert [s[0] for s in steps] == list(range(1, 301)) and steps[-1][1] == 300
    yield out, card


def test_training_writes_a_complete_card(trained: tuple[Path, dict[str, Any]]) -> None:
    out, card = trained
    _, on_disk = load_checkpoint(out)
    assert on_disk == card
    assert card["kind"] == "segmenter" and card["demo"] is True
    assert card["phantom_version"] == PHANTOM_VERSION
    assert card["labels"] == {"background": 0, "liver": 1, "tumor": 2, "loat": 3}
    assert card["input"]["channels"] == ["arterial", "portal_venous"]
    assert card["input"]["spacing_mm"] == SPACING_MM
    assert len(card["input"]["window_hu"]) == 2
    assert card["network"]["class"] == "UNet"
    assert card["network"]["kwargs"]["in_channels"] == 2
    assert card["network"]["kwargs"]["out_channels"] == 4
    training = card["training"]
    assert training["seed"] == 0 and training["iterations"] == 300
    assert training["patch_size"] == list(PATCH) and training["studies"] == 4
    assert training["device"] == str(resolve_device("auto")) and training["seconds"] > 0
    validation = card["validation"]
    assert validation["studies"] == 1
    assert set(validation["dice"]) == {"liver", "tumor", "loat"}
    assert card["created"].endswith("+00:00")


def test_segmenter_from_checkpoint_segments_a_held_out_phantom(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = trained
    segmenter = UNetSegmenter.from_checkpoint(out)
    assert segmenter.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert segmenter.working_spacing_mm == SPACING_MM
    sample = _sample(6)
    masks = segmenter.segment(sample.arterial, sample.portal_venous)
    shape = sample.labels.shape
    assert masks.liver.shape == masks.tumor.shape == masks.loat.shape == shape
    assert masks.source == "unet"
    truth_liver = (sample.labels == LABELS["liver"]) | (sample.labels == LABELS["tumor"])
    # Chance level for the liver (about 7 % of the volume) is a Dice near 0.1.
    assert dice(masks.liver, truth_liver) > 0.5
    # The tumour, when found, is part of the liver, and LOAT is fat only.
    assert not np.any(masks.tumor & ~masks.liver)
    hu = sitk.GetArrayViewFromImage(sample.arterial)
    assert np.all((hu[masks.loat > 0] >= -190.0) & (hu[masks.loat > 0] <= -30.0))
    # Same input, same output.
    again = segmenter.segment(sample.arterial, sample.portal_venous)
    assert np.array_equal(again.liver, masks.liver)


def test_segment_refuses_a_portal_venous_image_not_on_the_arterial_grid(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    segmenter = UNetSegmenter.from_checkpoint(trained[0], device="cpu")
    sample = _sample(5)
    other = sitk.Shrink(sample.portal_venous, [2, 2, 1])
    with pytest.raises(ValueError, match="arterial grid"):
        segmenter.segment(sample.arterial, other)


def test_a_checkpoint_of_another_kind_is_refused(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from model.checkpoint import save_checkpoint

    state, card = load_checkpoint(trained[0])
    save_checkpoint(tmp_path / "fusion", state, {**card, "kind": "fusion"})
    with pytest.raises(CheckpointError, match="not a segmenter"):
        UNetSegmenter.from_checkpoint(tmp_path / "fusion")
    wrong = {
        **card,
        "network": {
            **card["network"],
            "kwargs": {**card["network"]["kwargs"], "channels": [8, 16, 32, 64]},
        },
    }
    save_checkpoint(tmp_path / "wrong", state, wrong)
    with pytest.raises(CheckpointError, match="do not fit"):
        UNetSegmenter.from_checkpoint(tmp_path / "wrong")


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    samples = [_sample(1)]
    cards = [
        train_segmenter(
            samples, tmp_path / name, spacing_mm=8.0, patch=(16, 16, 8), iterations=3, seed=3
        )
        for name in ("a", "b")
    ]
    assert cards[0]["weights_sha256"] == cards[1]["weights_sha256"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segmenter_runs_on_cuda(trained: tuple[Path, dict[str, Any]]) -> None:
    segmenter = UNetSegmenter.from_checkpoint(trained[0], device="cuda")
    assert next(segmenter.network.parameters()).is_cuda
    sample = _sample(6)
    on_gpu = segmenter.segment(sample.arterial, sample.portal_venous)
    on_cpu = UNetSegmenter.from_checkpoint(trained[0], device="cpu").segment(
        sample.arterial, sample.portal_venous
    )
    # Mixed precision may flip a few boundary voxels, not the segmentation.
    assert dice(on_gpu.liver, on_cpu.liver) > 0.95
