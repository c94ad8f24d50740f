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
