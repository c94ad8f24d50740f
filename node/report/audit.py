"""`mvi-node audit`: survival and discrimination audit of the node's results against outcomes.

A site exports the node's results (``mvi-node results export``, :data:`RESULTS_COLUMNS`), joins
them with a follow-up table (time to event, event 0/1) and optionally with pathology (MVI 0/1),
and gets the statistics the method's paper reports:

* survival by risk group (lifelines): Kaplan–Meier curves with numbers at risk, the log-rank
  test, the Cox hazard ratio of high vs low risk — optionally a second model adjusted for
  follow-up covariates — and the proportional-hazards check of each model;
* discrimination against pathology: AUC with its DeLong CI (:func:`model.stats.delong_ci`), ROC
  and calibration plots, the confusion matrix at the model's own threshold (the exported
  ``risk_category``), the Brier score and the logistic model of MVI on DL probability, maximum
  tumour diameter and LOAT area (:func:`model.stats.logistic_model`).

:func:`run_audit` writes ``report.json`` (every number), ``report.html`` (the same, readable, plots
embedded) and the plots as PNG files. Bad input raises :class:`AuditInputError` with one line that
names the file, line and column. Thin data is not an error: with one risk group, one pathology
class or too few events the report says why a number is absent.

Identifiers: when the results' join column holds keyed hashes (``results export`` pseudonymised
it), the follow-up's and pathology's keys go through the same :func:`node.pseudonym.keyed_hash`
before the join, so neither side needs the other's plain identifiers.

lifelines, pandas, matplotlib and statsmodels are imported inside the functions that use them:
:func:`register` runs at every start of the command line and must stay cheap.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import html
import io
import json
import math
import platform
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from dicom_sr.enum import Status
from node.core.pseudonym import PseudonymKeyMissing, keyed_hash, looks_hashed
from node.report.export import COLUMNS as RESULTS_COLUMNS
from node.report.export import IDENTIFIER_COLUMNS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "IDENTIFIER_COLUMNS",
    "RESULTS_COLUMNS",
    "AuditInputError",
    "AuditOptions",
    "headline",
    "register",
    "run_audit",
]

#: Non-identifier columns the audit reads (the others are exported but not needed here).
_USED_RESULT_COLUMNS = (
    "study_date",
    "mvi_probability",
    "risk_category",
    "loat_max_area_cm2",
    "tumor_max_diameter_mm",
    "model_name",
    "model_version",
    "status",
)
#: Predictors of the logistic model, named as the results columns they come from (units: 0–1,
#: mm, cm²), so an odds ratio reads "per unit of that column".
_LOGISTIC_TERMS = ("mvi_probability", "tumor_max_diameter_mm", "loat_max_area_cm2")
#: Column names of the Cox design; dunder names cannot collide with a site's covariates.
_TIME, _EVENT, _HIGH = "__time__", "__event__", "high_risk"
_DEMO_NOTICE = "demo model — not for clinical use"
_PH_ALPHA = 0.05
#: Software whose versions the report records (the numbers depend on them).
_LIBRARIES = ("lifelines", "statsmodels", "numpy", "pandas", "matplotlib", "scipy")

JoinColumn = Literal["study_instance_uid", "accession_number", "patient_id"]
TimeUnit = Literal["days", "months"]


class AuditInputError(ValueError):
    """An input file cannot be audited; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class AuditOptions:
    """How the audit joins and reads its inputs.

    Parameters
    ----------
    join
        The identifier both files share. ``patient_id`` keeps one study per patient: the
        earliest scored one.
    time_col, event_col
        Follow-up columns: time from the study to the event or censoring, and 1 = event.
    time_unit
        Unit of the follow-up times (labels only; nothing is converted).
    covariates
        Numeric follow-up columns for the adjusted Cox model.
    pseudonym_key
        ``security.pseudonym_key``: needed when the results' join column holds keyed hashes.
    """

    join: JoinColumn = "study_instance_uid"
    time_col: str = "time"
    event_col: str = "event"
    time_unit: TimeUnit = "months"
    covariates: tuple[str, ...] = ()
    pseudonym_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.join not in get_args(JoinColumn):
            raise AuditInputError(f"join must be one of {', '.join(get_args(JoinColumn))}")
        if self.time_unit not in get_args(TimeUnit):
            raise AuditInputError(f"time unit must be one of {', '.join(get_args(TimeUnit))}")
        if self.time_col == self.event_col:
            raise AuditInputError(f"time and event columns are both {self.time_col!r}")
        taken = {self.join, self.time_col, self.event_col, _TIME, _EVENT, _HIGH}
        seen: set[str] = set()
        for name in self.covariates:
            if not name or name in taken or name in seen:
                raise AuditInputError(
                    f"covariate {name!r} is empty, repeated, or one of the join, time, event or "
                    f"{_HIGH!r} columns"
                )
            seen.add(name)


# --------------------------------------------------------------------------------------------
# Reading the inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """A CSV file: its header and its data rows with their line numbers (header = line 1)."""

    path: Path
    header: tuple[str, ...]
    rows: tuple[tuple[int, dict[str, str]], ...]

    @property
    def name(self) -> str:
        return self.path.name

    def require(self, columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in self.header]
        if missing:
            raise AuditInputError(
                f"{self.name}: missing column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} (it has: {', '.join(self.header) or 'no columns'})"
            )

    def values(self, column: str) -> list[str]:
        return [cells.get(column, "") for _, cells in self.rows]


def _read_csv(path: Path) -> _Table:
    """Read a comma-separated file with a header line (a spreadsheet's BOM is tolerated)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            first = next(reader, None)
            if first is None:
                raise AuditInputError(f"{path.name}: empty file (no header line)")
            header = tuple(name.strip() for name in first)
            repeated = sorted({n for n in header if header.count(n) > 1})
            if repeated:
                raise AuditInputError(f"{path.name}: column {', '.join(repeated)} repeated")
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue  # blank lines, which spreadsheets like to leave at the end
                if len(cells) > len(header):
                    raise AuditInputError(
                        f"{path.name} line {reader.line_num}: {len(cells)} cells but the header "
                        f"names {len(header)} columns"
                    )
                # Short rows (trailing empty cells dropped by an editor) read as empty cells.
                padded = [*cells, *([""] * (len(header) - len(cells)))]
                rows.append((reader.line_num, dict(zip(header, padded, strict=True))))
    except FileNotFoundError:
        raise AuditInputError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise AuditInputError(f"{path.name}: not UTF-8 text (save it as CSV UTF-8)") from None
    except csv.Error as exc:
        raise AuditInputError(f"{path.name}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise AuditInputError(f"{path}: {exc.strerror or exc}") from None
    return _Table(path, header, tuple(rows))


def _number(text: str) -> float | None:
    """The finite number in a cell, or None when it is empty or not a finite number."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


_DATE_FORMATS = (
    (re.compile(r"^\d{8}$"), "%Y%m%d"),
    (re.compile(r"^\d{4}-\d{2}-\d{2}$"), "%Y-%m-%d"),
)


def _study_date(text: str, table: _Table, line: int) -> dt.date | None:
    """DICOM's YYYYMMDD (or ISO, as a spreadsheet may rewrite it); None when empty (type 2)."""
    value = text.strip()
    if not value:
        return None
    for pattern, fmt in _DATE_FORMATS:
        if pattern.match(value):
            try:
                return dt.datetime.strptime(value, fmt).date()
            except ValueError:
                break
    raise AuditInputError(
        f"{table.name} line {line}: study_date {value!r} is not a date (YYYYMMDD)"
    )


def _zero_one(text: str, table: _Table, line: int, column: str) -> int:
    value = _number(text)
    if value == 0.0:
        return 0
    if value == 1.0:
        return 1
    raise AuditInputError(f"{table.name} line {line}: {column} {text.strip()!r} is not 0 or 1")


@dataclass(frozen=True)
class _Result:
    """One scored study of the results file."""

    line: int
    ids: dict[str, str]  # identifier column -> value as in the file (stripped; "" if empty)
    date: dt.date | None
    probability: float
    high_risk: bool
    diameter_mm: float | None
    loat_cm2: float | None


@dataclass(frozen=True)
class _Results:
    table: _Table
    scored: list[_Result]
    excluded: Counter[str]
    hashed: dict[str, bool]  # per identifier column present
    models: list[str]
    demo: bool


def _load_results(path: Path) -> _Results:
    table = _read_csv(path)
    table.require(_USED_RESULT_COLUMNS)
    id_columns = [c for c in IDENTIFIER_COLUMNS if c in table.header]
    if not any(v.strip() for c in id_columns for v in table.values(c)):
        raise AuditInputError(
            f"{table.name}: no identifier columns (study_instance_uid, accession_number, "
            "patient_id), so it cannot be joined to follow-up: export it again with identifiers "
            "(plain or hashed)"
        )
    scored: list[_Result] = []
    excluded: Counter[str] = Counter()
    models: set[str] = set()
    for line, cells in table.rows:
        # Dates are checked on every row: a bad one means a broken file, not a lost row.
        date = _study_date(cells["study_date"], table, line)
        name, version = cells["model_name"].strip(), cells["model_version"].strip()
        if name or version:
            models.add(f"{name} {version}".strip())
        status = cells["status"].strip().lower()
        # Only scored rows enter the statistics.
        if status != Status.SCORED:
            excluded[f"status {status}" if status in tuple(Status) else f"status {status!r}"] += 1
            continue
        probability = _number(cells["mvi_probability"])
        if probability is None or not 0.0 <= probability <= 1.0:
            excluded["mvi_probability missing or not in [0, 1]"] += 1
            continue
        risk = cells["risk_category"].strip().lower()
        if risk not in ("high", "low"):
            excluded["risk_category neither high nor low"] += 1
            continue
        scored.append(
            _Result(
                line=line,
                ids={c: cells[c].strip() for c in id_columns},
                date=date,
                probability=probability,
                high_risk=risk == "high",
                diameter_mm=_number(cells["tumor_max_diameter_mm"]),
                loat_cm2=_number(cells["loat_max_area_cm2"]),
            )
        )
    hashed = {c: looks_hashed(table.values(c)) for c in id_columns}
    return _Results(
        table=table,
        scored=scored,
        excluded=excluded,
        hashed=hashed,
        models=sorted(models),
        demo=any("demo" in m.lower() for m in models),
    )


def _one_per_key(results: _Results, column: str) -> tuple[dict[str, _Result], int, int]:
    """Scored studies by ``column``: the earliest (by study date, then file order) per key.

    Returns
    -------
    by_key, superseded, without_key
        ``superseded`` counts later studies of a key (for ``patient_id``: follow-up starts at the
        first scored study), ``without_key`` scored rows with an empty key.
    """
    if column not in results.table.header:
        others = [c for c in IDENTIFIER_COLUMNS if c in results.table.header]
        raise AuditInputError(
            f"{results.table.name}: no {column} column (it has {', '.join(others)}); "
            f"join on one of those with --join"
        )
    if not any(v.strip() for v in results.table.values(column)):
        raise AuditInputError(
            f"{results.table.name}: {column} is empty in every row (exported without it?); "
            "join on another identifier with --join"
        )
    # Studies without a date sort last: a dated study is the safer start of follow-up.
    ordered = sorted(results.scored, key=lambda r: (r.date is None, r.date or dt.date.min, r.line))
    by_key: dict[str, _Result] = {}
    superseded = without_key = 0
    for result in ordered:
        key = result.ids[column]
        if not key:
            without_key += 1
        elif key in by_key:
            superseded += 1
        else:
            by_key[key] = result
    return by_key, superseded, without_key


@dataclass(frozen=True)
class _FollowUp:
    line: int
    key: str  # as in the file, stripped
    time: float
    event: int
    covariates: dict[str, float | None]


def _load_followup(path: Path, options: AuditOptions) -> tuple[_Table, list[_FollowUp]]:
    table = _read_csv(path)
    table.require([options.join, options.time_col, options.event_col, *options.covariates])
    rows: list[_FollowUp] = []
    first_line: dict[str, int] = {}
    for line, cells in table.rows:
        key = cells[options.join].strip()
        if not key:
            raise AuditInputError(f"{table.name} line {line}: {options.join} is empty")
        if key in first_line:
            # The key itself stays out of the message: it may be a plain identifier.
            raise AuditInputError(
                f"{table.name} line {line}: {options.join} repeats line {first_line[key]} "
                "(one follow-up row per key)"
            )
        first_line[key] = line
        raw_time = cells[options.time_col].strip()
        time = _number(raw_time)
        if time is None:
            raise AuditInputError(
                f"{table.name} line {line}: {options.time_col} {raw_time!r} is not a number"
            )
        if time < 0:
            raise AuditInputError(
                f"{table.name} line {line}: {options.time_col} {raw_time} is negative"
            )
        event = _zero_one(cells[options.event_col], table, line, options.event_col)
        covariates: dict[str, float | None] = {}
        for name in options.covariates:
            raw = cells[name].strip()
            value = _number(raw)
            if raw and value is None:
                raise AuditInputError(
                    f"{table.name} line {line}: covariate {name} {raw!r} is not a number"
                )
            covariates[name] = value  # empty: left out of the adjusted model only
        rows.append(_FollowUp(line, key, time, event, covariates))
    if not rows:
        raise AuditInputError(f"{table.name}: no data rows")
    return table, rows


def _lookup(
    results: _Results, column: str, keys: list[str], options: AuditOptions
) -> Callable[[str], str]:
    """How another file's key maps to the results' key in ``column`` (hashing it if needed)."""
    if not results.hashed.get(column, False) or looks_hashed(keys):
        # Plain on both sides, or the other file already holds pseudonyms.
        return str.strip
    if not options.pseudonym_key:
        raise AuditInputError(
            f"{results.table.name}: {column} holds keyed hashes but security.pseudonym_key is "
            "empty: set it (or MVI_SECURITY__PSEUDONYM_KEY) to the key the export used"
        )
    key = options.pseudonym_key
    return lambda value: keyed_hash(value, key)


def _no_match_hint(results: _Results, column: str, keys: list[str]) -> str:
    if looks_hashed(keys) and not results.hashed.get(column, False):
        return f" (the keys look like pseudonyms but {results.table.name}'s are plain)"
    if results.hashed.get(column, False):
        return " (is security.pseudonym_key the key the export used?)"
    return ""


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _fit_cox(frame: Any, terms: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """Cox model of ``terms`` with its proportional-hazards check; (None, why) if it fails."""
    from lifelines import CoxPHFitter  # type: ignore[import-untyped]
    from lifelines.exceptions import ConvergenceError  # type: ignore[import-untyped]
    from lifelines.statistics import proportional_hazard_test  # type: ignore[import-untyped]

    data = frame[[_TIME, _EVENT, *terms]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cph = CoxPHFitter().fit(data, duration_col=_TIME, event_col=_EVENT)
        except (ConvergenceError, np.linalg.LinAlgError, ValueError, ZeroDivisionError) as exc:
            return None, f"Cox model could not be fitted ({_first_line(exc)})"
    summary = cph.summary
    model: dict[str, Any] = {
        "n": len(data),
        "events": int(data[_EVENT].sum()),
        "terms": {},
        "concordance": float(cph.concordance_index_),
        "log_likelihood_ratio_p": float(cph.log_likelihood_ratio_test().p_value),
    }
    for term in terms:
        row = summary.loc[term]
        model["terms"][term] = {
            "hr": float(row["exp(coef)"]),
            "ci_low": float(row["exp(coef) lower 95%"]),
            "ci_high": float(row["exp(coef) upper 95%"]),
            "p": float(row["p"]),
            "coef": float(row["coef"]),
            "se": float(row["se(coef)"]),
        }
    if not all(math.isfinite(v) for t in model["terms"].values() for v in t.values()):
        return None, "Cox model did not converge (non-finite estimates: too few events?)"
    # The headline: high vs low risk, flat in the dict for readers of report.json.
    model.update({k: model["terms"][_HIGH][k] for k in ("hr", "ci_low", "ci_high", "p")})
    model["warnings"] = sorted({str(w.message).strip().splitlines()[0] for w in caught})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            test = proportional_hazard_test(cph, data, time_transform="rank")
        ph = {
            str(term): {
                "statistic": float(row["test_statistic"]),
                "p": float(row["p"]),
                "violated": bool(row["p"] < _PH_ALPHA),
            }
            for term, row in test.summary.iterrows()
        }
        model["ph_test"] = {"time_transform": "rank", "alpha": _PH_ALPHA, "terms": ph}
        model["ph_violation"] = any(t["violated"] for t in ph.values())
        model["ph_test_absent_reason"] = None
    except Exception as exc:  # lifelines raises assorted errors on degenerate residuals
        model["ph_test"], model["ph_violation"] = None, None
        model["ph_test_absent_reason"] = f"proportional-hazards test failed ({_first_line(exc)})"
    return model, None


def _survival(
    pairs: list[tuple[_FollowUp, _Result]], options: AuditOptions
) -> tuple[dict[str, Any], bytes]:
    """KM by risk group, log-rank, Cox (crude and adjusted), PH checks; and the KM plot."""
    import pandas as pd  # type: ignore[import-untyped]
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    frame = pd.DataFrame(
        {
            _TIME: [f.time for f, _ in pairs],
            _EVENT: [f.event for f, _ in pairs],
            _HIGH: [int(r.high_risk) for _, r in pairs],
            **{c: [f.covariates[c] for f, _ in pairs] for c in options.covariates},
        }
    )
    n, events = len(frame), int(frame[_EVENT].sum())
    groups: dict[str, Any] = {}
    fitters = []
    for name, flag in (("high", 1), ("low", 0)):
        part = frame[frame[_HIGH] == flag]
        entry: dict[str, Any] = {"n": len(part), "events": int(part[_EVENT].sum())}
        if len(part):
            kmf = KaplanMeierFitter(label=f"{name.capitalize()} risk")
            kmf.fit(part[_TIME], part[_EVENT])
            fitters.append(kmf)
            median = float(kmf.median_survival_time_)
            entry["median_survival"] = median if math.isfinite(median) else None
        else:
            entry["median_survival"] = None
        groups[name] = entry
    report: dict[str, Any] = {
        "n": n,
        "events": events,
        "time_unit": options.time_unit,
        "follow_up_median": float(frame[_TIME].median()),
        "groups": groups,
    }
    present = [g for g in ("high", "low") if groups[g]["n"]]
    absent: str | None = None
    if len(present) == 1:
        absent = f"only one risk group ({present[0]}) among matched patients"
    elif events == 0:
        absent = "no events among matched patients"
    lost = [g for g in present if groups[g]["events"] == 0]
    if absent is None and lost:
        absent = f"no events in the {lost[0]}-risk group: the hazard ratio is not estimable"

    if len(present) == 2 and events > 0:
        high, low = frame[frame[_HIGH] == 1], frame[frame[_HIGH] == 0]
        test = logrank_test(high[_TIME], low[_TIME], high[_EVENT], low[_EVENT])
        report["logrank"] = {
            "statistic": float(test.test_statistic),
            "p": float(test.p_value),
        }
        report["logrank_absent_reason"] = None
    else:
        report["logrank"] = None
        report["logrank_absent_reason"] = absent

    if absent is None:
        report["cox"], report["cox_absent_reason"] = _fit_cox(frame, [_HIGH])
    else:
        report["cox"], report["cox_absent_reason"] = None, absent

    report["covariates"] = list(options.covariates)
    reason: str | None
    if not options.covariates:
        report["cox_adjusted"], reason = None, "no covariates given (--covariates)"
    elif absent is not None:
        report["cox_adjusted"], reason = None, absent
    else:
        complete = frame.dropna(subset=list(options.covariates))
        terms = [_HIGH, *options.covariates]
        adjusted_events = int(complete[_EVENT].sum())
        if complete.empty:
            report["cox_adjusted"] = None
            reason = "no matched patient has every covariate"
        elif complete[_HIGH].nunique() < 2:
            report["cox_adjusted"] = None
            reason = "only one risk group among patients with every covariate"
        elif adjusted_events <= len(terms):
            report["cox_adjusted"] = None
            reason = (
                f"too few events ({adjusted_events}) for an adjusted model of {len(terms)} terms"
            )
        else:
            report["cox_adjusted"], reason = _fit_cox(complete, terms)
            if report["cox_adjusted"] is not None:
                report["cox_adjusted"]["excluded_missing_covariates"] = n - len(complete)
    report["cox_adjusted_absent_reason"] = reason

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
    from model.stats import brier, delong_ci, logistic_model, roc_curve

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

    tp = int(np.count_nonzero(called & (y == 1)))
    fp = int(np.count_nonzero(called & (y == 0)))
    fn = int(np.count_nonzero(~called & (y == 1)))
    tn = int(np.count_nonzero(~called & (y == 0)))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    report["confusion"] = {
        "predicted_positive": "risk_category == high",
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": ratio(tp + tn, int(y.size)),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }
    report["brier"] = brier(y, p)
    report["calibration"] = _calibration_bins(y, p)
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


def _calibration_bins(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Reliability curve: equal-width bins, 10 or fewer so small audits keep ~10 cases a bin."""
    count = int(max(2, min(10, y.size // 10)))
    edges = np.linspace(0.0, 1.0, count + 1)
    # The last bin is closed so that a probability of exactly 1 is counted.
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, count - 1)
    bins = []
    for b in range(count):
        mask = index == b
        size = int(mask.sum())
        bins.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": size,
                "mean_predicted": float(p[mask].mean()) if size else None,
                "observed": float(y[mask].mean()) if size else None,
            }
        )
    return {
        "bins": bins,
        "mean_predicted": float(p.mean()),
        "observed_rate": float(y.mean()),
    }


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot state, no display needed)
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No timestamp metadata: the same inputs give the same bytes.
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


_COLORS = {"High risk": "#c0392b", "Low risk": "#1f6fb2"}


def _km_png(fitters: list[Any], time_unit: str, note: str) -> bytes:
    from lifelines.plotting import add_at_risk_counts  # type: ignore[import-untyped]

    figure = _figure(7.5, 5.6)
    ax = figure.add_subplot()
    for kmf in fitters:
        kmf.plot_survival_function(
            ax=ax, ci_show=True, show_censors=True, color=_COLORS.get(kmf._label)
        )
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(f"Time ({time_unit})")
    ax.set_ylabel("Survival probability")
    ax.set_title("Kaplan–Meier by MVI risk group" + (f"\n{note}" if note else ""), fontsize=10)
    ax.legend(loc="lower left")
    add_at_risk_counts(*fitters, ax=ax, fig=figure, rows_to_show=["At risk"])
    figure.tight_layout()
    return _png(figure)


def _roc_png(
    fpr: np.ndarray, tpr: np.ndarray, auc: dict[str, Any] | None, called: np.ndarray, y: np.ndarray
) -> bytes:
    figure = _figure(5.0, 5.0)
    ax = figure.add_subplot()
    label = "ROC"
    if auc is not None:
        label = f"AUC {auc['auc']:.3f} ({auc['ci_low']:.3f}–{auc['ci_high']:.3f})"
    ax.plot(fpr, tpr, color="#1f6fb2", label=label)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1)
    sensitivity = float(np.mean(called[y == 1]))
    specificity = float(np.mean(~called[y == 0]))
    ax.plot([1 - specificity], [sensitivity], "o", color="#c0392b", label="risk category high")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("Sensitivity")
    ax.set_title("ROC: MVI probability vs pathology", fontsize=10)
    ax.legend(loc="lower right")
    figure.tight_layout()
    return _png(figure)


def _calibration_png(calibration: dict[str, Any]) -> bytes:
    figure = _figure(5.0, 5.0)
    ax = figure.add_subplot()
    bins = [b for b in calibration["bins"] if b["n"]]
    x = [b["mean_predicted"] for b in bins]
    y = [b["observed"] for b in bins]
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="ideal")
    ax.plot(x, y, "-", color="#1f6fb2")
    ax.scatter(x, y, s=[20 + 4 * b["n"] for b in bins], color="#1f6fb2", label="bins (size: n)")
    for b in bins:
        ax.annotate(
            str(b["n"]),
            (b["mean_predicted"], b["observed"]),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("Mean predicted MVI probability")
    ax.set_ylabel("Observed MVI fraction")
    ax.set_title(f"Calibration ({len(calibration['bins'])} bins)", fontsize=10)
    ax.legend(loc="upper left")
    figure.tight_layout()
    return _png(figure)


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


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


def run_audit(
    results_csv: Path,
    followup_csv: Path,
    out_dir: Path,
    *,
    pathology_csv: Path | None = None,
    options: AuditOptions = AuditOptions(),
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

    pairs: list[tuple[_FollowUp, _Result]] = []
    unmatched_followup: list[str] = []
    seen: set[str] = set()
    for row in followup:
        looked_up = to_results(row.key)
        match = by_key.get(looked_up)
        if match is None:
            unmatched_followup.append(row.key)
        else:
            pairs.append((row, match))
            seen.add(looked_up)
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


def _join_pathology(
    path: Path, results: _Results, options: AuditOptions
) -> tuple[_Table, str, list[tuple[int, _Result]], list[str], int]:
    """Pathology rows matched to scored studies.

    Returns
    -------
    table, key column, (mvi, result) pairs, unmatched keys (as in the file), matched rows
    without an MVI value
    """
    table = _read_csv(path)
    # Pathology is per study: keyed by the join column, or by the study UID whatever the join.
    column = options.join
    if column not in table.header and "study_instance_uid" in table.header:
        column = "study_instance_uid"
    table.require([column, "mvi"])
    by_key, _, _ = _one_per_key(results, column)
    keys = [cells[column].strip() for _, cells in table.rows]
    to_results = _lookup(results, column, keys, options)
    labelled: list[tuple[int, _Result]] = []
    unmatched: list[str] = []
    missing = 0
    first_line: dict[str, int] = {}
    for line, cells in table.rows:
        key = cells[column].strip()
        if not key:
            raise AuditInputError(f"{table.name} line {line}: {column} is empty")
        if key in first_line:
            raise AuditInputError(
                f"{table.name} line {line}: {column} repeats line {first_line[key]} "
                "(one pathology row per key)"
            )
        first_line[key] = line
        raw = cells["mvi"].strip()
        label = _zero_one(raw, table, line, "mvi") if raw else None
        match = by_key.get(to_results(key))
        if match is None:
            unmatched.append(key)
        elif label is None:
            missing += 1
        else:
            labelled.append((label, match))
    return table, column, labelled, unmatched, missing


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_p(value: float | None) -> str:
    if value is None:
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _p_phrase(value: float) -> str:
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"


def _fmt_ratio(value: float) -> str:
    # Odds ratios per unit span orders of magnitude (per 1.0 of probability vs per mm).
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _fmt_ci(estimate: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    if estimate is None:
        return "—"
    return (
        f"{estimate[key]:.{digits}f} ({estimate['ci_low']:.{digits}f}–"
        f"{estimate['ci_high']:.{digits}f})"
    )


def headline(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The few numbers a reader looks for first, as (label, text) rows (CLI and HTML)."""
    survival = report["survival"]
    join = report["join"]
    unit = survival["time_unit"]
    rows = [
        ("Studies matched to follow-up", f"{join['matched']} of {join['followup_rows']}"),
        ("Events", str(survival["events"])),
        (
            "Risk groups (high / low)",
            f"{survival['groups']['high']['n']} / {survival['groups']['low']['n']}",
        ),
        ("Median follow-up", f"{survival['follow_up_median']:.1f} {unit}"),
    ]
    cox = survival["cox"]
    rows.append(
        (
            "Cox HR high vs low (95 % CI)",
            _fmt_ci(cox, "hr") if cox else f"— ({survival['cox_absent_reason']})",
        )
    )
    rows.append(("Cox p", _fmt_p(cox["p"]) if cox else "—"))
    logrank = survival["logrank"]
    rows.append(
        (
            "Log-rank p",
            _fmt_p(logrank["p"]) if logrank else f"— ({survival['logrank_absent_reason']})",
        )
    )
    if survival["covariates"]:
        adjusted = survival["cox_adjusted"]
        rows.append(
            (
                f"Adjusted HR ({', '.join(survival['covariates'])})",
                f"{_fmt_ci(adjusted, 'hr')}, p {_fmt_p(adjusted['p'])}"
                if adjusted
                else f"— ({survival['cox_adjusted_absent_reason']})",
            )
        )
    discrimination = report["discrimination"]
    if discrimination is not None:
        auc = discrimination["auc"]
        rows.append(
            (
                "AUC vs pathology (95 % CI, DeLong)",
                _fmt_ci(auc, "auc", 3) if auc else f"— ({discrimination['auc_absent_reason']})",
            )
        )
        confusion = discrimination["confusion"]
        rows.append(
            (
                "Sensitivity / specificity (risk high)",
                f"{_fmt(confusion['sensitivity'])} / {_fmt(confusion['specificity'])}",
            )
        )
    elif report["inputs"]["pathology"] is not None:
        rows.append(("AUC vs pathology", f"— ({report['discrimination_absent_reason']})"))
    return rows


def _table_html(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    esc = html.escape
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _img(plots: dict[str, bytes], name: str, alt: str) -> str:
    if name not in plots:
        return ""
    data = base64.b64encode(plots[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _keys_html(title: str, keys: list[str]) -> str:
    if not keys:
        return ""
    items = "".join(f"<li><code>{html.escape(k)}</code></li>" for k in keys)
    return (
        f"<details><summary>{html.escape(title)} ({len(keys)})</summary><ul>{items}</ul></details>"
    )


def _cox_html(title: str, model: dict[str, Any] | None, reason: str | None) -> str:
    esc = html.escape
    if model is None:
        return f"<h3>{esc(title)}</h3><p class='absent'>Absent: {esc(reason or '')}</p>"
    rows = [
        (
            "high risk vs low" if term == _HIGH else term,
            _fmt_ci(t, "hr"),
            _fmt_p(t["p"]),
        )
        for term, t in model["terms"].items()
    ]
    parts = [
        f"<h3>{esc(title)}</h3>",
        f"<p>n = {model['n']}, events = {model['events']}, "
        f"concordance = {model['concordance']:.3f}</p>",
        _table_html(rows, ("term", "HR (95 % CI)", "p")),
    ]
    ph = model.get("ph_test")
    if ph is None:
        parts.append(f"<p class='absent'>{esc(model.get('ph_test_absent_reason') or '')}</p>")
    else:
        ph_rows = [
            (
                "high risk vs low" if term == _HIGH else term,
                _fmt(t["statistic"]),
                _fmt_p(t["p"]),
                "violated (p < 0.05)" if t["violated"] else "ok",
            )
            for term, t in ph["terms"].items()
        ]
        parts.append("<p>Proportional-hazards check (Schoenfeld residuals, rank time):</p>")
        parts.append(_table_html(ph_rows, ("term", "statistic", "p", "assumption")))
    if model.get("warnings"):
        parts.append(
            "<p class='absent'>lifelines warnings: " + esc("; ".join(model["warnings"])) + "</p>"
        )
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.absent { color: #8a5a00; }
footer { margin-top: 3em; padding-top: 1em; border-top: 1px solid #ccc; font-size: 0.9em; }
.notice { color: #b00; font-weight: bold; }
"""


def _html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    esc = html.escape
    survival = report["survival"]
    join = report["join"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>MVI audit</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>MVI model audit: survival and discrimination</h1>",
        f"<p>Generated {esc(report['generated_at'])}; model "
        f"{esc(', '.join(report['models']) or 'unknown')}.</p>",
        _table_html(headline(report)),
        "<h2>Inputs</h2>",
        _table_html(
            [
                (role, info["name"], info["rows"], info["sha256"][:16])
                for role, info in report["inputs"].items()
                if info is not None
            ],
            ("file", "name", "data rows", "sha256 (first 16)"),
        ),
        f"<p>Join on <code>{esc(join['column'])}</code>"
        f"{' (keyed hashes)' if join['hashed'] else ''}; time unit "
        f"{esc(report['options']['time_unit'])}. Results: {report['results']['rows']} rows, "
        f"{report['results']['scored']} scored, {report['results']['keys']} keys used; "
        f"{report['results']['superseded']} later studies of the same key left out "
        f"({esc(report['results']['superseded_rule'])}).</p>",
    ]
    excluded = report["results"]["excluded"]
    if excluded:
        parts.append("<p>Rows excluded from the statistics:</p>")
        parts.append(_table_html(sorted(excluded.items()), ("reason", "rows")))
    parts.append(
        f"<p>Matched {join['matched']} follow-up rows; {join['unmatched_followup']} follow-up "
        f"rows without a scored study, {join['unmatched_results']} scored studies without "
        "follow-up.</p>"
    )
    parts.append(
        _keys_html("Follow-up keys without a scored study", join["unmatched_followup_keys"])
    )
    parts.append(_keys_html("Scored studies without follow-up", join["unmatched_results_keys"]))

    parts.append("<h2>Survival by risk group</h2>")
    unit = survival["time_unit"]
    group_rows = [
        (name, g["n"], g["events"], _fmt(g["median_survival"], 1))
        for name, g in survival["groups"].items()
    ]
    parts.append(_table_html(group_rows, ("risk group", "n", "events", f"median ({unit})")))
    parts.append(_img(plots, "km", "Kaplan–Meier curves by risk group"))
    logrank = survival["logrank"]
    if logrank:
        parts.append(
            f"<p>Log-rank χ² = {logrank['statistic']:.2f}, {esc(_p_phrase(logrank['p']))}</p>"
        )
    else:
        parts.append(
            f"<p class='absent'>Log-rank absent: {esc(survival['logrank_absent_reason'])}</p>"
        )
    parts.append(
        _cox_html("Cox model: high vs low risk", survival["cox"], survival["cox_absent_reason"])
    )
    if survival["covariates"]:
        parts.append(
            _cox_html(
                f"Cox model adjusted for {', '.join(survival['covariates'])}",
                survival["cox_adjusted"],
                survival["cox_adjusted_absent_reason"],
            )
        )

    parts.append("<h2>Discrimination against pathology</h2>")
    discrimination = report["discrimination"]
    if discrimination is None:
        parts.append(f"<p class='absent'>{esc(report['discrimination_absent_reason'])}</p>")
    else:
        pj = report["pathology_join"]
        parts.append(
            f"<p>{discrimination['n']} studies with pathology ({discrimination['positives']} "
            f"MVI-positive, {discrimination['negatives']} negative); {pj['unmatched']} pathology "
            f"rows without a scored study; {discrimination['excluded_missing_mvi']} without an "
            "MVI value.</p>"
        )
        parts.append(_keys_html("Pathology keys without a scored study", pj["unmatched_keys"]))
        auc = discrimination["auc"]
        if auc is None:
            parts.append(
                f"<p class='absent'>AUC absent: {esc(discrimination['auc_absent_reason'])}</p>"
            )
        else:
            parts.append(f"<p>AUC {esc(_fmt_ci(auc, 'auc', 3))} (DeLong).</p>")
        parts.append(_img(plots, "roc", "ROC curve"))
        parts.append(_img(plots, "calibration", "Calibration plot"))
        c = discrimination["confusion"]
        parts.append("<p>Confusion matrix at the model's threshold (risk category high):</p>")
        parts.append(
            _table_html(
                [("predicted high", c["tp"], c["fp"]), ("predicted low", c["fn"], c["tn"])],
                ("", "MVI positive", "MVI negative"),
            )
        )
        parts.append(
            _table_html(
                [
                    ("sensitivity", c["sensitivity"]),
                    ("specificity", c["specificity"]),
                    ("accuracy", c["accuracy"]),
                    ("PPV", c["ppv"]),
                    ("NPV", c["npv"]),
                    ("Brier score", discrimination["brier"]),
                ]
            )
        )
        logistic = discrimination["logistic"]
        parts.append("<h3>Logistic regression of MVI</h3>")
        if logistic is None:
            parts.append(
                f"<p class='absent'>Absent: {esc(discrimination['logistic_absent_reason'])}</p>"
            )
        else:
            rows = [
                (
                    f"{name} ({logistic['units'][name]})",
                    f"{_fmt_ratio(logistic['odds_ratios'][name])} "
                    f"({_fmt_ratio(logistic['ci'][name][0])}–"
                    f"{_fmt_ratio(logistic['ci'][name][1])})",
                    _fmt_p(logistic["p_values"][name]),
                )
                for name in logistic["names"]
            ]
            parts.append(f"<p>n = {logistic['n']}, MVI-positive = {logistic['events']}.</p>")
            parts.append(_table_html(rows, ("predictor", "OR (95 % CI)", "p")))

    software = ", ".join(f"{k} {v}" for k, v in report["software"].items() if v)
    parts.append(f"<footer><p>Software: {esc(software)}.</p>")
    if report["notice"]:
        parts.append(f"<p class='notice'>{esc(report['notice'])}</p>")
    parts.append("</footer></body></html>")
    return "\n".join(p for p in parts if p) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _consoles() -> tuple[Console, Console]:
    # Off a terminal (pipes, CI logs) rich would wrap at 80 columns, as node.cli notes.
    out = Console() if sys.stdout.isatty() else Console(width=160)
    err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
    return out, err


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command to ``app``."""

    @app.command()
    def audit(
        results: Annotated[
            Path, typer.Option("--results", help="Results table from `mvi-node results export`.")
        ],
        followup: Annotated[
            Path,
            typer.Option("--followup", help="Follow-up CSV: key, time and event (0/1) columns."),
        ],
        out_dir: Annotated[Path, typer.Option("--out", help="Folder for the reports.")],
        pathology: Annotated[
            Path | None,
            typer.Option("--pathology", help="Pathology CSV: key and mvi (0/1) columns."),
        ] = None,
        join: Annotated[
            JoinColumn, typer.Option("--join", help="Identifier shared by the files.")
        ] = "study_instance_uid",
        time_col: Annotated[str, typer.Option("--time-col", help="Follow-up time column.")] = (
            "time"
        ),
        event_col: Annotated[
            str, typer.Option("--event-col", help="Follow-up event column (1 = event).")
        ] = "event",
        time_unit: Annotated[
            TimeUnit, typer.Option("--time-unit", help="Unit of the follow-up times.")
        ] = "months",
        covariates: Annotated[
            str,
            typer.Option(
                "--covariates", help="Comma-separated numeric follow-up columns to adjust for."
            ),
        ] = "",
        config: Annotated[
            Path | None,
            typer.Option("--config", "-c", help="TOML configuration file (default: $MVI_CONFIG)."),
        ] = None,
    ) -> None:
        """Survival (KM, log-rank, Cox) and discrimination (AUC) audit of exported results."""
        from node.core.settings import ConfigError, load_settings

        out, err = _consoles()

        def fail(message: str) -> typer.Exit:
            err.print(f"mvi-node: {message}", markup=False, highlight=False, soft_wrap=True)
            return typer.Exit(2)

        try:
            settings = load_settings(config)
        except ConfigError as exc:
            problem = exc.problems[0] if exc.problems else str(exc)
            raise fail(f"{exc.source}: {problem}") from None
        try:
            options = AuditOptions(
                join=join,
                time_col=time_col,
                event_col=event_col,
                time_unit=time_unit,
                covariates=tuple(c.strip() for c in covariates.split(",") if c.strip()),
                pseudonym_key=settings.security.pseudonym_key.get_secret_value(),
            )
            report = run_audit(results, followup, out_dir, pathology_csv=pathology, options=options)
        except (AuditInputError, PseudonymKeyMissing) as exc:
            raise fail(str(exc).splitlines()[0]) from None

        table = Table(title="MVI audit", show_header=False)
        table.add_column("measure")
        table.add_column("value")
        for label, text in headline(report):
            table.add_row(label, text)
        out.print(table)
        if report["notice"]:
            out.print(report["notice"], style="bold red", highlight=False)
        out.print(f"report: {out_dir / 'report.html'}", highlight=False, soft_wrap=True)
