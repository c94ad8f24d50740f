"""Training of the dual-phase U-Net segmenter: arrays in, checkpoint out.

Each :class:`TrainingSample` is preprocessed once, exactly as :class:`UNetSegmenter` prepares its
input (working grid, window, body crop), and kept in memory. Training draws random patches biased
to the small structures: most patches are centred, with a random offset, on tumour or LOAT voxels
(the LOAT is a few cm³ in a 10 L abdomen; uniform sampling would almost never show it), the rest
on the liver or anywhere. Each patch then goes through MONAI's random transforms
(:func:`augmentation`, the same for phantoms and a site's studies): a small in-plane rotation and
scaling, per-channel intensity scale and shift, gamma, a bias field, blur and noise. For phantoms
the bigger variation comes from the generator itself (``--domain randomised``,
:mod:`model.domain`); the transforms add what a patch can vary on its own. Mirroring is not
used, because left and right are not symmetric here (the liver is on the right, the LOAT beside
the left lobe).

Loss is MONAI's Dice over the reported structures and background (:data:`DICE_LABELS`) plus
cross-entropy over every class, optimiser AdamW with a warm-up and cosine decay. The run is
deterministic for a seed on a given device. Validation segments each held-out sample with the
very code the node runs (:meth:`UNetSegmenter.segment`, post-processing included) and reports the
Dice of each label on the arterial grid in the model card.

Partial truth. A study's truth may lack the stomach and the aorta (:data:`OPTIONAL_LABELS`; a
manual SEG from a site has liver, tumour and LOAT only): :attr:`TrainingSample.unlabelled` names
them, and their voxels are then background in its label map. Such a study does not teach the
network that the stomach is background: for its patches the loss marginalises, adding the
softmax probability of each unlabelled class to that of background before Dice and cross-entropy
(and leaving the unlabelled class's Dice to the studies that have it). Predicting stomach where
such truth says background costs nothing; predicting background, liver or anything else still
does.

The model card also records what the segmenter was trained on and how uncertain it is:

* ``training_range`` (:func:`training_range`): over the training studies, ``[min, max]`` of the
  truth tumour and LOAT volumes (ml), of the mean HU of the liver without the tumour on the
  arterial and on the portal-venous image (registered onto the arterial grid, as training sees
  it), and of the mean HU inside the aorta (omitted when no training study has an aorta label);
* ``quality``: the trained segmenter's :attr:`Masks.uncertainty` on each validation study (the
  training studies when there is no validation split), summarised as ``uncertainty_validation``
  ``[p50, p95, max]``, and ``uncertainty_limit = UNCERTAINTY_LIMIT_FACTOR × p95`` (1.5 × the
  95th percentile, rounded up to four decimals): a study segmented with more uncertainty than
  that is outside what the segmenter validated on (:func:`model.segmentation.uncertainty_limit_of`);
  the same for its :attr:`Masks.tumor_uncertainty` (``tumor_uncertainty_validation``,
  ``tumor_uncertainty_limit``): a tumour found but faint, whose extent is guessed.

Nothing here imports :mod:`node` or reads settings; nothing is written but the checkpoint.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import monai
import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import set_determinism

from model.checkpoint import load_checkpoint, save_checkpoint
from model.phantom import PHANTOM_VERSION
from model.registration import resample_onto
from model.segmentation import (
    DEFAULT_WINDOW_HU,
    LABELS,
    SEGMENTER_CARD_VERSION,
    UNetSegmenter,
    autocast,
    build_network,
    default_network_spec,
    dice,
    prepare_input,
    resolve_device,
)

__all__ = [
    "AUGMENTATION",
    "DEFAULT_PATCH",
    "DICE_LABELS",
    "OPTIONAL_LABELS",
    "SAMPLING",
    "UNCERTAINTY_LIMIT_FACTOR",
    "TrainingSample",
    "augmentation",
    "evaluate_segmenter",
    "train_segmenter",
    "training_range",
    "uncertainty_quality",
]

#: Default patch, ``(x, y, z)`` voxels of the working grid (128 × 128 × 64 mm at 2 mm).
DEFAULT_PATCH: tuple[int, int, int] = (64, 64, 32)

#: Where patch centres are drawn: probability per target (a missing structure falls back to
#: "any"). Tumour + LOAT = 55 % keeps the small structures in most batches; the stomach's 10 %
#: is what the quality gates need of it (on randomised phantoms, without it, stomach Dice stayed
#: near 0.5 at the demo budget; with it 0.8).
SAMPLING: dict[str, float] = {"tumor": 0.25, "loat": 0.3, "liver": 0.15, "stomach": 0.1, "any": 0.2}

#: Labels a study's truth may lack (:attr:`TrainingSample.unlabelled`): the organs the quality
#: gates use, which a site's manual SEG does not draw.
OPTIONAL_LABELS: tuple[str, ...] = ("stomach", "aorta")

#: Classes in the Dice term of the loss; cross-entropy covers every class. The stomach and the
#: aorta are large, easy and only measured by the quality gates: cross-entropy alone learns them,
#: and the reported structures keep the share of the Dice they had before those two were labels.
#: (With all six in the Dice, the demo budget's held-out LOAT Dice fell from 0.86 to 0.77.)
DICE_LABELS: tuple[str, ...] = ("background", "liver", "tumor", "loat")

#: ``quality.uncertainty_limit`` is this factor times the 95th percentile of the validation
#: studies' uncertainty: headroom for the spread of studies that are as good as those validated,
#: while a study far outside it (wrong phase, artefacts, another anatomy) still exceeds it.
UNCERTAINTY_LIMIT_FACTOR: float = 1.5

_WARMUP_FRACTION = 0.05

#: Per-patch augmentation: (MONAI transform, probability), as the card records it; a name after
#: ``:`` tells two uses of one transform apart. Intensities are on the [0, 1] window (600 HU
#: wide: 0.05 is 30 HU). They reach beyond the phantoms' own ranges (:mod:`model.domain`), as
#: SynthSeg's do: per-phase gain ±25 % and offsets ±42 HU, noise to 24 HU, and a blur along the
#: slice axis alone (sigma 1.6-4 mm on the 2 mm grid) for slices thicker than any phantom's. With
#: them the demo budget's held-out LOAT Dice rose from 0.85 to 0.88 (standard) and 0.82 to 0.86
#: (randomised); on the shifted cohort it stayed at 0.60-0.63. The dearer transforms (affine,
#: blur) are rare: they cost 8-17 ms a patch on one CPU core, a tenth of a training step.
AUGMENTATION: tuple[tuple[str, float], ...] = (
    ("RandAffined", 0.2),
    ("RandScaleIntensityd", 0.5),
    ("RandShiftIntensityd", 0.5),
    ("RandAdjustContrastd", 0.2),
    ("RandBiasFieldd", 0.1),
    ("RandGaussianSmoothd", 0.1),
    ("RandGaussianSmoothd:slices", 0.25),
    ("RandGaussianNoised", 0.2),
)


def augmentation(seed: int) -> Compose:
    """MONAI transforms applied to every training patch (``{"image", "label"}``, channel first).

    Seeded, so a training run stays deterministic; :data:`AUGMENTATION` lists them.
    """
    p = dict(AUGMENTATION)
    transforms = Compose(
        [
            # In-plane rotation (about the slice axis, the first spatial one) up to ±11°, and
            # ±10 % scaling: patient positioning and size beyond what the phantoms draw.
            RandAffined(
                keys=("image", "label"),
                prob=p["RandAffined"],
                rotate_range=(0.2, 0.0, 0.0),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandScaleIntensityd(
                keys="image", factors=0.25, prob=p["RandScaleIntensityd"], channel_wise=True
            ),
            RandShiftIntensityd(
                keys="image", offsets=0.07, prob=p["RandShiftIntensityd"], channel_wise=True
            ),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=p["RandAdjustContrastd"]),
            RandBiasFieldd(
                keys="image", coeff_range=(0.0, 0.05), degree=3, prob=p["RandBiasFieldd"]
            ),
            RandGaussianSmoothd(
                keys="image",
                sigma_x=(0.3, 1.0),
                sigma_y=(0.3, 1.0),
                sigma_z=(0.3, 1.0),
                prob=p["RandGaussianSmoothd"],
            ),
            # The first spatial axis of a patch is the slice axis (k).
            RandGaussianSmoothd(
                keys="image",
                sigma_x=(0.8, 2.0),
                sigma_y=(0.0, 0.3),
                sigma_z=(0.0, 0.3),
                prob=p["RandGaussianSmoothd:slices"],
            ),
            RandGaussianNoised(keys="image", std=0.04, prob=p["RandGaussianNoised"]),
        ]
    )
    transforms.set_random_state(seed=seed)
    return transforms


@dataclass(frozen=True)
class TrainingSample:
    """One training study.

    Attributes
    ----------
    arterial
        Arterial HU image (SimpleITK).
    portal_venous
        Portal-venous HU image, registered and resampled onto the arterial grid.
    labels
        uint8 ``[k, j, i]`` label map on the arterial grid (:data:`model.segmentation.LABELS`).
    name
        For messages and the card (no patient identifiers).
    unlabelled
        Labels of :data:`OPTIONAL_LABELS` that this truth does not draw (their voxels are
        background in ``labels``); the loss does not count them as background (see the module
        docstring).
    """

    arterial: Any
    portal_venous: Any
    labels: npt.NDArray[np.uint8]
    name: str = ""
    unlabelled: frozenset[str] = field(default_factory=frozenset)


@dataclass
class _Prepared:
    image: npt.NDArray[np.float32]  # [2, k, j, i], padded to at least the patch
    labels: npt.NDArray[np.uint8]  # [k, j, i]
    where: dict[str, npt.NDArray[np.intp]]  # flat indices per sampling target
    unlabelled: tuple[int, ...]  # class indices this truth does not draw


def _check_sample(sample: TrainingSample) -> None:
    size = tuple(sample.arterial.GetSize())
    if tuple(sample.portal_venous.GetSize()) != size:
        raise ValueError(f"{sample.name}: portal-venous image is not on the arterial grid")
    if sample.labels.shape != size[::-1]:
        raise ValueError(
            f"{sample.name}: labels {sample.labels.shape} do not match the arterial grid "
            f"{size[::-1]}"
        )
    if int(sample.labels.max(initial=0)) >= len(LABELS):
        raise ValueError(f"{sample.name}: labels must be in 0..{len(LABELS) - 1}")
    unknown = set(sample.unlabelled) - set(OPTIONAL_LABELS)
    if unknown:
        raise ValueError(
            f"{sample.name}: only {', '.join(OPTIONAL_LABELS)} may be unlabelled, not "
            f"{', '.join(sorted(unknown))}"
        )
    for name in sample.unlabelled:
        if np.any(sample.labels == LABELS[name]):
            raise ValueError(f"{sample.name}: {name} is said to be unlabelled but is drawn")


def _prepare(
    sample: TrainingSample,
    spacing_mm: float,
    window_hu: Sequence[float],
    patch_kji: Sequence[int],
) -> _Prepared:
    _check_sample(sample)
    work = prepare_input(sample.arterial, sample.portal_venous, spacing_mm, window_hu)
    label_image = sitk.GetImageFromArray(np.ascontiguousarray(sample.labels, dtype=np.uint8))
    label_image.CopyInformation(sample.arterial)
    on_work = resample_onto(label_image, work.reference, label=True)
    labels = np.ascontiguousarray(work.crop(sitk.GetArrayFromImage(on_work)), dtype=np.uint8)
    image = work.image
    # Volumes smaller than a patch (thin test phantoms) are padded with air / background.
    pad = [(0, max(int(p) - n, 0)) for p, n in zip(patch_kji, labels.shape, strict=True)]
    if any(after for _, after in pad):
        labels = np.pad(labels, pad)
        image = np.pad(image, [(0, 0), *pad])
    flat = labels.ravel()
    where = {
        "tumor": np.flatnonzero(flat == LABELS["tumor"]),
        "loat": np.flatnonzero(flat == LABELS["loat"]),
        "liver": np.flatnonzero((flat == LABELS["liver"]) | (flat == LABELS["tumor"])),
        "stomach": np.flatnonzero(flat == LABELS["stomach"]),
    }
    unlabelled = tuple(sorted(LABELS[name] for name in sample.unlabelled))
    return _Prepared(image=image, labels=labels, where=where, unlabelled=unlabelled)


def _patch_start(
    prepared: _Prepared, patch_kji: Sequence[int], rng: np.random.Generator
) -> tuple[int, int, int]:
    targets = list(SAMPLING)
    target = targets[int(rng.choice(len(targets), p=list(SAMPLING.values())))]
    shape = prepared.labels.shape
    candidates = prepared.where.get(target)
    if candidates is None or candidates.size == 0:
        centre = [int(rng.integers(0, n)) for n in shape]
    else:
        centre = [int(c) for c in np.unravel_index(int(rng.choice(candidates)), shape)]
    start = []
    for c, p, n in zip(centre, patch_kji, shape, strict=True):
        # The structure lands anywhere in the middle half of the patch, not always at its centre:
        # sliding-window inference sees it at every position.
        offset = int(rng.integers(-(p // 4), p // 4 + 1))
        start.append(int(np.clip(c - p // 2 + offset, 0, n - p)))
    return (start[0], start[1], start[2])


def _batch(
    prepared: Sequence[_Prepared],
    patch_kji: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    augment: Compose,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, ...]]]:
    images = []
    labels = []
    unlabelled = []
    for _ in range(batch_size):
        sample = prepared[int(rng.integers(len(prepared)))]
        unlabelled.append(sample.unlabelled)
        k, j, i = _patch_start(sample, patch_kji, rng)
        pk, pj, pi = patch_kji
        patch = augment(
            {
                # A copy: the prepared study must come out of any transform unchanged.
                "image": torch.from_numpy(
                    sample.image[:, k : k + pk, j : j + pj, i : i + pi].copy()
                ),
                "label": torch.from_numpy(
                    sample.labels[None, k : k + pk, j : j + pj, i : i + pi].astype(np.int64)
                ),
            }
        )
        images.append(torch.as_tensor(patch["image"], dtype=torch.float32))
        # Nearest-neighbour resampling returns labels as floats: whole numbers, rounded back.
        labels.append(torch.as_tensor(patch["label"]).round().to(torch.int64))
    return torch.stack(images), torch.stack(labels), unlabelled


def _dice_weights() -> torch.Tensor:
    """Per-class weights that put only :data:`DICE_LABELS` in MONAI's class-averaged Dice."""
    # MONAI averages the weighted per-class terms over every class: scaled so that each Dice
    # class counts 1 / len(DICE_LABELS), as in a plain Dice over those classes alone.
    weights = torch.zeros(len(LABELS))
    for name in DICE_LABELS:
        weights[LABELS[name]] = len(LABELS) / len(DICE_LABELS)
    return weights


def _segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    unlabelled: Sequence[Sequence[int]],
    dice_loss: DiceLoss,
) -> torch.Tensor:
    """Dice (``dice_loss``, on probabilities) + cross-entropy, unlabelled classes marginalised.

    For a sample with unlabelled classes, their probability is added to that of background
    before either term. Worked in log space: the merged background is a log-sum-exp, and an
    unlabelled class gets log-probability -inf (probability 0), so it adds nothing to that
    sample's Dice terms and cross-entropy never reads it (truth never holds an unlabelled class).
    Without unlabelled classes this is Dice on the softmax plus plain cross-entropy.
    """
    assert LABELS["background"] == 0
    log_p = torch.log_softmax(logits, dim=1)
    if any(unlabelled):
        rows = []
        for index, missing in enumerate(unlabelled):
            row = log_p[index]
            if missing:
                merged = torch.logsumexp(row[[0, *missing]], dim=0)
                drop = torch.zeros(row.shape[0], dtype=torch.bool, device=row.device)
                drop[list(missing)] = True
                # where, not arithmetic: -inf never enters a product, so gradients stay finite.
                row = torch.where(drop[:, None, None, None], float("-inf"), row)
                row = torch.cat([merged[None], row[1:]])
            rows.append(row)
        log_p = torch.stack(rows)
    cross_entropy = F.nll_loss(log_p, target[:, 0])
    return dice_loss(log_p.exp(), target) + cross_entropy


def _schedule(iterations: int) -> Callable[[int], float]:
    warmup = max(1, int(iterations * _WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, iterations - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _truth(labels: npt.NDArray[np.uint8], name: str) -> npt.NDArray[np.bool_]:
    if name == "liver":
        return (labels == LABELS["liver"]) | (labels == LABELS["tumor"])
    return labels == LABELS[name]


#: Labels whose Dice :func:`evaluate_segmenter` reports.
_SCORED = ("liver", "tumor", "loat", "stomach", "aorta")


def evaluate_segmenter(
    segmenter: UNetSegmenter, samples: Sequence[TrainingSample]
) -> dict[str, Any]:
    """Dice per label and uncertainty, per sample and summarised, on the arterial grid.

    The Dice of the stomach or the aorta is left out for a sample whose truth does not draw it
    or a segmenter that does not label it.

    Returns
    -------
    dict
        ``{"dice": {label: mean or None}, "studies": n, "per_study": [{name, dice...,
        uncertainty}]}``; ``dice`` has liver, tumor, loat, stomach and aorta.
    """
    per_study: list[dict[str, Any]] = []
    for sample in samples:
        masks = segmenter.segment(sample.arterial, sample.portal_venous)
        truth = sample.labels
        found = {
            "liver": masks.liver,
            "tumor": masks.tumor,
            "loat": masks.loat,
            "stomach": masks.stomach,
            "aorta": masks.aorta,
        }
        scores: dict[str, float] = {}
        for label in _SCORED:
            prediction = found[label]
            if prediction is not None and label not in sample.unlabelled:
                scores[label] = round(dice(prediction, _truth(truth, label)), 4)
        per_study.append(
            {
                "name": sample.name,
                **scores,
                "uncertainty": _rounded(masks.uncertainty),
                "tumor_uncertainty": _rounded(masks.tumor_uncertainty),
            }
        )
    mean: dict[str, float | None] = {}
    for label in _SCORED:
        values = [s[label] for s in per_study if label in s]
        mean[label] = round(float(np.mean(values)), 4) if values else None
    return {"dice": mean, "studies": len(per_study), "per_study": per_study}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _floor(value: float, digits: int) -> float:
    scale = 10.0**digits
    # Rounded first: 3 × 0.02 ml is 0.060000000000000005 and must not become 0.07.
    return math.floor(round(value * scale, 6)) / scale


def _ceil(value: float, digits: int) -> float:
    scale = 10.0**digits
    return math.ceil(round(value * scale, 6)) / scale


def _span(values: Sequence[float], digits: int) -> list[float] | None:
    """``[min, max]`` rounded outward (the range still holds every value), or None if empty."""
    if not values:
        return None
    return [_floor(min(values), digits), _ceil(max(values), digits)]


def training_range(samples: Sequence[TrainingSample]) -> dict[str, Any]:
    """The card's ``training_range``: what the training studies' truth spans.

    Per study, on the arterial grid: the truth tumour and LOAT volumes (voxel count × voxel
    volume); the mean HU of the label ``liver`` (the liver without the tumour) on the arterial
    and on the portal-venous image (the latter as :class:`TrainingSample` holds it, registered
    onto the arterial grid); the mean HU inside the label ``aorta`` on both, for studies that
    draw the aorta. Then ``[min, max]`` over the studies, rounded outward (ml to 0.01, HU to
    0.1). A study with no liver voxels (a SEG of only tumour and LOAT) adds no liver HU; the
    ``aorta_hu`` key is omitted when no study has an aorta, and a phase entry when no study could
    measure it.

    Returns
    -------
    dict
        ``{"tumor_volume_ml": [lo, hi], "loat_volume_ml": [lo, hi], "liver_hu": {"arterial":
        [lo, hi], "portal_venous": [lo, hi]}, "aorta_hu": {...}, "studies": n}``.
    """
    if not samples:
        raise ValueError("no training samples to measure")
    tumor_ml: list[float] = []
    loat_ml: list[float] = []
    hu: dict[str, dict[str, list[float]]] = {
        organ: {"arterial": [], "portal_venous": []} for organ in ("liver", "aorta")
    }
    for sample in samples:
        voxel_ml = float(np.prod(sample.arterial.GetSpacing())) / 1000.0
        labels = sample.labels
        tumor_ml.append(int(np.count_nonzero(labels == LABELS["tumor"])) * voxel_ml)
        loat_ml.append(int(np.count_nonzero(labels == LABELS["loat"])) * voxel_ml)
        images = {
            "arterial": sitk.GetArrayViewFromImage(sample.arterial),
            "portal_venous": sitk.GetArrayViewFromImage(sample.portal_venous),
        }
        for organ in ("liver", "aorta"):
            if organ in sample.unlabelled:
                continue
            inside = labels == LABELS[organ]
            if not inside.any():
                continue
            for phase, image in images.items():
                hu[organ][phase].append(float(np.mean(image[inside], dtype=np.float64)))
    entry: dict[str, Any] = {
        "tumor_volume_ml": _span(tumor_ml, 2),
        "loat_volume_ml": _span(loat_ml, 2),
    }
    for organ in ("liver", "aorta"):
        phases = {phase: _span(values, 1) for phase, values in hu[organ].items() if values}
        if phases or organ == "liver":
            entry[f"{organ}_hu"] = phases
    entry["studies"] = len(samples)
    return entry


def _limit_and_spread(values: npt.NDArray[np.float64]) -> tuple[float, list[float]]:
    p50, p95 = (float(v) for v in np.percentile(values, [50.0, 95.0]))
    limit = max(_ceil(UNCERTAINTY_LIMIT_FACTOR * p95, 4), 1e-4)
    return limit, [round(p50, 6), round(p95, 6), round(float(values.max()), 6)]


def uncertainty_quality(
    uncertainties: Sequence[float],
    measured_on: str,
    tumor_uncertainties: Sequence[float] = (),
) -> dict[str, Any]:
    """The card's ``quality`` from the uncertainty of each validation (or training) study.

    ``uncertainty_validation`` is ``[p50, p95, max]`` (linear-interpolation percentiles) and
    ``uncertainty_limit`` is :data:`UNCERTAINTY_LIMIT_FACTOR` × p95, rounded up to four decimals
    and at least 0.0001, so the limit is always positive. ``tumor_uncertainty_validation`` and
    ``tumor_uncertainty_limit`` are the same for the tumour's own uncertainty, when given.

    Parameters
    ----------
    uncertainties
        :attr:`model.segmentation.Masks.uncertainty` per study (at least one).
    measured_on
        ``"validation"`` or ``"training"``: which studies they are, recorded in the card.
    tumor_uncertainties
        :attr:`model.segmentation.Masks.tumor_uncertainty` of the studies where the segmenter
        found tumour (none: the card gets no tumour limit).
    """
    values = np.asarray([float(u) for u in uncertainties], dtype=np.float64)
    tumor = np.asarray([float(u) for u in tumor_uncertainties], dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)) or not np.all(np.isfinite(tumor)):
        raise ValueError("uncertainty_quality needs at least one finite uncertainty")
    limit, spread = _limit_and_spread(values)
    quality: dict[str, Any] = {
        "uncertainty_limit": limit,
        "uncertainty_validation": spread,
        "uncertainty_limit_rule": f"{UNCERTAINTY_LIMIT_FACTOR:g} x p95",
        "studies": int(values.size),
        "measured_on": measured_on,
    }
    if tumor.size:
        quality["tumor_uncertainty_limit"], quality["tumor_uncertainty_validation"] = (
            _limit_and_spread(tumor)
        )
        quality["tumor_studies"] = int(tumor.size)
    return quality


def train_segmenter(
    samples: Sequence[TrainingSample],
    out_dir: Path,
    *,
    spacing_mm: float = 2.0,
    patch: Sequence[int] = DEFAULT_PATCH,
    iterations: int = 600,
    batch_size: int = 2,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "auto",
    validation: Sequence[TrainingSample] = (),
    demo: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    network: Mapping[str, Any] | None = None,
    window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
    name: str | None = None,
    version: str = "1",
    card_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the segmenter, validate it and write its checkpoint.

    Parameters
    ----------
    samples
        Training studies (at least one).
    out_dir
        Checkpoint directory (:func:`model.checkpoint.save_checkpoint`).
    spacing_mm
        Isotropic working spacing.
    patch
        Patch size ``(x, y, z)`` in working-grid voxels; also the inference window.
    iterations, batch_size, lr
        Optimiser steps, patches per step, peak learning rate (AdamW, cosine decay).
    seed
        Seeds torch, MONAI and the patch sampler.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    validation
        Held-out studies; their Dice and uncertainty go into the card (without them, the
        card's ``quality`` is measured on the training studies).
    demo
        Trained on phantoms: the card says so and records the phantom generator's version.
    progress
        Called after each step with ``(step, iterations, loss)``.
    network
        Card ``network`` entry; default :func:`model.segmentation.default_network_spec`.
    window_hu
        Input intensity window.
    name, version
        Card identity; the name defaults to ``mvi-segmenter`` (``-demo`` for demo models).
    card_extra
        Further top-level card entries (e.g. where the training data came from).

    Returns
    -------
    dict
        The model card as written, with ``training_range`` (:func:`training_range`) and
        ``quality`` (:func:`uncertainty_quality`).
    """
    if not samples:
        raise ValueError("no training samples")
    if iterations < 1 or batch_size < 1 or not lr > 0 or not spacing_mm > 0:
        raise ValueError("iterations, batch_size, lr and spacing_mm must be positive")
    patch_xyz = [int(p) for p in patch]
    if len(patch_xyz) != 3 or min(patch_xyz) < 8 or any(p % 8 for p in patch_xyz):
        # Three stride-2 levels: every side must be a multiple of 8.
        raise ValueError(f"patch must be three multiples of 8, got {patch}")
    patch_kji = patch_xyz[::-1]
    torch_device = resolve_device(device)
    started = time.perf_counter()

    torch.manual_seed(seed)
    set_determinism(seed=seed)
    rng = np.random.default_rng(seed)
    augment = augmentation(seed)
    prepared = [_prepare(s, spacing_mm, window_hu, patch_kji) for s in samples]
    prepare_seconds = time.perf_counter() - started

    spec = dict(network) if network is not None else default_network_spec()
    outputs = (spec.get("kwargs") or {}).get("out_channels")
    if outputs != len(LABELS):
        raise ValueError(f"the network needs {len(LABELS)} outputs (one per label), not {outputs}")
    net = build_network(spec).to(torch_device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(iterations))
    dice_loss = DiceLoss(
        to_onehot_y=True, softmax=False, batch=True, weight=_dice_weights().to(torch_device)
    )

    net.train()
    loss_value = float("nan")
    for step in range(iterations):
        images, labels, unlabelled = _batch(prepared, patch_kji, batch_size, rng, augment)
        x = images.to(torch_device)
        y = labels.to(torch_device)
        optimiser.zero_grad(set_to_none=True)
        with autocast(torch_device):
            logits = net(x)
        loss = _segmentation_loss(logits.float(), y, unlabelled, dice_loss)
        loss.backward()
        optimiser.step()
        scheduler.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise RuntimeError(f"training diverged at step {step + 1}: loss {loss_value}")
        if progress is not None:
            progress(step + 1, iterations, loss_value)
    train_seconds = time.perf_counter() - started - prepare_seconds
    set_determinism(seed=None)  # leave the global RNG state as a library should

    created = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    card: dict[str, Any] = {
        "name": name or ("mvi-segmenter-demo" if demo else "mvi-segmenter"),
        "version": version,
        "created": created,
        "kind": "segmenter",
        "card_version": SEGMENTER_CARD_VERSION,
        "demo": bool(demo),
        "labels": dict(LABELS),
        "input": {
            "channels": ["arterial", "portal_venous"],
            "spacing_mm": float(spacing_mm),
            "window_hu": [float(window_hu[0]), float(window_hu[1])],
        },
        "network": spec,
        "training": {
            "seed": int(seed),
            "iterations": int(iterations),
            "batch_size": int(batch_size),
            "lr": float(lr),
            "patch_size": patch_xyz,
            "patch_axes": "xyz",
            "sampling": dict(SAMPLING),
            "augmentation": {name: prob for name, prob in AUGMENTATION},
            "loss": "Dice + cross-entropy",
            "dice_labels": list(DICE_LABELS),
            "optimizer": "AdamW",
            "studies": len(samples),
            "studies_without": {
                name: sum(name in s.unlabelled for s in samples) for name in OPTIONAL_LABELS
            },
            "device": str(torch_device),
            "seconds": round(train_seconds, 1),
            "prepare_seconds": round(prepare_seconds, 1),
            "final_loss": round(loss_value, 4),
            "torch": torch.__version__,
            "monai": monai.__version__,
        },
        "training_range": training_range(samples),
    }
    if demo:
        card["phantom_version"] = PHANTOM_VERSION
    if card_extra:
        card.update(card_extra)

    segmenter = UNetSegmenter(net, card, device=str(torch_device))
    validated = time.perf_counter()
    card["validation"] = evaluate_segmenter(segmenter, validation)
    card["validation"]["seconds"] = round(time.perf_counter() - validated, 1)
    if validation:
        per_study = card["validation"]["per_study"]
        card["quality"] = uncertainty_quality(
            [s["uncertainty"] for s in per_study if s["uncertainty"] is not None],
            "validation",
            [s["tumor_uncertainty"] for s in per_study if s["tumor_uncertainty"] is not None],
        )
    else:
        # No held-out study: the training studies are the only measure there is (an optimistic
        # one, which the card says).
        measured = [segmenter.segment(s.arterial, s.portal_venous) for s in samples]
        card["quality"] = uncertainty_quality(
            [m.uncertainty for m in measured if m.uncertainty is not None],
            "training",
            [m.tumor_uncertainty for m in measured if m.tumor_uncertainty is not None],
        )
    save_checkpoint(out_dir, net.state_dict(), card)
    # Read back: the card as written (with its weights hash), and proof that it loads.
    return load_checkpoint(out_dir)[1]
