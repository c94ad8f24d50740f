"""Training and cross-validation of the MVI fusion model: ROIs in, checkpoint out.

:func:`train_fusion` runs stratified K-fold cross-validation. Each fold trains a fresh
:class:`model.fusion.FusionNet` (binary cross-entropy weighted by the fold's class ratio, AdamW,
light augmentation), records its validation logits after every epoch and stops once its own
validation AUC has not improved for ``patience`` epochs (early stopping). The epoch is chosen on
the validation AUC of the pooled out-of-fold (OOF) logits, one epoch for all folds so the logits
share a scale; those OOF logits then give

* Platt calibration ``p = sigmoid(a * logit + b)``,
* the risk threshold (Youden's J on the calibrated OOF probabilities),
* OOF metrics (AUC with DeLong 95 % CI, sensitivity, specificity, accuracy, Brier score),
* the combined logistic model (DL logit + max tumour diameter + LOAT area) and the clinical one
  (diameter + LOAT area), with odds ratios, CIs and p-values.

A final network is trained on all studies for the chosen number of epochs and saved with
:func:`model.checkpoint.save_checkpoint`; the card carries everything above. Note that the OOF
metrics are mildly optimistic: the epoch was chosen on the predictions they are computed from. An
external test set (``bench/fusion.py`` uses held-out phantom seeds) gives the unbiased figure.

Validation and the saved network use an exponential moving average of the weights.
Augmentation: small rotations and shifts, flips (the crop is local, so left/right anatomy is not
at stake), intensity jitter per branch. Runs are deterministic for a seed on a given device.

:func:`rois_from_phantom` renders a phantom and cuts ROIs from its truth masks; :func:`cached_rois`
keeps them in an npz cache so repeated runs skip rendering. Nothing here imports :mod:`node` or
reads settings; nothing is written but the checkpoint and the ROI cache a caller names.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import torchvision

from model.checkpoint import load_checkpoint, save_checkpoint
from model.fusion import ARCHS, FusionNet
from model.phantom import PHANTOM_VERSION, PhantomSpec, make_study
from model.registration import register, resample_onto
from model.roi import RoiSpec, extract_rois
from model.segmentation import autocast, resolve_device
from model.stats import (
    brier,
    delong_ci,
    logistic_model,
    platt_apply,
    platt_fit,
    sens_spec_acc,
    youden_threshold,
)

__all__ = [
    "CARD_KIND",
    "CLINICAL_FEATURES",
    "COMBINED_FEATURES",
    "FUSION_CARD_KEYS",
    "Progress",
    "StudyRois",
    "cached_rois",
    "rois_from_phantom",
    "stratified_folds",
    "train_fusion",
]

#: The model card's ``kind``.
CARD_KIND = "mvi-fusion"

#: Card keys a fusion model needs beyond :data:`model.checkpoint.REQUIRED_CARD_KEYS`.
FUSION_CARD_KEYS: tuple[str, ...] = ("arch", "input", "network", "calibration", "threshold")

#: Predictors of the combined logistic model (``dl_logit`` is the calibrated logit
#: ``a * logit + b``: on that scale the combined model reproduces the calibrated DL probability
#: when the measurements add nothing).
COMBINED_FEATURES: tuple[str, ...] = ("dl_logit", "max_diameter_mm", "loat_area_cm2")

#: Predictors of the clinical model (the paper's independent predictors).
CLINICAL_FEATURES: tuple[str, ...] = ("max_diameter_mm", "loat_area_cm2")

#: ``progress(stage, epoch, epochs, train_loss, val_auc)``; stage ``"fold i/k"`` or ``"final"``,
#: ``val_auc`` ``None`` for the final model.
Progress = Callable[[str, int, int, float, float | None], None]

_ROTATION_DEG = 10.0
_SHIFT = 0.06  # of the half-width (affine_grid's coordinates run -1..1)
_INTENSITY_SCALE = 0.03
_INTENSITY_SHIFT = 0.02  # of the [0, 1] window (7-8 HU): enhancement differences must survive
_WEIGHT_DECAY = 1e-4
# Exponential moving average of the weights, per optimiser step (~20 steps, 1-2 epochs of a few
# hundred studies): validation AUC of the raw weights jumps from epoch to epoch on small cohorts,
# and the averaged weights both rank more steadily and generalise better.
_EMA_DECAY = 0.95
_EVAL_BATCH = 64

_FloatArray = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# Samples and the phantom ROI cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRois:
    """One study's inputs and targets.

    Attributes
    ----------
    tumor, loat
        float32 ROIs ``(channels, size, size)`` (:func:`model.roi.extract_rois`).
    label
        1 MVI, 0 none.
    diameter_mm
        Maximum axial tumour diameter.
    loat_area_cm2
        Largest axial LOAT area.
    study_id
        For messages and the cache; never written to the card.
    """

    tumor: _FloatArray
    loat: _FloatArray
    label: int
    diameter_mm: float
    loat_area_cm2: float
    study_id: str = ""


def _image(volume: npt.NDArray[Any], spacing: Sequence[float], origin: Sequence[float]) -> Any:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    return image


def rois_from_phantom(
    seed: int, spec_phantom: PhantomSpec, roi_spec: RoiSpec, *, register_pv: bool = True
) -> StudyRois:
    """Render a phantom study and cut its ROIs from the truth masks.

    Parameters
    ----------
    seed
        Study seed (:func:`model.phantom.make_study`).
    spec_phantom
        What to render; only the arterial and portal-venous phases are rendered whatever its
        ``phases`` say (the anatomy and each phase's noise do not depend on the others).
    roi_spec
        How to cut the ROIs.
    register_pv
        Register the portal-venous phase onto the arterial one with
        :func:`model.registration.register` (as the node does); ``False`` uses the phantom's
        known breathing shift instead (exact, and much faster).

    Raises
    ------
    ValueError
        When the phantom has no tumour; :class:`model.roi.RoiError` when a mask is too small.
    """
    spec = dataclasses.replace(spec_phantom, phases=("arterial", "portal_venous"))
    study = make_study(seed, spec)
    if study.truth.mvi is None:
        raise ValueError(f"phantom {seed} has no tumour: no MVI label")
    arterial = _image(study.phases["arterial"].hu, study.spacing_mm, study.origin_mm)
    portal = _image(study.phases["portal_venous"].hu, study.spacing_mm, study.origin_mm)
    if register_pv:
        transform = register(arterial, portal, seed=0).transform
    else:
        # An arterial point p lies at p + shift in the portal-venous image (fixed → moving).
        transform = sitk.TranslationTransform(3, study.phases["portal_venous"].shift_mm)
    pv_on_arterial = sitk.GetArrayFromImage(resample_onto(portal, arterial, transform))
    rois = extract_rois(
        study.phases["arterial"].hu,
        pv_on_arterial,
        study.masks["tumor"],
        study.masks["loat"],
        study.spacing_mm,
        roi_spec,
    )
    return StudyRois(
        tumor=rois["tumor"],
        loat=rois["loat"],
        label=int(study.truth.mvi),
        diameter_mm=float(study.truth.max_diameter_mm),
        loat_area_cm2=float(study.truth.loat_max_area_cm2),
        study_id=f"phantom-{seed}",
    )


def _cache_folder(
    cache_dir: Path, spec_phantom: PhantomSpec, roi_spec: RoiSpec, register_pv: bool
) -> Path:
    key = {
        "phantom_version": PHANTOM_VERSION,
        "phantom": {
            k: v for k, v in dataclasses.asdict(spec_phantom).items() if k not in ("phases",)
        },
        "roi": roi_spec.to_card(),
        "register_pv": register_pv,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"rois-{digest}"


def _write_npz(path: Path, sample: StudyRois) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(
                stream,
                tumor=sample.tumor,
                loat=sample.loat,
                label=np.int64(sample.label),
                diameter_mm=np.float64(sample.diameter_mm),
                loat_area_cm2=np.float64(sample.loat_area_cm2),
            )
        os.replace(tmp, path)  # a reader never sees half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_npz(path: Path, study_id: str) -> StudyRois | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return StudyRois(
                tumor=np.asarray(data["tumor"], dtype=np.float32),
                loat=np.asarray(data["loat"], dtype=np.float32),
                label=int(data["label"]),
                diameter_mm=float(data["diameter_mm"]),
                loat_area_cm2=float(data["loat_area_cm2"]),
                study_id=study_id,
            )
    except (OSError, KeyError, ValueError):
        return None  # unreadable or from an older layout: render again


def cached_rois(
    seeds: Sequence[int],
    spec_phantom: PhantomSpec,
    roi_spec: RoiSpec,
    cache_dir: Path | None,
    *,
    register_pv: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[StudyRois]:
    """:func:`rois_from_phantom` for many seeds, through an npz cache.

    The cache lives in ``cache_dir/rois-<hash>/phantom-<seed>.npz``; the hash covers the phantom
    generator's version, the phantom spec, the ROI spec and ``register_pv``, so changing any of
    them renders afresh. ``cache_dir=None`` renders without caching.

    Parameters
    ----------
    progress
        Called with ``(done, total)`` after each study.
    """
    folder = None
    if cache_dir is not None:
        folder = _cache_folder(cache_dir, spec_phantom, roi_spec, register_pv)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    samples: list[StudyRois] = []
    for done, seed in enumerate(seeds, start=1):
        study_id = f"phantom-{int(seed)}"
        sample = None
        path = None if folder is None else folder / f"{study_id}.npz"
        if path is not None and path.is_file():
            sample = _read_npz(path, study_id)
        if sample is None:
            sample = rois_from_phantom(int(seed), spec_phantom, roi_spec, register_pv=register_pv)
            if path is not None:
                _write_npz(path, sample)
        samples.append(sample)
        if progress is not None:
            progress(done, len(seeds))
    return samples


# --------------------------------------------------------------------------------------------
# Folds, augmentation, one training run
# --------------------------------------------------------------------------------------------


def stratified_folds(labels: npt.ArrayLike, folds: int, seed: int) -> list[npt.NDArray[np.intp]]:
    """Validation indices of each fold; each class is shuffled and dealt round-robin.

    Raises
    ------
    ValueError
        When a class has fewer cases than folds (a fold would miss it and have no AUC).
    """
    y = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 7])
    parts: list[list[int]] = [[] for _ in range(folds)]
    for cls in (0, 1):
        members = np.flatnonzero(y == cls)
        if members.size < folds:
            raise ValueError(f"class {cls} has {members.size} studies, fewer than {folds} folds")
        rng.shuffle(members)
        # Continue the round-robin where the previous class stopped: fold sizes stay even.
        offset = 0 if cls == 0 else int(np.count_nonzero(y == 0)) % folds
        for position, index in enumerate(members):
            parts[(position + offset) % folds].append(int(index))
    return [np.sort(np.asarray(p, dtype=np.intp)) for p in parts]


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, shift, flips and intensity jitter of a ``(N, C, H, W)`` batch."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-_ROTATION_DEG, _ROTATION_DEG) * (math.pi / 180.0)
    flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip_x
    theta[:, 0, 1] = -sin * flip_y
    theta[:, 1, 0] = sin * flip_x
    theta[:, 1, 1] = cos * flip_y
    theta[:, 0, 2] = uniform(-_SHIFT, _SHIFT)
    theta[:, 1, 2] = uniform(-_SHIFT, _SHIFT)
    scale = 1.0 + uniform(-_INTENSITY_SCALE, _INTENSITY_SCALE)
    shift = uniform(-_INTENSITY_SHIFT, _INTENSITY_SHIFT)
    theta, scale, shift = theta.to(x.device), scale.to(x.device), shift.to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Border padding: a rotated crop's corners repeat the edge instead of inventing black.
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return moved * scale[:, None, None, None] + shift[:, None, None, None]


@dataclass
class _Data:
    tumor: torch.Tensor  # (N, C, H, W) on the device
    loat: torch.Tensor
    labels: npt.NDArray[np.int64]


def _predict_logits(net: FusionNet, data: _Data, index: npt.NDArray[np.intp]) -> _FloatArray:
    net.eval()
    out: list[_FloatArray] = []
    device = data.tumor.device
    with torch.inference_mode(), autocast(device):
        for start in range(0, index.size, _EVAL_BATCH):
            batch = torch.as_tensor(index[start : start + _EVAL_BATCH], device=device)
            logits = net(data.tumor[batch], data.loat[batch] if net.loat is not None else None)
            out.append(logits.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[npt.NDArray[np.intp]]:
    order = rng.permutation(n)
    # array_split keeps batch sizes within one of each other: never a lone sample, which batch
    # normalisation cannot train on.
    return list(np.array_split(order, max(1, math.ceil(n / batch_size))))


@dataclass(frozen=True)
class _RunSettings:
    arch: str
    in_channels: int
    dropout: float
    patience: int
    batch_size: int
    lr: float
    progress: Progress | None


@dataclass
class _RunResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    losses: list[float]
    val_aucs: list[float]
    val_logits: list[_FloatArray]  # per epoch, in the order of val_index


def _train_run(
    data: _Data,
    train_index: npt.NDArray[np.intp],
    val_index: npt.NDArray[np.intp] | None,
    settings: _RunSettings,
    *,
    epochs: int,
    seed: int,
    stage: str,
) -> _RunResult:
    """Train one network for up to ``epochs``.

    With ``val_index``, the validation logits of every epoch are kept (the caller chooses the
    epoch on the pooled out-of-fold AUC) and the run stops once the fold's own AUC has not
    improved for ``patience`` epochs.
    """
    from model.stats import auc

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = data.tumor.device
    net = FusionNet(settings.arch, in_channels=settings.in_channels, dropout=settings.dropout)
    net = net.to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=_WEIGHT_DECAY)
    labels = data.labels[train_index]
    n1 = int(labels.sum())
    n0 = int(labels.size - n1)
    pos_weight = torch.tensor([n0 / max(n1, 1)], device=device)
    targets_all = torch.as_tensor(data.labels, dtype=torch.float32, device=device)
    ema = copy.deepcopy(net).eval()
    ema_pairs = [
        (e, v)
        for e, v in zip(ema.state_dict().values(), net.state_dict().values(), strict=True)
        if e.is_floating_point()
    ]
    ema_counts = [
        (e, v)
        for e, v in zip(ema.state_dict().values(), net.state_dict().values(), strict=True)
        if not e.is_floating_point()
    ]
    result = _RunResult(state={}, best_epoch=epochs, losses=[], val_aucs=[], val_logits=[])
    best_auc = -1.0
    for epoch in range(1, epochs + 1):
        net.train()
        total, count = 0.0, 0
        for local in _batches(train_index.size, settings.batch_size, rng):
            index = torch.as_tensor(train_index[local], device=device)
            tumor = _augment(data.tumor[index], generator)
            loat = _augment(data.loat[index], generator) if net.loat is not None else None
            optimiser.zero_grad(set_to_none=True)
            with autocast(device):
                logits = net(tumor, loat)
            loss = F.binary_cross_entropy_with_logits(
                logits.float(), targets_all[index], pos_weight=pos_weight
            )
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                for averaged, current in ema_pairs:
                    averaged.lerp_(current, 1.0 - _EMA_DECAY)
                for averaged, current in ema_counts:
                    averaged.copy_(current)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"{stage}: training diverged at epoch {epoch} (loss {value})")
            total += value * int(index.numel())
            count += int(index.numel())
        result.losses.append(total / max(count, 1))
        val_auc: float | None = None
        if val_index is not None:
            val_logits = _predict_logits(ema, data, val_index)
            val_auc = auc(data.labels[val_index], val_logits)
            result.val_logits.append(val_logits)
            result.val_aucs.append(val_auc)
            # Strictly better only: on ties the earlier (less fitted) epoch stays.
            if val_auc > best_auc:
                best_auc, result.best_epoch = val_auc, epoch
        if settings.progress is not None:
            settings.progress(stage, epoch, epochs, result.losses[-1], val_auc)
        if val_index is not None and epoch - result.best_epoch >= settings.patience:
            break
    if val_index is None:
        result.state = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
    return result


def _choose_epoch(
    labels: npt.NDArray[np.int64],
    fold_index: Sequence[npt.NDArray[np.intp]],
    runs: Sequence[_RunResult],
) -> tuple[int, npt.NDArray[np.float64], list[float]]:
    """The epoch whose pooled out-of-fold logits rank best, those logits, and the AUC per epoch.

    Pooling one epoch across folds (rather than each fold's own best epoch) keeps the OOF logits
    on one scale, which calibration needs, and names the epoch count the final network trains
    for. A fold that stopped early contributes its last epoch's logits to later epochs.
    """
    from model.stats import auc

    longest = max(len(run.val_logits) for run in runs)
    pooled: list[npt.NDArray[np.float64]] = []
    for epoch in range(longest):
        oof = np.zeros(labels.size, dtype=np.float64)
        for index, run in zip(fold_index, runs, strict=True):
            oof[index] = run.val_logits[min(epoch, len(run.val_logits) - 1)]
        pooled.append(oof)
    aucs = [auc(labels, oof) for oof in pooled]
    best = int(np.argmax(aucs))  # the first (least trained) on ties
    return best + 1, pooled[best], aucs


# --------------------------------------------------------------------------------------------
# Cross-validation and the final model
# --------------------------------------------------------------------------------------------


def _features(name: str, dl_logit: float, sample: StudyRois) -> float:
    if name == "dl_logit":
        return dl_logit
    if name == "max_diameter_mm":
        return sample.diameter_mm
    if name == "loat_area_cm2":
        return sample.loat_area_cm2
    raise ValueError(f"unknown predictor {name!r}")


def _fit_logistic(
    names: Sequence[str],
    dl_logits: npt.NDArray[np.float64],
    samples: Sequence[StudyRois],
    labels: npt.NDArray[np.int64],
) -> dict[str, Any]:
    rows = zip(dl_logits, samples, strict=True)
    x = np.asarray([[_features(n, float(d), s) for n in names] for d, s in rows])
    try:
        model = logistic_model(x, labels, list(names))
    except ValueError as exc:
        # A tiny or separable cohort: the card says why and inference reports no combined value.
        return {"names": list(names), "error": str(exc)}
    return model


def _round(value: float, digits: int = 6) -> float:
    return float(round(value, digits))


def train_fusion(
    samples: Sequence[StudyRois],
    out_dir: Path,
    *,
    roi_spec: RoiSpec,
    arch: str = "fusion",
    folds: int = 5,
    epochs: int = 30,
    patience: int = 8,
    batch_size: int = 16,
    lr: float = 3e-4,
    dropout: float = 0.3,
    seed: int = 0,
    device: str = "auto",
    demo: bool = False,
    progress: Progress | None = None,
    name: str | None = None,
    version: str = "1",
    card_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Cross-validate, calibrate, train the final network and write the checkpoint.

    Parameters
    ----------
    samples
        Studies with ROIs cut by ``roi_spec`` (at least ``folds`` of each class).
    out_dir
        Checkpoint directory (:func:`model.checkpoint.save_checkpoint`).
    roi_spec
        The spec the ROIs were cut with; stored as the card's ``input`` so inference cuts alike.
    arch
        ``"fusion"`` or ``"tumor-only"``.
    folds
        Cross-validation folds (>= 2).
    epochs, patience
        Most epochs per fold, and epochs without a better validation AUC before a fold stops.
    batch_size, lr, dropout
        Batch size, AdamW learning rate, dropout before the head.
    seed
        Seeds the folds, initialisation, batch order and augmentation.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    demo
        Trained on phantoms: the card says so and records the phantom generator's version.
    progress
        See :data:`Progress`.
    name, version
        Card identity; the name defaults to ``mvi-fusion`` / ``mvi-tumor-only`` (``-demo``).
    card_extra
        Further top-level card entries.

    Returns
    -------
    dict
        The model card as written (with ``weights_sha256``), plus nothing else.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if folds < 2 or epochs < 1 or patience < 1 or batch_size < 2 or not lr > 0:
        raise ValueError("need folds >= 2, epochs >= 1, patience >= 1, batch_size >= 2, lr > 0")
    expected = (roi_spec.channels, roi_spec.size, roi_spec.size)
    for sample in samples:
        if sample.tumor.shape != expected or sample.loat.shape != expected:
            raise ValueError(
                f"{sample.study_id}: ROIs {sample.tumor.shape} / {sample.loat.shape} do not match "
                f"the ROI spec {expected}"
            )
    labels = np.asarray([int(s.label) for s in samples], dtype=np.int64)
    fold_index = stratified_folds(labels, folds, seed)
    torch_device = resolve_device(device)
    started = time.perf_counter()
    data = _Data(
        tumor=torch.from_numpy(np.stack([s.tumor for s in samples])).to(torch_device),
        loat=torch.from_numpy(np.stack([s.loat for s in samples])).to(torch_device),
        labels=labels,
    )
    settings = _RunSettings(arch, roi_spec.channels, dropout, patience, batch_size, lr, progress)

    fold_reports: list[dict[str, Any]] = []
    runs: list[_RunResult] = []
    all_index = np.arange(labels.size, dtype=np.intp)
    for f, val_index in enumerate(fold_index):
        run = _train_run(
            data,
            np.setdiff1d(all_index, val_index),
            val_index,
            settings,
            epochs=epochs,
            seed=seed * 1000 + f + 1,
            stage=f"fold {f + 1}/{folds}",
        )
        runs.append(run)
        fold_reports.append(
            {
                "studies": int(val_index.size),
                "best_epoch": run.best_epoch,
                "loss_history": [_round(v, 5) for v in run.losses],
                "val_auc_history": [_round(v, 4) for v in run.val_aucs],
            }
        )
    final_epochs, oof, pooled_aucs = _choose_epoch(labels, fold_index, runs)
    cv_seconds = time.perf_counter() - started

    a, b = platt_fit(labels, oof)
    calibrated = platt_apply(oof, a, b)
    threshold = youden_threshold(labels, calibrated)
    auc_value, low, high = delong_ci(labels, calibrated)
    sensitivity, specificity, accuracy = sens_spec_acc(labels, calibrated, threshold)
    dl_logit = a * oof + b
    combined = _fit_logistic(COMBINED_FEATURES, dl_logit, samples, labels)
    clinical = _fit_logistic(CLINICAL_FEATURES, dl_logit, samples, labels)

    final = _train_run(
        data,
        all_index,
        None,
        settings,
        epochs=final_epochs,
        seed=seed * 1000,
        stage="final",
    )
    total_seconds = time.perf_counter() - started
    network = FusionNet(arch, in_channels=roi_spec.channels, dropout=dropout)
    network.load_state_dict(final.state)

    base_name = "mvi-fusion" if arch == "fusion" else "mvi-tumor-only"
    n1 = int(labels.sum())
    card: dict[str, Any] = {
        "name": name or (f"{base_name}-demo" if demo else base_name),
        "version": version,
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "kind": CARD_KIND,
        "arch": arch,
        "demo": bool(demo),
        "input": roi_spec.to_card(),
        "network": network.spec(),
        "output": "logit; p = sigmoid(calibration.a * logit + calibration.b)",
        "calibration": {"method": "platt", "a": _round(a), "b": _round(b), "fitted_on": "oof"},
        "threshold": _round(threshold),
        "threshold_method": "youden on calibrated out-of-fold probabilities",
        "oof_metrics": {
            "auc": _round(auc_value, 4),
            "ci95": [_round(low, 4), _round(high, 4)],
            "ci_method": "delong",
            "sensitivity": _round(sensitivity, 4),
            "specificity": _round(specificity, 4),
            "accuracy": _round(accuracy, 4),
            "brier": _round(brier(labels, calibrated), 4),
            "studies": int(labels.size),
            "note": "the epoch was chosen on these predictions: mildly optimistic",
        },
        "class_counts": {"mvi": n1, "no_mvi": int(labels.size - n1)},
        "combined_model": {
            "features": list(COMBINED_FEATURES),
            "fitted_on": "out-of-fold calibrated DL logit, max tumour diameter, LOAT area",
            **combined,
        },
        "clinical_model": {"features": list(CLINICAL_FEATURES), **clinical},
        "libraries": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "training": {
            "seed": int(seed),
            "folds": int(folds),
            "max_epochs": int(epochs),
            "patience": int(patience),
            "final_epochs": final_epochs,
            "epoch_choice": "best pooled out-of-fold AUC over epochs",
            "oof_auc_history": [_round(v, 4) for v in pooled_aucs],
            "batch_size": int(batch_size),
            "lr": float(lr),
            "weight_decay": _WEIGHT_DECAY,
            "optimizer": "AdamW",
            "weights_ema_decay": _EMA_DECAY,
            "loss": "BCEWithLogits, pos_weight = negatives / positives",
            "augmentation": {
                "rotation_deg": _ROTATION_DEG,
                "shift_fraction": _SHIFT / 2.0,
                "flips": True,
                "intensity_scale": _INTENSITY_SCALE,
                "intensity_shift": _INTENSITY_SHIFT,
            },
            "studies": int(labels.size),
            "device": str(torch_device),
            "cv_seconds": round(cv_seconds, 1),
            "seconds": round(total_seconds, 1),
            "folds_detail": fold_reports,
            "final_loss_history": [_round(v, 5) for v in final.losses],
        },
    }
    if demo:
        card["phantom_version"] = PHANTOM_VERSION
    try:
        import statsmodels  # type: ignore[import-untyped]

        card["libraries"]["statsmodels"] = statsmodels.__version__
    except ImportError:  # pragma: no cover - logistic_model needs it; recorded when present
        pass
    if card_extra:
        card.update(card_extra)
    save_checkpoint(out_dir, network.state_dict(), card)
    # Read back: the card as written (with its weights hash), and proof that it loads.
    return load_checkpoint(out_dir, required=FUSION_CARD_KEYS)[1]
