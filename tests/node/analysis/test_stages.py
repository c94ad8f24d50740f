"""Specification of the stage chain: training and inference cut the same ROIs from a study."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from node.analysis.dicomio import scan_folder
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
