"""The audit report as text: the headline rows (command line and HTML) and report.html."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

from model.survival import HIGH as _HIGH


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
