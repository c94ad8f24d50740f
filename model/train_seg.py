"""Training of the dual-phase U-Net segmenter: arrays in, checkpoint out.

Each :class:`TrainingSample` is preprocessed once, exactly as :class:`UNetSegmenter` prepares its
input (working grid, window, body crop), and kept in memory. Training draws random patches biased
to the small structures: most patches are centred, with a random offset, on tumour or LOAT voxels
(the LOAT is a few cm³ in a 10 L abdomen; uniform sampling would almost never show it), the rest
on the liver or anywhere. Augmentation is deliberately light: random patch offsets and small
per-channel intensity jitter. Mirroring is not used, because left and right are not symmetric
here (the liver is on the right, the LOAT beside the left lobe).

Loss is MONAI's Dice + cross-entropy, optimiser AdamW with a warm-up and cosine decay. The run is
deterministic for a seed on a given device. Validation segments each held-out sample with the
very code the node runs (:meth:`UNetSegmenter.segment`, post-processing included) and reports the
Dice of each label on the arterial grid in the model card.

Nothing here imports :mod:`node` or reads settings; nothing is written but the checkpoint.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from model.checkpoint import load_checkpoint, save_checkpoint
from model.phantom import PHANTOM_VERSION
from model.registration import resample_onto
from model.segmentation import (
    DEFAULT_WINDOW_HU,
    LABELS,
    UNetSegmenter,
    autocast,
    build_network,
    default_network_spec,
    dice,
    prepare_input,
    resolve_device,
)

__all__ = [
    "DEFAULT_PATCH",
    "SAMPLING",
    "TrainingSample",
    "evaluate_segmenter",
    "train_segmenter",
]

#: Default patch, ``(x, y, z)`` voxels of the working grid (128 × 128 × 64 mm at 2 mm).
DEFAULT_PATCH: tuple[int, int, int] = (64, 64, 32)

#: Where patch centres are drawn: probability per target (a missing structure falls back to
#: "any"). Tumour + LOAT = 60 % keeps the small structures in most batches.
SAMPLING: dict[str, float] = {"tumor": 0.3, "loat": 0.3, "liver": 0.2, "any": 0.2}

_INTENSITY_SCALE = 0.05  # ± fraction per channel
_INTENSITY_SHIFT = 0.03  # ± of the [0, 1] window (~18 HU)
_WARMUP_FRACTION = 0.05


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
    """

    arterial: Any
    portal_venous: Any
    labels: npt.NDArray[np.uint8]
    name: str = ""


@dataclass
class _Prepared:
    image: npt.NDArray[np.float32]  # [2, k, j, i], padded to at least the patch
    labels: npt.NDArray[np.uint8]  # [k, j, i]
    where: dict[str, npt.NDArray[np.intp]]  # flat indices per sampling target


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
    }
    return _Prepared(image=image, labels=labels, where=where)


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
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    images = []
    labels = []
    for _ in range(batch_size):
        sample = prepared[int(rng.integers(len(prepared)))]
        k, j, i = _patch_start(sample, patch_kji, rng)
        pk, pj, pi = patch_kji
        image = sample.image[:, k : k + pk, j : j + pj, i : i + pi].copy()
        scale = 1.0 + rng.uniform(-_INTENSITY_SCALE, _INTENSITY_SCALE, size=(2, 1, 1, 1))
        shift = rng.uniform(-_INTENSITY_SHIFT, _INTENSITY_SHIFT, size=(2, 1, 1, 1))
        images.append((image * scale + shift).astype(np.float32))
        labels.append(sample.labels[None, k : k + pk, j : j + pj, i : i + pi].astype(np.int64))
    return np.stack(images), np.stack(labels)


def _schedule(iterations: int) -> Callable[[int], float]:
    warmup = max(1, int(iterations * _WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, iterations - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def evaluate_segmenter(
    segmenter: UNetSegmenter, samples: Sequence[TrainingSample]
) -> dict[str, Any]:
    """Dice of liver, tumour and LOAT per sample and averaged, on the arterial grid.

    Returns
    -------
    dict
        ``{"dice": {label: mean or None}, "studies": n, "per_study": [{name, dice...}]}``.
    """
    per_study: list[dict[str, Any]] = []
    for sample in samples:
        masks = segmenter.segment(sample.arterial, sample.portal_venous)
        truth = sample.labels
        scores = {
            "liver": dice(masks.liver, (truth == LABELS["liver"]) | (truth == LABELS["tumor"])),
            "tumor": dice(masks.tumor, truth == LABELS["tumor"]),
            "loat": dice(masks.loat, truth == LABELS["loat"]),
        }
        per_study.append({"name": sample.name, **{k: round(v, 4) for k, v in scores.items()}})
    mean: dict[str, float | None] = {
        label: (round(float(np.mean([s[label] for s in per_study])), 4) if per_study else None)
        for label in ("liver", "tumor", "loat")
    }
    return {"dice": mean, "studies": len(per_study), "per_study": per_study}


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
        Held-out studies; their Dice goes into the card.
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
        The model card as written.
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
    prepared = [_prepare(s, spacing_mm, window_hu, patch_kji) for s in samples]
    prepare_seconds = time.perf_counter() - started

    spec = dict(network) if network is not None else default_network_spec()
    net = build_network(spec).to(torch_device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(iterations))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    net.train()
    loss_value = float("nan")
    for step in range(iterations):
        images, labels = _batch(prepared, patch_kji, batch_size, rng)
        x = torch.from_numpy(images).to(torch_device)
        y = torch.from_numpy(labels).to(torch_device)
        optimiser.zero_grad(set_to_none=True)
        with autocast(torch_device):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
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
            "loss": "DiceCELoss",
            "optimizer": "AdamW",
            "studies": len(samples),
            "device": str(torch_device),
            "seconds": round(train_seconds, 1),
            "prepare_seconds": round(prepare_seconds, 1),
            "final_loss": round(loss_value, 4),
            "torch": torch.__version__,
            "monai": monai.__version__,
        },
    }
    if demo:
        card["phantom_version"] = PHANTOM_VERSION
    if card_extra:
        card.update(card_extra)

    segmenter = UNetSegmenter(net, card, device=str(torch_device))
    validated = time.perf_counter()
    card["validation"] = evaluate_segmenter(segmenter, validation)
    card["validation"]["seconds"] = round(time.perf_counter() - validated, 1)
    save_checkpoint(out_dir, net.state_dict(), card)
    # Read back: the card as written (with its weights hash), and proof that it loads.
    return load_checkpoint(out_dir)[1]
