"""Specification of result.json: one model, its committed schema, and older files still read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dicom_sr.enum import RiskCategory, Status
from node.analysis.result import (
    SCHEMA_VERSION,
    Device,
    Result,
    json_schema,
    schema_text,
    to_json,
)

SCHEMA_FILE = Path(__file__).resolve().parents[3] / "docs" / "result.schema.json"

#: A scored result.json as a worker wrote it before the file had a schema_version.
OLD_FORMAT: dict[str, Any] = {
    "study_instance_uid": "2.25.1",
    "status": "scored",
    "reason": None,
    "phases": {
        "arterial": "2.25.2",
        "portal_venous": "2.25.3",
        "pairing": "tags",
        "registration_shift_mm": [2.8, 0.87, -4.4],
    },
    "tumor": {"max_diameter_mm": 38.02, "volume_ml": 18.332, "count": 1, "diameter_slice": 7},
    "loat": {"found": True, "max_area_cm2": 2.82, "volume_ml": 5.288, "area_slice": 8},
    "mvi_probability": 0.6347,
    "combined_probability": 0.1242,
    "risk_category": "high",
    "model": {"name": "mvi-fusion-demo", "version": "1", "threshold": 0.508911, "demo": True},
    "segmentation": {"source": "supplied", "supplied_seg": "2.25.4", "rejected_segs": 0},
    "timings_s": {"pair": 0.119, "load": 0.078, "infer": 1.073},
    "outputs": {"seg": "seg.dcm", "sr": "sr.dcm", "sc": "sc.dcm"},
    "device": {"requested": "auto", "type": "cpu"},
}


def test_the_committed_schema_is_the_models() -> None:
    # After a change of the model, write node.analysis.result.schema_text() to the file.
    assert SCHEMA_FILE.read_text() == schema_text()
    schema = json_schema()
    assert schema["title"] and schema["description"]
    # Every field says what it is, in the result and in every part of it.
    for name, definition in [("Result", schema), *schema["$defs"].items()]:
        if "properties" not in definition:
            continue
        for field, spec in definition["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"
    assert schema["$defs"]["Status"]["enum"] == [s.value for s in Status]


def test_an_old_result_without_schema_version_reads_and_keeps_its_values() -> None:
    old = json.loads(json.dumps(OLD_FORMAT))
    result = Result.model_validate(old)
    assert result.status is Status.SCORED and result.status == "scored"
    assert result.risk_category is RiskCategory.HIGH
    assert result.tumor is not None and result.tumor.max_diameter_mm == 38.02
    assert result.device is not None and result.device.type == "cpu"
    # Written again, it is the same JSON plus the layout version and what version 2 added.
    assert to_json(result) == {
        "schema_version": SCHEMA_VERSION,
        **OLD_FORMAT,
        "segmentation": {**OLD_FORMAT["segmentation"], "rejected": [], "algorithm": ""},
        "gates": [],
    }


def test_keys_absent_before_are_absent_now() -> None:
    # `mvi-node analyze` never wrote a device; a CPU worker never wrote a GPU peak.
    result = Result(study_instance_uid="2.25.1", status=Status.FAILED, reason="the analysis failed")
    assert "device" not in to_json(result)
    result.device = Device(requested="auto", type="cpu")
    assert to_json(result)["device"] == {"requested": "auto", "type": "cpu"}
    result.device.gpu_memory_peak_bytes = 1024
    assert to_json(result)["device"]["gpu_memory_peak_bytes"] == 1024
    keys = list(OLD_FORMAT)
    keys.insert(keys.index("segmentation") + 1, "gates")
    assert list(to_json(result)) == ["schema_version", *keys]


@pytest.mark.parametrize(
    "change",
    [{"status": "done"}, {"risk_category": "medium"}, {"tumor": {"volume_ml": 1.0}}],
)
def test_a_result_that_is_not_one_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Result.model_validate({**OLD_FORMAT, **change})


def test_a_version_1_file_reads_with_no_gates_and_no_rejected_segs() -> None:
    result = Result.model_validate(OLD_FORMAT)
    assert result.gates == []
    assert result.segmentation is not None and result.segmentation.rejected == []


def test_gates_and_rejected_segs_round_trip_through_the_json() -> None:
    data = {
        **OLD_FORMAT,
        "status": "needs_review",
        "reason": "quality check failed — segmentation: tumor components 9 (limit 3)",
        "gates": [
            {"name": "input", "passed": True, "figures": {"arterial_slices": 64}},
            {
                "name": "segmentation",
                "passed": False,
                "reason": "tumor components 9 (limit 3)",
                "figures": {"tumor_components": 9},
                "limits": {"max_tumor_components": 3},
            },
        ],
        "segmentation": {
            "source": "unet",
            "supplied_seg": None,
            "rejected_segs": 1,
            "rejected": [
                {
                    "series_uid": "2.25.9",
                    "series_number": 7,
                    "series_description": "LIVER SEG",
                    "label": "series 7 (LIVER SEG)",
                    "reason": "no LOAT segment",
                }
            ],
        },
    }
    result = Result.model_validate(data)
    assert [g.text for g in result.gates] == [
        "input: passed (arterial_slices 64)",
        "segmentation: FAILED — tumor components 9 (limit 3)",
    ]
    again = Result.model_validate(to_json(result))
    assert again == result
    assert to_json(result)["schema_version"] == SCHEMA_VERSION == 2


def test_a_stored_result_without_schema_version_reads_as_version_1() -> None:
    from node.analysis.result import from_json

    assert from_json(dict(OLD_FORMAT)).schema_version == 1
    assert from_json({**OLD_FORMAT, "schema_version": 2}).schema_version == 2
