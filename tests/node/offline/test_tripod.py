"""Specification of the TRIPOD+AI card section and the evaluation report that renders it."""

from __future__ import annotations

from node.offline.tripod import render_report, tripod_section


def test_the_section_counts_exclusions_by_reason_and_names_no_study() -> None:
    section = tripod_section(
        studies=40,
        patients=31,
        positives=17,
        centres=["north", "south"],
        skipped=[
            ("aaa", "RoiError: loat: only 2 mask pixel(s)"),
            ("bbb", "RoiError: tumor: the mask is empty"),
            ("ccc", "ValueError: no arterial/portal-venous pair (one phase)"),
        ],
        label_source="histopathology",
    )
    assert section["data"] == {
        "studies": 40,
        "patients": 31,
        "mvi_positive": 17,
        "mvi_negative": 23,
        "centres": ["north", "south"],
    }
    assert section["exclusions"] == {"studies": 3, "by_reason": {"RoiError": 2, "ValueError": 1}}
    assert "aaa" not in str(section)
    assert {"intended_use", "missing_data", "label_source", "performance", "failure_modes"} <= set(
        section
    )


def test_the_report_shows_the_card_items_and_the_test_figures() -> None:
    card = {
        "name": "mvi-fusion",
        "version": "3",
        "arch": "fusion",
        "layout": "phase",
        "threshold": 0.45,
        "network": {"members": 5},
        "tripod": tripod_section(
            studies=40, patients=40, positives=17, centres=[], skipped=[], label_source="pathology"
        ),
    }
    result = {
        "studies": 80,
        "mvi": 30,
        "card": {"auc": 0.85, "sensitivity": 0.8, "specificity": 0.7, "brier": 0.16},
        "intervals": {
            "auc": {"value": 0.81, "ci95_bootstrap": [0.72, 0.89]},
            "sensitivity": {
                "value": 0.7,
                "ci95_bootstrap": [0.5, 0.85],
                "ci95_wilson": [0.52, 0.83],
            },
            "ppv": {"value": None},
        },
        "calibration": {"intercept": {"value": 0.1, "ci95": [-0.3, 0.5]}, "slope": {"value": 0.9}},
        "subgroups": [
            {
                "subgroup": "tumour ≤ 5 cm",
                "studies": 60,
                "mvi": 20,
                "auc": 0.8,
                "auc_ci95": [0.7, 0.9],
            },
            {"subgroup": "tumour > 5 cm", "studies": 20, "mvi": 10, "absent_reason": "few"},
        ],
        "decision_curve": [{"threshold": 0.2, "model": 0.21, "treat_all": 0.2}],
    }
    text = render_report(card, result, {"checked": True, "studies": 0, "patients": 0})
    assert "## Model (TRIPOD+AI items from the card)" in text
    assert "fusion (phase layout), 5-member fold ensemble" in text
    assert "| auc | 0.810 (0.720–0.890) | — | 0.850 |" in text
    assert "| sensitivity | 0.700 (0.500–0.850) | 0.520–0.830 | 0.800 |" in text
    assert "| ppv | — | — | — |" in text
    assert "| tumour > 5 cm | 20 | 10 | few |" in text
    assert "training set: 0 studies, 0 patients" in text
    older = render_report({"name": "old"}, result, {"checked": False, "reason": "no ids"})
    assert "no TRIPOD+AI section" in older and "training set not checked (no ids)" in older
    assert "Not evaluated: no combined model." in older


def test_the_report_validates_the_combined_model_at_its_own_threshold() -> None:
    card = {"name": "m", "combined_model": {"features": ["dl_logit", "loat_area_cm2"]}}
    combined = {
        "auc": 0.84,
        "auc_ci95": [0.79, 0.89],
        "brier": 0.17,
        "threshold": 0.3812,
        "sensitivity": 0.75,
        "specificity": 0.8,
        "card": {"auc": 0.86, "sensitivity": 0.78, "specificity": None, "brier": 0.16},
    }
    text = render_report(card, {"combined_model": combined}, {"checked": False, "reason": "-"})
    assert "Predictors: dl_logit, loat_area_cm2; threshold 0.3812 (its own Youden)" in text
    assert "| auc | 0.840 (0.790–0.890) | 0.860 |" in text
    assert "| sensitivity | 0.750 | 0.780 |" in text
    assert "| specificity | 0.800 | — |" in text
    # A card from before the combined model had a threshold: AUC and Brier only.
    older = {k: v for k, v in combined.items() if k not in ("threshold", "sensitivity")}
    text = render_report(card, {"combined_model": older}, {"checked": False, "reason": "-"})
    assert "threshold none in the card (an older model)" in text
    assert "| sensitivity | — | 0.780 |" in text
    absent = {"absent_reason": "9 events allow 0 predictor(s)"}
    text = render_report(card, {"combined_model": absent}, {"checked": False, "reason": "-"})
    assert "Not evaluated: 9 events allow 0 predictor(s)." in text
