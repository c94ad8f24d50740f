"""The audit itself: inputs joined, statistics from :mod:`model`, report.json/.html written."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import platform
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from node.core.pseudonym import date_shift_days
from node.report.audit.html import _fmt_p, _html
from node.report.audit.inputs import (
    AuditInputError,
    AuditOptions,
    _FollowUp,
    _join_pathology,
    _load_followup,
    _load_results,
    _lookup,
    _no_match_hint,
    _one_per_key,
    _Result,
    _Results,
    _Table,
)
from node.report.audit.plots import _calibration_png, _km_png, _roc_png

#: Predictors of the logistic model, named as the results columns they come from (units: 0–1,
#: mm, cm²), so an odds ratio reads "per unit of that column".
_LOGISTIC_TERMS = ("mvi_probability", "tumor_max_diameter_mm", "loat_max_area_cm2")
#: run_audit's options when none are given (the options are frozen).
_DEFAULT_OPTIONS = AuditOptions()
_DEMO_NOTICE = "demo model — not for clinical use"
#: Software whose versions the report records (the numbers depend on them).
_LIBRARIES = ("lifelines", "statsmodels", "numpy", "pandas", "matplotlib", "scipy")


def _survival(
    pairs: list[tuple[_FollowUp, _Result]], options: AuditOptions
) -> tuple[dict[str, Any], bytes]:
    """KM by risk group, log-rank, Cox (crude and adjusted), PH checks; and the KM plot."""
    from model.survival import risk_group_survival

    report, fitters = risk_group_survival(
        [f.time for f, _ in pairs],
        [f.event for f, _ in pairs],
        [r.high_risk for _, r in pairs],
        {c: [f.covariates[c] for f, _ in pairs] for c in options.covariates},
        options.time_unit,
    )
    from model.survival import score_survival

    report["score"] = score_survival(
        [f.time for f, _ in pairs], [f.event for f, _ in pairs], [r.probability for _, r in pairs]
    )
    note = []
    if report["logrank"] is not None:
        note.append(f"log-rank p {_fmt_p(report['logrank']['p'])}")
    if report["cox"] is not None:
        cox = report["cox"]
        note.append(f"HR {cox['hr']:.2f} ({cox['ci_low']:.2f}–{cox['ci_high']:.2f})")
    return report, _km_png(fitters, options.time_unit, ", ".join(note))


def _discrimination(
    pairs: list[tuple[int, _Result]], missing_label: int
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """AUC (DeLong), ROC, calibration, confusion matrix at the risk category, Brier, logistic."""
    from model.stats import (
        brier,
        calibration_bins,
        confusion,
        delong_ci,
        logistic_model,
        roc_curve,
    )

    y = np.array([label for label, _ in pairs], dtype=np.int64)
    p = np.array([r.probability for _, r in pairs], dtype=np.float64)
    called = np.array([r.high_risk for _, r in pairs], dtype=bool)
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    report: dict[str, Any] = {
        "n": int(y.size),
        "positives": positives,
        "negatives": negatives,
        "excluded_missing_mvi": missing_label,
    }
    plots: dict[str, bytes] = {}

    report["auc"], report["auc_absent_reason"] = None, None
    if positives == 0 or negatives == 0:
        which = "MVI-positive" if negatives == 0 else "MVI-negative"
        report["auc_absent_reason"] = f"only one pathology class ({which}) among matched studies"
    else:
        try:
            value, low, high = delong_ci(y, p)
            report["auc"] = {"auc": value, "ci_low": low, "ci_high": high, "method": "DeLong"}
        except ValueError as exc:
            report["auc_absent_reason"] = str(exc)
        fpr, tpr, _ = roc_curve(y, p)
        plots["roc"] = _roc_png(fpr, tpr, report["auc"], called, y)

    report["confusion"] = {"predicted_positive": "risk_category == high", **confusion(called, y)}
    report["brier"] = brier(y, p)
    report["calibration"] = calibration_bins(y, p)
    plots["calibration"] = _calibration_png(report["calibration"])

    usable = [
        (label, r) for label, r in pairs if r.diameter_mm is not None and r.loat_cm2 is not None
    ]
    report["logistic"], report["logistic_absent_reason"] = None, None
    if not usable:
        report["logistic_absent_reason"] = "no study has both tumour diameter and LOAT area"
    else:
        design = np.array([[r.probability, r.diameter_mm, r.loat_cm2] for _, r in usable])
        labels = np.array([label for label, _ in usable], dtype=np.int64)
        try:
            model = logistic_model(design, labels, _LOGISTIC_TERMS)
        except ValueError as exc:
            report["logistic_absent_reason"] = str(exc).splitlines()[0]
        else:
            model["excluded_missing_measurements"] = len(pairs) - len(usable)
            model["units"] = {
                "mvi_probability": "per 1.0 of probability",
                "tumor_max_diameter_mm": "per mm",
                "loat_max_area_cm2": "per cm²",
            }
            report["logistic"] = model
    return report, plots


def _file_summary(table: _Table) -> dict[str, Any]:
    digest = hashlib.sha256(table.path.read_bytes()).hexdigest()
    return {"path": str(table.path), "name": table.name, "rows": len(table.rows), "sha256": digest}


def _versions() -> dict[str, str | None]:
    from node import __version__

    versions: dict[str, str | None] = {"mvi-node": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars unwrapped, non-finite floats as null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _origin_on_the_results_calendar(
    results: _Results, options: AuditOptions
) -> Callable[[_FollowUp, _Result], dt.date | None]:
    """How a follow-up row's time origin compares with its study's date in the results file.

    A hashed export shifts each patient's study dates (``study_date_shifted``): the origin is
    shifted by the same days, drawn from the matched study's patient pseudonym and the key.
    """
    if not results.dates_shifted or options.time_origin_col is None:
        return lambda row, match: row.origin
    if not options.pseudonym_key:
        raise AuditInputError(
            f"{results.table.name}: its study dates are shifted per patient (a hashed export), "
            f"so --time-origin-col needs security.pseudonym_key (or MVI_SECURITY__PSEUDONYM_KEY) "
            "to shift the follow-up dates the same way"
        )
    key = options.pseudonym_key

    def shifted(row: _FollowUp, match: _Result) -> dt.date | None:
        owner = match.ids.get("patient_id") or match.ids.get("study_instance_uid") or ""
        if row.origin is None or not owner:
            return None if not owner else row.origin
        return row.origin + dt.timedelta(days=date_shift_days(owner, key))

    return shifted


def run_audit(
    results_csv: Path,
    followup_csv: Path,
    out_dir: Path,
    *,
    pathology_csv: Path | None = None,
    options: AuditOptions = _DEFAULT_OPTIONS,
) -> dict[str, Any]:
    """Audit the node's results against follow-up (and pathology); write the reports.

    Parameters
    ----------
    results_csv
        The table ``mvi-node results export`` writes (:data:`RESULTS_COLUMNS`).
    followup_csv
        One row per key: ``options.join``, ``options.time_col``, ``options.event_col`` (0/1) and
        the ``options.covariates``.
    out_dir
        Created if needed; receives ``report.json``, ``report.html``, ``km.png`` and, with
        pathology, ``roc.png`` and ``calibration.png``.
    pathology_csv
        ``mvi`` (0/1, empty = unknown) keyed by ``options.join``, or by ``study_instance_uid``
        when it lacks the join column.
    options
        Join, columns, time unit, covariates and the pseudonym key.

    Returns
    -------
    dict
        The report, as written to ``report.json``.

    Raises
    ------
    AuditInputError
        When an input is unusable: missing columns, bad dates, times or events, no identifiers,
        hashed identifiers without a key, or no study matching the follow-up.
    """
    # Every input is read and checked before any statistics: bad input fails fast.
    results = _load_results(results_csv)
    by_key, superseded, without_key = _one_per_key(results, options.join)
    followup_table, followup = _load_followup(followup_csv, options)
    followup_keys = [f.key for f in followup]
    to_results = _lookup(results, options.join, followup_keys, options)

    origin_of = _origin_on_the_results_calendar(results, options)
    pairs: list[tuple[_FollowUp, _Result]] = []
    unmatched_followup: list[str] = []
    seen: set[str] = set()
    after_origin = undated = 0
    for row in followup:
        looked_up = to_results(row.key)
        match = by_key.get(looked_up)
        if match is None:
            unmatched_followup.append(row.key)
            continue
        seen.add(looked_up)
        origin = origin_of(row, match)
        if origin is not None and match.date is None:
            undated += 1  # cannot tell whether the CT preceded the origin
        elif origin is not None and match.date is not None and match.date > origin:
            after_origin += 1  # a CT after surgery predicts nothing about that surgery
        else:
            pairs.append((row, match))
    if not pairs and (after_origin or undated):
        raise AuditInputError(
            f"{followup_table.name}: every matched study is dated after its "
            f"{options.time_origin_col} ({after_origin}) or undated ({undated}): nothing "
            "pre-operative to audit"
        )
    if not pairs:
        raise AuditInputError(
            f"no {options.join} of {followup_table.name} matches a scored study of "
            f"{results.table.name} ({len(followup)} follow-up rows, {len(by_key)} scored "
            f"keys){_no_match_hint(results, options.join, followup_keys)}"
        )
    unmatched_results = sorted(k for k in by_key if k not in seen)

    pathology_part: tuple[_Table, str, list[tuple[int, _Result]], list[str], int] | None = None
    if pathology_csv is not None:
        pathology_part = _join_pathology(pathology_csv, results, options)

    excluded = Counter(results.excluded)
    if without_key:
        excluded[f"no {options.join}"] += without_key
    report: dict[str, Any] = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "software": _versions(),
        "inputs": {
            "results": _file_summary(results.table),
            "followup": _file_summary(followup_table),
            "pathology": _file_summary(pathology_part[0]) if pathology_part else None,
        },
        "options": {
            "join": options.join,
            "time_col": options.time_col,
            "event_col": options.event_col,
            "time_unit": options.time_unit,
            "covariates": list(options.covariates),
            "time_origin": options.time_origin_col or "the study",
        },
        "models": results.models,
        "results": {
            "rows": len(results.table.rows),
            "scored": len(results.scored),
            "excluded": dict(sorted(excluded.items())),
            "superseded": superseded,
            "superseded_rule": f"one study per {options.join}: the earliest scored study",
            "keys": len(by_key),
        },
        "join": {
            "column": options.join,
            "hashed": results.hashed.get(options.join, False),
            "followup_rows": len(followup),
            "matched": len(pairs),
            "unmatched_followup": len(unmatched_followup),
            "unmatched_results": len(unmatched_results),
            "unmatched_followup_keys": unmatched_followup,
            "unmatched_results_keys": unmatched_results,
            "study_after_time_origin": after_origin,
            "study_undated_with_time_origin": undated,
        },
    }
    survival, km = _survival(pairs, options)
    report["survival"] = survival
    plots = {"km": km}
    if pathology_part is None:
        report["pathology_join"] = None
        report["discrimination"] = None
        report["discrimination_absent_reason"] = "no pathology file given (--pathology)"
    else:
        table, column, labelled, unmatched, missing = pathology_part
        report["pathology_join"] = {
            "column": column,
            "hashed": results.hashed.get(column, False),
            "rows": len(table.rows),
            "matched": len(labelled) + missing,
            "unmatched": len(unmatched),
            "unmatched_keys": unmatched,
        }
        if labelled:
            report["discrimination"], more = _discrimination(labelled, missing)
            report["discrimination_absent_reason"] = None
            plots.update(more)
        else:
            report["discrimination"] = None
            report["discrimination_absent_reason"] = (
                f"no scored study of {results.table.name} has a pathology result in {table.name}"
            )
    report["notice"] = _DEMO_NOTICE if results.demo else None
    report["plots"] = {name: f"{name}.png" for name in plots}
    report = _jsonable(report)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in plots.items():
        (out_dir / f"{name}.png").write_bytes(data)
    (out_dir / "report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
    (out_dir / "report.html").write_text(_html(report, plots), encoding="utf-8")
    return report
