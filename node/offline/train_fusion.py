"""The I/O side of `mvi-node train` and `mvi-node evaluate`: DICOM studies in, ROIs out.

Each study of ``--studies`` (any layout, grouped by StudyInstanceUID) goes through the node's own
stages (:mod:`node.analysis.stages`) — pairing, registration, segmentation (a supplied SEG in the
study wins, else the configured segmenter), measurement — with the node's settings, and its ROIs
are cut with the model's input spec, exactly as a job would cut them, so training and inference
cannot drift. ROIs are cached per study (keyed by
the study, its series and the spec), so a second run does not read DICOM again.

The labels file names each study's label and, optionally, its patient and centre
(``study_instance_uid,mvi[,patient_id][,centre]``). Without a ``patient_id`` column the study's
PatientID groups a patient's studies into one fold. Patient identifiers are pseudonymised with
``security.pseudonym_key`` when one is set before they reach the model (whose card holds them
only as salted hashes); they never reach a log line.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from node.analysis.models import Models
from node.core.errors import ConfigurationError, InputError
from node.core.logging import get_logger, study_key
from node.core.settings import Settings

if TYPE_CHECKING:
    from model.inference import FusionModel
    from model.roi import RoiSpec
    from model.train import StudyRois
    from node.analysis.dicomio import SeriesFiles

log = get_logger("node.offline.train_fusion")


class FusionUsageError(ConfigurationError):
    """Bad usage of train/evaluate: one line for the operator."""


@dataclass(frozen=True)
class Label:
    """One labels-file row: the MVI label, and the patient and centre when the file names them."""

    mvi: int
    patient_id: str = field(default="", repr=False)
    centre: str = ""


@dataclass(frozen=True)
class StudySkip:
    """A study that could not give ROIs, and why."""

    key: str
    reason: str


def read_labels(path: Path) -> dict[str, Label]:
    """Read ``study_instance_uid,mvi[,patient_id][,centre]`` rows.

    Refuses, naming the line (never an identifier): a missing column, a label other than 0/1, a
    study listed twice, a patient under two centres.
    """
    if not path.is_file():
        raise FusionUsageError(f"{path}: no such labels file")
    labels: dict[str, Label] = {}
    first_line: dict[str, int] = {}
    patient_centre: dict[str, tuple[str, int]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"study_instance_uid", "mvi"} <= set(reader.fieldnames):
            raise FusionUsageError(f"{path}: the header must name study_instance_uid and mvi")
        for line, row in enumerate(reader, start=2):
            uid = (row.get("study_instance_uid") or "").strip()
            if not uid:
                raise FusionUsageError(f"{path}:{line}: study_instance_uid is empty")
            value = (row.get("mvi") or "").strip()
            if value not in {"0", "1"}:
                raise FusionUsageError(f"{path}:{line}: mvi must be 0 or 1, got {value!r}")
            if uid in labels:
                raise FusionUsageError(
                    f"{path}:{line}: the study of line {first_line[uid]} is listed again"
                )
            patient = (row.get("patient_id") or "").strip()
            centre = (row.get("centre") or "").strip()
            if patient and centre:
                seen = patient_centre.setdefault(patient, (centre, line))
                if seen[0] != centre:
                    raise FusionUsageError(
                        f"{path}:{line}: this patient is at centre {seen[0]!r} on line {seen[1]} "
                        f"and {centre!r} here; a patient belongs to one centre"
                    )
            labels[uid] = Label(int(value), patient, centre)
            first_line[uid] = line
    if not labels:
        raise FusionUsageError(f"{path}: no labelled study")
    return labels


def _patient(label: Label, series: dict[str, SeriesFiles], settings: Settings) -> str:
    """The study's patient key: the labels file's, else PatientID; pseudonymised when keyed."""
    from node.core.pseudonym import keyed_hash

    raw = label.patient_id or next((s.patient_id for s in series.values() if s.patient_id), "")
    key = settings.security.pseudonym_key.get_secret_value()
    return keyed_hash(raw, key) if raw and key else raw


def _cache_path(
    cache: Path, study_uid: str, series: Sequence[str], spec: RoiSpec, working_spacing_mm: float
) -> Path:
    # The working spacing is part of the key: the registration, and so the ROIs, depend on it.
    key = json.dumps(
        [study_uid, sorted(series), spec.to_card(), working_spacing_mm], sort_keys=True
    )
    return cache / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def study_rois(
    folder: Path,
    labels: dict[str, Label],
    settings: Settings,
    models: Models,
    spec: RoiSpec,
    cache: Path | None,
    on_study: Callable[[str, str | None], None] | None = None,
) -> tuple[list[StudyRois], list[StudySkip]]:
    """ROIs of every labelled study under ``folder`` (and the studies skipped, with why).

    Raises
    ------
    FusionUsageError
        When no study under ``folder`` is in the labels file (the wrong folder or file).
    """
    from model.registration import RegistrationError
    from model.roi import RoiError
    from model.train import StudyRois
    from node.analysis import stages
    from node.analysis.dicomio import scan_folder

    working = stages.working_spacing_mm(settings.pipeline)
    studies = scan_folder(folder)
    if not set(studies) & set(labels):
        raise FusionUsageError(
            f"none of the {len(labels)} labelled studies is among the {len(studies)} studies "
            f"under {folder}: check --labels and --studies"
        )
    samples: list[StudyRois] = []
    skipped: list[StudySkip] = []
    for uid in sorted(studies):
        key = study_key(uid)
        series = studies[uid]
        reason: str | None = None
        if uid not in labels:
            reason = "no label in the labels file"
        else:
            label = labels[uid]
            identity = {"patient_id": _patient(label, series, settings), "centre": label.centre}
            path = (
                _cache_path(cache, uid, list(series), spec, working) if cache is not None else None
            )
            if path is not None and path.is_file():
                with np.load(path) as data:
                    samples.append(
                        StudyRois(
                            data["tumor"],
                            data["loat"],
                            label.mvi,
                            float(data["diameter"]),
                            float(data["area"]),
                            key,
                            **identity,
                        )
                    )
                if on_study is not None:
                    on_study(key, None)
                continue
            try:
                # The stages of a job, with the same settings (pipeline.working_spacing_mm
                # included): the model trains on the ROIs a job would cut.
                pairing = stages.pair(series, settings.phases, working_spacing_mm=working)
                if pairing.status != "paired" or not pairing.arterial or not pairing.portal_venous:
                    raise ValueError(f"no arterial/portal-venous pair ({pairing.reason})")
                arterial, portal = stages.load_phases(
                    series, pairing.arterial, pairing.portal_venous
                )
                registered = stages.register(arterial, portal, working_spacing_mm=working)
                choice = stages.segment(
                    series,
                    arterial,
                    registered,
                    arterial_uid=pairing.arterial,
                    portal_venous_uid=pairing.portal_venous,
                    pipeline=settings.pipeline,
                    segmenter=models.segmenter,
                )
                measured = stages.measure(arterial, choice.masks)
                rois = stages.rois(arterial, registered, choice.masks, spec)
                sample = StudyRois(
                    rois["tumor"],
                    rois["loat"],
                    label.mvi,
                    measured.max_diameter_mm,
                    measured.loat_max_area_cm2,
                    key,
                    **identity,
                )
                samples.append(sample)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(
                        path,
                        tumor=sample.tumor,
                        loat=sample.loat,
                        diameter=sample.diameter_mm,
                        area=sample.loat_area_cm2,
                    )
            # InputError covers a supplied SEG that cannot be read, as ValueError once did.
            except (InputError, RegistrationError, RoiError, ValueError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            skipped.append(StudySkip(key, reason))
            log.warning("study skipped", study_key=key, reason=reason)
        if on_study is not None:
            on_study(key, reason)
    return samples, skipped


def training_overlap(card: dict[str, Any], samples: Sequence[StudyRois]) -> dict[str, Any]:
    """How many test studies and patients the model trained on (from the card's hashed IDs).

    ``checked`` is false for a card that lists no training identifiers (an older model).
    Patients match only when both sides were pseudonymised with the same site key.
    """
    from model.train import hash_id

    ids = card.get("training_ids")
    if not isinstance(ids, dict) or not isinstance(ids.get("salt"), str):
        return {"checked": False, "reason": "the model card lists no training identifiers"}
    salt = ids["salt"]
    trained_studies = set(ids.get("studies") or [])
    trained_patients = set(ids.get("patients") or [])
    studies = sum(hash_id(s.study_id, salt) in trained_studies for s in samples)
    patients = {hash_id(s.patient, salt) for s in samples} & trained_patients
    return {
        "checked": True,
        "studies": int(studies),
        "patients": len(patients),
        "test_studies": len(samples),
        "test_patients": len({s.patient for s in samples}),
    }


def _binary_metrics(
    y: npt.NDArray[Any], p: npt.NDArray[Any], threshold: float | None
) -> dict[str, Any]:
    from model.stats import brier, delong_ci, sens_spec_acc

    value, low, high = delong_ci(y, p)
    metrics: dict[str, Any] = {
        "auc": round(value, 4),
        "auc_ci95": [round(low, 4), round(high, 4)],
        "brier": round(brier(y, p), 4),
    }
    if threshold is not None:
        sensitivity, specificity, accuracy = sens_spec_acc(y, p, threshold)
        metrics |= {
            "threshold": threshold,
            "sensitivity": round(sensitivity, 4),
            "specificity": round(specificity, 4),
            "accuracy": round(accuracy, 4),
        }
    return metrics


def evaluate(model: FusionModel, samples: Sequence[StudyRois]) -> dict[str, Any]:
    """Discrimination and calibration of a loaded model (and its combined model) on labelled ROIs.

    Sensitivity and specificity are at the card's threshold; the combined logistic model (whose
    probability the SR reports beside the DL one) gets its AUC and Brier score, and its
    sensitivity and specificity at its own threshold when the card has one (cards from before
    the combined model's threshold have none), beside the card's optimism-corrected figures.
    """
    predictions = model.predict(
        [{"tumor": s.tumor, "loat": s.loat} for s in samples],
        max_diameter_mm=[s.diameter_mm for s in samples],
        loat_area_cm2=[s.loat_area_cm2 for s in samples],
    )
    y = np.array([s.label for s in samples])
    p = np.array([prediction.mvi_probability for prediction in predictions])
    result: dict[str, Any] = {
        "studies": len(samples),
        "mvi": int(y.sum()),
        **_binary_metrics(y, p, model.threshold),
        "card": {
            k: model.card.get("oof_metrics", {}).get(k)
            for k in ("auc", "sensitivity", "specificity", "brier")
        },
        "probabilities": p,
        "labels": y,
    }
    combined = [prediction.combined_probability for prediction in predictions]
    entry = model.card.get("combined_model")
    if all(c is not None for c in combined) and isinstance(entry, dict):
        threshold = entry.get("threshold")
        result["combined_model"] = _binary_metrics(
            y, np.array(combined, dtype=float), None if threshold is None else float(threshold)
        )
        corrected = (entry.get("optimism_corrected") or {}).get("corrected") or {}
        result["combined_model"]["card"] = {
            k: corrected.get(k) for k in ("auc", "sensitivity", "specificity", "brier")
        }
    else:
        why = entry.get("error") if isinstance(entry, dict) else None
        result["combined_model"] = {"absent_reason": why or "the card has no combined model"}
    result.update(_reviewer_figures(y, p, model.threshold, samples))
    return result


#: Tumour size split of the subgroup table (the paper's 5 cm).
LARGE_TUMOUR_MM = 50.0


def _reviewer_figures(
    y: npt.NDArray[Any], p: npt.NDArray[Any], threshold: float, samples: Sequence[StudyRois]
) -> dict[str, Any]:
    """CIs for every metric, calibration, decision curve and subgroups (centre, tumour size)."""
    from model.stats import delong_ci, sens_spec_acc
    from model.validation import calibration, decision_curve, threshold_metrics

    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        size = "> 5 cm" if sample.diameter_mm > LARGE_TUMOUR_MM else "≤ 5 cm"
        groups.setdefault(f"tumour {size}", []).append(index)
        if sample.centre:
            groups.setdefault(f"centre {sample.centre}", []).append(index)
    subgroups = []
    for name in sorted(groups):
        members = np.asarray(groups[name])
        yy, pp = y[members], p[members]
        row: dict[str, Any] = {"subgroup": name, "studies": int(members.size), "mvi": int(yy.sum())}
        if min(int(yy.sum()), int(members.size - yy.sum())) >= 2:  # DeLong's least
            value, low, high = delong_ci(yy, pp)
            sensitivity, specificity, _ = sens_spec_acc(yy, pp, threshold)
            row |= {
                "auc": round(value, 4),
                "auc_ci95": [round(low, 4), round(high, 4)],
                "sensitivity": round(sensitivity, 4),
                "specificity": round(specificity, 4),
            }
        else:
            row["absent_reason"] = "fewer than 2 studies of a class: no AUC"
        subgroups.append(row)
    return {
        "intervals": threshold_metrics(y, p, threshold, n_boot=1000),
        "calibration": calibration(y, p),
        "decision_curve": decision_curve(y, p),
        "subgroups": subgroups,
    }


def roc_png(path: Path, curves: dict[str, tuple[npt.ArrayLike, npt.ArrayLike]]) -> None:
    """Draw ROC curves (false positive rate, true positive rate) into a PNG with Pillow."""
    from PIL import Image, ImageDraw

    from model.stats import roc_curve

    size, margin = 480, 50
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (margin, margin, size - margin, size - margin)
    draw.rectangle(box, outline="black")
    draw.line([(margin, size - margin), (size - margin, margin)], fill="gray")
    colours = ["#d62728", "#1f77b4"]
    span = size - 2 * margin
    for index, (name, (y, p)) in enumerate(curves.items()):
        fpr, tpr, _ = roc_curve(y, p)
        points = [
            (margin + f * span, size - margin - t * span) for f, t in zip(fpr, tpr, strict=True)
        ]
        draw.line(points, fill=colours[index % 2], width=3)
        draw.text((margin + 8, margin + 8 + 16 * index), name, fill=colours[index % 2])
    draw.text((size // 2 - 60, size - margin + 12), "1 - specificity", fill="black")
    draw.text((8, margin - 24), "sensitivity", fill="black")
    image.save(path)
