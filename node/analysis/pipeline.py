"""One analysis: pair → load → register → segment → measure → ROI → infer → encode.

:func:`analyse_study` runs on the files of one study and returns the result (a
:class:`node.analysis.result.Result`, written as ``result.json``) and the DICOM objects it made;
it never raises for a study it cannot score — the status says why (``not_applicable``,
``needs_review``, ``no_tumor``). Only a fault of the node (a missing model, a bug, CUDA out of
memory) raises, so the job can be retried and then ``failed``. :func:`prepare_study` and
:func:`score_prepared` are its two halves, so a worker can score several waiting studies in one
model batch. The stages themselves are :mod:`node.analysis.stages`, shared with the training
commands. :func:`node.jobs.runner.run_jobs` is the worker's entry: it adds the store, the outputs
folder and the outbox. ``mvi-node analyze`` calls :func:`analyse_study` directly, without a
network.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_sr.common import AlgorithmInfo, AnalysisResult
from dicom_sr.enum import RiskCategory, Status
from node import MANUFACTURER, MODEL_NAME, __version__
from node.analysis import gates as quality
from node.analysis import stages
from node.analysis.dicomio import SeriesFiles
from node.analysis.models import Models
from node.analysis.result import (
    Gate,
    Loat,
    ModelInfo,
    Phases,
    RejectedSeg,
    Result,
    Segmentation,
    Tumor,
    to_json,
)
from node.analysis.stages import Rois
from node.core.logging import get_logger, study_key
from node.core.settings import GatesSection, Settings

if TYPE_CHECKING:
    from dicom_sr.sr import ImageLibrary
    from model.inference import Prediction
    from model.measure import Measurements
    from model.segmentation import Masks
    from node.analysis.supplied_seg import SegmentationChoice

log = get_logger("node.analysis.pipeline")

#: Names of the result files in a study's output folder.
OUTPUT_NAMES = {"seg": "seg.dcm", "sr": "sr.dcm", "sc": "sc.dcm", "ko": "rejection.dcm"}
#: Statuses that get an SR and SC saying so when ``results.notify_failures`` is on.
NOTIFIED = (Status.NO_TUMOR, Status.NEEDS_REVIEW, Status.FAILED)


#: Kinds of DICOM object an analysis writes.
ObjectKind = Literal["seg", "sr", "sc", "ko"]


@dataclass
class Analysis:
    """What one analysis produced: its result and the DICOM objects by kind."""

    result: Result
    objects: dict[ObjectKind, Dataset] = field(default_factory=dict)


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


@dataclass
class _Draft:
    """The parts of the result the stages have filled in so far."""

    study_instance_uid: str
    phases: Phases | None = None
    tumor: Tumor | None = None
    loat: Loat | None = None
    segmentation: Segmentation | None = None
    gates: list[Gate] = field(default_factory=list)


def algorithm_info(settings: Settings, card: Mapping[str, Any] | None) -> AlgorithmInfo:
    """The model and node identification written into every output."""
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
class _Context:
    """What every way out of one analysis needs, so no path can forget part of it.

    (A superseding report must always name its predecessor; a study that is not scored must
    still get its notice.)
    """

    timer: _Timer
    settings: Settings
    models: Models
    series: Mapping[str, SeriesFiles]
    superseded: Sequence[Dataset]
    own_series_uids: Collection[str]
    #: Headers pairing read, by series, for the outputs (the arterial series' once it is loaded,
    #: its Pixel Data let go): 200 files at 512 x 512 x 200 are not parsed a second time.
    headers: dict[str, tuple[Dataset, ...]] = field(default_factory=dict)
    #: The SR's Image Library of the arterial headers, made while the study is registered.
    library: Future[ImageLibrary] | None = None

    def finish(
        self,
        draft: _Draft,
        status: Status,
        reason: str | None,
        arterial_uid: str | None,
        *,
        arterial: sitk.Image | None = None,
        masks: Masks | None = None,
        measured: Measurements | None = None,
        prediction: Prediction | None = None,
    ) -> Analysis:
        """Fill in status, model and outputs; encode the DICOM objects the status calls for."""
        card = _model_card(self.models) if status in (Status.SCORED, *NOTIFIED) else None
        model = None
        if card is not None:
            threshold = prediction.threshold if prediction is not None else None
            model = ModelInfo(
                name=card.get("name"),
                version=card.get("version"),
                threshold=threshold if threshold is not None else card.get("threshold"),
                demo=bool(card.get("demo", False)),
            )
        result = Result(
            study_instance_uid=draft.study_instance_uid,
            status=status,
            reason=reason,
            phases=draft.phases,
            tumor=draft.tumor,
            loat=draft.loat,
            model=model,
            segmentation=draft.segmentation,
            gates=list(draft.gates),
        )
        if prediction is not None:
            result.mvi_probability = round(prediction.mvi_probability, 4)
            result.combined_probability = (
                None
                if prediction.combined_probability is None
                else round(prediction.combined_probability, 4)
            )
            result.risk_category = RiskCategory(prediction.risk_category)
        analysis = Analysis(result)
        settings = self.settings
        encode = status == Status.SCORED or (
            status in NOTIFIED and settings.results.notify_failures
        )
        if encode:
            source = arterial_uid or notice_series(self.series, self.own_series_uids, draft.phases)
            with self.timer.stage("encode"):
                analysis.objects = encode_objects(
                    result,
                    settings,
                    card,
                    self.series[source].paths if source is not None else [],
                    arterial if source == arterial_uid else None,
                    masks if source == arterial_uid else None,
                    measured if source == arterial_uid else None,
                    self.superseded,
                    study_file=any_study_file(self.series, self.own_series_uids),
                    source_headers=self.headers.get(source, ()) if source is not None else (),
                    library=self.library if source == arterial_uid else None,
                )
        result.timings_s = dict(self.timer.timings)
        log.info(
            "analysis finished",
            study_key=study_key(result.study_instance_uid),
            status=str(status),
            reason=reason,
            timings_s=result.timings_s,
        )
        return analysis


@dataclass
class Prepared:
    """A study ready for the MVI model: measured, ROIs cut (:func:`score_prepared` ends it)."""

    draft: _Draft
    rois: Rois
    measured: Measurements
    arterial_uid: str
    arterial: sitk.Image
    masks: Masks
    context: _Context


def analyse_study(
    study_uid: str,
    series: Mapping[str, SeriesFiles],
    settings: Settings,
    models: Models,
    *,
    own_series_uids: Sequence[str] = (),
    superseded: Sequence[Dataset] = (),
    force_pair: tuple[str, str] | None = None,
) -> Analysis:
    """Analyse one study's files; see the module docstring for what raises and what does not.

    ``superseded``: headers of the node's objects (SEG, SR, SC) of the study's previous analysis;
    the new SR names their SR as its predecessor, and with ``results.send_rejection_notes`` a
    rejection note names them all.
    """
    step = prepare_study(
        study_uid,
        series,
        settings,
        models,
        own_series_uids=own_series_uids,
        superseded=superseded,
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
        step.context.timer.timings["infer"] = share
        try:
            analyses.append(
                step.context.finish(
                    step.draft,
                    Status.SCORED,
                    None,
                    step.arterial_uid,
                    arterial=step.arterial,
                    masks=step.masks,
                    measured=step.measured,
                    prediction=prediction,
                )
            )
        except Exception as exc:
            analyses.append(exc)
    if len(prepared) > 1:
        log.info("inference batch", studies=len(prepared), seconds=share * len(prepared))
    return analyses


def prepare_study(
    study_uid: str,
    series: Mapping[str, SeriesFiles],
    settings: Settings,
    models: Models,
    *,
    own_series_uids: Sequence[str] = (),
    superseded: Sequence[Dataset] = (),
    force_pair: tuple[str, str] | None = None,
) -> Analysis | Prepared:
    """Every stage before the MVI model; an :class:`Analysis` when the study ends earlier."""
    from model.registration import RegistrationError
    from model.roi import RoiError

    timer = _Timer()
    draft = _Draft(study_uid)
    context = _Context(timer, settings, models, series, superseded, own_series_uids)
    finish = context.finish
    working = stages.working_spacing_mm(settings.pipeline)

    headers: dict[str, tuple[Dataset, ...]] = {}
    with timer.stage("pair"):
        pairing = stages.pair(
            series,
            settings.phases,
            working_spacing_mm=working,
            own_series_uids=own_series_uids,
            headers=headers,
        )
    arterial_uid, portal_uid = pairing.arterial, pairing.portal_venous
    method: str | None = pairing.method
    if force_pair is not None:
        arterial_uid, portal_uid = force_pair
        method = "operator"
    draft.phases = Phases(
        arterial=arterial_uid,
        portal_venous=portal_uid,
        pairing=method,
        registration_shift_mm=None,
    )
    if force_pair is None and pairing.status != "paired":
        return finish(draft, Status(pairing.status), pairing.reason, None)
    assert arterial_uid is not None and portal_uid is not None
    if arterial_uid not in series or portal_uid not in series:
        return finish(draft, Status.NEEDS_REVIEW, "the forced series are not in the study", None)

    limits = settings.gates
    with timer.stage("load"):
        arterial_headers = headers.get(arterial_uid, ())
        arterial, portal = stages.load_phases(series, arterial_uid, portal_uid, headers)
    headers.clear()
    context.headers[arterial_uid] = stages.without_pixels(arterial_headers)
    if "sr" in settings.results.formats:
        context.library = _library_aside(context.headers[arterial_uid])
    geometry = quality.check_geometry(limits, {"arterial": arterial, "portal_venous": portal})
    if limits.enabled and geometry.passed is False:
        draft.gates.append(geometry)
        return finish(draft, Status.NEEDS_REVIEW, quality.failed_reason(draft.gates), arterial_uid)
    with timer.stage("register"):
        try:
            registered = stages.register(arterial, portal, working_spacing_mm=working)
        except RegistrationError as exc:
            if limits.enabled:
                draft.gates += [geometry, quality.registration_failed(str(exc))]
            return finish(draft, Status.NEEDS_REVIEW, f"registration failed: {exc}", arterial_uid)
    draft.phases.registration_shift_mm = registered.shift_mm

    with timer.stage("segment"):
        choice = stages.segment(
            series,
            arterial,
            registered,
            arterial_uid=arterial_uid,
            portal_venous_uid=portal_uid,
            pipeline=settings.pipeline,
            segmenter=models.segmenter,
            own_series_uids=own_series_uids,
        )
    masks = choice.masks
    card = models.segmenter_card()
    draft.segmentation = Segmentation(
        source=masks.source,
        supplied_seg=choice.supplied.sop_instance_uid if choice.supplied else None,
        rejected_segs=len(choice.rejected),
        rejected=[
            RejectedSeg(
                series_uid=r.series_uid,
                series_number=r.series_number,
                series_description=r.series_description,
                label=r.label,
                reason=r.reason,
            )
            for r in choice.rejected
        ],
        algorithm=_segmentation_algorithm(choice, card),
    )

    with timer.stage("measure"):
        measured = stages.measure(arterial, masks)
    draft.tumor = Tumor(
        max_diameter_mm=round(measured.max_diameter_mm, 2),
        volume_ml=round(measured.tumor_volume_ml, 3),
        count=masks.tumor_components,
        diameter_slice=measured.diameter_slice,
    )
    draft.loat = Loat(
        found=measured.loat_found,
        max_area_cm2=round(measured.loat_max_area_cm2, 3),
        volume_ml=round(measured.loat_volume_ml, 3),
        area_slice=measured.loat_area_slice,
    )
    if limits.enabled:
        with timer.stage("gates"):
            draft.gates += _stage_gates(limits, geometry, registered, arterial, masks, card)
        reason = quality.failed_reason(draft.gates)
        if reason is not None:
            return finish(
                draft,
                Status.NEEDS_REVIEW,
                reason,
                arterial_uid,
                arterial=arterial,
                masks=masks,
                measured=measured,
            )
    if masks.tumor.sum() == 0:
        return finish(
            draft,
            Status.NO_TUMOR,
            "no liver tumor was found",
            arterial_uid,
            arterial=arterial,
            masks=masks,
            measured=measured,
        )

    fusion = models.fusion()
    if limits.enabled:
        roi_gate = quality.check_roi(limits, masks, stages.spacing_of(arterial), fusion.spec)
        draft.gates.append(roi_gate)
        if roi_gate.passed is False:
            return finish(
                draft,
                Status.NEEDS_REVIEW,
                quality.failed_reason(draft.gates),
                arterial_uid,
                arterial=arterial,
                masks=masks,
                measured=measured,
            )
    with timer.stage("roi"):
        try:
            cut = stages.rois(arterial, registered, masks, fusion.spec)
        except RoiError as exc:
            status = Status.NO_TUMOR if exc.branch == "tumor" else Status.NEEDS_REVIEW
            return finish(
                draft,
                status,
                str(exc),
                arterial_uid,
                arterial=arterial,
                masks=masks,
                measured=measured,
            )
    return Prepared(
        draft=draft,
        rois=cut,
        measured=measured,
        arterial_uid=arterial_uid,
        arterial=arterial,
        masks=masks,
        context=context,
    )


#: Modalities of series a notice cannot hang on (no image geometry).
_NOT_IMAGES = frozenset({"SEG", "SR", "KO", "PR", "DOC", "RTSTRUCT"})


def notice_series(
    series: Mapping[str, SeriesFiles], own_series_uids: Collection[str], phases: Phases | None
) -> str | None:
    """The series a notice hangs on when there is no arterial one.

    The portal-venous series when one was found, else the CT series with the most images, else
    any other image series; ``None`` when the study has no image series (the SR is then
    study-level).
    """
    if phases is not None:
        for uid in (phases.arterial, phases.portal_venous):
            if uid is not None and uid in series:
                return uid
    candidates = [
        (files.modality != "CT", -len(files.paths), uid)
        for uid, files in series.items()
        if uid not in own_series_uids and files.modality not in _NOT_IMAGES and files.paths
    ]
    return min(candidates)[2] if candidates else None


def any_study_file(
    series: Mapping[str, SeriesFiles], own_series_uids: Collection[str]
) -> Path | None:
    """A file of the study that the node did not write (its patient and study attributes)."""
    for uid in sorted(series):
        if uid not in own_series_uids and series[uid].paths:
            return Path(series[uid].paths[0])
    return None


def _stage_gates(
    limits: GatesSection,
    geometry: Gate,
    registered: stages.Registered,
    arterial: sitk.Image,
    masks: Masks,
    card: Mapping[str, Any] | None,
) -> list[Gate]:
    """The gates judged once the study is segmented: input, registration, masks, intensity."""
    spacing = stages.spacing_of(arterial)
    arterial_hu = sitk.GetArrayViewFromImage(arterial)
    portal_hu = sitk.GetArrayViewFromImage(registered.portal_venous_on_arterial)
    gates = [
        quality.check_input(geometry, limits, masks),
        quality.check_registration(
            limits, registered, arterial_hu, portal_hu, masks.liver, spacing
        ),
    ]
    if masks.tumor.any():
        gates.append(quality.check_segmentation(limits, masks, spacing, card))
    gates.append(quality.check_intensity(limits, arterial_hu, portal_hu, masks, card))
    return gates


def _segmentation_algorithm(choice: SegmentationChoice, card: Mapping[str, Any] | None) -> str:
    """What made the masks, as the measurements name their algorithm."""
    if choice.supplied is not None:
        from node.analysis.supplied_seg import series_label

        seg = choice.supplied
        name = f"manual SEG {series_label(seg.path, seg.series_number, seg.series_description)}"
        return f"{name} (its one fat segment taken as the LOAT)" if seg.loat_is_single_fat else name
    card = card or {}
    return f"{card.get('name') or 'segmenter'} {card.get('version') or ''}".strip()


def _model_card(models: Models) -> dict[str, Any] | None:
    try:
        return dict(models.fusion().card)
    except Exception:
        return None


def encode_objects(
    result: Result,
    settings: Settings,
    card: Mapping[str, Any] | None,
    source_paths: Sequence[Path],
    arterial: sitk.Image | None,
    masks: Masks | None,
    measured: Measurements | None,
    superseded: Sequence[Dataset] = (),
    *,
    study_file: Path | None = None,
    source_headers: Sequence[Dataset] = (),
    library: Future[ImageLibrary] | None = None,
) -> dict[ObjectKind, Dataset]:
    """Build the SEG, SR and SC (as configured in ``results.formats``) for a result.

    ``source_paths`` is the series the objects hang on: the arterial one for a scored result;
    for a notice whatever series the study has (:func:`notice_series`), or none, when the SR
    is study-level and made from ``study_file``'s patient and study. With
    ``results.send_rejection_notes`` and ``superseded`` objects, a rejection note ("ko") too.
    ``source_headers``: the source files' datasets as already read (pixels not needed), used
    instead of reading the files again when they cover every path and no file changed since;
    ``library``: the SR's Image Library of those datasets (:func:`_library_aside`), taken
    when they were.
    """
    from dicom_sr.common import allocate_uids
    from dicom_sr.sc import build_sc
    from dicom_sr.seg import build_seg
    from dicom_sr.sr import build_sr

    predecessor_sr = next((ds for ds in superseded if str(ds.get("Modality", "")) == "SR"), None)
    algorithm = algorithm_info(settings, card)
    uids = allocate_uids(predecessor_sr=predecessor_sr)
    analysis = _analysis_result(result, measured, masks)
    formats = set(settings.results.formats)
    objects: dict[ObjectKind, Dataset] = {}
    study = pydicom.dcmread(study_file, stop_before_pixels=True) if study_file else None
    prebuilt: ImageLibrary | None = None
    try:
        # Headers only: no output needs the source pixels (the SC draws from ``arterial``), and
        # a 512 x 512 x 200 series holds 100 MB of them.
        sources, kept = _source_datasets(source_paths, source_headers)
        # Waited for before any output reads the headers: the thread making it reads them too.
        prebuilt = _ready(library) if kept else None
        if sources and not analysis.scored:
            from dicom_sr.common import slice_references

            slice_references(sources)  # a notice falls back to study level when these fail
    except Exception:
        if analysis.scored:
            raise
        sources = []
    if not sources and study is None:
        raise ValueError("a notice needs a series or a file of the study")
    if settings.results.send_rejection_notes and superseded:
        from dicom_sr.kos import build_rejection_note

        objects["ko"] = build_rejection_note(
            superseded, algorithm=algorithm, analysis_time=uids.analysis_time
        )
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
            study=study,
            library=prebuilt,
        )
    if "sc" in formats:
        hu = sitk.GetArrayViewFromImage(arterial) if arterial is not None else None
        spacing = tuple(arterial.GetSpacing()[:2]) if arterial is not None else None
        key = analysis.diameter_slice
        area_slice = analysis.loat_area_slice
        if key < 0 and area_slice >= 0:
            # No tumour (none found, or none left inside the liver): the reader sees the LOAT's
            # largest slice, what the node did find, instead of a text-only summary.
            key = area_slice
        arterial_slice = hu[key] if hu is not None and key >= 0 else None
        tumor_slice = masks.tumor[key] if masks is not None and key >= 0 else None
        loat_slice = masks.loat[key] if masks is not None and key >= 0 else None
        loat_view = None
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
            study=study,
        )
    return objects


def _source_datasets(paths: Sequence[Path], kept: Sequence[Dataset]) -> tuple[list[Dataset], bool]:
    """The headers of ``paths``, in their order, and whether they are ``kept``'s: those when
    it holds every one of them and their files are unchanged, else read again (headers only)."""
    by_path = {str(ds.filename): ds for ds in kept if isinstance(ds.filename, str)}
    found = [by_path.get(str(path)) for path in paths]
    if found and all(ds is not None for ds in found) and stages.unchanged(kept):
        return [ds for ds in found if ds is not None], True
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths], False


def _library_aside(headers: Sequence[Dataset]) -> Future[ImageLibrary] | None:
    """The SR's Image Library of ``headers``, made in a thread of its own.

    Called once the phases are loaded: registration (SimpleITK) and segmentation (torch)
    leave the interpreter lock to it and use 1.7 of 2 cores, so the 0.17 s it takes at 512 x
    512 x 200 leave the time after the model for about 0.07 s more registration.
    """
    if not headers:
        return None
    from dicom_sr.sr import image_library

    pool = ThreadPoolExecutor(1, thread_name_prefix="library")
    try:
        return pool.submit(image_library, headers)
    finally:
        pool.shutdown(wait=False)


def _ready(library: Future[ImageLibrary] | None) -> ImageLibrary | None:
    """The library made aside; None when there is none or it failed (the report then makes
    its own and raises what failed, if anything)."""
    if library is None:
        return None
    try:
        return library.result()
    except Exception as exc:
        log.warning("image library not made aside", error=type(exc).__name__, detail=str(exc))
        return None


def _analysis_result(
    result: Result, measured: Measurements | None, masks: Masks | None
) -> AnalysisResult:
    scored = result.status == Status.SCORED
    return AnalysisResult(
        status=result.status,
        reason=result.reason,
        mvi_probability=result.mvi_probability,
        combined_probability=result.combined_probability,
        risk_category=result.risk_category,
        threshold=result.model.threshold if scored and result.model is not None else None,
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
        segmentation_algorithm=result.segmentation.algorithm if result.segmentation else "",
        checks=tuple(gate.text for gate in result.gates),
        notes=tuple(
            f"Supplied segmentation not used: {r.label}: {r.reason}"
            for r in (result.segmentation.rejected if result.segmentation else [])
        ),
    )


def result_text(result: Result) -> str:
    """The text of ``result.json`` (the JSON layout it always had, plus ``schema_version``)."""
    return json.dumps(to_json(result), indent=2)


def write_outputs(analysis: Analysis, folder: Path) -> dict[ObjectKind, Path]:
    """Write the objects and ``result.json`` into ``folder`` durably; returns the object paths."""
    from node.core.dicom import file_bytes
    from node.receive.spool import make_folder_durably, write_durably

    started = time.perf_counter()
    make_folder_durably(folder)
    paths: dict[ObjectKind, Path] = {}
    for kind, dataset in analysis.objects.items():
        written = write_durably(folder, OUTPUT_NAMES[kind], [file_bytes(dataset)])
        paths[kind] = written.path
    if paths:
        # Encoding the objects into files and syncing them: a stage of its own (0.4–0.6 s at
        # 512 x 512 x 200).
        analysis.result.timings_s["write"] = round(time.perf_counter() - started, 3)
    analysis.result.outputs = {kind: path.name for kind, path in paths.items()}
    write_durably(folder, "result.json", [result_text(analysis.result).encode()])
    return paths
