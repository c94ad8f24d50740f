"""``result.json``: the one definition of an analysis result, written and read by every module.

The pipeline builds a :class:`Result`, the worker records it (the store keeps it as JSON:
:func:`to_json` at the store boundary, :func:`from_json` when reading), and export,
re-query, metrics, the command line and the demo read its typed fields. The JSON keeps the keys
and values it always had, plus :attr:`Result.schema_version`; a file written before that field
existed reads as version 1 (the same shape); version 2 added ``gates`` and
``segmentation.rejected``, which read as empty from an older file. ``docs/result.schema.json``
is generated from this model (:func:`json_schema`); a test keeps the two equal.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from dicom_sr.enum import RiskCategory, Status

__all__ = [
    "SCHEMA_VERSION",
    "Device",
    "Gate",
    "GateName",
    "Loat",
    "ModelInfo",
    "Phases",
    "RejectedSeg",
    "Result",
    "Segmentation",
    "Tumor",
    "from_json",
    "json_schema",
    "to_json",
]

#: Version of the ``result.json`` layout written now (2: ``gates`` and
#: ``segmentation.rejected`` added; a version-1 file reads with both empty).
SCHEMA_VERSION = 2


class _Part(BaseModel):
    # Unknown keys are ignored, so a file of a later, larger layout still reads.
    model_config = ConfigDict(extra="ignore")


class Phases(_Part):
    """The arterial and portal-venous series the analysis used, and how they were found."""

    arterial: str | None = Field(description="SeriesInstanceUID of the arterial series.")
    portal_venous: str | None = Field(description="SeriesInstanceUID of the portal-venous series.")
    pairing: str | None = Field(
        description='How the pair was chosen: "tags", "image", "tags+image", or "operator" '
        "(forced by `studies reprocess --arterial --portal-venous`); null when unpaired."
    )
    registration_shift_mm: list[float] | None = Field(
        description="Portal-venous displacement (x, y, z) in LPS mm found by the registration; "
        "null when it was not run or failed."
    )


class RejectedSeg(_Part):
    """A SEG of the study that was not used as the supplied segmentation, and why."""

    series_uid: str | None = Field(description="SeriesInstanceUID of the SEG (null: unreadable).")
    series_number: int | None = Field(default=None, description="Its SeriesNumber.")
    series_description: str = Field(default="", description="Its SeriesDescription.")
    label: str = Field(description='How a reader finds it, e.g. "series 7 (LIVER SEG)".')
    reason: str = Field(description="Why it was not used.")


class Segmentation(_Part):
    """Where the masks came from."""

    source: str = Field(
        description='"supplied" (a SEG found in the study) or the segmenter\'s name ("unet").'
    )
    supplied_seg: str | None = Field(description="SOPInstanceUID of the supplied SEG used.")
    rejected_segs: int = Field(description="Candidate SEGs of the study that were not used.")
    rejected: list[RejectedSeg] = Field(
        default_factory=list, description="Each SEG not used, with its reason."
    )
    algorithm: str = Field(
        default="",
        description='What made the masks: the segmenter\'s name and version, or "manual SEG …".',
    )


class GateName(StrEnum):
    """The quality checks between the stages, in the order they run."""

    INPUT = "input"
    REGISTRATION = "registration"
    SEGMENTATION = "segmentation"
    INTENSITY = "intensity"
    ROI = "roi"


class Gate(_Part):
    """The outcome of one quality check: passed, failed (with its reason) or not run."""

    name: GateName = Field(description="Which check.")
    passed: bool | None = Field(description="true passed, false failed, null not run.")
    reason: str | None = Field(
        default=None, description="Why it failed, or why it was not run; null when it passed."
    )
    figures: dict[str, float | int | str | list[float] | None] = Field(
        default_factory=dict, description="What was measured (units in the key names)."
    )
    limits: dict[str, float | int | list[float] | None] = Field(
        default_factory=dict, description="The limits applied (units in the key names)."
    )

    @property
    def text(self) -> str:
        """One line for the SR, the SC and `studies list`."""
        shown = ", ".join(f"{k} {_show(v)}" for k, v in self.figures.items() if v is not None)
        if self.passed is None:
            return f"{self.name}: not checked — {self.reason}"
        if self.passed:
            return f"{self.name}: passed ({shown})" if shown else f"{self.name}: passed"
        return f"{self.name}: FAILED — {self.reason}"


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


class Tumor(_Part):
    """Measurements of the tumor mask (the largest component)."""

    max_diameter_mm: float = Field(description="Largest axial (Feret) diameter in mm.")
    volume_ml: float = Field(description="Volume in ml.")
    count: int = Field(description="Connected tumor components found before the largest was kept.")
    diameter_slice: int = Field(description="Slice k of the largest diameter (the key slice).")


class Loat(_Part):
    """Measurements of the lesser omental adipose tissue."""

    found: bool = Field(description="Whether any LOAT voxel was found.")
    max_area_cm2: float = Field(description="Largest axial LOAT area in cm².")
    volume_ml: float = Field(description="Volume in ml.")
    area_slice: int = Field(description="Slice k of the largest area; -1 without LOAT.")


class ModelInfo(_Part):
    """The MVI model that scored (or would have scored) the study."""

    name: str | None = Field(description="The model card's name.")
    version: str | None = Field(description="The model card's version.")
    threshold: float | None = Field(
        description="Probability from which the risk is high (the configured one, else the card's)."
    )
    demo: bool = Field(description="Whether the model was trained on phantoms.")


class Device(_Part):
    """Where the worker's models ran (recorded by the worker, not by `mvi-node analyze`)."""

    requested: str = Field(description='The configured device: "auto", "cpu", "cuda", "cuda:N".')
    type: str = Field(description='The device type used: "cpu" or "cuda".')
    gpu_memory_peak_bytes: int | None = Field(
        default=None, description="Peak GPU memory of the worker; present on CUDA only."
    )

    @model_serializer(mode="wrap")
    def _present_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The key is absent on the CPU, as it always was.
        data: dict[str, Any] = handler(self)
        if data.get("gpu_memory_peak_bytes") is None:
            data.pop("gpu_memory_peak_bytes", None)
        return data


class Result(_Part):
    """One analysis of one study: the content of ``result.json``."""

    model_config = ConfigDict(
        extra="ignore",
        title="MVI node result",
        json_schema_extra={
            "description": "result.json: one analysis of one study by the MVI node "
            "(generated from node.analysis.result.Result)."
        },
    )

    schema_version: int = Field(
        default=SCHEMA_VERSION,
        description="Layout version of this file; absent in files written before version 1, "
        "which have the same layout.",
    )
    study_instance_uid: str = Field(description="StudyInstanceUID of the analysed study.")
    status: Status = Field(description="How the analysis ended; only scored results carry an MVI.")
    reason: str | None = Field(
        default=None, description="Why the study was not scored (shown to the reading room)."
    )
    phases: Phases | None = Field(default=None, description="The pair of series used.")
    tumor: Tumor | None = Field(default=None, description="Tumor measurements.")
    loat: Loat | None = Field(default=None, description="LOAT measurements.")
    mvi_probability: float | None = Field(
        default=None, description="Calibrated deep-learning MVI probability (4 decimals)."
    )
    combined_probability: float | None = Field(
        default=None, description="The combined (logistic) model's MVI probability (4 decimals)."
    )
    risk_category: RiskCategory | None = Field(
        default=None, description="MVI risk of a scored result."
    )
    model: ModelInfo | None = Field(default=None, description="The MVI model.")
    segmentation: Segmentation | None = Field(
        default=None, description="Where the masks came from."
    )
    gates: list[Gate] = Field(
        default_factory=list,
        description="The quality checks that ran (or could not), in order, with their figures.",
    )
    timings_s: dict[str, float] = Field(
        default_factory=dict, description="Seconds per stage (pair, load, register, …)."
    )
    outputs: dict[str, str] = Field(
        default_factory=dict, description='File names of the written objects by kind ("seg", …).'
    )
    device: Device | None = Field(
        default=None, description="Where the models ran; present in results a worker recorded."
    )

    @model_serializer(mode="wrap")
    def _present_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `mvi-node analyze` never had a device key; a worker's result always has one.
        data: dict[str, Any] = handler(self)
        if data.get("device") is None:
            data.pop("device", None)
        return data


def from_json(data: dict[str, Any]) -> Result:
    """A result as stored or written: one without ``schema_version`` predates it (version 1)."""
    return Result.model_validate({"schema_version": 1, **data})


def to_json(result: Result) -> dict[str, Any]:
    """The plain JSON value of a result (what ``result.json`` and the store hold)."""
    data: dict[str, Any] = result.model_dump(mode="json")
    return data


def json_schema() -> dict[str, Any]:
    """The JSON schema of ``result.json`` (committed as ``docs/result.schema.json``)."""
    schema = Result.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """:func:`json_schema` as the committed file's text."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
