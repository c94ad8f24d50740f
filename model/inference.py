"""Scoring ROIs with a trained fusion model: checkpoint → calibrated MVI probability.

:meth:`FusionModel.load` reads a checkpoint written by :func:`model.train.train_fusion`
(safetensors + model card, through :func:`model.checkpoint.load_checkpoint`) and refuses, with
one line that says what is wrong, a folder that holds a pickle file, weights that do not match the
card's SHA-256, or a card this code cannot honour (unknown kind or arch, an ROI spec it cannot
cut, channels that disagree with the spec, combined-model predictors it does not know).

The network is the fold ensemble :func:`model.train.train_fusion` ships (the card's
``network.members``; a card without it holds one network, as earlier versions wrote).
:meth:`FusionModel.predict` runs the network in eval mode under ``torch.inference_mode`` (bf16
autocast on CUDA) in batches, and turns each logit into

* ``mvi_probability``: the Platt-calibrated probability (the card's ``calibration``),
* ``risk_category``: ``"high"`` when the probability reaches the threshold (the card's, or the
  pipeline's ``risk_threshold`` override),
* ``combined_probability``: the card's logistic model of the calibrated DL logit, the maximum
  tumour diameter and the LOAT area, when both measurements are given and the card has the model.

Nothing here imports :mod:`node` or reads settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dicom_sr.enum import RiskCategory
from model.checkpoint import CheckpointError, load_checkpoint
from model.fusion import ARCHS, FusionEnsemble, FusionNet
from model.roi import RoiSpec
from model.segmentation import autocast, resolve_device
from model.stats import logistic_predict
from model.train import CARD_KIND, FUSION_CARD_KEYS

__all__ = ["KNOWN_PREDICTORS", "PICKLE_SUFFIXES", "FusionModel", "Prediction"]

#: Files whose presence makes a model folder suspect: torch / pickle formats execute code when
#: loaded, and a checkpoint of this project never contains one.
PICKLE_SUFFIXES: frozenset[str] = frozenset(
    {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy", ".npz"}
)

#: Predictors a card's combined model may name (a fixed table: a card cannot make inference
#: compute anything else).
KNOWN_PREDICTORS: frozenset[str] = frozenset({"dl_logit", "max_diameter_mm", "loat_area_cm2"})


@dataclass(frozen=True)
class Prediction:
    """One study's scores.

    Attributes
    ----------
    mvi_probability
        Calibrated DL probability of MVI.
    logit
        The uncalibrated logit: the mean of the ensemble members' standardised logits.
    risk_category
        ``"high"`` when ``mvi_probability >= threshold``, else ``"low"``.
    threshold
        The threshold applied.
    combined_probability
        The combined logistic model's probability; ``None`` without measurements or model.
    """

    mvi_probability: float
    logit: float
    risk_category: RiskCategory
    threshold: float
    combined_probability: float | None


def _refuse_pickles(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder: point model_dir at a fusion model")
    suspects = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if suspects:
        raise CheckpointError(
            f"{directory} contains {', '.join(suspects)}: model folders hold only "
            "weights.safetensors and model_card.json (convert .pth weights with "
            "`mvi-node convert-weights`)"
        )


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"model card: {what} must be a finite number, got {value!r}")
    return float(value)


class FusionModel:
    """A loaded fusion (or tumour-only) model ready to score ROIs.

    Use :meth:`load`; the constructor takes an already built network and its card.
    """

    def __init__(
        self, network: FusionEnsemble | FusionNet, card: Mapping[str, Any], device: str = "auto"
    ) -> None:
        self.card = dict(card)
        self.device = resolve_device(device)
        self.arch = network.arch
        try:
            self.spec = RoiSpec.from_card(card["input"])
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"model card: cannot honour the input spec: {exc}") from exc
        if self.spec.channels != network.in_channels:
            raise CheckpointError(
                f"model card: the ROI spec gives {self.spec.channels} channels, the network "
                f"takes {network.in_channels}"
            )
        calibration = card["calibration"]
        if not isinstance(calibration, Mapping):
            raise CheckpointError("model card: calibration must be an object with a and b")
        self.a = _number(calibration.get("a"), "calibration.a")
        self.b = _number(calibration.get("b"), "calibration.b")
        self.threshold = _number(card["threshold"], "threshold")
        if not 0.0 <= self.threshold <= 1.0:
            raise CheckpointError(f"model card: threshold {self.threshold} is not in [0, 1]")
        self.combined = self._combined_model(card.get("combined_model"), calibration)
        ensemble = network if isinstance(network, FusionEnsemble) else FusionEnsemble([network])
        self.network = ensemble.to(self.device).eval()

    @staticmethod
    def _combined_model(entry: Any, calibration: Mapping[str, Any]) -> dict[str, Any] | None:
        if not isinstance(entry, Mapping) or "error" in entry or "coefficients" not in entry:
            return None  # the card records why there is none; predictions carry None
        # The calibration its dl_logit was fitted on: its own record, else (a card written before
        # that record, since recalibrated) the first calibration in the history, else the card's.
        history = calibration.get("history") or []
        fitted_on = entry.get("dl_calibration") or (history[0] if history else calibration)
        if not isinstance(fitted_on, Mapping):
            raise CheckpointError("model card: combined_model.dl_calibration must have a and b")
        names = entry.get("names")
        if not isinstance(names, list) or not set(names) <= KNOWN_PREDICTORS:
            raise CheckpointError(
                f"model card: combined model predictors {names!r} are not among "
                f"{sorted(KNOWN_PREDICTORS)}"
            )
        coefficients = entry["coefficients"]
        return {
            "names": list(names),
            "a": _number(fitted_on.get("a"), "combined_model.dl_calibration.a"),
            "b": _number(fitted_on.get("b"), "combined_model.dl_calibration.b"),
            "intercept": _number(entry.get("intercept"), "combined_model.intercept"),
            "coefficients": {
                n: _number(coefficients.get(n), f"combined_model.coefficients.{n}") for n in names
            },
        }

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> FusionModel:
        """Load a fusion checkpoint.

        Raises
        ------
        CheckpointError
            With one line naming the problem: missing files, a pickle file in the folder, weights
            that do not match the card, a card of another kind or an unknown arch, an input spec
            or channel count this code cannot honour, weights that do not fit the network.
        """
        directory = Path(directory)
        _refuse_pickles(directory)
        state, card = load_checkpoint(directory, required=FUSION_CARD_KEYS)
        if card.get("kind") != CARD_KIND:
            raise CheckpointError(f"{directory} holds a {card.get('kind')!r}, not a {CARD_KIND}")
        arch = card.get("arch")
        if arch not in ARCHS:
            raise CheckpointError(
                f"{directory}: arch {arch!r} is unknown (known: {', '.join(ARCHS)})"
            )
        network_entry = card.get("network")
        if not isinstance(network_entry, Mapping):
            raise CheckpointError(f"{directory}: the card's network entry must be an object")
        try:
            normalise = network_entry.get("normalise")
            shape: dict[str, Any] = {
                "arch": str(arch),
                "in_channels": int(network_entry["in_channels"]),
                "dropout": float(network_entry.get("dropout", 0.0)),
                "layout": str(network_entry.get("layout", "region")),
                "phases": int(network_entry.get("phases", 2)),
                "normalise": None
                if normalise is None
                else (float(normalise["mean"]), float(normalise["std"])),
            }
            members = network_entry.get("members")
            if members is None:  # one network, keys without the members. prefix
                network: FusionEnsemble | FusionNet = FusionNet(**shape)
            else:
                network = FusionEnsemble.build(int(members), **shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{directory}: cannot build the network: {exc}") from exc
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"{directory}: weights do not fit the {arch} network: {first}"
            ) from exc
        return cls(network, card, device)

    def _check(self, branch: str, array: Any) -> npt.NDArray[np.float32]:
        expected = (self.spec.channels, self.spec.size, self.spec.size)
        value = np.asarray(array, dtype=np.float32)
        if value.shape != expected:
            raise ValueError(f"{branch} ROI has shape {value.shape}; this model takes {expected}")
        return value

    @property
    def members(self) -> int:
        """Networks in the ensemble (1 for a single-network card)."""
        return len(self.network.members)

    def _member_logits(
        self,
        tumors: Sequence[npt.NDArray[np.float32]],
        loats: Sequence[npt.NDArray[np.float32]],
        batch_size: int,
    ) -> npt.NDArray[np.float64]:
        out: list[npt.NDArray[np.float64]] = []
        with torch.inference_mode(), autocast(self.device):
            for start in range(0, len(tumors), batch_size):
                stop = start + batch_size
                tumor = torch.from_numpy(np.stack(tumors[start:stop])).to(self.device)
                loat = None
                if loats:
                    loat = torch.from_numpy(np.stack(loats[start:stop])).to(self.device)
                logits = self.network.member_logits(tumor, loat)
                out.append(logits.float().cpu().numpy().astype(np.float64))
        if not out:
            return np.zeros((0, self.members), dtype=np.float64)
        return np.concatenate(out)

    def member_logits(
        self, rois_batch: Sequence[Mapping[str, Any]], *, batch_size: int = 32
    ) -> npt.NDArray[np.float64]:
        """Standardised logits of every ensemble member, ``(studies, members)``.

        Their row mean is :attr:`Prediction.logit`. For audits of the card: a training study's
        out-of-fold logit is the column of the fold it was validated in (the card's
        ``training_ids.fold``).
        """
        fusion = self.network.uses_loat
        tumors = [self._check("tumor", rois["tumor"]) for rois in rois_batch]
        loats = [self._check("loat", rois["loat"]) for rois in rois_batch] if fusion else []
        return self._member_logits(tumors, loats, batch_size)

    def predict(
        self,
        rois_batch: Sequence[Mapping[str, Any]],
        *,
        max_diameter_mm: Sequence[float | None] | None = None,
        loat_area_cm2: Sequence[float | None] | None = None,
        threshold: float | None = None,
        batch_size: int = 32,
    ) -> list[Prediction]:
        """Score studies.

        Parameters
        ----------
        rois_batch
            Per study, the dict :func:`model.roi.extract_rois` returns (``"tumor"``, and
            ``"loat"`` for a fusion model), cut with :attr:`spec`.
        max_diameter_mm, loat_area_cm2
            Per study measurements for the combined probability (``None`` entries, or lists
            left out, give ``combined_probability=None``).
        threshold
            Overrides the card's threshold (the pipeline's ``risk_threshold``).
        batch_size
            Studies per forward pass.

        Raises
        ------
        ValueError
            When an ROI is missing or has the wrong shape, or the lists differ in length.
        """
        n = len(rois_batch)
        measured = {"max_diameter_mm": max_diameter_mm, "loat_area_cm2": loat_area_cm2}
        for name, values in measured.items():
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} studies")
        cut = self.threshold if threshold is None else float(threshold)
        if not 0.0 <= cut <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {cut}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        fusion = self.network.uses_loat
        tumors = []
        loats = []
        for index, rois in enumerate(rois_batch):
            if "tumor" not in rois or (fusion and rois.get("loat") is None):
                missing = "tumor" if "tumor" not in rois else "loat"
                raise ValueError(f"study {index}: the {missing} ROI is missing")
            tumors.append(self._check("tumor", rois["tumor"]))
            if fusion:
                loats.append(self._check("loat", rois["loat"]))
        logits = [float(v) for v in self._member_logits(tumors, loats, batch_size).mean(axis=1)]
        predictions = []
        for index, logit in enumerate(logits):
            dl_logit = self.a * logit + self.b
            probability = 1.0 / (1.0 + math.exp(-dl_logit))
            combined = None
            diameter = None if max_diameter_mm is None else max_diameter_mm[index]
            area = None if loat_area_cm2 is None else loat_area_cm2[index]
            if self.combined is not None and diameter is not None and area is not None:
                predictors = {
                    "dl_logit": self.combined["a"] * logit + self.combined["b"],
                    "max_diameter_mm": diameter,
                    "loat_area_cm2": area,
                }
                combined = logistic_predict(self.combined, predictors)
            predictions.append(
                Prediction(
                    mvi_probability=probability,
                    logit=logit,
                    risk_category=RiskCategory.HIGH if probability >= cut else RiskCategory.LOW,
                    threshold=cut,
                    combined_probability=combined,
                )
            )
        return predictions
