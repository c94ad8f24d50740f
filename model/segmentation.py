"""Liver, tumour, LOAT, stomach and aorta segmentation on dual-phase (arterial + portal-venous) CT.

The segmenter is a small MONAI 3-D U-Net with two input channels (arterial, portal-venous) and
six output classes (:data:`LABELS`). It runs on an isotropic working grid (the model card's
``input.spacing_mm``, about 2 mm): both phases are resampled onto it, windowed to the card's HU
range and scaled to ``[0, 1]``, cropped to the body, segmented with a sliding window, and the
label map is resampled back onto the arterial grid with nearest-neighbour interpolation before
:func:`postprocess` turns it into :class:`Masks`. A segmenter trained before the stomach and the
aorta were labels (:data:`LEGACY_LABELS`) still loads; its masks then have no stomach or aorta.

The segmenter reports its own uncertainty (:func:`predict_labels`): the mean normalised entropy
of the softmax over the working-grid voxels it labels as anything but background. Its model card
records what it was trained on and how uncertain it was on its validation studies
(:mod:`model.train_seg`); :func:`training_range_of` and :func:`uncertainty_limit_of` read those
entries for the node's quality gates without the gates knowing the card's JSON layout.

The portal-venous image must already be registered and resampled onto the arterial grid
(:mod:`model.registration`): the pipeline registers first, and training uses the same path.

Nothing here imports :mod:`node` or reads settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet, UNet
from scipy import ndimage

from model.checkpoint import CheckpointError, load_checkpoint
from model.measure import labelled_components
from model.registration import resample_onto, working_grid

__all__ = [
    "BODY_HU",
    "DEFAULT_WINDOW_HU",
    "FAT_HU",
    "LABELS",
    "LEGACY_LABELS",
    "LIVER_COMPONENT_SHARE",
    "LOAT_LIVER_MM",
    "NETWORK_CLASSES",
    "SEGMENTER_CARD_KEYS",
    "SEGMENTER_CARD_VERSION",
    "Masks",
    "Prediction",
    "TrainingRange",
    "UNetSegmenter",
    "WorkingInput",
    "autocast",
    "build_network",
    "default_network_spec",
    "dice",
    "labels_from_masks",
    "postprocess",
    "predict_labels",
    "prediction_from_logits",
    "prepare_input",
    "resolve_device",
    "training_range_of",
    "tumor_uncertainty_limit_of",
    "uncertainty_limit_of",
]

#: Class indices of the network's output (also written into every segmenter's model card).
LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "tumor": 2,
    "loat": 3,
    "stomach": 4,
    "aorta": 5,
}

#: The label map of segmenters trained before the stomach and the aorta were labels (card
#: version 1). Its indices are those of :data:`LABELS`, so the same post-processing reads both; such
#: a segmenter's :class:`Masks` have ``stomach`` and ``aorta`` ``None``.
LEGACY_LABELS: dict[str, int] = {"background": 0, "liver": 1, "tumor": 2, "loat": 3}

#: Layout version of a segmenter's model card: 2 added the stomach and aorta labels and the
#: ``training_range`` and ``quality`` entries. Part of the demo segmenter's cache key, so a demo
#: model cached with an older card is rebuilt rather than reused.
SEGMENTER_CARD_VERSION: int = 2

#: Fat on CT: LOAT voxels outside this HU range (arterial image) are not fat and are dropped.
FAT_HU: tuple[float, float] = (-190.0, -30.0)

#: Intensity window of the network input: wide enough to keep fat (-100) apart from air and soft
#: tissue, narrow enough that enhancement differences of tens of HU stay visible.
DEFAULT_WINDOW_HU: tuple[float, float] = (-250.0, 350.0)

#: Arterial voxels above this HU are body; the segmenter only looks inside the body's box.
BODY_HU: float = -500.0

# Voxels of context kept around the body box (working grid).
_BODY_MARGIN = 4

#: The networks a card may name. A fixed table, so a card can never make the loader import an
#: arbitrary class.
NETWORK_CLASSES: dict[str, Any] = {"UNet": UNet, "BasicUNet": BasicUNet}

#: Card keys a segmenter needs beyond :data:`model.checkpoint.REQUIRED_CARD_KEYS`.
SEGMENTER_CARD_KEYS: tuple[str, ...] = ("labels", "input", "network", "training")

UInt8Volume = npt.NDArray[np.uint8]


# --------------------------------------------------------------------------------------------
# Masks and post-processing
# --------------------------------------------------------------------------------------------


#: Liver components a segmenter's output keeps besides the largest: those of at least this share
#: of its volume (a liver that thick slices cut in two at a fissure keeps both parts; "liver" on
#: the spleen, a kidney or the stomach wall does not survive).
LIVER_COMPONENT_SHARE: float = 0.2

#: LOAT components a segmenter's output keeps: those with a voxel within this distance (mm) of
#: the kept liver. The lesser omentum runs from the liver's fissure for the ligamentum venosum to
#: the lesser curvature; fat labelled LOAT further from the liver is mesenteric, perirenal or
#: subcutaneous fat (on shifted phantoms such false LOAT lay a median 15-83 mm from the liver).
LOAT_LIVER_MM: float = 10.0

#: Tumour components a segmenter's output keeps: those at least this wide (mm) on some axial
#: slice, i.e. holding an in-plane point half of it from their edge. Narrower ones are specks of
#: partial volume at the liver's surface and noise: on the shifted cohort 7 of 8 studies had 1 to
#: 9 of them (0.1-1.9 ml, all but one at most 3.8 mm from their own edge, a median 2 mm inside
#: the liver), while the true tumours (14 mm across and more) reached 7.7 mm and more. Counted
#: in the axial plane, as the report's diameter is, so thick slices do not make a lesion look
#: thin. A lesion under 8 mm is below what the node measures; such components stay liver.
MIN_LESION_WIDTH_MM: float = 8.0


@dataclass(frozen=True)
class Masks:
    """Segmentation result on the arterial grid.

    Attributes
    ----------
    liver, tumor, loat
        uint8 ``[k, j, i]`` masks (0/1) on the arterial grid; ``liver`` includes the tumour.
    tumor_components
        Connected tumour components found before the largest one was kept (0: no tumour).
    source
        ``"unet"`` or ``"supplied"``.
    stomach, aorta
        uint8 masks of the stomach and the aorta, where the segmenter has those labels (the
        quality gates use them); ``None`` for a supplied SEG or an older segmenter.
    tumor_component_voxels
        Voxel counts of every tumour component, largest first (the others are dropped from
        ``tumor`` and stay ``liver``): the gates judge the number and size of the others.
    uncertainty
        The segmenter's mean normalised softmax entropy (0 = certain, 1 = uniform) over the
        voxels it labelled as foreground; ``None`` for a supplied SEG.
    tumor_uncertainty
        The same mean over the voxels the network labelled tumour (on the working grid, before
        the anatomical rules); ``None`` for a supplied SEG or when it labelled none.
    dropped_voxels
        Voxels of the segmenter's raw labels that the anatomical rules of :func:`postprocess`
        removed, per structure (``liver`` includes tumour found outside the kept liver,
        ``tumor`` counts only those, ``tumor_narrow`` tumour components narrower than
        :data:`MIN_LESION_WIDTH_MM`, left as liver, ``loat`` the fat far from the liver); empty
        when no rule applied (a supplied SEG).
    """

    liver: UInt8Volume
    tumor: UInt8Volume
    loat: UInt8Volume
    tumor_components: int
    source: str
    stomach: UInt8Volume | None = None
    aorta: UInt8Volume | None = None
    tumor_component_voxels: tuple[int, ...] = ()
    uncertainty: float | None = None
    tumor_uncertainty: float | None = None
    dropped_voxels: Mapping[str, int] = dataclasses.field(default_factory=dict)


def postprocess(
    labels: npt.NDArray[Any],
    arterial_hu: npt.NDArray[Any],
    source: str,
    label_map: Mapping[str, int] = LEGACY_LABELS,
    spacing_mm: Sequence[float] | None = None,
) -> Masks:
    """Turn a label map on the arterial grid into :class:`Masks`.

    * tumour: the largest 26-connected component of label ``tumor``
      (the report describes one lesion, and the count and sizes of all
      components are kept so a multifocal case can be flagged);
    * LOAT: label ``loat`` restricted to fat, :data:`FAT_HU` on the arterial image (a label
      boundary that bleeds into the stomach wall or vessels must not inflate the area);
    * liver: labels ``liver`` and ``tumor`` (dropped tumour components stay liver);
    * stomach, aorta: their labels as they are (no component filtering: the quality gates
      measure them, they are not reported), when ``label_map`` has them, else ``None``.

    With ``spacing_mm`` (a segmenter's output), anatomical rules apply first, because a network
    off its training distribution labels look-alike tissue elsewhere: liver and tumour are kept
    only in the largest liver component and those of :data:`LIVER_COMPONENT_SHARE` of its size
    (a hepatic tumour lies in the liver), LOAT only in fat components that come within
    :data:`LOAT_LIVER_MM` of that liver, and tumour only in components at least
    :data:`MIN_LESION_WIDTH_MM` wide on an axial slice. What they removed is counted in
    :attr:`Masks.dropped_voxels`. Without it (a reader's supplied SEG) the labels are kept as
    drawn.

    Parameters
    ----------
    labels
        Integer ``[k, j, i]`` label map.
    arterial_hu
        Arterial HU on the same grid.
    source
        Recorded in :attr:`Masks.source`.
    label_map
        The classes ``labels`` can hold: :data:`LABELS` for a current segmenter; the default,
        :data:`LEGACY_LABELS`, for a supplied SEG or an older segmenter, which know no stomach or
        aorta (an empty mask would claim that the organ was looked for and not found).
    spacing_mm
        ``(x, y, z)`` voxel spacing of the grid; given, the anatomical rules apply.
    """
    labels = np.asarray(labels)
    hu = np.asarray(arterial_hu)
    if labels.ndim != 3 or labels.shape != hu.shape:
        raise ValueError(
            f"labels {labels.shape} and arterial_hu {hu.shape} must be 3-D of the same shape"
        )
    all_tumor = labels == label_map["tumor"]
    liver = (labels == label_map["liver"]) | all_tumor
    low, high = FAT_HU
    loat = (labels == label_map["loat"]) & (hu >= low) & (hu <= high)
    dropped: dict[str, int] = {}
    if spacing_mm is not None:
        kept_liver = _main_liver(liver)
        dropped["liver"] = int(np.count_nonzero(liver & ~kept_liver))
        dropped["tumor"] = int(np.count_nonzero(all_tumor & ~kept_liver))
        liver, all_tumor = kept_liver, all_tumor & kept_liver
        near = _near_liver(loat, liver, spacing_mm, LOAT_LIVER_MM)
        dropped["loat"] = int(np.count_nonzero(loat & ~near))
        loat = near
        wide = _wide_components(all_tumor, spacing_mm, MIN_LESION_WIDTH_MM)
        dropped["tumor_narrow"] = int(np.count_nonzero(all_tumor & ~wide))
        all_tumor = wide
    # One labelling gives the kept lesion, the count and the sizes the gates judge.
    lesions = labelled_components(all_tumor)
    sizes = lesions.sizes

    # Boolean masks are handed on as uint8 views (one byte, 0 or 1): no copy of the grid.
    def organ(name: str) -> UInt8Volume | None:
        if name not in label_map:
            return None
        return (labels == label_map[name]).view(np.uint8)

    return Masks(
        liver=liver.view(np.uint8),
        tumor=lesions.largest().view(np.uint8),
        loat=loat.view(np.uint8),
        tumor_components=len(sizes),
        source=source,
        stomach=organ("stomach"),
        aorta=organ("aorta"),
        tumor_component_voxels=sizes,
        dropped_voxels=dropped,
    )


def _main_liver(liver: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The largest liver component and those of at least :data:`LIVER_COMPONENT_SHARE` of it."""
    parts = labelled_components(liver)
    if not parts.sizes:
        return liver
    largest = parts.sizes[0]
    return parts.select([False, *(size >= LIVER_COMPONENT_SHARE * largest for size in parts.sizes)])


def _wide_components(
    mask: npt.NDArray[np.bool_], spacing_mm: Sequence[float], width_mm: float
) -> npt.NDArray[np.bool_]:
    """The components of ``mask`` that hold, on some slice, a point ``width_mm / 2`` in-plane
    from their edge (the 2-D Euclidean distance to the nearest pixel outside)."""
    parts = labelled_components(mask)
    if not parts.sizes:
        return mask
    keep = np.zeros(len(parts.sizes) + 1, dtype=bool)
    sampling = (float(spacing_mm[1]), float(spacing_mm[0]))  # rows (y), columns (x)
    # Padded by one where the box lies inside the grid (the grid beyond the box is outside the
    # mask), not where it reaches the grid's edge: the image's border is not the mask's edge.
    assert parts.box is not None
    pad = [
        (int(side.start > 0), int(side.stop < size))
        for side, size in zip(parts.box[1:], parts.shape[1:], strict=True)
    ]
    for plane in parts.numbered:
        if not plane.any():
            continue
        padded = np.pad(plane, pad)
        # Two 26-connected components never touch in a slice: one transform serves them all.
        depth = ndimage.distance_transform_edt(padded > 0, sampling=sampling)
        keep[np.unique(padded[depth >= width_mm / 2.0])] = True
    return parts.select(keep)


def _near_liver(
    loat: npt.NDArray[np.bool_],
    liver: npt.NDArray[np.bool_],
    spacing_mm: Sequence[float],
    reach_mm: float,
) -> npt.NDArray[np.bool_]:
    """The components of ``loat`` with a voxel within ``reach_mm`` of ``liver``."""
    if not loat.any() or not liver.any():
        return np.zeros_like(loat)
    # The distance is only needed around the LOAT candidates: crop to their box plus the reach,
    # so a 512 × 512 × 200 study does not pay for a distance map of the whole body.
    spacing_kji = np.asarray(spacing_mm, dtype=np.float64)[::-1]
    margin = np.ceil(reach_mm / spacing_kji).astype(int) + 1
    where = np.argwhere(loat)
    low = np.maximum(where.min(axis=0) - margin, 0)
    high = np.minimum(where.max(axis=0) + margin + 1, loat.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    liver_box = liver[box]
    if not liver_box.any():
        return np.zeros_like(loat)
    image = sitk.GetImageFromArray(liver_box.view(np.uint8))
    image.SetSpacing([float(v) for v in spacing_mm])
    distance = sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(
            image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
    )
    parts = labelled_components(loat[box])
    numbered = parts.whole()
    keep = np.zeros(len(parts.sizes) + 1, dtype=bool)
    keep[numbered[distance <= reach_mm]] = True
    near = np.zeros_like(loat)
    near[box] = parts.select(keep)
    return near


def labels_from_masks(
    liver: npt.NDArray[Any],
    tumor: npt.NDArray[Any],
    loat: npt.NDArray[Any],
    stomach: npt.NDArray[Any] | None = None,
    aorta: npt.NDArray[Any] | None = None,
) -> UInt8Volume:
    """Combine binary masks into one :data:`LABELS` map.

    Painted in the order liver, stomach, aorta, tumour, LOAT, so where masks overlap the later
    wins: the tumour and the LOAT, the structures the report measures, are never lost to a
    neighbouring organ's boundary. A missing stomach or aorta mask paints nothing (those voxels
    stay background or whatever else covers them).
    """
    labels = np.zeros(np.shape(liver), dtype=np.uint8)
    painted: list[tuple[str, npt.NDArray[Any] | None]] = [
        ("liver", liver),
        ("stomach", stomach),
        ("aorta", aorta),
        ("tumor", tumor),
        ("loat", loat),
    ]
    for name, mask in painted:
        if mask is None:
            continue
        if np.shape(mask) != labels.shape:
            raise ValueError(f"{name} mask {np.shape(mask)} differs from liver {labels.shape}")
        labels[np.asarray(mask) > 0] = LABELS[name]
    return labels


def dice(prediction: npt.NDArray[Any], truth: npt.NDArray[Any]) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty."""
    a = np.asarray(prediction) > 0
    b = np.asarray(truth) > 0
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


# --------------------------------------------------------------------------------------------
# Devices and networks
# --------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.

    Raises
    ------
    ValueError
        For an unknown name, or CUDA asked for where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if resolved.type == "cuda" and resolved.index is not None:
        count = torch.cuda.device_count()
        if resolved.index >= count:
            raise ValueError(f"device {device!r} asked for, but this host has {count} CUDA devices")
    return resolved


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def default_network_spec(
    channels: Sequence[int] = (16, 32, 64, 128), num_res_units: int = 1
) -> dict[str, Any]:
    """The card's ``network`` entry of the default small U-Net (2 inputs, one output a class)."""
    return {
        "class": "UNet",
        "kwargs": {
            "spatial_dims": 3,
            "in_channels": 2,
            "out_channels": len(LABELS),
            "channels": [int(c) for c in channels],
            "strides": [2] * (len(channels) - 1),
            "num_res_units": int(num_res_units),
            "norm": "instance",
        },
    }


def build_network(spec: Mapping[str, Any]) -> torch.nn.Module:
    """Build the network a card's ``network`` entry describes (untrained).

    Raises
    ------
    CheckpointError
        When the class is not one of :data:`NETWORK_CLASSES` or the arguments do not fit it.
    """
    name = spec.get("class")
    kwargs = spec.get("kwargs")
    if name not in NETWORK_CLASSES or not isinstance(kwargs, Mapping):
        raise CheckpointError(
            f"network {name!r} is not supported (known: {', '.join(NETWORK_CLASSES)})"
        )
    try:
        network: torch.nn.Module = NETWORK_CLASSES[name](**dict(kwargs))
    except (TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"cannot build {name} from {dict(kwargs)}: {exc}") from exc
    return network


# --------------------------------------------------------------------------------------------
# Input preparation and inference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkingInput:
    """Network input on the working grid, cropped to the body.

    Attributes
    ----------
    image
        float32 ``[2, k, j, i]``: windowed arterial and portal-venous channels in ``[0, 1]``.
    box
        The crop of the full working grid, as slices along ``k, j, i``.
    reference
        The full working grid (SimpleITK image whose geometry the label map takes).
    """

    image: npt.NDArray[np.float32]
    box: tuple[slice, slice, slice]
    reference: Any

    def uncrop(self, cropped: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Place a ``[k, j, i]`` array of the crop into a zero array of the full working grid."""
        size = self.reference.GetSize()
        full = np.zeros((size[2], size[1], size[0]), dtype=cropped.dtype)
        full[self.box] = cropped
        return full

    def crop(self, volume: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The crop of a ``[k, j, i]`` array of the full working grid."""
        return volume[self.box]


def _window(hu: npt.NDArray[Any], window_hu: Sequence[float]) -> npt.NDArray[np.float32]:
    low, high = float(window_hu[0]), float(window_hu[1])
    scaled = (np.asarray(hu, dtype=np.float32) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def _body_box(hu: npt.NDArray[Any], margin: int) -> tuple[slice, slice, slice]:
    body = hu > BODY_HU
    if not body.any():
        return (slice(None), slice(None), slice(None))
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(body.any(axis=other))
        low = max(int(present[0]) - margin, 0)
        high = min(int(present[-1]) + margin + 1, hu.shape[axis])
        box.append(slice(low, high))
    return (box[0], box[1], box[2])


def prepare_input(
    arterial: sitk.Image,
    portal_venous_on_arterial: sitk.Image,
    spacing_mm: float,
    window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
) -> WorkingInput:
    """Resample both phases onto the working grid, window them and crop to the body.

    Parameters
    ----------
    arterial
        Arterial HU image.
    portal_venous_on_arterial
        Portal-venous HU image, registered and resampled onto the arterial grid.
    spacing_mm
        Isotropic working spacing.
    window_hu
        ``(low, high)`` HU mapped to ``0`` and ``1``.
    """
    if tuple(arterial.GetSize()) != tuple(portal_venous_on_arterial.GetSize()):
        raise ValueError(
            "the portal-venous image must be resampled onto the arterial grid first "
            f"(sizes {arterial.GetSize()} and {portal_venous_on_arterial.GetSize()})"
        )
    ap = working_grid(arterial, spacing_mm)
    pv = resample_onto(portal_venous_on_arterial, ap)
    ap_hu = sitk.GetArrayViewFromImage(ap)
    box = _body_box(ap_hu, _BODY_MARGIN)
    image = np.stack(
        [
            _window(ap_hu[box], window_hu),
            _window(sitk.GetArrayViewFromImage(pv)[box], window_hu),
        ]
    )
    return WorkingInput(image=np.ascontiguousarray(image), box=box, reference=ap)


class Prediction(NamedTuple):
    """What :func:`predict_labels` returns.

    Attributes
    ----------
    labels
        uint8 argmax labels ``[k, j, i]``.
    uncertainty
        Mean normalised softmax entropy over the voxels labelled anything but background, in
        ``[0, 1]`` (0: one class has all the probability; 1: all classes are equally likely).
        1.0 when no voxel is foreground: a segmentation that found nothing is not one to trust.
    class_uncertainty
        Per class index, the same mean over the voxels labelled that class alone (a class no
        voxel has is absent). The tumour's tells a faint lesion, whose extent the network is
        unsure of, from a clear one: the foreground's mean hides it among the liver's many
        confident voxels.
    """

    labels: UInt8Volume
    uncertainty: float
    class_uncertainty: Mapping[int, float] = MappingProxyType({})


# Voxels per block when turning logits into labels and entropy: each float32 temporary (the
# block, its log-softmax, their product) is then about 50 MB for six classes, whatever the volume.
_ENTROPY_BLOCK_VOXELS = 1 << 21


def prediction_from_logits(logits: torch.Tensor, background: int = 0) -> Prediction:
    """Argmax labels and uncertainty of class scores ``[classes, k, j, i]``.

    The normalised entropy of a voxel is ``-sum_c p_c ln p_c / ln(classes)`` with ``p`` the
    softmax of its scores, computed in float32 whatever the scores' dtype (mixed precision). The
    volume is processed a few slices at a time so that the temporaries stay small.

    Parameters
    ----------
    logits
        Raw network output of one volume (any device, any float dtype).
    background
        Class index left out of the uncertainty.
    """
    if logits.ndim != 4 or logits.shape[0] < 2:
        raise ValueError(f"logits must be [classes >= 2, k, j, i], got {tuple(logits.shape)}")
    classes, depth = int(logits.shape[0]), int(logits.shape[1])
    plane = max(1, int(logits.shape[2]) * int(logits.shape[3]))
    step = max(1, _ENTROPY_BLOCK_VOXELS // plane)
    labels = torch.empty(tuple(logits.shape[1:]), dtype=torch.uint8, device=logits.device)
    # Per class, summed in float64: millions of voxels of float32 entropy would lose digits.
    entropy_sums = torch.zeros(classes, dtype=torch.float64, device=logits.device)
    counts = torch.zeros(classes, dtype=torch.int64, device=logits.device)
    for k0 in range(0, depth, step):
        block = logits[:, k0 : k0 + step].float()
        log_p = torch.log_softmax(block, dim=0)
        entropy = -(log_p.exp() * log_p).sum(dim=0)
        argmax = torch.argmax(block, dim=0)
        labels[k0 : k0 + step] = argmax.to(torch.uint8)
        flat = argmax.reshape(-1)
        entropy_sums += torch.bincount(
            flat, weights=entropy.reshape(-1).double(), minlength=classes
        )
        counts += torch.bincount(flat, minlength=classes)
    sums, numbers = entropy_sums.cpu().tolist(), counts.cpu().tolist()
    scale = math.log(classes)

    def normalised(total: float, voxels: int) -> float:
        # Rounding can put a near-uniform softmax a hair outside [0, 1].
        return min(max(total / voxels / scale, 0.0), 1.0)

    foreground = sum(n for c, n in enumerate(numbers) if c != background)
    if foreground == 0:
        uncertainty = 1.0
    else:
        uncertainty = normalised(sum(t for c, t in enumerate(sums) if c != background), foreground)
    per_class = {c: normalised(sums[c], numbers[c]) for c in range(classes) if numbers[c]}
    return Prediction(
        labels=labels.cpu().numpy(),
        uncertainty=float(uncertainty),
        class_uncertainty=MappingProxyType(per_class),
    )


def predict_labels(
    network: torch.nn.Module,
    image: npt.NDArray[np.float32],
    roi_kji: Sequence[int],
    device: torch.device,
    overlap: float = 0.25,
) -> Prediction:
    """Sliding-window inference over a ``[2, k, j, i]`` input: labels and uncertainty.

    The uncertainty (:func:`prediction_from_logits`) is taken on the blended sliding-window
    output over the input as given (the body crop of the working grid), so the air around the
    body, where every network is certain, does not dilute it.
    """
    network.eval()
    batch = 4 if device.type == "cuda" else 1
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    with torch.inference_mode(), autocast(device):
        logits = sliding_window_inference(
            tensor,
            roi_size=[int(r) for r in roi_kji],
            sw_batch_size=batch,
            predictor=network,
            overlap=overlap,
            mode="gaussian",
        )
    assert isinstance(logits, torch.Tensor)
    with torch.inference_mode():
        return prediction_from_logits(logits[0], background=LABELS["background"])


# --------------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------------


class UNetSegmenter:
    """Dual-phase U-Net segmenter built from a checkpoint's model card and weights.

    Parameters
    ----------
    network
        The network, weights loaded.
    card
        Its model card (``input.spacing_mm``, ``input.window_hu``, ``training.patch_size``).
    device
        Where to run (``"auto"``: CUDA when available).
    """

    def __init__(
        self, network: torch.nn.Module, card: Mapping[str, Any], device: str = "auto"
    ) -> None:
        self.device = resolve_device(device)
        self.card = dict(card)
        try:
            self.working_spacing_mm: float = float(card["input"]["spacing_mm"])
            low, high = (float(v) for v in card["input"]["window_hu"])
            patch = [int(v) for v in card["training"]["patch_size"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"model card lacks a usable input/training entry: {exc}") from exc
        if len(patch) != 3 or min(patch) < 1 or not high > low or self.working_spacing_mm <= 0:
            raise CheckpointError(
                f"model card has an invalid patch size {patch}, window [{low}, {high}] or "
                f"spacing {self.working_spacing_mm}"
            )
        labels = _known_label_map(card.get("labels", LABELS))
        if labels is None:
            raise CheckpointError(
                f"model card labels {card.get('labels')} are neither {LABELS} nor the older "
                f"{LEGACY_LABELS}"
            )
        #: The classes this segmenter's output holds (:data:`LABELS` or :data:`LEGACY_LABELS`).
        self.labels: dict[str, int] = labels
        self.window_hu: tuple[float, float] = (low, high)
        # The card gives the patch as (x, y, z) voxels; tensors are indexed [k, j, i].
        self.roi_kji: tuple[int, int, int] = (patch[2], patch[1], patch[0])
        self.network = network.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, directory: Path, device: str = "auto") -> UNetSegmenter:
        """Load a segmenter checkpoint (see :mod:`model.checkpoint`).

        Raises
        ------
        CheckpointError
            When the directory is not a segmenter checkpoint or its weights do not fit the
            network its card describes.
        """
        state, card = load_checkpoint(directory, required=SEGMENTER_CARD_KEYS)
        if card.get("kind") != "segmenter":
            raise CheckpointError(f"{directory} holds a {card.get('kind')!r}, not a segmenter")
        labels = _known_label_map(card.get("labels"))
        if labels is None:
            raise CheckpointError(
                f"{directory}: labels {card.get('labels')} are neither {LABELS} nor the older "
                f"{LEGACY_LABELS}"
            )
        spec = card["network"]
        kwargs = spec.get("kwargs") if isinstance(spec, Mapping) else None
        outputs = kwargs.get("out_channels") if isinstance(kwargs, Mapping) else None
        if outputs is not None and outputs != len(labels):
            # Weights of the right shape would load, and argmax would name classes the card lacks.
            raise CheckpointError(
                f"{directory}: the network has {outputs} outputs for {len(labels)} labels"
            )
        network = build_network(card["network"])
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{directory}: weights do not fit the network of the card: {exc}"
            ) from exc
        return cls(network, card, device)

    def segment(self, arterial: sitk.Image, portal_venous_on_arterial: sitk.Image) -> Masks:
        """Segment liver, tumour, LOAT and (when the card has those labels) stomach and aorta.

        Parameters
        ----------
        arterial
            Arterial HU image.
        portal_venous_on_arterial
            Portal-venous HU image already registered and resampled onto the arterial grid.

        Returns
        -------
        Masks
            On the arterial grid, ``source="unet"``, with the :attr:`Masks.uncertainty` and
            :attr:`Masks.tumor_uncertainty` of :func:`predict_labels` (measured on the working
            grid, before resampling).
        """
        work = prepare_input(
            arterial, portal_venous_on_arterial, self.working_spacing_mm, self.window_hu
        )
        prediction = predict_labels(self.network, work.image, self.roi_kji, self.device)
        label_image = sitk.GetImageFromArray(work.uncrop(prediction.labels))
        label_image.CopyInformation(work.reference)
        on_arterial = resample_onto(label_image, arterial, label=True)
        masks = postprocess(
            sitk.GetArrayViewFromImage(on_arterial),  # read only, and no mask is a view of it
            sitk.GetArrayViewFromImage(arterial),
            "unet",
            self.labels,
            spacing_mm=arterial.GetSpacing(),
        )
        return dataclasses.replace(
            masks,
            uncertainty=prediction.uncertainty,
            tumor_uncertainty=prediction.class_uncertainty.get(self.labels["tumor"]),
        )


def _known_label_map(labels: Any) -> dict[str, int] | None:
    """:data:`LABELS` or :data:`LEGACY_LABELS` when ``labels`` is one of them, else None."""
    for known in (LABELS, LEGACY_LABELS):
        if labels == known:
            return dict(known)
    return None


# --------------------------------------------------------------------------------------------
# What the model card says about the training data and the segmenter's uncertainty
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRange:
    """What a segmenter's training studies spanned (the card's ``training_range``).

    Measured per training study on its truth masks (:func:`model.train_seg.training_range`); each
    range is ``(min, max)`` over the studies.

    Attributes
    ----------
    tumor_volume_ml, loat_volume_ml
        Volumes of the truth tumour and LOAT.
    liver_hu
        Mean HU of the liver without the tumour, by phase (``"arterial"``,
        ``"portal_venous"``; the portal-venous image registered onto the arterial grid, as
        training sees it). A phase no study could measure is absent.
    aorta_hu
        Mean HU inside the aorta by phase, or ``None`` when the training truth had no aorta
        (site training from manual SEGs).
    studies
        Number of training studies measured.
    """

    tumor_volume_ml: tuple[float, float]
    loat_volume_ml: tuple[float, float]
    liver_hu: Mapping[str, tuple[float, float]]
    aorta_hu: Mapping[str, tuple[float, float]] | None
    studies: int


def _bounds(value: Any) -> tuple[float, float] | None:
    """``[min, max]`` of a card as a tuple, or None when it is not two ordered finite numbers."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        return None
    try:
        low, high = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        return None
    return (low, high)


def _phase_bounds(value: Any) -> dict[str, tuple[float, float]] | None:
    if not isinstance(value, Mapping):
        return None
    phases: dict[str, tuple[float, float]] = {}
    for phase, entry in value.items():
        bounds = _bounds(entry)
        if bounds is None:
            return None
        phases[str(phase)] = bounds
    return phases


def training_range_of(card: Mapping[str, Any]) -> TrainingRange | None:
    """The :class:`TrainingRange` a segmenter's model card records.

    Returns
    -------
    TrainingRange or None
        ``None`` when the card has no ``training_range`` (a segmenter trained before card
        version 2) or it is not in the layout :mod:`model.train_seg` writes; a quality gate then
        has no range to check against.
    """
    entry = card.get("training_range")
    if not isinstance(entry, Mapping):
        return None
    tumor = _bounds(entry.get("tumor_volume_ml"))
    loat = _bounds(entry.get("loat_volume_ml"))
    liver = _phase_bounds(entry.get("liver_hu", {}))
    aorta = _phase_bounds(entry["aorta_hu"]) if "aorta_hu" in entry else None
    if tumor is None or loat is None or liver is None:
        return None
    if "aorta_hu" in entry and aorta is None:
        return None
    studies = entry.get("studies", 0)
    return TrainingRange(
        tumor_volume_ml=tumor,
        loat_volume_ml=loat,
        liver_hu=liver,
        aorta_hu=aorta,
        studies=int(studies) if isinstance(studies, int) else 0,
    )


def uncertainty_limit_of(card: Mapping[str, Any]) -> float | None:
    """The card's ``quality.uncertainty_limit``: above it a segmentation is not trusted.

    Returns
    -------
    float or None
        ``None`` when the card has none (an older segmenter) or it is not a positive finite
        number.
    """
    return _quality_limit(card, "uncertainty_limit")


def tumor_uncertainty_limit_of(card: Mapping[str, Any]) -> float | None:
    """The card's ``quality.tumor_uncertainty_limit``: above it the tumour's extent is a guess.

    ``None`` as :func:`uncertainty_limit_of` (a segmenter trained before the tumour's own
    uncertainty was measured has none).
    """
    return _quality_limit(card, "tumor_uncertainty_limit")


def _quality_limit(card: Mapping[str, Any], key: str) -> float | None:
    quality = card.get("quality")
    if not isinstance(quality, Mapping):
        return None
    limit = quality.get(key)
    if isinstance(limit, bool) or not isinstance(limit, int | float):
        return None
    value = float(limit)
    return value if math.isfinite(value) and value > 0 else None
