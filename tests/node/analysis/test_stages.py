"""Specification of the stage chain: training and inference cut the same ROIs from a study."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from node.analysis.dicomio import DicomIOError, SeriesFiles, scan_folder
from node.analysis.models import Models
from node.analysis.pipeline import Prepared, prepare_study
from node.core.settings import Settings
from node.offline.train_fusion import Label, study_rois
from tests.nodeproc import tiny_models


@pytest.fixture
def one_thread() -> Iterator[None]:
    """SimpleITK on one thread: its multithreaded metric sums make registrations of the same
    images differ in the last digits, and this test compares ROIs exactly."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _settings(tmp_path: Path, **pipeline: float) -> Settings:
    return Settings.model_validate(
        {
            "node": {"data_dir": str(tmp_path / "data")},
            "pipeline": {"device": "cpu", **tiny_models(), **pipeline},
            # The tiny models' masks would stop the study; this test compares ROIs.
            "gates": {"enabled": False},
        }
    )


def test_training_and_inference_cut_identical_rois_with_a_configured_working_spacing(
    tmp_path: Path, cohort_factory: Callable[..., Path], one_thread: None
) -> None:
    # The study's truth SEG gives both the same masks; what could differ is the pairing and the
    # registration, which must both use the configured (not the default) working spacing.
    cohort = cohort_factory(studies=1, seed=83, size=64, slices=16, seg=True)
    settings = _settings(tmp_path, working_spacing_mm=3.5)
    models = Models(settings, device="cpu")
    ((study_uid, series),) = scan_folder(cohort / "study_0001").items()
    with (cohort / "labels.csv").open(newline="") as handle:
        labels = {
            row["study_instance_uid"]: Label(int(row["mvi"])) for row in csv.DictReader(handle)
        }

    prepared = prepare_study(study_uid, series, settings, models)
    assert isinstance(prepared, Prepared), "the study must reach the model"
    # The outputs will take the arterial headers pairing read, pixels let go, and the SR's
    # image library made of them while the study was registered.
    kept = prepared.context.headers[prepared.arterial_uid]
    assert len(kept) == len(series[prepared.arterial_uid].paths)
    assert not any("PixelData" in ds for ds in kept)
    assert prepared.context.library is not None
    library = prepared.context.library.result(timeout=60)
    assert sorted(library.sop_instance_uids) == sorted(str(ds.SOPInstanceUID) for ds in kept)
    (sample,), skipped = study_rois(
        cohort, labels, settings, models, models.fusion().spec, cache=None
    )
    assert skipped == []

    np.testing.assert_array_equal(sample.tumor, prepared.rois["tumor"])
    np.testing.assert_array_equal(sample.loat, prepared.rois["loat"])
    assert sample.diameter_mm == prepared.measured.max_diameter_mm
    assert sample.loat_area_cm2 == prepared.measured.loat_max_area_cm2

    # The spacing matters: registered at the default spacing, the portal-venous channels differ
    # (so the equality above is not one of any two registrations).
    default = _settings(tmp_path)
    at_default = prepare_study(study_uid, series, default, Models(default, device="cpu"))
    assert isinstance(at_default, Prepared)
    assert not np.array_equal(at_default.rois["tumor"], prepared.rois["tumor"])


@pytest.mark.parametrize("spacing", [None, 3.5])
def test_the_working_spacing_is_the_configured_one_or_two_mm(spacing: float | None) -> None:
    from node.analysis.stages import working_spacing_mm

    settings = Settings.model_validate({"pipeline": {"working_spacing_mm": spacing}})
    assert working_spacing_mm(settings.pipeline) == (spacing or 2.0)


def _paired(
    folder: Path, cohort_factory: Callable[..., Path], seed: int
) -> tuple[dict[str, SeriesFiles], Any, dict[str, tuple[Dataset, ...]]]:
    """A phantom study copied to ``folder``, paired: its series, the pairing and the headers
    pairing handed on."""
    from node.analysis import stages
    from node.core.settings import PhasesSection

    cohort = cohort_factory(studies=1, seed=seed, size=64, slices=16)
    shutil.copytree(cohort / "study_0001", folder)
    ((_, series),) = scan_folder(folder).items()
    headers: dict[str, tuple[Dataset, ...]] = {}
    pairing = stages.pair(series, PhasesSection(), working_spacing_mm=2.0, headers=headers)
    return dict(series), pairing, headers


def test_the_chosen_pair_is_loaded_from_the_headers_pairing_read(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    from dataclasses import replace

    from node.analysis import stages

    series, pairing, headers = _paired(tmp_path / "study", cohort_factory, seed=84)
    # The chosen two only: the study's other series (non-contrast, delayed) are let go.
    assert pairing.status == "paired" and len(series) > 2
    assert set(headers) == {pairing.arterial, pairing.portal_venous}
    uid = str(pairing.arterial)
    from_files = stages.load(series, uid)
    # Without its files in the mapping, the series still loads: from the headers alone.
    no_paths = {**series, uid: replace(series[uid], paths=())}
    from_headers = stages.load(no_paths, uid, headers[uid])
    assert np.array_equal(
        sitk.GetArrayViewFromImage(from_headers), sitk.GetArrayViewFromImage(from_files)
    )
    # A file rewritten since pairing read it: the files are loaded again, not old headers
    # with new pixels (here the paths are gone too, so the loader refuses).
    changed = Path(headers[uid][0].filename)
    stamp = changed.stat().st_mtime
    os.utime(changed, (stamp + 5, stamp + 5))
    with pytest.raises(DicomIOError, match="empty series"):
        stages.load(no_paths, uid, headers[uid])
    assert np.array_equal(
        sitk.GetArrayViewFromImage(stages.load(series, uid, headers[uid])),
        sitk.GetArrayViewFromImage(from_files),
    )


def test_the_outputs_are_built_from_the_arterial_headers_pairing_read_without_their_pixels(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    import pydicom

    from node.analysis import stages
    from node.analysis.pipeline import _source_datasets

    series, pairing, headers = _paired(tmp_path / "study", cohort_factory, seed=85)
    uid = str(pairing.arterial)
    stages.load(series, uid, headers[uid])
    kept = stages.without_pixels(headers[uid])
    assert kept and not any("PixelData" in ds for ds in kept)

    paths = list(reversed(series[uid].paths))  # the order asked for, not the order read
    sources, taken = _source_datasets(paths, kept)
    assert taken
    assert all(any(ds is k for k in kept) for ds in sources)
    fresh = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    assert [str(ds.filename) for ds in sources] == [str(path) for path in paths]
    assert [set(ds.keys()) for ds in sources] == [set(ds.keys()) for ds in fresh]
    assert [ds.SOPInstanceUID for ds in sources] == [ds.SOPInstanceUID for ds in fresh]

    # A file rewritten since, or a path pairing never read: every header is read again.
    partial, taken = _source_datasets(paths, kept[1:])
    assert not taken and not any(ds is k for ds in partial for k in kept)
    changed = Path(paths[0])
    stamp = changed.stat().st_mtime
    os.utime(changed, (stamp + 5, stamp + 5))
    again, taken = _source_datasets(paths, kept)
    assert not taken and not any(ds is k for ds in again for k in kept)
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in fresh]


def test_both_phases_load_side_by_side_as_they_load_alone_and_the_arterial_error_comes_first(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    from dataclasses import replace

    from node.analysis import stages
    from node.core.settings import PhasesSection

    cohort = cohort_factory(studies=1, seed=85, size=64, slices=16)
    ((_, series),) = scan_folder(cohort / "study_0001").items()
    headers: dict[str, tuple[Dataset, ...]] = {}
    pairing = stages.pair(series, PhasesSection(), working_spacing_mm=2.0, headers=headers)
    arterial_uid, portal_uid = str(pairing.arterial), str(pairing.portal_venous)

    arterial, portal = stages.load_phases(series, arterial_uid, portal_uid, headers)
    assert headers == {}, "the datasets are let go once loaded"
    for loaded, uid in ((arterial, arterial_uid), (portal, portal_uid)):
        alone = stages.load(series, uid)
        assert loaded.GetOrigin() == alone.GetOrigin()
        assert np.array_equal(sitk.GetArrayViewFromImage(loaded), sitk.GetArrayViewFromImage(alone))

    # Both series unloadable: the error names the arterial one, as a load in order would.
    broken = {
        uid: replace(files, paths=(tmp_path / f"{name}.dcm",))
        for (uid, files), name in zip(series.items(), "abcdef", strict=False)
    }
    for files in broken.values():
        files.paths[0].write_bytes(b"not DICOM")
    with pytest.raises(DicomIOError, match=str(broken[arterial_uid].paths[0].name)):
        stages.load_phases(broken, arterial_uid, portal_uid)
