"""The dual-branch ResNet18 fusion network and its tumour-only comparator, in two layouts.

Each branch is torchvision's ResNet18 with its first convolution widened to its input channels
and its classifier removed, so it yields the 512 globally pooled features. Two branch layouts,
because the method's abstract allows both and the group's earlier CGAResNet18 used the second:

* ``"region"``: the branches are the regions, tumour and LOAT, each carrying both phases'
  slices as channels. ``"fusion"`` concatenates the two branches' features (1024) → dropout →
  linear → one logit; ``"tumor-only"`` runs the tumour branch alone.
* ``"phase"``: the branches are the phases, arterial and portal-venous, each carrying the tumour
  and the LOAT slices of its phase as channels. ``"tumor-only"`` keeps the two phase branches
  with the tumour slices only.
* ``"phase-tiled"``: the phase branches again, but each sees its tumour crop and its LOAT crop
  side by side in one image (``H × 2W``) instead of stacked as channels, so the first
  convolution never adds a tumour pixel to an unrelated fat pixel. Its tumour-only comparator is
  the phase layout's.

The network returns logits; probabilities and calibration belong to :mod:`model.inference`.
Inputs are ROIs in ``[0, 1]``; with ImageNet weights they are normalised as those weights expect
(``normalise``: the mean and standard deviation of ImageNet's three channel statistics, since a
CT channel is grey).

Pretrained ImageNet weights are optional and must be local: :func:`convert_weights` turns a
torchvision ``.pth`` file that a user supplies into safetensors (the only place in the project
that calls ``torch.load``, with ``weights_only=True``), and :meth:`FusionNet.load_pretrained`
reads that safetensors file. Checkpoints of this project are never unpickled.

Nothing here imports :mod:`node` or reads settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import resnet18

__all__ = [
    "ARCHS",
    "FEATURES",
    "IMAGENET_GREY",
    "LAYOUTS",
    "FusionEnsemble",
    "FusionNet",
    "convert_weights",
]

#: Network variants a model card may name.
ARCHS: tuple[str, ...] = ("fusion", "tumor-only")

#: Branch layouts: branches are regions (tumour, LOAT) or phases (arterial, portal-venous).
LAYOUTS: tuple[str, ...] = ("region", "phase", "phase-tiled")

#: ImageNet's normalisation for a grey channel: the means of torchvision's RGB mean and std.
IMAGENET_GREY: tuple[float, float] = (
    round((0.485 + 0.456 + 0.406) / 3, 4),
    round((0.229 + 0.224 + 0.225) / 3, 4),
)

#: Globally pooled features of one ResNet18 branch.
FEATURES = 512


def _branch(in_channels: int) -> nn.Module:
    net = resnet18(weights=None)
    # Same geometry as ResNet's stem (7×7, stride 2), only the channel count changes.
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


class FusionNet(nn.Module):
    """Dual-branch ResNet18 classifier: fusion or tumour-only, region or phase layout.

    Parameters
    ----------
    arch
        ``"fusion"`` or ``"tumor-only"``.
    in_channels
        Channels of each ROI (:attr:`model.roi.RoiSpec.channels`: phases × slices, phase-major).
    dropout
        Dropout before the linear head.
    layout
        ``"region"`` or ``"phase"`` (see the module's docstring).
    phases
        Phases in the ROI's channels; the phase layout needs exactly two.
    normalise
        ``(mean, std)`` applied to the inputs (ImageNet weights); ``None`` leaves them as cut.
    size_head
        A second linear head on the same features that predicts the tumour's size (training's
        auxiliary target, :meth:`forward_with_size`); shipped networks leave it out.
    """

    def __init__(
        self,
        arch: str = "fusion",
        in_channels: int = 6,
        dropout: float = 0.3,
        *,
        layout: str = "region",
        phases: int = 2,
        normalise: tuple[float, float] | None = None,
        size_head: bool = False,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if layout != "region" and (phases != 2 or in_channels % 2):
            raise ValueError(
                f"the phase layout needs ROIs of two phases (even channels), got {phases} phases "
                f"and {in_channels} channels"
            )
        if normalise is not None and not normalise[1] > 0:
            raise ValueError(f"normalise std must be positive, got {normalise}")
        self.arch = arch
        self.in_channels = in_channels
        self.layout = layout
        self.phases = phases
        self.normalise = None if normalise is None else (float(normalise[0]), float(normalise[1]))
        self.uses_loat = arch == "fusion"
        # Region layout: attributes tumor and loat (the checkpoints' key names since version 1).
        self.tumor: nn.Module | None = None
        self.loat: nn.Module | None = None
        self.arterial: nn.Module | None = None
        self.portal_venous: nn.Module | None = None
        if layout == "region":
            self.tumor = _branch(in_channels)
            self.loat = _branch(in_channels) if self.uses_loat else None
            branches = 2 if self.uses_loat else 1
        else:
            stacked = self.uses_loat and layout == "phase"
            per_phase = in_channels // 2 * (2 if stacked else 1)
            self.arterial = _branch(per_phase)
            self.portal_venous = _branch(per_phase)
            branches = 2
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURES * branches, 1)
        self.size_head = nn.Linear(FEATURES * branches, 1) if size_head else None

    def branches(self) -> list[nn.Module]:
        """The ResNet18 branches, in the order their features are concatenated."""
        found = [self.tumor, self.loat, self.arterial, self.portal_venous]
        return [b for b in found if b is not None]

    def spec(self) -> dict[str, Any]:
        """The model card's ``network`` entry."""
        entry: dict[str, Any] = {
            "backbone": "resnet18",
            "arch": self.arch,
            "in_channels": self.in_channels,
            "dropout": float(self.dropout.p),
            "features": FEATURES,
            "layout": self.layout,
        }
        if self.layout != "region":
            entry["phases"] = self.phases
        if self.normalise is not None:
            entry["normalise"] = {"mean": self.normalise[0], "std": self.normalise[1]}
        return entry

    def features(self, tumor: torch.Tensor, loat: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features before the head: ``(N, 512 × branches)``."""
        if self.uses_loat and loat is None:
            raise ValueError("the fusion network needs the LOAT ROI")
        if self.normalise is not None:
            mean, std = self.normalise
            tumor = (tumor - mean) / std
            loat = None if loat is None else (loat - mean) / std
        if self.layout == "region":
            assert self.tumor is not None
            parts = [self.tumor(tumor)]
            if self.loat is not None and loat is not None:
                parts.append(self.loat(loat))
            return torch.cat(parts, dim=1)
        # Phase-major channels: the first half is the arterial phase's slices.
        half = self.in_channels // 2
        inputs = []
        for index in range(2):
            own = [tumor[:, index * half : (index + 1) * half]]
            if self.uses_loat and loat is not None:
                own.append(loat[:, index * half : (index + 1) * half])
            # Stacked as channels ("phase"), or side by side along the width ("phase-tiled").
            inputs.append(torch.cat(own, dim=1 if self.layout == "phase" else 3))
        assert self.arterial is not None and self.portal_venous is not None
        return torch.cat([self.arterial(inputs[0]), self.portal_venous(inputs[1])], dim=1)

    def forward(self, tumor: torch.Tensor, loat: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(N,)`` from ROIs ``(N, C, H, W)``; ``loat`` is ignored by tumor-only."""
        return self.head(self.dropout(self.features(tumor, loat)))[:, 0]

    def forward_with_size(
        self, tumor: torch.Tensor, loat: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the size head's prediction ``(N,)`` each, from one pass of the branches.

        The size target makes the shared features carry the tumour's size, which a crop resized
        to a fixed pixel grid otherwise hides (``box`` and ``square`` crops).
        """
        if self.size_head is None:
            raise ValueError("this network has no size head (built with size_head=False)")
        features = self.dropout(self.features(tumor, loat))
        return self.head(features)[:, 0], self.size_head(features)[:, 0]

    def load_pretrained(self, path: Path) -> list[str]:
        """Initialise every branch from local torchvision ResNet18 weights (safetensors).

        The first convolution's RGB kernels are averaged and repeated over this network's
        channels, scaled by ``3 / in_channels`` so a grey input gives the activations ImageNet
        training saw; the classifier is dropped.

        Parameters
        ----------
        path
            A ``.safetensors`` file of a torchvision ``resnet18`` state dict
            (:func:`convert_weights` makes one from a ``.pth`` file).

        Returns
        -------
        list of str
            Branch keys left at their random initialisation (empty for a complete file).

        Raises
        ------
        ValueError
            When the file cannot be read or is not a ResNet18 state dict.
        """
        try:
            state = load_file(str(path), device="cpu")
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read pretrained weights {path}: {exc}") from exc
        conv1 = state.get("conv1.weight")
        if conv1 is None or tuple(conv1.shape[:1]) != (64,) or conv1.ndim != 4:
            raise ValueError(f"{path} is not a torchvision ResNet18 state dict (no conv1.weight)")
        adapted = {k: v for k, v in state.items() if not k.startswith("fc.")}
        mean = conv1.float().mean(dim=1, keepdim=True)
        missing: list[str] = []
        for branch in self.branches():
            conv1_layer = branch.get_submodule("conv1")
            assert isinstance(conv1_layer, nn.Conv2d)
            channels = int(conv1_layer.in_channels)
            adapted["conv1.weight"] = mean.repeat(1, channels, 1, 1) * (3.0 / channels)
            try:
                result = branch.load_state_dict(adapted, strict=False)
            except RuntimeError as exc:
                raise ValueError(f"{path} does not fit ResNet18: {exc}") from exc
            missing.extend(result.missing_keys)
        return sorted(set(missing))


class FusionEnsemble(nn.Module):
    """The shipped MVI model: the cross-validation's fold networks, scored by their mean logit.

    Each member is the network of one fold, saved at the epoch its own validation chose, and its
    logit is standardised, ``(logit - centre) / scale``, by the mean and standard deviation of
    its logits over its own validation studies (no labels involved): fold networks stopped at
    different epochs have different offsets and scales, and pooling them raw made the
    out-of-fold AUC 0.58 where each fold's was 0.73-0.83. Every figure of the model card
    (calibration, threshold, sensitivity, specificity, the combined model) is computed from these
    standardised logits on the studies each member did not see; a new study is unseen by every
    member, so their mean is on the scale the calibration was fitted on. (A separately trained
    final network was not: shipped with the out-of-fold calibration, it called every new study
    high risk.)

    Parameters
    ----------
    members
        Fold networks of one arch and channel count.
    centre, scale
        Per member standardisation; zeros and ones when left out.
    """

    centre: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        members: list[FusionNet],
        centre: list[float] | None = None,
        scale: list[float] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        kinds = {(m.arch, m.in_channels, m.layout, m.normalise) for m in members}
        if len(kinds) != 1:
            raise ValueError(f"ensemble members differ in arch or channels: {sorted(kinds)}")
        count = len(members)
        centre = [0.0] * count if centre is None else list(centre)
        scale = [1.0] * count if scale is None else list(scale)
        if len(centre) != count or len(scale) != count:
            raise ValueError(f"{count} members need {count} centres and scales")
        if not all(v > 0 for v in scale):
            raise ValueError(f"member scales must be positive, got {scale}")
        self.members = nn.ModuleList(members)
        # Buffers: saved with the weights (and so covered by the card's weights hash).
        self.register_buffer("centre", torch.tensor(centre, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.arch = members[0].arch
        self.in_channels = members[0].in_channels
        self.uses_loat = members[0].uses_loat

    @classmethod
    def build(cls, count: int, **network: Any) -> FusionEnsemble:
        """``count`` freshly initialised members (weights to be loaded); ``network`` as
        :class:`FusionNet` takes it."""
        if count < 1:
            raise ValueError(f"an ensemble needs at least one member, got {count}")
        return cls([FusionNet(**network) for _ in range(count)])

    def spec(self) -> dict[str, Any]:
        """The model card's ``network`` entry: a member's spec and the member count."""
        first = self.members[0]
        assert isinstance(first, FusionNet)
        return {
            **first.spec(),
            "members": len(self.members),
            "combine": "mean of (member logit - centre) / scale",
            "centre": [round(float(v), 6) for v in self.centre],
            "scale": [round(float(v), 6) for v in self.scale],
        }

    def member_logits(self, tumor: torch.Tensor, loat: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised logits of every member, ``(N, members)``."""
        raw = torch.stack([m(tumor, loat).float() for m in self.members], dim=1)
        return (raw - self.centre) / self.scale

    def forward(self, tumor: torch.Tensor, loat: torch.Tensor | None = None) -> torch.Tensor:
        """Mean standardised member logit ``(N,)``."""
        return self.member_logits(tumor, loat).mean(dim=1)


def convert_weights(pth_in: Path, safetensors_out: Path) -> int:
    """Convert a torchvision ``.pth`` state dict into a safetensors file.

    ``torch.load`` runs with ``weights_only=True``: tensors and plain containers only, never
    arbitrary objects. This is for a user's pretrained file; the project's own checkpoints are
    safetensors from the start and are never read with ``torch.load``.

    Parameters
    ----------
    pth_in
        The ``.pth`` file: a state dict, or a dict holding one under ``state_dict`` / ``model``.
    safetensors_out
        Where to write.

    Returns
    -------
    int
        Number of tensors written.

    Raises
    ------
    ValueError
        When the file cannot be read safely or holds no tensors.
    """
    try:
        loaded: Any = torch.load(Path(pth_in), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ValueError(f"cannot read {pth_in} as a weights-only torch file: {exc}") from exc
    except Exception as exc:  # the unpickler raises its own types for refused globals
        raise ValueError(f"{pth_in} is not a plain state dict: {exc}") from exc
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{pth_in} holds a {type(loaded).__name__}, not a state dict")
    tensors = {
        str(k): v.detach().contiguous() for k, v in loaded.items() if isinstance(v, torch.Tensor)
    }
    if not tensors:
        raise ValueError(f"{pth_in} holds no tensors")
    Path(safetensors_out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(safetensors_out))
    return len(tensors)
