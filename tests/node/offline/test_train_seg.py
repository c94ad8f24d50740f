"""Specification of `mvi-node train-seg` as an operator meets it: the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import CARD_NAME, WEIGHTS_NAME, load_checkpoint
from model.segmentation import (
    LABELS,
    LEGACY_LABELS,
    training_range_of,
    tumor_uncertainty_limit_of,
    uncertainty_limit_of,
)
from node.offline.phantom_study import CohortOptions, write_cohort

FAST = ("--size", "64", "--slices", "16", "--iterations", "5")


def mvi_node(*args: str | Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """Run the console script with the demo cache redirected into the test's folder."""
    script = shutil.which("mvi-node", path=str(Path(sys.executable).parent)) or "mvi-node"
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("MVI_")}
    return subprocess.run(
        [script, "train-seg", *map(str, args)],
        capture_output=True,
        text=True,
        env={**clean, "XDG_CACHE_HOME": str(cache), "CUDA_VISIBLE_DEVICES": ""},
        timeout=600,
        check=False,
    )


def _error_lines(stderr: str) -> list[str]:
    """stderr without the JSON log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def test_phantoms_write_a_checkpoint_with_a_card(tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = mvi_node("--phantoms", "3", *FAST, "--out", out, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_NAME, CARD_NAME])
    _, card = load_checkpoint(out)
    assert card["kind"] == "segmenter" and card["demo"] is True
    assert card["training"]["iterations"] == 5
    assert card["training"]["studies"] == 2 and card["validation"]["studies"] == 1
    assert card["input"]["spacing_mm"] == 2.0
    assert card["training"]["device"] == "cpu"
    assert card["training_data"]["phantoms"] == 3
    # Domain-randomised phantoms by default, MONAI augmentation on every patch.
    assert card["training_data"]["domain"] == "randomised"
    assert "--domain randomised" in card["training_data"]["command"]
    assert {"RandAffined", "RandGaussianNoised"} <= set(card["training"]["augmentation"])
    assert "validation Dice tumor" in result.stdout
    # Phantom truth has every label, the organs the quality gates use included.
    assert card["labels"] == LABELS and card["network"]["kwargs"]["out_channels"] == 6
    assert card["training"]["studies_without"] == {"stomach": 0, "aorta": 0}
    assert set(card["validation"]["dice"]) >= {"stomach", "aorta"}
    # What the two training phantoms span, for the quality gates.
    span = training_range_of(card)
    assert span is not None and span.studies == 2
    for low, high in (
        span.tumor_volume_ml,
        span.loat_volume_ml,
        *span.liver_hu.values(),
        *(span.aorta_hu or {}).values(),
    ):
        assert low <= high
    assert span.tumor_volume_ml[0] > 0 and span.loat_volume_ml[0] > 0
    assert span.aorta_hu is not None
    assert span.aorta_hu["arterial"][0] > span.liver_hu["arterial"][1]
    # Uncertainty of the one validation phantom, and the limit the gates apply.
    quality = card["quality"]
    assert quality["measured_on"] == "validation" and quality["studies"] == 1
    p50, p95, top = quality["uncertainty_validation"]
    assert 0.0 <= p50 <= p95 <= top <= 1.0
    limit = uncertainty_limit_of(card)
    assert limit is not None and limit >= 1.5 * p95 - 1e-9 and limit > 0
    # The tumour's own: from the validation study when this briefly trained network found a
    # tumour in it, and no limit (the gate then does not judge it) when it found none.
    found = card["validation"]["per_study"][0]["tumor_uncertainty"]
    tumor_limit = tumor_uncertainty_limit_of(card)
    if found is None:
        assert tumor_limit is None
    else:
        assert tumor_limit is not None and tumor_limit >= 1.5 * found - 1e-9
    assert str(out) in result.stdout.replace("\n", "")
    # Nothing went to the demo cache: --out was given.
    assert not (tmp_path / "cache" / "mvi-node").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exactly one of --studies DIR and --phantoms N"),
        (("--phantoms", "2", "--studies", "."), "exactly one of --studies DIR and --phantoms N"),
        (("--studies", "."), "--studies needs --out"),
        (("--phantoms", "2", "--validation-fraction", "1.5"), "--validation-fraction"),
        (("--phantoms", "2", "--domain", "shifted"), "for evaluation only"),
        (("--phantoms", "2", "--domain", "wild"), "--domain must be randomised or standard"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = mvi_node(*args, cache=tmp_path / "cache")
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_non_empty_out_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = mvi_node("--phantoms", "2", *FAST, "--out", out, cache=tmp_path / "cache")
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "--force" in lines[0]
    # --force replaces a checkpoint, never a folder of other things.
    result = mvi_node("--phantoms", "2", *FAST, "--out", out, "--force", cache=tmp_path / "c")
    assert result.returncode == 2 and (out / "notes.txt").exists()


def test_a_folder_without_usable_studies_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = mvi_node(
        "--studies", tmp_path / "empty", "--out", tmp_path / "model", cache=tmp_path / "cache"
    )
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "no usable study" in lines[0]


def test_studies_from_a_cohort_skip_a_study_without_masks(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortOptions(studies=3, size=64, slices=16, masks=True, seed=5))
    shutil.rmtree(cohort / "masks" / "study_0002")
    out = tmp_path / "model"
    result = mvi_node(
        "--studies",
        cohort,
        "--out",
        out,
        "--iterations",
        "5",
        "--spacing",
        "4",
        cache=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in _error_lines(result.stderr) if "study_0002" in line]
    assert warnings and "no truth masks" in warnings[0]
    assert "skipped study_0002: no truth masks" in result.stdout
    _, card = load_checkpoint(out)
    assert card["demo"] is False
    assert card["training"]["studies"] + card["validation"]["studies"] == 2
    assert card["input"]["spacing_mm"] == 4.0
    # The cohort's masks folders have stomach.nrrd and aorta.nrrd: all labels are trained.
    assert card["training"]["studies_without"] == {"stomach": 0, "aorta": 0}
    assert "aorta_hu" in card["training_range"]


def test_a_masks_folder_without_the_organs_leaves_them_unlabelled(tmp_path: Path) -> None:
    from node.offline.train_seg import study_samples

    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortOptions(studies=2, size=64, slices=16, masks=True, seed=8))
    (cohort / "masks" / "study_0001" / "stomach.nrrd").unlink()
    samples, outcomes = study_samples(cohort, spacing_mm=4.0)
    assert all(o.used for o in outcomes)
    by_name = {s.name: s for s in samples}
    partial, full = by_name["study_0001"], by_name["study_0002"]
    assert partial.unlabelled == frozenset({"stomach"})
    assert not (partial.labels == LABELS["stomach"]).any()
    assert (partial.labels == LABELS["aorta"]).any()
    assert full.unlabelled == frozenset()
    assert (full.labels == LABELS["stomach"]).any() and (full.labels == LABELS["aorta"]).any()


def test_truth_can_come_from_a_manual_seg_in_the_study(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortOptions(studies=2, size=64, slices=16, seg=True, seed=6))
    assert not (cohort / "masks").exists()
    out = tmp_path / "model"
    result = mvi_node(
        "--studies",
        cohort,
        "--out",
        out,
        "--iterations",
        "5",
        "--spacing",
        "4",
        cache=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr
    assert "skipped study_" not in result.stdout
    _, card = load_checkpoint(out)
    assert card["training"]["studies"] + card["validation"]["studies"] == 2
    # A manual SEG draws no stomach or aorta: unlabelled in training, no aorta HU range, no
    # organ Dice; the liver, tumour and LOAT ranges are there.
    studies = card["training"]["studies"]
    assert card["training"]["studies_without"] == {"stomach": studies, "aorta": studies}
    assert "aorta_hu" not in card["training_range"]
    span = training_range_of(card)
    assert span is not None and span.aorta_hu is None
    assert set(span.liver_hu) == {"arterial", "portal_venous"}
    assert card["validation"]["dice"]["stomach"] is None
    assert card["validation"]["dice"]["aorta"] is None
    assert uncertainty_limit_of(card) is not None


def test_truth_masks_from_a_seg_equal_the_phantom_truth(tmp_path: Path) -> None:
    import numpy as np

    from model.phantom import PhantomSpec, make_study
    from model.segmentation import labels_from_masks
    from node.analysis.dicomio import load_series, scan_folder
    from node.offline.phantom_study import study_seed
    from node.offline.train_seg import truth_masks_for

    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortOptions(studies=1, size=64, slices=16, seg=True, seed=7))
    rows = (cohort / "truth.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[1].split(",")
    row = dict(zip(header, values, strict=True))
    study = scan_folder(cohort)[row["study_instance_uid"]]
    arterial = load_series(study[row["arterial_series_uid"]].paths)
    labels = truth_masks_for(
        study,
        arterial,
        arterial_uid=row["arterial_series_uid"],
        portal_venous_uid=row["portal_venous_series_uid"],
    )
    phantom = make_study(study_seed(7, 0), PhantomSpec(size=64, slices=16))
    expected = labels_from_masks(
        phantom.masks["liver"], phantom.masks["tumor"], phantom.masks["loat"]
    )
    assert labels is not None
    np.testing.assert_array_equal(labels, expected)


def test_phantoms_without_out_fill_the_demo_cache_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ("--phantoms", "2", "--size", "64", "--slices", "16", "--iterations", "2")
    first = mvi_node(*args, "--spacing", "6", cache=cache)
    assert first.returncode == 0, first.stderr
    models = list((cache / "mvi-node" / "models").iterdir())
    assert len(models) == 1 and models[0].name.startswith("segmenter-")
    card = json.loads((models[0] / CARD_NAME).read_text())
    again = mvi_node(*args, "--spacing", "6", cache=cache)
    assert again.returncode == 0 and "not retrained" in again.stdout
    assert json.loads((models[0] / CARD_NAME).read_text())["created"] == card["created"]
    # Another setting is another cache entry: a quick run never overwrites the real demo model.
    other = mvi_node(*args, "--spacing", "8", cache=cache)
    assert other.returncode == 0, other.stderr
    assert len(list((cache / "mvi-node" / "models").iterdir())) == 2


def test_a_demo_segmenter_cached_with_other_labels_is_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import model.segmentation
    from node.analysis.models import demo_segmenter_dir
    from node.offline.train_seg import DEMO_ITERATIONS, TrainSegOptions, demo_key

    key = demo_key(TrainSegOptions(phantoms=2), DEMO_ITERATIONS)
    assert key["labels"] == LABELS and key["card_version"] == 2
    current = demo_segmenter_dir()
    # The cache entry of a node whose segmenter had the four older labels is another folder:
    # `mvi-node demo` finds no checkpoint at the current one and builds it.
    monkeypatch.setattr(model.segmentation, "LABELS", LEGACY_LABELS)
    assert demo_segmenter_dir() != current
    monkeypatch.setattr(model.segmentation, "LABELS", LABELS)
    monkeypatch.setattr(model.segmentation, "SEGMENTER_CARD_VERSION", 1)
    assert demo_segmenter_dir() != current
