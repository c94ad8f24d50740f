"""Training and cross-validation of the MVI fusion model: ROIs in, checkpoint out.

:func:`train_fusion` runs grouped, stratified K-fold cross-validation (folds never split a
patient, or a centre with ``group_by="centre"``; ``cv="loco"`` holds out one centre per fold).
Each fold trains a fresh :class:`model.fusion.FusionNet` (binary cross-entropy weighted by the
fold's class ratio, AdamW, light augmentation), scores its validation studies after every epoch
and keeps the weights of the epoch with its best validation AUC, stopping once that has not
improved for ``patience`` epochs.

**What is shipped is what was calibrated.** The saved model is the ensemble of the K fold
networks (:class:`model.fusion.FusionEnsemble`), each at its chosen epoch with its logit
standardised by the mean and spread of its own validation logits, scored by the mean; the
out-of-fold (OOF) logits the card is computed from are those very networks' standardised logits
on the studies they did not train on:

* Platt calibration ``p = sigmoid(a * logit + b)`` (refused when the slope is not positive),
* the risk threshold (Youden's J on the calibrated OOF probabilities),
* OOF metrics (AUC with DeLong 95 % CI, sensitivity, specificity, accuracy, Brier score), with
  bootstrap and Wilson CIs (PPV and NPV too) and Harrell's optimism correction of the figures
  that Platt and the threshold were fitted on (:mod:`model.validation`),
* the combined logistic model (DL logit + max tumour diameter + LOAT area) and the clinical one
  (diameter + LOAT area), with odds ratios, CIs and p-values.

A new study is unseen by every member, as each OOF study was by its member, so the calibration
carries over (``tests/model/test_train.py`` trains on one phantom cohort and checks the card's
sensitivity, specificity and Brier score on another). An earlier design trained a separate final
network on all studies and shipped it with the OOF calibration: its logits had another scale and
it called every new study high risk. The OOF metrics remain mildly optimistic (each fold's epoch
was chosen on its own validation studies); an external test set gives the unbiased figure.

The card lists the training studies and patients as salted hashes with their fold, so
``mvi-node evaluate`` can refuse a test set that overlaps and a test can recompute every card
figure from the shipped weights.

Validation and the saved networks use an exponential moving average of the weights.
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
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import torchvision

from model.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from model.cohort import CohortStudy
from model.fusion import ARCHS, IMAGENET_GREY, LAYOUTS, FusionEnsemble, FusionNet
from model.phantom import PHANTOM_VERSION, PhantomSpec, make_study
from model.registration import register, resample_onto
from model.roi import RoiSpec, extract_rois
from model.segmentation import autocast, resolve_device
from model.stats import (
    brier,
    delong_ci,
    logistic_model,
    logistic_predict,
    platt_apply,
    platt_fit,
    sens_spec_acc,
    youden_threshold,
)
from model.validation import (
    EVENTS_PER_VARIABLE,
    logistic_optimism,
    optimism_corrected,
    select_predictors,
    threshold_metrics,
)

__all__ = [
    "AUGMENTATIONS",
    "CARD_KIND",
    "CLINICAL_FEATURES",
    "COMBINED_FEATURES",
    "CV_SCHEMES",
    "FUSION_CARD_KEYS",
    "GROUPINGS",
    "THRESHOLD_RULES",
    "Progress",
    "StudyRois",
    "cached_rois",
    "centre_folds",
    "check_patient_centres",
    "cohort_rois",
    "grouped_folds",
    "hash_id",
    "make_folds",
    "recalibrated_card",
    "rois_from_phantom",
    "stratified_folds",
    "train_fusion",
]

#: The model card's ``kind``.
CARD_KIND = "mvi-fusion"

#: Card keys a fusion model needs beyond :data:`model.checkpoint.REQUIRED_CARD_KEYS`.
FUSION_CARD_KEYS: tuple[str, ...] = ("arch", "input", "network", "calibration", "threshold")

#: Candidate predictors of the combined logistic model. ``dl_logit``, always in, is the calibrated
#: logit ``a * logit + b``: on that scale the combined model reproduces the calibrated DL
#: probability when the measurements add nothing. The others are selected (EPV 10).
COMBINED_FEATURES: tuple[str, ...] = ("dl_logit", "max_diameter_mm", "loat_area_cm2")

#: Predictors of the clinical model (the paper's independent predictors).
CLINICAL_FEATURES: tuple[str, ...] = ("max_diameter_mm", "loat_area_cm2")

#: ``progress(stage, epoch, epochs, train_loss, val_auc)``; stage ``"fold i/k"``.
Progress = Callable[[str, int, int, float, float | None], None]

#: Cross-validation schemes: K folds, or leave one centre out (one fold per centre).
CV_SCHEMES: tuple[str, ...] = ("kfold", "loco")

#: What a fold never splits: a study, a patient (all their studies in one fold), a centre.
GROUPINGS: tuple[str, ...] = ("study", "patient", "centre")

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
        For messages and the cache; written to the card only as a salted hash.
    patient_id
        Groups a patient's studies into one fold (hashed in the card); empty: the study is its
        own patient.
    centre
        The site the study came from (``group_by="centre"``, ``cv="loco"``); named in the card.
    """

    tumor: _FloatArray
    loat: _FloatArray
    label: int
    diameter_mm: float
    loat_area_cm2: float
    study_id: str = ""
    patient_id: str = field(default="", repr=False)  # may be a plain PatientID: never printed
    centre: str = ""

    @property
    def patient(self) -> str:
        """The patient grouping key: ``patient_id``, or the study for a patient not given."""
        return self.patient_id or f"study:{self.study_id}"


def _image(volume: npt.NDArray[Any], spacing: Sequence[float], origin: Sequence[float]) -> Any:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    return image


def rois_from_phantom(
    seed: int,
    spec_phantom: PhantomSpec,
    roi_spec: RoiSpec,
    *,
    register_pv: bool = True,
    patient: int | None = None,
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
    patient
        A repeat study of patient seed ``patient`` (:func:`model.phantom.make_study`); the
        sample's ``patient_id`` is ``patient-<seed>`` either way and its ``centre`` the spec's
        site's name (empty without one).

    Raises
    ------
    ValueError
        When the phantom has no tumour; :class:`model.roi.RoiError` when a mask is too small.
    """
    spec = dataclasses.replace(spec_phantom, phases=("arterial", "portal_venous"))
    study = make_study(seed, spec, patient=patient)
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
        **_sample_ids(seed, patient, spec),
    )


def _sample_ids(seed: int, patient: int | None, spec: PhantomSpec) -> dict[str, str]:
    """A phantom sample's study, patient and centre (a study without a patient is its own)."""
    return {
        "study_id": f"phantom-{seed}",
        "patient_id": f"patient-{seed if patient is None else patient}",
        "centre": "" if spec.site is None else spec.site.name,
    }


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


def _read_npz(path: Path, ids: dict[str, str]) -> StudyRois | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return StudyRois(
                tumor=np.asarray(data["tumor"], dtype=np.float32),
                loat=np.asarray(data["loat"], dtype=np.float32),
                label=int(data["label"]),
                diameter_mm=float(data["diameter_mm"]),
                loat_area_cm2=float(data["loat_area_cm2"]),
                **ids,
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
    studies = [(int(seed), None, spec_phantom) for seed in seeds]
    return _cached_many(studies, roi_spec, cache_dir, register_pv, progress)


def cohort_rois(
    cohort: Sequence[CohortStudy],
    spec_phantom: PhantomSpec,
    roi_spec: RoiSpec,
    cache_dir: Path | None,
    *,
    register_pv: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[StudyRois]:
    """:func:`cached_rois` for a :func:`model.cohort.make_cohort` cohort: each study rendered at
    its site, a repeat study as its patient's, with ``patient_id`` and ``centre`` set."""
    studies = [(study.seed, study.patient, study.spec(spec_phantom)) for study in cohort]
    return _cached_many(studies, roi_spec, cache_dir, register_pv, progress)


def _cached_many(
    studies: Sequence[tuple[int, int | None, PhantomSpec]],
    roi_spec: RoiSpec,
    cache_dir: Path | None,
    register_pv: bool,
    progress: Callable[[int, int], None] | None,
) -> list[StudyRois]:
    samples: list[StudyRois] = []
    for done, (seed, patient, spec) in enumerate(studies, start=1):
        samples.append(_cached(seed, patient, spec, roi_spec, cache_dir, register_pv))
        if progress is not None:
            progress(done, len(studies))
    return samples


def _cached(
    seed: int,
    patient: int | None,
    spec_phantom: PhantomSpec,
    roi_spec: RoiSpec,
    cache_dir: Path | None,
    register_pv: bool,
) -> StudyRois:
    ids = _sample_ids(seed, patient, spec_phantom)
    study_id = ids["study_id"]
    path = None
    if cache_dir is not None:
        folder = _cache_folder(cache_dir, spec_phantom, roi_spec, register_pv)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (f"{study_id}.npz" if patient is None else f"{study_id}-of-{patient}.npz")
        if path.is_file():
            sample = _read_npz(path, ids)
            if sample is not None:
                return sample
    sample = rois_from_phantom(
        seed, spec_phantom, roi_spec, register_pv=register_pv, patient=patient
    )
    if path is not None:
        _write_npz(path, sample)
    return sample


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


def grouped_folds(
    labels: npt.ArrayLike, groups: Sequence[str], folds: int, seed: int
) -> list[npt.NDArray[np.intp]]:
    """Validation indices of each fold; a group (patient, centre) never spans two folds.

    Groups are dealt largest first (ties in a seeded random order) to the fold where they leave
    each class's count closest to its share, so folds stay balanced in size and prevalence.

    Raises
    ------
    ValueError
        When a fold would miss a class (fewer groups of that class than folds), or there are
        fewer groups than folds.
    """
    y = np.asarray(labels)
    if len(groups) != y.size:
        raise ValueError(f"{len(groups)} group keys for {y.size} studies")
    names = sorted(set(groups))
    if len(names) < folds:
        raise ValueError(f"{len(names)} groups, fewer than {folds} folds")
    members: dict[str, list[int]] = {name: [] for name in names}
    for index, name in enumerate(groups):
        members[name].append(index)
    rng = np.random.default_rng([int(seed), 11])
    order = [names[i] for i in rng.permutation(len(names))]
    order.sort(key=lambda name: -len(members[name]))  # stable: the shuffle breaks ties
    target = np.array([np.count_nonzero(y == 0), np.count_nonzero(y == 1)]) / folds
    counts = np.zeros((folds, 2))
    parts: list[list[int]] = [[] for _ in range(folds)]
    for name in order:
        own = y[members[name]]
        add = np.array([np.count_nonzero(own == 0), np.count_nonzero(own == 1)])
        # Squared distance from each class's share, after minus before; then the smaller fold.
        cost = ((counts + add - target) ** 2).sum(axis=1) - ((counts - target) ** 2).sum(axis=1)
        best = min(range(folds), key=lambda f: (round(float(cost[f]), 9), counts[f].sum(), f))
        counts[best] += add
        parts[best].extend(members[name])
    for f, part in enumerate(parts):
        missing = [cls for cls in (0, 1) if not np.any(y[part] == cls)] if part else [0, 1]
        if missing:
            cls = missing[0]
            with_class = sum(1 for name in names if any(y[i] == cls for i in members[name]))
            raise ValueError(
                f"fold {f + 1} of {folds} has no study of class {cls}: {with_class} groups "
                f"hold that class; use fewer folds"
            )
    return [np.sort(np.asarray(p, dtype=np.intp)) for p in parts]


def centre_folds(labels: npt.ArrayLike, centres: Sequence[str]) -> list[npt.NDArray[np.intp]]:
    """Leave-one-centre-out: one validation fold per centre, in the centres' sorted order.

    Raises
    ------
    ValueError
        When a study has no centre, there are fewer than two centres, or a centre holds one
        class only (its fold would have no AUC).
    """
    y = np.asarray(labels)
    if len(centres) != y.size:
        raise ValueError(f"{len(centres)} centres for {y.size} studies")
    if any(not c for c in centres):
        raise ValueError("leave-one-centre-out needs a centre for every study")
    names = sorted(set(centres))
    if len(names) < 2:
        raise ValueError(f"leave-one-centre-out needs two centres or more, got {names}")
    parts = []
    for name in names:
        index = np.flatnonzero(np.asarray(centres) == name)
        classes = set(int(v) for v in y[index])
        if classes != {0, 1}:
            only = "MVI" if classes == {1} else "no-MVI"
            raise ValueError(
                f"centre {name!r} has only {only} studies ({index.size}): leave-one-centre-out "
                "needs both classes in every centre"
            )
        parts.append(index.astype(np.intp))
    return parts


def check_patient_centres(patients: Sequence[str], centres: Sequence[str]) -> None:
    """Refuse a patient recorded at two centres (a centre fold would split them).

    Raises
    ------
    ValueError
        Naming how many patients are affected (never the identifiers).
    """
    seen: dict[str, set[str]] = {}
    for patient, centre in zip(patients, centres, strict=True):
        seen.setdefault(patient, set()).add(centre)
    split = [p for p, where in seen.items() if len(where) > 1]
    if split:
        raise ValueError(
            f"{len(split)} patient(s) appear under two centres; a patient belongs to one centre"
        )


def hash_id(value: str, salt: str) -> str:
    """The card's form of a study or patient identifier: 16 hex of SHA-256 over salt and value.

    The salt is drawn per model and written in the card, so ``evaluate`` can hash a test set's
    identifiers alike; identifiers the node hands over are already pseudonyms (study keys, and
    patient IDs under the site's pseudonym key when one is set).
    """
    return hashlib.sha256(f"{salt}:{value.strip()}".encode()).hexdigest()[:16]


#: Augmentation levels: ``light`` (rotation, shift, flips, small intensity jitter) and
#: ``strong``, which adds what differs between scanners and sites: spacing (zoom ±15 %), an HU
#: offset of ±20 HU, reconstruction-kernel blur (σ up to 1 pixel) and noise (σ up to 0.03 of the
#: window, ~10 HU).
AUGMENTATIONS: tuple[str, ...] = ("light", "strong")

_ZOOM = 0.15
_STRONG_SHIFT = 0.055  # of the window: ~20 HU
_BLUR_SIGMA = 1.0
_NOISE = 0.03


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` with one sigma (pixels) per sample."""
    radius = 2
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, 5)
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    per_channel = kernel.repeat_interleave(c, dim=0)  # (N*C, 5)
    rows = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="replicate"),
        per_channel[:, None, :, None],
        groups=n * c,
    )
    cols = F.conv2d(
        F.pad(rows, (radius, radius, 0, 0), mode="replicate"),
        per_channel[:, None, None, :],
        groups=n * c,
    )
    return cols.reshape(n, c, h, w)


def _augment(x: torch.Tensor, generator: torch.Generator, level: str = "light") -> torch.Tensor:
    """Random rotation, shift, flips and intensity jitter of a ``(N, C, H, W)`` batch; with
    ``level="strong"`` also zoom, HU offset, blur and noise (see :data:`AUGMENTATIONS`)."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    strong = level == "strong"
    angle = uniform(-_ROTATION_DEG, _ROTATION_DEG) * (math.pi / 180.0)
    flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    zoom = uniform(1.0 - _ZOOM, 1.0 + _ZOOM) if strong else torch.ones(n)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip_x
    theta[:, 0, 1] = -sin * flip_y
    theta[:, 1, 0] = sin * flip_x
    theta[:, 1, 1] = cos * flip_y
    theta[:, 0, 2] = uniform(-_SHIFT, _SHIFT)
    theta[:, 1, 2] = uniform(-_SHIFT, _SHIFT)
    scale = 1.0 + uniform(-_INTENSITY_SCALE, _INTENSITY_SCALE)
    bound = _STRONG_SHIFT if strong else _INTENSITY_SHIFT
    shift = uniform(-bound, bound)
    theta, scale, shift = theta.to(x.device), scale.to(x.device), shift.to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Border padding: a rotated crop's corners repeat the edge instead of inventing black.
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if strong:
        sigma = uniform(0.0, _BLUR_SIGMA).to(x.device)
        moved = _blur(moved, sigma)
        noise = torch.randn(moved.shape, generator=generator).to(x.device)
        moved = moved + noise * uniform(0.0, _NOISE).to(x.device)[:, None, None, None]
    return moved * scale[:, None, None, None] + shift[:, None, None, None]


@dataclass
class _Data:
    tumor: torch.Tensor  # (N, C, H, W) on the device
    loat: torch.Tensor
    labels: npt.NDArray[np.int64]
    log_diameter: npt.NDArray[np.float64]  # the size target's raw values, log(mm)


def _predict_logits(net: FusionNet, data: _Data, index: npt.NDArray[np.intp]) -> _FloatArray:
    net.eval()
    out: list[_FloatArray] = []
    device = data.tumor.device
    with torch.inference_mode(), autocast(device):
        for start in range(0, index.size, _EVAL_BATCH):
            batch = torch.as_tensor(index[start : start + _EVAL_BATCH], device=device)
            logits = net(data.tumor[batch], data.loat[batch] if net.uses_loat else None)
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
    layout: str = "region"
    phases: int = 2
    pretrained: Path | None = None  # safetensors ResNet18 weights (init "imagenet")
    augment: str = "light"
    size_weight: float = 0.0  # weight of the auxiliary size loss; 0: no size head


def _member(settings: _RunSettings, *, size_head: bool = False) -> FusionNet:
    return FusionNet(
        settings.arch,
        in_channels=settings.in_channels,
        dropout=settings.dropout,
        layout=settings.layout,
        phases=settings.phases,
        normalise=IMAGENET_GREY if settings.pretrained is not None else None,
        size_head=size_head,
    )


def _new_network(settings: _RunSettings) -> FusionNet:
    """A fold's network: random, or every branch from ImageNet weights (inputs normalised); with
    a size head when the size target is on."""
    net = _member(settings, size_head=settings.size_weight > 0)
    if settings.pretrained is not None:
        missing = net.load_pretrained(settings.pretrained)
        if missing:
            raise ValueError(
                f"{settings.pretrained} leaves {len(missing)} ResNet18 tensors unset "
                f"(first: {missing[0]})"
            )
    return net


@dataclass
class _RunResult:
    state: dict[str, torch.Tensor]  # the averaged weights at best_epoch, on the CPU
    best_epoch: int
    best_auc: float
    losses: list[float]
    val_aucs: list[float]
    val_logits: _FloatArray  # at best_epoch, in the order of val_index


def _snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _train_run(
    data: _Data,
    train_index: npt.NDArray[np.intp],
    val_index: npt.NDArray[np.intp],
    settings: _RunSettings,
    *,
    epochs: int,
    seed: int,
    stage: str,
) -> _RunResult:
    """Train one fold's network for up to ``epochs``; keep the epoch with the best validation AUC.

    The run stops once the validation AUC has not improved for ``patience`` epochs. The kept
    weights and their validation logits are what the ensemble ships and the card is computed
    from.
    """
    from model.stats import auc

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = data.tumor.device
    net = _new_network(settings).to(device)
    # One fused kernel per step instead of a dozen passes over the 22 M parameters of the two
    # ResNet18s together: the step took 0.10 s on 2 CPU cores, a third of a fold's training;
    # fused, 0.017 s.
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=settings.lr, weight_decay=_WEIGHT_DECAY, fused=True
    )
    labels = data.labels[train_index]
    n1 = int(labels.sum())
    n0 = int(labels.size - n1)
    pos_weight = torch.tensor([n0 / max(n1, 1)], device=device)
    targets_all = torch.as_tensor(data.labels, dtype=torch.float32, device=device)
    # The size target: log diameter standardised on this fold's training studies only.
    sizes = data.log_diameter[train_index]
    size_all = torch.as_tensor(
        (data.log_diameter - sizes.mean()) / max(float(sizes.std()), 1e-6),
        dtype=torch.float32,
        device=device,
    )
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
    result = _RunResult(
        state={},
        best_epoch=0,
        best_auc=-1.0,
        losses=[],
        val_aucs=[],
        val_logits=np.zeros(0, dtype=np.float32),
    )
    for epoch in range(1, epochs + 1):
        net.train()
        total, count = 0.0, 0
        for local in _batches(train_index.size, settings.batch_size, rng):
            index = torch.as_tensor(train_index[local], device=device)
            tumor = _augment(data.tumor[index], generator, settings.augment)
            loat = (
                _augment(data.loat[index], generator, settings.augment) if net.uses_loat else None
            )
            optimiser.zero_grad(set_to_none=True)
            with autocast(device):
                if settings.size_weight > 0:
                    logits, size = net.forward_with_size(tumor, loat)
                else:
                    logits, size = net(tumor, loat), None
            loss = F.binary_cross_entropy_with_logits(
                logits.float(), targets_all[index], pos_weight=pos_weight
            )
            if size is not None:
                loss = loss + settings.size_weight * F.mse_loss(size.float(), size_all[index])
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
        val_logits = _predict_logits(ema, data, val_index)
        val_auc = auc(data.labels[val_index], val_logits)
        result.val_aucs.append(val_auc)
        # Strictly better only: on ties the earlier (less fitted) epoch stays.
        if val_auc > result.best_auc:
            result.best_auc, result.best_epoch = val_auc, epoch
            result.val_logits = val_logits
            result.state = _snapshot(ema)
        if settings.progress is not None:
            settings.progress(stage, epoch, epochs, result.losses[-1], val_auc)
        if epoch - result.best_epoch >= settings.patience:
            break
    return result


# --------------------------------------------------------------------------------------------
# Cross-validation and the shipped ensemble
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
    events = int(min(labels.sum(), labels.size - labels.sum()))
    try:
        if events < EVENTS_PER_VARIABLE * len(names):
            raise ValueError(
                f"{events} events allow {events // EVENTS_PER_VARIABLE} predictor(s) at "
                f"{EVENTS_PER_VARIABLE} events per variable, not {len(names)}"
            )
        model = logistic_model(x, labels, list(names))
    except ValueError as exc:
        # A tiny or separable cohort: the card says why and inference reports no combined value.
        return {"names": list(names), "error": str(exc)}
    return model


def _columns(
    names: Sequence[str], dl_logits: npt.NDArray[np.float64], samples: Sequence[StudyRois]
) -> dict[str, npt.ArrayLike]:
    return {
        name: [_features(name, float(d), s) for d, s in zip(dl_logits, samples, strict=True)]
        for name in names
    }


def _combined(
    dl_logits: npt.NDArray[np.float64],
    samples: Sequence[StudyRois],
    labels: npt.NDArray[np.int64],
    seed: int,
) -> dict[str, Any]:
    """The combined model: DL logit forced in, clinical candidates selected (EPV 10), with its
    optimism (selection and fit repeated in each bootstrap resample)."""
    columns = _columns(COMBINED_FEATURES, dl_logits, samples)
    try:
        names, selection = select_predictors(columns, labels, forced=["dl_logit"])
    except ValueError as exc:
        return {"features": [], "names": [], "error": str(exc)}
    model = _fit_logistic(names, dl_logits, samples, labels)
    if "error" not in model:
        model.update(_own_threshold(model, columns, labels))
        model["optimism_corrected"] = logistic_optimism(
            columns, labels, forced=["dl_logit"], n_boot=200, seed=seed
        )
    return {
        "features": names,
        "candidates": list(COMBINED_FEATURES),
        "selection": selection,
        **model,
    }


def _own_threshold(
    model: dict[str, Any], columns: dict[str, npt.ArrayLike], labels: npt.NDArray[np.int64]
) -> dict[str, Any]:
    """A logistic model's own Youden threshold (stored as the DL threshold is) and its in-sample
    sensitivity and specificity, so that its calls can be validated like the DL model's."""
    values = {name: np.asarray(columns[name], dtype=np.float64) for name in model["names"]}
    p = np.asarray(
        [
            logistic_predict(model, {name: float(v[i]) for name, v in values.items()})
            for i in range(labels.size)
        ]
    )
    threshold = _stored_threshold(labels, p)
    sensitivity, specificity, _ = sens_spec_acc(labels, p, threshold)
    return {
        "threshold": threshold,
        "threshold_method": "youden on the model's in-sample probabilities",
        "sensitivity": _round(sensitivity, 4),
        "specificity": _round(specificity, 4),
    }


def _stored_threshold(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    """Youden's threshold as the card stores it: rounded down to 6 decimals, so that the study
    it was chosen at stays on the high side."""
    return math.floor(youden_threshold(labels, probabilities) * 1e6) / 1e6


def _round(value: float, digits: int = 6) -> float:
    return float(round(value, digits))


def make_folds(
    samples: Sequence[StudyRois],
    labels: npt.NDArray[np.int64],
    *,
    cv: str,
    group_by: str,
    folds: int,
    seed: int,
) -> list[npt.NDArray[np.intp]]:
    """The validation folds :func:`train_fusion` uses (callers check a cohort before training).

    Raises
    ------
    ValueError
        A patient at two centres, a centre with one class (``cv="loco"``), a fold that would
        miss a class.
    """
    centres = [s.centre for s in samples]
    if any(centres) and group_by != "study":
        check_patient_centres([s.patient for s in samples], centres)
    if cv == "loco":
        return centre_folds(labels, centres)
    if group_by == "study":
        return stratified_folds(labels, folds, seed)
    if group_by == "centre":
        if any(not c for c in centres):
            raise ValueError("group_by='centre' needs a centre for every study")
        return grouped_folds(labels, centres, folds, seed)
    return grouped_folds(labels, [s.patient for s in samples], folds, seed)


def train_fusion(
    samples: Sequence[StudyRois],
    out_dir: Path,
    *,
    roi_spec: RoiSpec,
    arch: str = "fusion",
    folds: int = 5,
    cv: str = "kfold",
    group_by: str = "patient",
    epochs: int = 30,
    patience: int = 8,
    batch_size: int = 16,
    lr: float = 3e-4,
    dropout: float = 0.3,
    seed: int = 0,
    device: str = "auto",
    layout: str = "region",
    pretrained: Path | None = None,
    augment: str = "light",
    size_target: float = 0.0,
    demo: bool = False,
    progress: Progress | None = None,
    name: str | None = None,
    version: str = "1",
    card_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Cross-validate, calibrate on the out-of-fold logits and ship the fold ensemble.

    Parameters
    ----------
    samples
        Studies with ROIs cut by ``roi_spec`` (every fold needs both classes).
    out_dir
        Checkpoint directory (:func:`model.checkpoint.save_checkpoint`).
    roi_spec
        The spec the ROIs were cut with; stored as the card's ``input`` so inference cuts alike.
    arch
        ``"fusion"`` or ``"tumor-only"``.
    folds
        Cross-validation folds (>= 2) for ``cv="kfold"``; the ensemble has this many members.
    cv
        ``"kfold"``, or ``"loco"``: one fold (and member) per centre.
    group_by
        What a fold never splits (:data:`GROUPINGS`): ``"patient"`` (the default; a study without
        a patient is its own), ``"centre"`` or ``"study"``.
    epochs, patience
        Most epochs per fold, and epochs without a better validation AUC before a fold stops.
    batch_size, lr, dropout
        Batch size, AdamW learning rate, dropout before the head.
    seed
        Seeds the folds, initialisation, batch order, augmentation and the identifier salt.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    layout
        ``"region"`` (branches tumour and LOAT), ``"phase"`` (branches arterial and
        portal-venous) or ``"phase-tiled"`` (the same, crops side by side), :mod:`model.fusion`.
    pretrained
        torchvision ResNet18 weights as safetensors (``mvi-node convert-weights``): every
        branch of every fold starts from them and inputs are normalised as ImageNet's; ``None``
        initialises at random.
    augment
        :data:`AUGMENTATIONS`: ``"light"`` or ``"strong"`` (adds zoom, HU offset, blur, noise).
    size_target
        Weight of an auxiliary loss (mean squared error) on the tumour's log maximum diameter,
        standardised per fold, predicted by a second head on the same features; 0 (the default)
        trains the classifier alone. The head is not shipped.
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
        The model card as written (with ``weights_sha256``).

    Raises
    ------
    ValueError
        On bad settings, ROIs that do not match the spec, folds that cannot hold both classes, a
        patient at two centres, or out-of-fold logits that rank against the labels (Platt).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if cv not in CV_SCHEMES:
        raise ValueError(f"unknown cv {cv!r}; expected one of {CV_SCHEMES}")
    if group_by not in GROUPINGS:
        raise ValueError(f"unknown group_by {group_by!r}; expected one of {GROUPINGS}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTATIONS}")
    if not (math.isfinite(size_target) and size_target >= 0.0):
        raise ValueError(f"size_target must be a finite weight >= 0, got {size_target}")
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
    fold_index = make_folds(samples, labels, cv=cv, group_by=group_by, folds=folds, seed=seed)
    count = len(fold_index)
    torch_device = resolve_device(device)
    started = time.perf_counter()
    data = _Data(
        tumor=torch.from_numpy(np.stack([s.tumor for s in samples])).to(torch_device),
        loat=torch.from_numpy(np.stack([s.loat for s in samples])).to(torch_device),
        labels=labels,
        log_diameter=np.log(np.asarray([max(s.diameter_mm, 1.0) for s in samples])),
    )
    settings = _RunSettings(
        arch,
        roi_spec.channels,
        dropout,
        patience,
        batch_size,
        lr,
        progress,
        layout=layout,
        phases=len(roi_spec.phases),
        pretrained=None if pretrained is None else Path(pretrained),
        augment=augment,
        size_weight=float(size_target),
    )

    fold_reports: list[dict[str, Any]] = []
    members: list[FusionNet] = []
    centres: list[float] = []
    scales: list[float] = []
    fold_of = np.zeros(labels.size, dtype=np.int64)
    oof = np.zeros(labels.size, dtype=np.float64)
    all_index = np.arange(labels.size, dtype=np.intp)
    for f, val_index in enumerate(fold_index):
        run = _train_run(
            data,
            np.setdiff1d(all_index, val_index),
            val_index,
            settings,
            epochs=epochs,
            seed=seed * 1000 + f + 1,
            stage=f"fold {f + 1}/{count}",
        )
        # The size head served training only: the shipped member is the classifier.
        member = _member(settings)
        member.load_state_dict(
            {k: v for k, v in run.state.items() if not k.startswith("size_head.")}
        )
        members.append(member)
        # Standardised by the member's own validation logits (no labels): fold networks stopped
        # at different epochs differ in offset and scale, which pooling raw logits would mix.
        centre, scale = float(np.mean(run.val_logits)), float(np.std(run.val_logits))
        if not scale > 1e-4:
            raise ValueError(
                f"fold {f + 1}/{count}: its network gives every validation study the same "
                f"logit ({centre:.4g}): nothing to rank or calibrate"
            )
        centres.append(centre)
        scales.append(scale)
        oof[val_index] = (run.val_logits - centre) / scale
        fold_of[val_index] = f
        report: dict[str, Any] = {
            "studies": int(val_index.size),
            "mvi": int(labels[val_index].sum()),
            "best_epoch": run.best_epoch,
            "val_auc": _round(run.best_auc, 4),
            "loss_history": [_round(v, 5) for v in run.losses],
            "val_auc_history": [_round(v, 4) for v in run.val_aucs],
        }
        if cv == "loco":
            report["centre"] = samples[int(val_index[0])].centre
        fold_reports.append(report)
    total_seconds = time.perf_counter() - started

    # Every figure is computed with the values as the card stores them (rounded), which are the
    # ones the node applies: the threshold is rounded down so that the study it was chosen at
    # stays on the high side.
    a, b = (_round(v) for v in platt_fit(labels, oof))
    calibrated = platt_apply(oof, a, b)
    threshold = _stored_threshold(labels, calibrated)
    auc_value, low, high = delong_ci(labels, calibrated)
    sensitivity, specificity, accuracy = sens_spec_acc(labels, calibrated, threshold)
    intervals = threshold_metrics(labels, calibrated, threshold, n_boot=500, seed=seed)
    optimism = optimism_corrected(labels, oof, n_boot=200, seed=seed)
    dl_logit = a * oof + b
    combined = _combined(dl_logit, samples, labels, seed)
    clinical = _fit_logistic(CLINICAL_FEATURES, dl_logit, samples, labels)
    if "error" not in clinical:
        clinical_columns = _columns(CLINICAL_FEATURES, dl_logit, samples)
        clinical.update(_own_threshold(clinical, clinical_columns, labels))
        clinical["optimism_corrected"] = logistic_optimism(
            clinical_columns,
            labels,
            select=False,
            n_boot=200,
            seed=seed,
        )
    network = FusionEnsemble(members, centres, scales)

    # A fresh salt per site model (no table of hashed IDs carries over between models); a demo
    # model's is seeded so that its card is reproducible.
    id_salt = (
        hashlib.sha256(f"mvi-node-demo-ids:{seed}".encode()).hexdigest()[:16]
        if demo
        else secrets.token_hex(8)
    )
    site_names = sorted({s.centre for s in samples if s.centre})
    base_name = "mvi-fusion" if arch == "fusion" else "mvi-tumor-only"
    n1 = int(labels.sum())
    card: dict[str, Any] = {
        "name": name or (f"{base_name}-demo" if demo else base_name),
        "version": version,
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "kind": CARD_KIND,
        "arch": arch,
        "layout": layout,
        "demo": bool(demo),
        "input": roi_spec.to_card(),
        "network": network.spec(),
        "output": (
            "logit = mean over the fold networks of (logit - network.centre) / network.scale; "
            "p = sigmoid(calibration.a * logit + calibration.b)"
        ),
        "calibration": {
            "method": "platt",
            "a": a,
            "b": b,
            "fitted_on": "standardised out-of-fold logits of the shipped fold networks",
        },
        "threshold": threshold,
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
            "note": (
                "each study scored by the shipped fold network that did not train on it; each "
                "fold's epoch was chosen on its own validation studies: mildly optimistic"
            ),
        },
        "oof_intervals": intervals,
        "oof_optimism_corrected": optimism,
        "class_counts": {"mvi": n1, "no_mvi": int(labels.size - n1)},
        "combined_model": {
            "fitted_on": (
                "out-of-fold calibrated DL logit (forced) and the clinical candidates selected "
                "(model.validation.select_predictors)"
            ),
            # Its dl_logit is this calibration of the network's logit, whatever a later
            # `recalibrate` does to the card's own: the coefficients were fitted on this scale.
            "dl_calibration": {"a": a, "b": b},
            **combined,
        },
        "clinical_model": {"features": list(CLINICAL_FEATURES), **clinical},
        "training_ids": {
            "hash": "sha256(salt + ':' + id), first 16 hex",
            "salt": id_salt,
            "studies": [hash_id(s.study_id, id_salt) for s in samples],
            "patients": [hash_id(s.patient, id_salt) for s in samples],
            "fold": [int(f) for f in fold_of],
            "centres": site_names,
        },
        "libraries": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "training": {
            "seed": int(seed),
            "cv": cv,
            "group_by": "centre" if cv == "loco" else group_by,
            "folds": count,
            "patients": len({s.patient for s in samples}),
            "max_epochs": int(epochs),
            "patience": int(patience),
            "epoch_choice": "per fold, best validation AUC (earliest on ties)",
            "init": "random" if pretrained is None else "imagenet",
            "pretrained_sha256": None if pretrained is None else file_sha256(Path(pretrained)),
            "shipped": "ensemble of the fold networks (mean logit)",
            "batch_size": int(batch_size),
            "lr": float(lr),
            "weight_decay": _WEIGHT_DECAY,
            "optimizer": "AdamW",
            "weights_ema_decay": _EMA_DECAY,
            "loss": "BCEWithLogits, pos_weight = negatives / positives",
            "size_target": (
                {
                    "weight": float(size_target),
                    "target": "log maximum tumour diameter, standardised per fold",
                    "loss": "mean squared error of a second head on the same features",
                    "shipped": False,
                }
                if size_target > 0
                else None
            ),
            "augmentation": {
                "level": augment,
                "rotation_deg": _ROTATION_DEG,
                "shift_fraction": _SHIFT / 2.0,
                "flips": True,
                "intensity_scale": _INTENSITY_SCALE,
                "intensity_shift": _STRONG_SHIFT if augment == "strong" else _INTENSITY_SHIFT,
                **(
                    {"zoom": _ZOOM, "blur_sigma_px": _BLUR_SIGMA, "noise_sd": _NOISE}
                    if augment == "strong"
                    else {}
                ),
            },
            "studies": int(labels.size),
            "device": str(torch_device),
            "seconds": round(total_seconds, 1),
            "folds_detail": fold_reports,
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


#: How ``recalibrate`` sets the threshold: keep the card's probability, or Youden on local data.
THRESHOLD_RULES: tuple[str, ...] = ("keep", "youden")


def recalibrated_card(
    card: dict[str, Any],
    logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    threshold_rule: str = "keep",
) -> dict[str, Any]:
    """A copy of ``card`` with Platt intercept and slope refitted on a site's own studies.

    Only the two calibration parameters change (and, with ``threshold_rule="youden"``, the
    threshold); the networks and everything they learnt stay. ``logits`` are the shipped model's
    uncalibrated logits (:attr:`model.inference.Prediction.logit`) on the local studies. The card
    keeps the previous calibration and the local figures before and after.

    Raises
    ------
    ValueError
        When the local studies lack a class, or the refitted slope is not positive (the model does
        not rank the local studies: recalibration cannot rescue it).
    """
    from model.validation import calibration

    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {threshold_rule!r}; expected {THRESHOLD_RULES}")
    y = np.asarray(labels, dtype=np.int64)
    x = np.asarray(logits, dtype=np.float64)
    old = card["calibration"]
    before = platt_apply(x, float(old["a"]), float(old["b"]))
    a, b = (_round(v) for v in platt_fit(y, x))
    after = platt_apply(x, a, b)
    threshold = float(card["threshold"])
    if threshold_rule == "youden":
        threshold = _stored_threshold(y, after)

    def local(p: npt.NDArray[np.float64]) -> dict[str, Any]:
        fit = calibration(y, p)
        sensitivity, specificity, _ = sens_spec_acc(y, p, threshold)
        return {
            "brier": _round(brier(y, p), 4),
            "calibration_intercept": fit["intercept"].get("value"),
            "calibration_slope": fit["slope"].get("value"),
            "sensitivity": _round(sensitivity, 4),
            "specificity": _round(specificity, 4),
        }

    updated = copy.deepcopy(card)
    updated.pop("weights_sha256", None)
    history = list(old.get("history", []))
    history.append({k: v for k, v in old.items() if k != "history"})
    updated["calibration"] = {
        "method": "platt",
        "a": a,
        "b": b,
        "fitted_on": f"{y.size} local studies ({int(y.sum())} with MVI): intercept and slope only",
        "recalibrated": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "threshold_rule": threshold_rule,
        "local_before": local(before),
        "local_after": local(after),
        "history": history,
    }
    updated["threshold"] = threshold
    return updated
