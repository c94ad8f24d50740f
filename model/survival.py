"""Survival by risk group: Kaplan–Meier, the log-rank test and Cox models with their PH check.

What ``mvi-node audit`` reports about follow-up, as numbers only (no files, no settings, no
plots): :func:`risk_group_survival` takes the times, events, risk groups and covariates of the
matched patients and returns the report section and the fitted Kaplan–Meier curves (for a plot).
Thin data is not an error: with one risk group or too few events the section says why a number is
absent.

lifelines (on pandas frames) is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "EVENT",
    "HIGH",
    "PH_ALPHA",
    "SCORE",
    "TIME",
    "first_line",
    "fit_cox",
    "risk_group_survival",
    "score_survival",
    "time_dependent_auc",
]

#: Column names of the Cox design; dunder names cannot collide with a site's covariates.
TIME, EVENT, HIGH = "__time__", "__event__", "high_risk"
#: The continuous score's term: the MVI probability in tens of percentage points.
SCORE = "mvi_probability_per_10_points"
#: Significance level of the proportional-hazards test.
PH_ALPHA = 0.05


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for a reason in the report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def fit_cox(
    frame: Any, terms: list[str], headline: str = HIGH
) -> tuple[dict[str, Any] | None, str | None]:
    """Cox model of ``terms`` with its proportional-hazards check; (None, why) if it fails.

    Parameters
    ----------
    frame
        A pandas frame with :data:`TIME`, :data:`EVENT`, :data:`HIGH` and the other ``terms``.
    terms
        The model's terms; ``headline`` must be one of them.
    headline
        The term whose hazard ratio is copied flat into the result (:data:`HIGH` by default).

    Returns
    -------
    model, reason
        Hazard ratios with 95 % CIs and p-values per term, concordance, the likelihood-ratio
        p-value, lifelines' warnings and the PH test (rank time transform); or None and why.
    """
    from lifelines import CoxPHFitter  # type: ignore[import-untyped]
    from lifelines.exceptions import ConvergenceError  # type: ignore[import-untyped]
    from lifelines.statistics import proportional_hazard_test  # type: ignore[import-untyped]

    data = frame[[TIME, EVENT, *terms]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cph = CoxPHFitter().fit(data, duration_col=TIME, event_col=EVENT)
        except (ConvergenceError, np.linalg.LinAlgError, ValueError, ZeroDivisionError) as exc:
            return None, f"Cox model could not be fitted ({first_line(exc)})"
    summary = cph.summary
    model: dict[str, Any] = {
        "n": len(data),
        "events": int(data[EVENT].sum()),
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
    # The headline (high vs low risk by default), flat in the dict for readers of report.json.
    model.update({k: model["terms"][headline][k] for k in ("hr", "ci_low", "ci_high", "p")})
    model["warnings"] = sorted({str(w.message).strip().splitlines()[0] for w in caught})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            test = proportional_hazard_test(cph, data, time_transform="rank")
        ph = {
            str(term): {
                "statistic": float(row["test_statistic"]),
                "p": float(row["p"]),
                "violated": bool(row["p"] < PH_ALPHA),
            }
            for term, row in test.summary.iterrows()
        }
        model["ph_test"] = {"time_transform": "rank", "alpha": PH_ALPHA, "terms": ph}
        model["ph_violation"] = any(t["violated"] for t in ph.values())
        model["ph_test_absent_reason"] = None
    except Exception as exc:  # lifelines raises assorted errors on degenerate residuals
        model["ph_test"], model["ph_violation"] = None, None
        model["ph_test_absent_reason"] = f"proportional-hazards test failed ({first_line(exc)})"
    return model, None


def risk_group_survival(
    time: Sequence[float],
    event: Sequence[int],
    high_risk: Sequence[bool],
    covariates: Mapping[str, Sequence[float | None]],
    time_unit: str,
) -> tuple[dict[str, Any], list[Any]]:
    """KM by risk group, log-rank, Cox (crude and adjusted by ``covariates``), PH checks.

    Parameters
    ----------
    time, event, high_risk
        One value per patient: follow-up time, event 0/1, and whether the model called high risk.
    covariates
        Name -> one value per patient (None: unknown) for the adjusted Cox model, in order.
    time_unit
        The unit of ``time`` (recorded in the section).

    Returns
    -------
    section, fitters
        The survival section of the audit report, and the fitted lifelines
        ``KaplanMeierFitter`` of each risk group present (high first).
    """
    import pandas as pd  # type: ignore[import-untyped]
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    frame = pd.DataFrame(
        {
            TIME: list(time),
            EVENT: list(event),
            HIGH: [int(h) for h in high_risk],
            **{name: list(values) for name, values in covariates.items()},
        }
    )
    n, events = len(frame), int(frame[EVENT].sum())
    groups: dict[str, Any] = {}
    fitters = []
    for name, flag in (("high", 1), ("low", 0)):
        part = frame[frame[HIGH] == flag]
        entry: dict[str, Any] = {"n": len(part), "events": int(part[EVENT].sum())}
        if len(part):
            kmf = KaplanMeierFitter(label=f"{name.capitalize()} risk")
            kmf.fit(part[TIME], part[EVENT])
            fitters.append(kmf)
            median = float(kmf.median_survival_time_)
            entry["median_survival"] = median if math.isfinite(median) else None
        else:
            entry["median_survival"] = None
        groups[name] = entry
    report: dict[str, Any] = {
        "n": n,
        "events": events,
        "time_unit": time_unit,
        "follow_up_median": float(frame[TIME].median()),
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
        high, low = frame[frame[HIGH] == 1], frame[frame[HIGH] == 0]
        test = logrank_test(high[TIME], low[TIME], high[EVENT], low[EVENT])
        report["logrank"] = {
            "statistic": float(test.test_statistic),
            "p": float(test.p_value),
        }
        report["logrank_absent_reason"] = None
    else:
        report["logrank"] = None
        report["logrank_absent_reason"] = absent

    if absent is None:
        report["cox"], report["cox_absent_reason"] = fit_cox(frame, [HIGH])
    else:
        report["cox"], report["cox_absent_reason"] = None, absent

    names = list(covariates)
    report["covariates"] = names
    reason: str | None
    if not names:
        report["cox_adjusted"], reason = None, "no covariates given (--covariates)"
    elif absent is not None:
        report["cox_adjusted"], reason = None, absent
    else:
        complete = frame.dropna(subset=names)
        terms = [HIGH, *names]
        adjusted_events = int(complete[EVENT].sum())
        if complete.empty:
            report["cox_adjusted"] = None
            reason = "no matched patient has every covariate"
        elif complete[HIGH].nunique() < 2:
            report["cox_adjusted"] = None
            reason = "only one risk group among patients with every covariate"
        elif adjusted_events <= len(terms):
            report["cox_adjusted"] = None
            reason = (
                f"too few events ({adjusted_events}) for an adjusted model of {len(terms)} terms"
            )
        else:
            report["cox_adjusted"], reason = fit_cox(complete, terms)
            if report["cox_adjusted"] is not None:
                report["cox_adjusted"]["excluded_missing_covariates"] = n - len(complete)
    report["cox_adjusted_absent_reason"] = reason
    return report, fitters


def time_dependent_auc(
    time: Sequence[float], event: Sequence[int], score: Sequence[float], horizon: float
) -> float | None:
    """Cumulative/dynamic AUC at ``horizon`` with inverse-probability-of-censoring weights.

    Cases had the event by ``horizon``, controls were event-free beyond it; each case is weighted
    by 1 / G(T−), G the Kaplan–Meier estimate of remaining uncensored (Uno et al., Stat Med 2007,
    the cumulative/dynamic form). ``None`` when there is no case or no control.
    """
    from lifelines import KaplanMeierFitter

    t = np.asarray(time, dtype=np.float64)
    d = np.asarray(event, dtype=np.int64)
    s = np.asarray(score, dtype=np.float64)
    cases = (t <= horizon) & (d == 1)
    controls = t > horizon
    if not cases.any() or not controls.any():
        return None
    censoring = KaplanMeierFitter().fit(t, 1 - d)
    # G just before each case's time: the survival function at the previous distinct time.
    g = np.asarray(censoring.survival_function_at_times(np.nextafter(t[cases], -np.inf)))
    weights = 1.0 / np.clip(g, 1e-6, None)
    greater = (s[cases][:, None] > s[controls][None, :]).astype(float)
    ties = (s[cases][:, None] == s[controls][None, :]).astype(float) * 0.5
    numerator = float(np.sum(weights[:, None] * (greater + ties)))
    return numerator / float(np.sum(weights) * controls.sum())


def score_survival(
    time: Sequence[float],
    event: Sequence[int],
    probability: Sequence[float],
    horizons: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Survival against the continuous MVI probability, not only the risk groups.

    Cox on the probability (hazard ratio per 10 percentage points) with its PH check, Harrell's
    C (lifelines' ``concordance_index``: a higher probability should mean an earlier event) and
    the time-dependent AUC at ``horizons`` (default: the quartiles of the observed event times).
    """
    import pandas as pd
    from lifelines.utils import concordance_index  # type: ignore[import-untyped]

    t = [float(v) for v in time]
    d = [int(v) for v in event]
    p = [float(v) for v in probability]
    report: dict[str, Any] = {"n": len(t), "events": int(sum(d))}
    if sum(d) == 0 or len(set(p)) < 2:
        why = "no events" if sum(d) == 0 else "every probability is the same"
        return report | {"cox": None, "cox_absent_reason": why, "harrell_c": None}
    frame = pd.DataFrame({TIME: t, EVENT: d, SCORE: [10.0 * v for v in p]})
    report["cox"], report["cox_absent_reason"] = fit_cox(frame, [SCORE], headline=SCORE)
    report["harrell_c"] = float(concordance_index(t, [-v for v in p], d))
    if horizons is None:
        times = sorted(tt for tt, dd in zip(t, d, strict=True) if dd)
        horizons = [float(np.quantile(times, q)) for q in (0.25, 0.5, 0.75)]
    report["time_dependent_auc"] = [
        {"time": float(h), "auc": time_dependent_auc(t, d, p, float(h))} for h in horizons
    ]
    report["time_dependent_auc_method"] = "cumulative/dynamic, IPCW (Uno 2007)"
    return report
