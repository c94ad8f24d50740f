"""Liver, tumour and LOAT segmentation on dual-phase (arterial + portal-venous) CT.

The segmenter is a small MONAI 3-D U-Net with two input channels (arterial, portal-venous) and
four output classes (:data:`LABELS`). It runs on an isotropic working grid (the model card's
``input.spacing_mm``, about 2 mm): both phases are resampled onto it, windowed to the card's HU
range and scaled to ``[0, 1]``, cropped to the body, segmented with a sliding window, and the
label map is resampled back onto the arterial grid with nearest-neighbour interpolation before
:func:`postprocess` turns it into :class:`Masks`.

The portal-venous image must already be registered and resampled onto the arterial grid
(:mod:`model.registration`): the pipeline registers first, and training uses the same path.

Nothing here imports :mod:`node` or reads settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet, UNet

from model.checkpoint import CheckpointError, load_checkpoint
from model.measure import component_sizes, largest_component
from model.registration import resample_onto, working_grid

__all__ = [
    "BODY_HU",
    "DEFAULT_WINDOW_HU",
    "FAT_HU",
    "LABELS",
    "NETWORK_CLASSES",
    "SEGMENTER_CARD_KEYS",
    "Masks",
    "UNetSegmenter",
    "WorkingInput",
    "autocast",
    "build_network",
    "default_network_spec",
    "dice",
    "labels_from_masks",
    "postprocess",
    "predict_labels",
    "prepare_input",
    "resolve_device",
]

#: Class indices of the network's output (also written into every segmenter's model card).
LABELS: dict[str, int] = {"background": 0, "liver": 1, "tumor": 2, "loat": 3}

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


def postprocess(labels: npt.NDArray[Any], arterial_hu: npt.NDArray[Any], source: str) -> Masks:
    """Turn a label map (:data:`LABELS`) on the arterial grid into :class:`Masks`.

    * tumour: the largest 26-connected component of label ``tumor``
      (:func:`model.measure.largest_component`; the report describes one lesion, and the count of
      components is kept so a multifocal case can be flagged);
    * LOAT: label ``loat`` restricted to fat, :data:`FAT_HU` on the arterial image (a label
      boundary that bleeds into the stomach wall or vessels must not inflate the area);
    * liver: labels ``liver`` and ``tumor`` (dropped tumour components stay liver).

    Parameters
    ----------
    labels
        Integer ``[k, j, i]`` label map.
    arterial_hu
        Arterial HU on the same grid.
    source
        Recorded in :attr:`Masks.source`.
    """
    labels = np.asarray(labels)
    hu = np.asarray(arterial_hu)
    if labels.ndim != 3 or labels.shape != hu.shape:
        raise ValueError(
            f"labels {labels.shape} and arterial_hu {hu.shape} must be 3-D of the same shape"
        )
    all_tumor = labels == LABELS["tumor"]
    tumor, components = largest_component(all_tumor)
    liver = (labels == LABELS["liver"]) | (labels == LABELS["tumor"])
    low, high = FAT_HU
    loat = (labels == LABELS["loat"]) & (hu >= low) & (hu <= high)
    return Masks(
        liver=liver.astype(np.uint8),
        tumor=tumor.astype(np.uint8),
        loat=loat.astype(np.uint8),
        tumor_components=components,
        source=source,
        tumor_component_voxels=component_sizes(all_tumor),
    )


def labels_from_masks(
    liver: npt.NDArray[Any], tumor: npt.NDArray[Any], loat: npt.NDArray[Any]
) -> UInt8Volume:
    """Combine binary masks into one label map (tumour over liver; LOAT over both)."""
    labels = np.zeros(np.shape(liver), dtype=np.uint8)
    labels[np.asarray(liver) > 0] = LABELS["liver"]
    labels[np.asarray(tumor) > 0] = LABELS["tumor"]
    labels[np.asarray(loat) > 0] = LABELS["loat"]
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
    """The card's ``network`` entry of the default small U-Net (2 inputs, 4 classes)."""
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


def predict_labels(
    network: torch.nn.Module,
    image: npt.NDArray[np.float32],
    roi_kji: Sequence[int],
    device: torch.device,
    overlap: float = 0.25,
) -> UInt8Volume:
    """Sliding-window inference over a ``[2, k, j, i]`` input; argmax labels ``[k, j, i]``."""
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
    labels = torch.argmax(logits[0].float(), dim=0).to(torch.uint8)
    return labels.cpu().numpy()


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
        if card.get("labels") != LABELS:
            raise CheckpointError(f"{directory}: labels {card.get('labels')} differ from {LABELS}")
        network = build_network(card["network"])
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{directory}: weights do not fit the network of the card: {exc}"
            ) from exc
        return cls(network, card, device)

    def segment(self, arterial: sitk.Image, portal_venous_on_arterial: sitk.Image) -> Masks:
        """Segment liver, tumour and LOAT.

        Parameters
        ----------
        arterial
            Arterial HU image.
        portal_venous_on_arterial
            Portal-venous HU image already registered and resampled onto the arterial grid.

        Returns
        -------
        Masks
            On the arterial grid, ``source="unet"``.
        """
        work = prepare_input(
            arterial, portal_venous_on_arterial, self.working_spacing_mm, self.window_hu
        )
        labels = work.uncrop(predict_labels(self.network, work.image, self.roi_kji, self.device))
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(work.reference)
        on_arterial = resample_onto(label_image, arterial, label=True)
        return postprocess(
            sitk.GetArrayFromImage(on_arterial), sitk.GetArrayViewFromImage(arterial), "unet"
        )
