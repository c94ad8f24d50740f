"""One analysis: pair → load → register → segment → measure → ROI → infer → encode.

:func:`analyse_study` runs on the files of one study and returns the result (the dict written as
``result.json``) and the DICOM objects it made; it never raises for a study it cannot score — the
status says why (``not_applicable``, ``needs_review``, ``no_tumor``). Only a fault of the node
(a missing model, a bug, CUDA out of memory) raises, so the job can be retried and then
``failed``. :func:`prepare_study` and :func:`score_prepared` are its two halves, so a worker
can score several waiting studies in one model batch. :func:`node.worker.run_jobs` is the
worker's entry: it adds the store, the outputs folder and the outbox. ``mvi-node analyze`` calls
:func:`analyse_study` directly, without a network.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from node import MANUFACTURER, MODEL_NAME, __version__
from node.analysis.dicomio import SeriesFiles, load_series
from node.analysis.models import Models
from node.core.logging import get_logger, study_key
from node.core.settings import Settings

log = get_logger("node.analysis.pipeline")

#: Names of the result files in a study's output folder.
OUTPUT_NAMES = {"seg": "seg.dcm", "sr": "sr.dcm", "sc": "sc.dcm"}
#: Statuses that get an SR and SC saying so when ``results.notify_failures`` is on.
NOTIFIED = ("no_tumor", "needs_review", "failed")


@dataclass
class Analysis:
    """What one analysis produced."""

    result: dict[str, Any]
    objects: dict[str, Any] = field(default_factory=dict)  # "seg"/"sr"/"sc" -> pydicom Dataset


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(
                self.timings.get(name, 0.0) + time.perf_counter() - started, 3
            )


def _result_skeleton(study_uid: str) -> dict[str, Any]:
    return {
        "study_instance_uid": study_uid,
        "status": None,
        "reason": None,
        "phases": None,
        "tumor": None,
        "loat": None,
        "mvi_probability": None,
        "combined_probability": None,
        "risk_category": None,
        "model": None,
        "segmentation": None,
        "timings_s": {},
        "outputs": {},
    }


def algorithm_info(settings: Settings, card: dict[str, Any] | None) -> Any:
    """The model and node identification written into every output."""
    from dicom_sr.common import AlgorithmInfo

    card = card or {}
    return AlgorithmInfo(
        name=str(card.get("name") or "mvi-fusion-resnet18"),
        version=str(card.get("version") or "unknown"),
        manufacturer=MANUFACTURER,
        model_name=MODEL_NAME,
        software_version=__version__,
        demo=bool(card.get("demo", True)),
        disclaimer=settings.results.disclaimer,
        device_serial_number=settings.node.ae_title,
    )


@dataclass
class Prepared:
    """A study ready for the MVI model: measured, ROIs cut (:func:`score_prepared` ends it)."""

    result: dict[str, Any]
    rois: dict[str, Any]
    measured: Any
    arterial_uid: str
    arterial: Any
    masks: Any
    timer: _Timer
    finish: Callable[..., Analysis]


def analyse_study(
    study_uid: str,
    series: dict[str, SeriesFiles],
    settings: Settings,
    models: Models,
    *,
    own_series_uids: Sequence[str] = (),
    predecessor_sr: Any | None = None,
    force_pair: tuple[str, str] | None = None,
) -> Analysis:
    """Analyse one study's files; see the module docstring for what raises and what does not."""
    step = prepare_study(
        study_uid,
        series,
        settings,
        models,
        own_series_uids=own_series_uids,
        predecessor_sr=predecessor_sr,
        force_pair=force_pair,
    )
    if isinstance(step, Analysis):
        return step
    (scored,) = score_prepared([step], settings, models)
    if isinstance(scored, Exception):
        raise scored
    return scored


def score_prepared(
    prepared: Sequence[Prepared], settings: Settings, models: Models
) -> list[Analysis | Exception]:
    """Run the MVI model once over several prepared studies and finish each.

    One forward pass for the batch; each study's ``timings_s["infer"]`` is its share of it.
    A study whose objects cannot be built gets its exception in its place: its batch-mates
    are finished all the same. An error of the forward pass itself raises.
    """
    if not prepared:
        return []
    fusion = models.fusion()
    started = time.perf_counter()
    predictions = fusion.predict(
        [p.rois for p in prepared],
        max_diameter_mm=[p.measured.max_diameter_mm for p in prepared],
        loat_area_cm2=[p.measured.loat_max_area_cm2 for p in prepared],
        threshold=settings.pipeline.risk_threshold,
    )
    share = round((time.perf_counter() - started) / len(prepared), 3)
    analyses: list[Analysis | Exception] = []
    for step, prediction in zip(prepared, predictions, strict=True):
        step.timer.timings["infer"] = share
        result = step.result
        result["mvi_probability"] = round(prediction.mvi_probability, 4)
        result["combined_probability"] = (
            None
            if prediction.combined_probability is None
            else round(prediction.combined_probability, 4)
        )
        result["risk_category"] = prediction.risk_category
        try:
            analyses.append(
                step.finish(
                    result,
                    "scored",
                    None,
                    step.arterial_uid,
                    arterial=step.arterial,
                    masks=step.masks,
                    measured=step.measured,
                    threshold=prediction.threshold,
                )
            )
        except Exception as exc:
            analyses.append(exc)
    if len(prepared) > 1:
        log.info("inference batch", studies=len(prepared), seconds=share * len(prepared))
    return analyses


def prepare_study(
    study_uid: str,
    series: dict[str, SeriesFiles],
    settings: Settings,
    models: Models,
    *,
    own_series_uids: Sequence[str] = (),
    predecessor_sr: Any | None = None,
    force_pair: tuple[str, str] | None = None,
) -> Analysis | Prepared:
    """Every stage before the MVI model; an :class:`Analysis` when the study ends earlier."""
    from model.registration import RegistrationError, register, resample_onto
    from node.analysis.pairing import pair_phases, series_info

    timer = _Timer()
    result = _result_skeleton(study_uid)
    # Every way out of the analysis goes through one finish with the same context, so no path
    # can forget part of it (a superseding report must always name its predecessor).
    finish = functools.partial(
        _finish,
        timer=timer,
        settings=settings,
        models=models,
        series=series,
        predecessor_sr=predecessor_sr,
    )

    with timer.stage("pair"):
        analysable = {
            uid: files
            for uid, files in series.items()
            if uid not in own_series_uids and files.modality == "CT"
        }
        infos = [series_info(files.paths) for files in analysable.values()]
        working = settings.pipeline.working_spacing_mm or 2.0
        pairing = pair_phases(infos, settings.phases.model_dump(), working_spacing_mm=working)
    record = pairing.to_json()
    arterial_uid, portal_uid = pairing.arterial, pairing.portal_venous
    if force_pair is not None:
        arterial_uid, portal_uid = force_pair
        record["method"] = "operator"
    result["phases"] = {
        "arterial": arterial_uid,
        "portal_venous": portal_uid,
        "pairing": record.get("method"),
        "registration_shift_mm": None,
    }
    if force_pair is None and pairing.status != "paired":
        return finish(result, pairing.status, pairing.reason, None)
    assert arterial_uid is not None and portal_uid is not None
    if arterial_uid not in series or portal_uid not in series:
        return finish(
            result,
            "needs_review",
            "the forced series are not in the study",
            None,
        )

    with timer.stage("load"):
        arterial = load_series(series[arterial_uid].paths)
        portal = load_series(series[portal_uid].paths)
    with timer.stage("register"):
        try:
            registration = register(arterial, portal, working_spacing_mm=working)
        except RegistrationError as exc:
            return finish(
                result,
                "needs_review",
                f"registration failed: {exc}",
                arterial_uid,
            )
        portal_on_arterial = resample_onto(portal, arterial, registration.transform)
    result["phases"]["registration_shift_mm"] = [round(v, 2) for v in registration.translation_mm]

    with timer.stage("segment"):
        choice = _segment(
            series,
            settings,
            models,
            arterial,
            portal_on_arterial,
            arterial_uid,
            portal_uid,
            registration.transform,
            own_series_uids,
        )
    masks = choice.masks
    result["segmentation"] = {
        "source": masks.source,
        "supplied_seg": choice.supplied.sop_instance_uid if choice.supplied else None,
        "rejected_segs": len(choice.rejected),
    }

    import SimpleITK as sitk

    from model.measure import measure

    with timer.stage("measure"):
        spacing = tuple(float(v) for v in arterial.GetSpacing())
        measured = measure(masks.tumor, masks.loat, spacing)
    result["tumor"] = {
        "max_diameter_mm": round(measured.max_diameter_mm, 2),
        "volume_ml": round(measured.tumor_volume_ml, 3),
        "count": masks.tumor_components,
        "diameter_slice": measured.diameter_slice,
    }
    result["loat"] = {
        "found": measured.loat_found,
        "max_area_cm2": round(measured.loat_max_area_cm2, 3),
        "volume_ml": round(measured.loat_volume_ml, 3),
        "area_slice": measured.loat_area_slice,
    }
    if masks.tumor.sum() == 0:
        return finish(
            result,
            "no_tumor",
            "no liver tumor was found",
            arterial_uid,
            arterial=arterial,
            masks=masks,
            measured=measured,
        )

    from model.roi import RoiError, extract_rois

    fusion = models.fusion()
    with timer.stage("roi"):
        arterial_hu = sitk.GetArrayFromImage(arterial)
        portal_hu = sitk.GetArrayFromImage(portal_on_arterial)
        try:
            rois = extract_rois(
                arterial_hu, portal_hu, masks.tumor, masks.loat, spacing, fusion.spec
            )
        except RoiError as exc:
            status = "no_tumor" if exc.branch == "tumor" else "needs_review"
            return finish(
                result,
                status,
                str(exc),
                arterial_uid,
                arterial=arterial,
                masks=masks,
                measured=measured,
            )
    return Prepared(
        result=result,
        rois=rois,
        measured=measured,
        arterial_uid=arterial_uid,
        arterial=arterial,
        masks=masks,
        timer=timer,
        finish=finish,
    )


def _segment(
    series: dict[str, SeriesFiles],
    settings: Settings,
    models: Models,
    arterial: Any,
    portal_on_arterial: Any,
    arterial_uid: str,
    portal_uid: str,
    transform: Any,
    own_series_uids: Sequence[str],
) -> Any:
    from node.analysis.supplied_seg import choose_segmentation

    paths = [path for files in series.values() for path in files.paths]
    pipeline = settings.pipeline
    return choose_segmentation(
        paths,
        arterial=arterial,
        portal_venous_on_arterial=portal_on_arterial,
        arterial_series_uid=arterial_uid,
        portal_venous_series_uid=portal_uid,
        pv_to_arterial=transform,
        allowed_algorithm_types=pipeline.supplied_seg_algorithm_types,
        label_patterns=pipeline.supplied_seg_labels.model_dump(),
        own_series_uids=own_series_uids,
        automatic=models.segmenter,
    )


def _model_card(models: Models) -> dict[str, Any] | None:
    try:
        return dict(models.fusion().card)
    except Exception:
        return None


def _finish(
    result: dict[str, Any],
    status: str,
    reason: str | None,
    arterial_uid: str | None,
    *,
    timer: _Timer,
    settings: Settings,
    models: Models,
    series: dict[str, SeriesFiles],
    arterial: Any | None = None,
    masks: Any | None = None,
    measured: Any | None = None,
    threshold: float | None = None,
    predecessor_sr: Any | None = None,
) -> Analysis:
    """Fill in status, model and outputs; encode the DICOM objects the status calls for."""
    result["status"] = status
    result["reason"] = reason
    card = _model_card(models) if status in ("scored", *NOTIFIED) else None
    if card is not None:
        result["model"] = {
            "name": card.get("name"),
            "version": card.get("version"),
            "threshold": threshold if threshold is not None else card.get("threshold"),
            "demo": bool(card.get("demo", False)),
        }
    analysis = Analysis(result)
    encode = status == "scored" or (status in NOTIFIED and settings.results.notify_failures)
    if encode and arterial_uid is not None:
        with timer.stage("encode"):
            analysis.objects = encode_objects(
                result,
                settings,
                card,
                series[arterial_uid].paths,
                arterial,
                masks,
                measured,
                predecessor_sr,
            )
    result["timings_s"] = dict(timer.timings)
    log.info(
        "analysis finished",
        study_key=study_key(result["study_instance_uid"]),
        status=status,
        reason=reason,
        timings_s=result["timings_s"],
    )
    return analysis


def encode_objects(
    result: dict[str, Any],
    settings: Settings,
    card: dict[str, Any] | None,
    arterial_paths: Sequence[Path],
    arterial: Any | None,
    masks: Any | None,
    measured: Any | None,
    predecessor_sr: Any | None,
) -> dict[str, Any]:
    """Build the SEG, SR and SC (as configured in ``results.formats``) for a result."""
    import SimpleITK as sitk

    from dicom_sr.common import allocate_uids
    from dicom_sr.sc import build_sc
    from dicom_sr.seg import build_seg
    from dicom_sr.sr import build_sr

    sources = [pydicom.dcmread(path) for path in arterial_paths]
    algorithm = algorithm_info(settings, card)
    uids = allocate_uids(predecessor_sr=predecessor_sr)
    analysis = _analysis_result(result, measured, masks)
    formats = set(settings.results.formats)
    objects: dict[str, Any] = {}
    seg = None
    if analysis.scored and masks is not None:
        seg = build_seg(
            sources,
            masks.tumor,
            masks.loat,
            algorithm=algorithm,
            uids=uids,
            manual=masks.source == "supplied",
        )
        if "seg" in formats:
            objects["seg"] = seg
    if "sr" in formats:
        objects["sr"] = build_sr(
            analysis,
            sources,
            seg,
            algorithm=algorithm,
            uids=uids,
            sop_class=settings.results.sr_sop_class,
        )
    if "sc" in formats:
        hu = sitk.GetArrayViewFromImage(arterial) if arterial is not None else None
        spacing = tuple(arterial.GetSpacing()[:2]) if arterial is not None else None
        key = analysis.diameter_slice
        arterial_slice = hu[key] if hu is not None and key >= 0 else None
        tumor_slice = masks.tumor[key] if masks is not None and key >= 0 else None
        loat_slice = masks.loat[key] if masks is not None and key >= 0 else None
        loat_view = None
        area_slice = analysis.loat_area_slice
        if hu is not None and masks is not None and area_slice >= 0 and area_slice != key:
            loat_view = (np.asarray(hu[area_slice]), masks.loat[area_slice])
        objects["sc"] = build_sc(
            analysis,
            None if arterial_slice is None else np.asarray(arterial_slice),
            tumor_slice,
            loat_slice,
            spacing,
            sources,
            algorithm=algorithm,
            uids=uids,
            loat_view=loat_view,
        )
    return objects


def _analysis_result(result: dict[str, Any], measured: Any | None, masks: Any | None) -> Any:
    from dicom_sr.common import AnalysisResult

    model = result.get("model") or {}
    scored = result["status"] == "scored"
    return AnalysisResult(
        status=result["status"],
        reason=result["reason"],
        mvi_probability=result["mvi_probability"],
        combined_probability=result["combined_probability"],
        risk_category=result["risk_category"],
        threshold=model.get("threshold") if scored else None,
        max_diameter_mm=measured.max_diameter_mm if measured is not None else None,
        tumor_volume_ml=measured.tumor_volume_ml if measured is not None else None,
        tumor_count=masks.tumor_components if masks is not None else 0,
        loat_found=bool(measured.loat_found) if measured is not None else False,
        loat_max_area_cm2=measured.loat_max_area_cm2 if measured is not None else None,
        loat_volume_ml=measured.loat_volume_ml if measured is not None else None,
        diameter_slice=measured.diameter_slice if measured is not None else -1,
        diameter_endpoints=measured.diameter_endpoints if measured is not None and scored else None,
        loat_area_slice=measured.loat_area_slice if measured is not None else -1,
        segmentation_source=masks.source if masks is not None else "unet",
    )


def write_outputs(analysis: Analysis, folder: Path) -> dict[str, Path]:
    """Write the objects and ``result.json`` into ``folder`` durably; returns the object paths."""
    from node.receive.spool import write_durably

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind, dataset in analysis.objects.items():
        from io import BytesIO

        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        written = write_durably(folder, OUTPUT_NAMES[kind], [buffer.getvalue()])
        paths[kind] = written.path
    analysis.result["outputs"] = {kind: path.name for kind, path in paths.items()}
    text = json.dumps(analysis.result, indent=2, default=str).encode()
    write_durably(folder, "result.json", [text])
    return paths


ProgressCallback = Callable[[str], None]
