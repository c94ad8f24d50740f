"""Survival by risk group: the numbers are lifelines', and thin data says why one is absent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.statistics import logrank_test

from model.survival import EVENT, HIGH, TIME, fit_cox, risk_group_survival


def _cohort(n: int = 80, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    high = rng.random(n) < 0.5
    time = rng.exponential(np.where(high, 12.0, 30.0))
    event = (rng.random(n) < 0.8).astype(int)
    return time, event, high


def test_hazard_ratio_and_log_rank_are_those_of_lifelines() -> None:
    time, event, high = _cohort()
    section, fitters = risk_group_survival(time, event, high, {}, "months")
    frame = pd.DataFrame({"t": time, "e": event, "h": high.astype(int)})
    reference = CoxPHFitter().fit(frame, duration_col="t", event_col="e").summary.loc["h"]
    assert section["cox"]["hr"] == pytest.approx(float(reference["exp(coef)"]))
    assert section["cox"]["p"] == pytest.approx(float(reference["p"]))
    test = logrank_test(time[high], time[~high], event[high], event[~high])
    assert section["logrank"]["p"] == pytest.approx(float(test.p_value))
    assert section["groups"]["high"]["n"] == int(high.sum())
    assert section["time_unit"] == "months" and section["cox_adjusted"] is None
    assert [f._label for f in fitters] == ["High risk", "Low risk"]
    assert section["cox"]["ph_test"]["terms"].keys() == {HIGH}


def test_one_risk_group_leaves_every_comparison_absent_with_the_reason() -> None:
    time, event, _ = _cohort(20)
    section, fitters = risk_group_survival(time, event, [True] * 20, {}, "days")
    assert len(fitters) == 1
    reason = "only one risk group (high) among matched patients"
    assert section["logrank"] is None and section["logrank_absent_reason"] == reason
    assert section["cox"] is None and section["cox_absent_reason"] == reason


def test_the_adjusted_model_uses_patients_with_every_covariate() -> None:
    time, event, high = _cohort(120)
    age = [None if i % 10 == 0 else float(50 + i % 30) for i in range(120)]
    section, _ = risk_group_survival(time, event, high, {"age": age}, "months")
    adjusted = section["cox_adjusted"]
    assert adjusted is not None and set(adjusted["terms"]) == {HIGH, "age"}
    assert adjusted["excluded_missing_covariates"] == 12 and adjusted["n"] == 108


def test_a_cox_model_that_cannot_be_fitted_says_why() -> None:
    # The risk group separates events perfectly: no finite hazard ratio exists.
    frame = pd.DataFrame({TIME: [1.0, 2.0, 3.0, 4.0], EVENT: [1, 1, 0, 0], HIGH: [1, 1, 0, 0]})
    model, reason = fit_cox(frame, [HIGH])
    assert model is None and reason is not None and "Cox model" in reason


def test_the_continuous_score_gets_a_hazard_ratio_harrells_c_and_time_dependent_auc() -> None:
    from model.stats import auc
    from model.survival import score_survival, time_dependent_auc

    rng = np.random.default_rng(11)
    n = 400
    probability = rng.random(n)
    # Hazard doubles per 0.25 of probability; censoring uniform over 0-30 months.
    event_time = rng.exponential(20.0 / np.exp(np.log(2) * probability / 0.25))
    censor = rng.uniform(0, 30, n)
    time = np.minimum(event_time, censor)
    event = (event_time <= censor).astype(int)
    report = score_survival(time, event, probability, horizons=[6.0, 12.0])
    cox = report["cox"]
    # Per 10 points: 2 ** 0.4 = 1.32.
    assert 1.2 < cox["hr"] < 1.45 and cox["ci_low"] < 1.32 < cox["ci_high"]
    assert 0.6 < report["harrell_c"] < 0.75
    assert all(0.65 < row["auc"] < 0.9 for row in report["time_dependent_auc"])
    # Without censoring the weights are all one: the plain AUC of "event by t" against the rest.
    full = np.ones(n, dtype=int)
    plain = auc((event_time <= 12.0).astype(int), probability)
    assert time_dependent_auc(event_time, full, probability, 12.0) == pytest.approx(plain)
    assert score_survival(time, np.zeros(n, dtype=int), probability)["cox_absent_reason"] == (
        "no events"
    )
