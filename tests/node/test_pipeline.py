"""Specification of one analysis, offline: `mvi-node analyze` on a phantom study."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pydicom

from node.settings import to_toml
from tests.conftest import require_tool, run_tool
from tests.node.test_cli import mvi_node
from tests.nodeproc import tiny_models

RESULT_KEYS = {
    "study_instance_uid",
    "status",
    "reason",
    "phases",
    "tumor",
    "loat",
    "mvi_probability",
    "combined_probability",
    "risk_category",
    "model",
    "segmentation",
    "timings_s",
    "outputs",
}


def analyze_config(tmp_path: Path) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(tmp_path / "data")},
                "pipeline": {"device": "cpu", **tiny_models()},
            }
        )
    )
    return config


def test_analyze_writes_result_json_and_valid_objects(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=95, size=64, slices=16)
    out = tmp_path / "out"
    result = mvi_node(
        "analyze", cohort / "study_0001", "--out", out, "--config", analyze_config(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "result.json").read_text())
    assert set(data) >= RESULT_KEYS
    assert data["status"] in {"scored", "no_tumor", "needs_review"}
    assert data["phases"]["pairing"] == "tags"
    assert len(data["phases"]["registration_shift_mm"]) == 3
    assert data["segmentation"]["source"] == "unet"
    assert data["model"]["demo"] is True
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    for name in data["outputs"].values():
        ds = pydicom.dcmread(out / name)
        assert ds.StudyInstanceUID == data["study_instance_uid"]
        check = run_tool(dciodvfy, out / name, check=False)
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], f"{name}: {errors}"
    assert "status" in result.stdout and "timings" in result.stdout


def test_analyze_takes_exactly_one_study(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=2, seed=96, size=48, slices=16)
    result = mvi_node(
        "analyze", cohort, "--out", tmp_path / "out", "--config", analyze_config(tmp_path)
    )
    assert result.returncode == 2
    assert "holds 2 studies" in result.stderr


def test_analyze_without_models_says_how_to_get_them(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=95, size=64, slices=16)
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"pipeline": {"segmenter_dir": str(tmp_path / "none")}}))
    result = mvi_node(
        "analyze", cohort / "study_0001", "--out", tmp_path / "out", "--config", config
    )
    assert result.returncode == 2
    assert "mvi-node demo" in result.stderr and "train-seg" in result.stderr
