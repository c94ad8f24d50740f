"""The stages of one study, up to the MVI model: pair → load → register → segment → measure → ROI.

One function per stage, each taking what it needs as arguments (settings sections or values,
never a global) and returning a typed value. A job (:mod:`node.analysis.pipeline`), `mvi-node
analyze`, `mvi-node train` / `evaluate` (:mod:`node.offline.train_fusion`), `mvi-node train-seg`
(:mod:`node.offline.train_seg`, whose truth masks are its own) and the failure notice of a job
(:mod:`node.jobs.runner`) all call these functions, so training and inference cannot drift.

Pairing and registration share one working spacing, :func:`working_spacing_mm`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from node.analysis.dicomio import SeriesFiles, load_series
from node.core.settings import PhasesSection, PipelineSection

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from model.measure import Measurements
    from model.registration import Registration
    from model.roi import RoiSpec
    from model.segmentation import Masks, UNetSegmenter
    from node.analysis.pairing import Pairing
    from node.analysis.supplied_seg import SegmentationChoice

__all__ = [
    "DEFAULT_WORKING_SPACING_MM",
    "Registered",
    "Rois",
    "load",
    "load_phases",
    "measure",
    "pair",
    "register",
    "rois",
    "segment",
    "spacing_of",
    "working_spacing_mm",
]

#: Working spacing of pairing's image check and of the registration when none is configured.
DEFAULT_WORKING_SPACING_MM = 2.0

#: The two branches' ROIs of a study, ``{"tumor": ..., "loat": ...}`` (float32 stacks).
Rois = dict[str, npt.NDArray[np.float32]]


def working_spacing_mm(pipeline: PipelineSection) -> float:
    """The working spacing of pairing and registration: ``pipeline.working_spacing_mm`` or 2."""
    return pipeline.working_spacing_mm or DEFAULT_WORKING_SPACING_MM


def pair(
    series: Mapping[str, SeriesFiles],
    phases: PhasesSection,
    *,
    working_spacing_mm: float,
    own_series_uids: Collection[str] = (),
    headers: MutableMapping[str, tuple[Dataset, ...]] | None = None,
) -> Pairing:
    """Choose the arterial and portal-venous series among the study's CT series.

    The node's own outputs (``own_series_uids``) and non-CT series are not candidates.
    ``headers``, when given, receives the chosen pair's datasets as pairing read them, Pixel
    Data still in the files (:attr:`~node.analysis.pairing.SeriesInfo.headers`), for
    :func:`load`.
    """
    from node.analysis.pairing import pair_phases, series_info

    infos = {
        uid: series_info(files.paths)
        for uid, files in series.items()
        if uid not in own_series_uids and files.modality == "CT"
    }
    pairing = pair_phases(
        list(infos.values()), phases.model_dump(), working_spacing_mm=working_spacing_mm
    )
    if headers is not None:
        for uid in (pairing.arterial, pairing.portal_venous):
            if uid in infos and infos[uid].headers:
                headers[uid] = infos[uid].headers
    return pairing


def load_phases(
    series: Mapping[str, SeriesFiles],
    arterial_uid: str,
    portal_venous_uid: str,
    headers: MutableMapping[str, tuple[Dataset, ...]] | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """The arterial and portal-venous series (:func:`load`), read side by side.

    Two threads: reading the files and converting slices release the interpreter lock, so the
    second series loads while the first is parsed (512 x 512 x 200 each: 0.55–0.9 s one after
    the other, 0.44 s side by side). The datasets taken from ``headers`` are popped: a loaded
    series' datasets hold its pixel bytes until they are let go. The arterial series' error
    is raised first, as if loaded first.
    """
    found = headers if headers is not None else {}
    with ThreadPoolExecutor(2, thread_name_prefix="load") as pool:
        arterial = pool.submit(load, series, arterial_uid, found.pop(arterial_uid, ()))
        portal = pool.submit(load, series, portal_venous_uid, found.pop(portal_venous_uid, ()))
        return arterial.result(), portal.result()


def unchanged(headers: Sequence[Dataset]) -> bool:
    """Every file is still the one its dataset was read from (pydicom's read time stamp)."""
    try:
        return all(
            ds.filename is not None and os.stat(ds.filename).st_mtime == ds.timestamp
            for ds in headers
        )
    except (OSError, AttributeError, TypeError):
        return False


def load(
    series: Mapping[str, SeriesFiles], series_uid: str, headers: Sequence[Dataset] = ()
) -> sitk.Image:
    """One series of the study as a volume (:func:`node.analysis.dicomio.load_series`): from
    the datasets :func:`pair` read (each file's headers parsed once) when given and their files
    are unchanged since, else from its files (a file replaced or gone meanwhile then gets the
    loader's own error, naming the file, not its folder)."""
    if headers and unchanged(headers):
        return load_series(headers)
    return load_series(series[series_uid].paths)


def without_pixels(headers: Sequence[Dataset]) -> tuple[Dataset, ...]:
    """``headers`` with their Pixel Data let go (in place), once a series is loaded from them:
    the outputs need the source headers, never their 100 MB of pixels."""
    for ds in headers:
        if "PixelData" in ds:
            del ds.PixelData
    return tuple(headers)


@dataclass(frozen=True)
class Registered:
    """The portal-venous phase registered onto the arterial one.

    Attributes
    ----------
    registration
        The rigid registration (transform arterial → portal-venous space, shift, metric).
    portal_venous_on_arterial
        The portal-venous volume resampled onto the arterial grid.
    """

    registration: Registration
    portal_venous_on_arterial: sitk.Image

    @property
    def shift_mm(self) -> list[float]:
        """The portal-venous displacement (x, y, z) in mm, rounded to 0.01 (``result.json``)."""
        return [round(v, 2) for v in self.registration.translation_mm]


def register(
    arterial: sitk.Image,
    portal_venous: sitk.Image,
    *,
    working_spacing_mm: float,
    seed: int = 0,
) -> Registered:
    """Register the portal-venous phase onto the arterial one and resample it onto its grid.

    Raises
    ------
    model.registration.RegistrationError
        When the registration does not converge to a plausible transform.
    """
    from model.registration import register as rigid
    from model.registration import resample_onto

    registration = rigid(arterial, portal_venous, working_spacing_mm=working_spacing_mm, seed=seed)
    return Registered(registration, resample_onto(portal_venous, arterial, registration.transform))


def segment(
    series: Mapping[str, SeriesFiles],
    arterial: sitk.Image,
    registered: Registered,
    *,
    arterial_uid: str,
    portal_venous_uid: str,
    pipeline: PipelineSection,
    segmenter: Callable[[], UNetSegmenter],
    own_series_uids: Collection[str] = (),
) -> SegmentationChoice:
    """The masks: a qualifying supplied SEG of the study, else the automatic segmenter.

    ``segmenter`` is called only when no SEG qualifies (the model is not loaded otherwise).
    """
    from node.analysis.supplied_seg import SEG_CLASSES, choose_segmentation

    # Only a study that may hold a SEG has its headers read for one (all of them: a SEG is
    # checked against the study's images); 800 headers took 0.27 s of a 512 x 512 x 200 study.
    may_hold_segs = any(
        not files.sop_classes or "" in files.sop_classes or files.sop_classes & SEG_CLASSES
        for files in series.values()
    )
    paths = [path for files in series.values() for path in files.paths] if may_hold_segs else []
    return choose_segmentation(
        paths,
        arterial=arterial,
        portal_venous_on_arterial=registered.portal_venous_on_arterial,
        arterial_series_uid=arterial_uid,
        portal_venous_series_uid=portal_venous_uid,
        pv_to_arterial=registered.registration.transform,
        allowed_algorithm_types=pipeline.supplied_seg_algorithm_types,
        label_patterns=pipeline.supplied_seg_labels.model_dump(),
        own_series_uids=own_series_uids,
        automatic=segmenter,
        accept_single_fat=pipeline.supplied_seg_accept_single_fat,
    )


def spacing_of(arterial: sitk.Image) -> tuple[float, float, float]:
    """The arterial grid's voxel spacing ``(x, y, z)`` in mm."""
    x, y, z = (float(v) for v in arterial.GetSpacing())
    return x, y, z


def measure(arterial: sitk.Image, masks: Masks) -> Measurements:
    """Tumor diameter and volume, LOAT area and volume, on the arterial grid."""
    from model.measure import measure as measure_masks

    return measure_masks(masks.tumor, masks.loat, spacing_of(arterial))


def rois(arterial: sitk.Image, registered: Registered, masks: Masks, spec: RoiSpec) -> Rois:
    """The MVI model's inputs: both branches' ROIs cut with the model's input spec.

    Raises
    ------
    model.roi.RoiError
        Naming the first branch (tumor before LOAT) whose mask is empty or too small.
    """
    from model.roi import extract_rois

    # Views, not copies: the ROIs read a few slices of each volume.
    return extract_rois(
        sitk.GetArrayViewFromImage(arterial),
        sitk.GetArrayViewFromImage(registered.portal_venous_on_arterial),
        masks.tumor,
        masks.loat,
        spacing_of(arterial),
        spec,
    )
