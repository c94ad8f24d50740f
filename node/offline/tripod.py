"""The model card's TRIPOD+AI section and its rendering into the evaluation report.

TRIPOD+AI (Collins et al., BMJ 2024) lists what a report of a clinical prediction model that uses
machine learning must state. :func:`tripod_section` writes the items the training run knows
(intended use, data, exclusions with counts and reasons, missing-data handling, label source,
where the performance figures are, failure modes) into the card at training time;
:func:`render_report` turns a card and an ``evaluate`` result into ``report.md``, the part of the
evaluation report a reviewer reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["render_report", "tripod_section"]

_INTENDED_USE = (
    "Pre-operative risk of microvascular invasion in hepatocellular carcinoma from dual-phase "
    "(arterial and portal-venous) contrast CT, as an adjunct to the radiologist's and surgeon's "
    "judgement when planning resection margins or transplantation; not a diagnosis of HCC and "
    "not for other tumours."
)

_FAILURE_MODES = [
    "no arterial/portal-venous pair identified (the study is not scored: needs_review)",
    "registration of the portal-venous phase failed its checks",
    "segmentation outside the segmenter's training range, fragmented or uncertain (quality gates)",
    "tumour or LOAT too small on its key slice for an ROI (fewer than 4 pixels)",
    "HU of liver or aorta outside the training range ± 30 HU (another protocol or scanner)",
    "scanners, protocols or populations unlike the training centres: recalibrate locally",
]


def _reason_kind(reason: str) -> str:
    head = reason.split(":", 1)[0].strip()
    return head if head and len(head) < 40 else reason[:40]


def tripod_section(
    *,
    studies: int,
    patients: int,
    positives: int,
    centres: Sequence[str],
    skipped: Sequence[tuple[str, str]],
    label_source: str,
    demo: bool = False,
) -> dict[str, Any]:
    """The card's ``tripod`` entry.

    Parameters
    ----------
    skipped
        ``(study key, reason)`` of every labelled study left out; counted by kind of reason.
    label_source
        Where the MVI labels come from (the site says; e.g. histopathology of the specimen).
    """
    exclusions = Counter(_reason_kind(reason) for _, reason in skipped)
    return {
        "guideline": "TRIPOD+AI (Collins et al., BMJ 2024;385:e078378)",
        "intended_use": _INTENDED_USE + (" Demo model — not for clinical use." if demo else ""),
        "data": {
            "studies": int(studies),
            "patients": int(patients),
            "mvi_positive": int(positives),
            "mvi_negative": int(studies - positives),
            "centres": list(centres),
        },
        "exclusions": {
            "studies": len(skipped),
            "by_reason": dict(sorted(exclusions.items())),
        },
        "missing_data": (
            "complete-case: a labelled study without a usable phase pair, registration or "
            "masks is excluded and counted above; no imputation. Measurements are always "
            "available for an included study."
        ),
        "label_source": label_source,
        "performance": (
            "oof_metrics (DeLong CI), oof_intervals (Wilson and bootstrap CIs), "
            "oof_optimism_corrected; external figures come from `mvi-node evaluate`"
        ),
        "failure_modes": list(_FAILURE_MODES),
    }


def _ci(entry: dict[str, Any], key: str = "ci95_bootstrap") -> str:
    value = entry.get("value")
    interval = entry.get(key)
    if value is None:
        return "—"
    if not interval:
        return f"{value:.3f}"
    return f"{value:.3f} ({interval[0]:.3f}–{interval[1]:.3f})"


def render_report(card: dict[str, Any], result: dict[str, Any], overlap: dict[str, Any]) -> str:
    """``report.md``: the model's TRIPOD+AI items and its performance on the test set."""
    name = f"{card.get('name', 'model')} {card.get('version', '')}".strip()
    lines = [f"# Evaluation of {name}", ""]
    tripod = card.get("tripod")
    if isinstance(tripod, dict):
        data = tripod.get("data", {})
        lines += [
            "## Model (TRIPOD+AI items from the card)",
            "",
            f"- **Intended use**: {tripod.get('intended_use', '—')}",
            f"- **Development data**: {data.get('studies')} studies of {data.get('patients')} "
            f"patients ({data.get('mvi_positive')} with MVI); centres: "
            f"{', '.join(data.get('centres') or []) or 'not given'}",
            f"- **Exclusions**: {tripod.get('exclusions', {}).get('studies', 0)} studies "
            + (
                "("
                + "; ".join(
                    f"{k}: {v}"
                    for k, v in tripod.get("exclusions", {}).get("by_reason", {}).items()
                )
                + ")"
                if tripod.get("exclusions", {}).get("by_reason")
                else ""
            ),
            f"- **Missing data**: {tripod.get('missing_data', '—')}",
            f"- **Label source**: {tripod.get('label_source', '—')}",
            f"- **Model**: {card.get('arch')} ({card.get('layout', 'region')} layout), "
            f"{card.get('network', {}).get('members', 1)}-member fold ensemble, threshold "
            f"{card.get('threshold')}",
            "- **Known failure modes**: " + "; ".join(tripod.get("failure_modes", [])),
            "",
        ]
    else:
        lines += ["The model card has no TRIPOD+AI section (trained by an older version).", ""]
    intervals = result.get("intervals", {})
    lines += [
        "## Performance on the test set",
        "",
        f"{result.get('studies')} studies ({result.get('mvi')} with MVI); overlap with the "
        + (
            f"training set: {overlap.get('studies')} studies, {overlap.get('patients')} patients"
            if overlap.get("checked")
            else f"training set not checked ({overlap.get('reason')})"
        ),
        "",
        "| metric | value (95 % bootstrap CI) | Wilson 95 % CI | card (out-of-fold) |",
        "|---|---|---|---|",
    ]
    promised = result.get("card", {})
    for metric in ("auc", "sensitivity", "specificity", "ppv", "npv", "brier"):
        entry = intervals.get(metric, {})
        wilson = entry.get("ci95_wilson")
        wilson_text = f"{wilson[0]:.3f}–{wilson[1]:.3f}" if wilson else "—"
        card_value = promised.get(metric)
        card_text = "—" if card_value is None else f"{card_value:.3f}"
        lines.append(f"| {metric} | {_ci(entry)} | {wilson_text} | {card_text} |")
    calibration = result.get("calibration", {})
    intercept = calibration.get("intercept", {})
    slope = calibration.get("slope", {})
    lines += [
        "",
        f"Calibration intercept {intercept.get('value')} (CI {intercept.get('ci95')}), slope "
        f"{slope.get('value')} (CI {slope.get('ci95')}).",
        "",
        "| subgroup | studies | MVI | AUC (95 % CI) | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.get("subgroups", []):
        auc_text = (
            f"{row['auc']:.3f} ({row['auc_ci95'][0]:.3f}–{row['auc_ci95'][1]:.3f})"
            if "auc" in row
            else row.get("absent_reason", "—")
        )
        lines.append(
            f"| {row['subgroup']} | {row['studies']} | {row['mvi']} | {auc_text} | "
            f"{row.get('sensitivity', '—')} | {row.get('specificity', '—')} |"
        )
    lines += ["", "| threshold probability | net benefit: model | treat all |", "|---|---|---|"]
    for row in result.get("decision_curve", []):
        lines.append(f"| {row['threshold']:.2f} | {row['model']:.4f} | {row['treat_all']:.4f} |")
    lines += _combined_lines(card, result.get("combined_model") or {})
    if card.get("demo"):
        lines += ["", "Demo model — not for clinical use."]
    return "\n".join(lines) + "\n"


def _combined_lines(card: dict[str, Any], combined: dict[str, Any]) -> list[str]:
    """The combined logistic model on the test set beside its card (optimism-corrected)."""
    lines = ["", "## Combined model (DL logit + selected clinical predictors)", ""]
    if "auc" not in combined:
        return [*lines, f"Not evaluated: {combined.get('absent_reason', 'no combined model')}."]
    features = (card.get("combined_model") or {}).get("features") or []
    low, high = combined["auc_ci95"]
    lines += [
        f"Predictors: {', '.join(features) or '—'}; threshold "
        + (
            f"{combined['threshold']:.4f} (its own Youden)"
            if "threshold" in combined
            else "none in the card (an older model)"
        ),
        "",
        "| metric | test | card (optimism-corrected) |",
        "|---|---|---|",
        f"| auc | {combined['auc']:.3f} ({low:.3f}–{high:.3f}) | "
        f"{_number(combined.get('card', {}).get('auc'))} |",
    ]
    for metric in ("sensitivity", "specificity", "brier"):
        value = combined.get(metric)
        lines.append(
            f"| {metric} | {_number(value)} | {_number(combined.get('card', {}).get(metric))} |"
        )
    return lines


def _number(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3f}"
