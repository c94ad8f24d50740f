"""Specification of the validation statistics: CIs, calibration, net benefit, optimism."""

from __future__ import annotations

import numpy as np
import pytest

from model import validation


def _cohort(n: int, seed: int, *, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from known probabilities; predictions ``sigmoid(spread * true logit)``."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-0.3, 1.5, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-true_logit))).astype(int)
    return y, 1.0 / (1.0 + np.exp(-spread * true_logit))


def test_wilson_interval_matches_the_textbook() -> None:
    # 8 of 10: Wilson 95 % interval 0.490-0.943 (Newcombe 1998, method 3).
    low, high = validation.wilson_ci(8, 10) or (0.0, 0.0)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert validation.wilson_ci(0, 0) is None


def test_threshold_metrics_carry_both_kinds_of_interval() -> None:
    y, p = _cohort(400, 1)
    metrics = validation.threshold_metrics(y, p, 0.5, n_boot=300)
    for name in ("auc", "brier", "sensitivity", "specificity", "ppv", "npv"):
        entry = metrics[name]
        low, high = entry["ci95_bootstrap"]
        assert low <= entry["value"] <= high, name
    c = metrics["confusion"]
    assert c["tp"] + c["fp"] + c["fn"] + c["tn"] == 400
    assert metrics["ppv"]["value"] == pytest.approx(c["tp"] / (c["tp"] + c["fp"]), abs=1e-4)
    low, high = metrics["npv"]["ci95_wilson"]
    assert low < metrics["npv"]["value"] < high
    # Nobody called positive: the PPV is undefined, not zero.
    none_called = validation.threshold_metrics(y, p, 1.01, n_boot=20)
    assert none_called["ppv"]["value"] is None and none_called["ppv"]["ci95_wilson"] is None
    assert none_called["sensitivity"]["value"] == 0.0


def test_calibration_intercept_and_slope_recover_a_known_miscalibration() -> None:
    y, right = _cohort(4000, 2)
    fit = validation.calibration(y, right)
    assert fit["intercept"]["value"] == pytest.approx(0.0, abs=0.1)
    assert fit["slope"]["value"] == pytest.approx(1.0, abs=0.1)
    low, high = fit["slope"]["ci95"]
    assert low < 1.0 < high
    # Twice the true logit: overconfident, slope about one half.
    _, extreme = _cohort(4000, 2, spread=2.0)
    assert validation.calibration(y, extreme)["slope"]["value"] == pytest.approx(0.5, abs=0.07)
    curve = validation.calibration(y, right)["curve"]
    # The smoothed curve of a calibrated model follows the diagonal.
    assert np.max(np.abs(np.subtract(curve["observed"], curve["predicted"]))) < 0.1


def test_decision_curve_against_treat_all_and_none() -> None:
    y = np.array([1] * 30 + [0] * 70)
    perfect = y.astype(float)
    rows = validation.decision_curve(y, perfect, (0.1, 0.5))
    assert [r["model"] for r in rows] == [pytest.approx(0.3), pytest.approx(0.3)]
    assert rows[0]["treat_all"] == pytest.approx(0.3 - 0.7 * (0.1 / 0.9), abs=1e-5)
    assert rows[1]["treat_all"] == pytest.approx(0.3 - 0.7)
    assert all(r["treat_none"] == 0.0 for r in rows)
    with pytest.raises(ValueError, match="threshold probabilities"):
        validation.decision_curve(y, perfect, (0.0,))


def test_optimism_correction_lowers_what_the_threshold_was_chosen_on() -> None:
    y, p = _cohort(80, 3)
    logits = np.log(p / (1 - p)) + np.random.default_rng(4).normal(0, 1.5, p.size)
    result = validation.optimism_corrected(y, logits, n_boot=100)
    apparent, corrected = result["apparent"], result["corrected"]
    # Youden's threshold maximises sensitivity + specificity on these very predictions.
    assert corrected["sensitivity"] + corrected["specificity"] < (
        apparent["sensitivity"] + apparent["specificity"]
    )
    assert result["resamples"] + result["failed_resamples"] == 100


def test_predictor_selection_screens_eliminates_and_respects_events_per_variable() -> None:
    rng = np.random.default_rng(6)
    n = 600
    strong = rng.normal(0, 1, n)
    weak_but_real = rng.normal(0, 1, n)
    noise = rng.normal(0, 1, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * strong + 0.6 * weak_but_real)))).astype(int)
    columns = {"dl_logit": strong, "size": weak_but_real, "noise": noise}
    names, report = validation.select_predictors(columns, y, forced=["dl_logit"])
    assert names[0] == "dl_logit" and "size" in names and "noise" not in names
    assert report["univariable"]["size"]["p"] < 0.10
    assert report["events"] == min(int(y.sum()), n - int(y.sum()))
    # Twenty events allow two variables: the forced one and the strongest candidate only.
    few = np.zeros(n, dtype=int)
    few[rng.choice(n, 20, replace=False, p=np.exp(strong) / np.exp(strong).sum())] = 1
    names, report = validation.select_predictors(columns, few, forced=["dl_logit"])
    assert len(names) <= 2 and report["variables_allowed"] == 2
    # Nine events allow none: a clear refusal, not a model.
    nine = np.zeros(n, dtype=int)
    nine[:9] = 1
    with pytest.raises(ValueError, match="9 events allow 0 predictor"):
        validation.select_predictors(columns, nine, forced=["dl_logit"])


def test_the_combined_model_optimism_repeats_the_selection_in_every_resample() -> None:
    rng = np.random.default_rng(12)
    n = 160
    signal = rng.normal(0, 1, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-1.2 * signal))).astype(int)
    # Eight noise candidates: a selection made on these very studies flatters itself.
    columns = {"dl_logit": signal, **{f"noise{k}": rng.normal(0, 1, n) for k in range(8)}}
    result = validation.logistic_optimism(columns, y, forced=["dl_logit"], n_boot=60, seed=1)
    apparent, corrected = result["apparent"], result["corrected"]
    assert apparent["calibration_slope"] == pytest.approx(1.0, abs=1e-6)
    assert corrected["auc"] < apparent["auc"]
    assert corrected["brier"] > apparent["brier"]
    assert corrected["calibration_slope"] < 1.0  # a new cohort should expect shrinkage

    # The model's own Youden threshold, chosen again in every resample, flatters itself too.
    def youden_j(figures: dict[str, float]) -> float:
        return figures["sensitivity"] + figures["specificity"] - 1.0

    assert youden_j(corrected) < youden_j(apparent)
    assert result["resamples"] + result["failed_resamples"] == 60
    fixed = validation.logistic_optimism({"dl_logit": signal}, y, select=False, n_boot=60)
    # One predictor chosen in advance has less to be optimistic about.
    assert fixed["optimism"]["auc"] < result["optimism"]["auc"] + 1e-9
