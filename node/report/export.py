"""The results table: one row per study with its newest result, as CSV for audits.

``mvi-node results export`` writes it; ``mvi-node audit`` reads it back (:mod:`node.report.audit`).
Identifier columns (study UID, accession number, patient ID) are pseudonymised by default with
the site's keyed hash (:func:`node.core.pseudonym.keyed_hash`), written plain only on request, or
left out. With hashed identifiers the study date is shifted per patient
(:func:`node.core.pseudonym.date_shift_days`) and the column is named ``study_date_shifted`` so
that no reader mistakes it for the calendar date; the audit shifts a follow-up date the same way.
Every other column is a number or a code, never an identifier.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from node.analysis.result import Result
from node.core.pseudonym import date_shift_days, keyed_hash
from node.store.database import Store, Study

#: The export's columns, in order (the audit reads them by name).
COLUMNS = (
    "study_instance_uid",
    "study_date",
    "accession_number",
    "patient_id",
    "mvi_probability",
    "combined_probability",
    "risk_category",
    "loat_max_area_cm2",
    "tumor_max_diameter_mm",
    "tumor_volume_ml",
    "model_name",
    "model_version",
    "status",
)
IDENTIFIER_COLUMNS = ("study_instance_uid", "accession_number", "patient_id")
#: The study date column of a hashed export (shifted per patient).
SHIFTED_DATE_COLUMN = "study_date_shifted"

Identifiers = Literal["none", "hashed", "plain"]


def _number(value: float | None) -> str:
    return "" if value is None else f"{float(value):.6g}"


def result_row(study: Study, result: Result) -> dict[str, str]:
    """One CSV row (plain identifiers) from a study row and its result."""
    tumor, loat, model = result.tumor, result.loat, result.model
    return {
        "study_instance_uid": str(study.study_uid),
        "study_date": str(study.study_date or ""),
        "accession_number": str(study.accession_number or ""),
        "patient_id": str(study.patient_id or ""),
        "mvi_probability": _number(result.mvi_probability),
        "combined_probability": _number(result.combined_probability),
        "risk_category": str(result.risk_category or ""),
        "loat_max_area_cm2": _number(loat.max_area_cm2 if loat is not None else None),
        "tumor_max_diameter_mm": _number(tumor.max_diameter_mm if tumor is not None else None),
        "tumor_volume_ml": _number(tumor.volume_ml if tumor is not None else None),
        "model_name": str(model.name or "") if model is not None else "",
        "model_version": str(model.version or "") if model is not None else "",
        "status": str(result.status),
    }


def iter_results(
    store: Store, since: dt.date | None = None, until: dt.date | None = None
) -> Iterator[dict[str, str]]:
    """Rows for every study with a result (its newest), by study date; plain identifiers.

    ``since`` / ``until`` filter on StudyDate (inclusive); studies without a date are left out
    when either is given.
    """
    for row in store.iter_newest_results(since, until):
        yield result_row(row.study, row.result.result)


def pseudonymise(row: dict[str, str], identifiers: Identifiers, key: str) -> dict[str, str]:
    """``row`` with its identifier columns hashed, kept, or removed."""
    if identifiers == "plain":
        return dict(row)
    if identifiers == "none":
        return {k: v for k, v in row.items() if k not in IDENTIFIER_COLUMNS}
    hashed = {
        k: (keyed_hash(v, key) if k in IDENTIFIER_COLUMNS and v else v) for k, v in row.items()
    }
    # Per patient; a study without a patient ID moves on its own.
    owner = hashed.get("patient_id") or hashed.get("study_instance_uid") or ""
    date = hashed.pop("study_date", "")
    hashed[SHIFTED_DATE_COLUMN] = shift_date(date, date_shift_days(owner, key)) if owner else ""
    return {_export_name(k): hashed[_export_name(k)] for k in row}


def _export_name(column: str) -> str:
    return SHIFTED_DATE_COLUMN if column == "study_date" else column


def shift_date(yyyymmdd: str, days: int) -> str:
    """A DICOM date moved by ``days`` (empty when it is not a date: never the plain value)."""
    try:
        date = dt.datetime.strptime(yyyymmdd.strip(), "%Y%m%d").date()
    except ValueError:
        return ""
    return (date + dt.timedelta(days=days)).strftime("%Y%m%d")


def export_results(
    store: Store,
    out: Path,
    *,
    identifiers: Identifiers = "hashed",
    key: str = "",
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> int:
    """Write the results CSV; returns the number of rows.

    Raises
    ------
    node.core.pseudonym.PseudonymKeyMissing
        ``identifiers="hashed"`` with an empty key (checked before anything is written).
    """
    if identifiers == "hashed":
        keyed_hash("check", key)  # fails now rather than after a partial file
    columns = [c for c in COLUMNS if identifiers != "none" or c not in IDENTIFIER_COLUMNS]
    if identifiers == "hashed":
        columns = [_export_name(c) for c in columns]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    count = 0
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in iter_results(store, since, until):
            writer.writerow(pseudonymise(row, identifiers, key))
            count += 1
    partial.replace(out)
    return count
