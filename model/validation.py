"""The figures a reviewer asks of a validation: CIs for every metric, calibration, net benefit.

* :func:`threshold_metrics`: sensitivity, specificity, PPV and NPV at a threshold with Wilson
  95 % CIs (statsmodels), and a stratified bootstrap 95 % CI for each of them, the AUC and the
  Brier score from one set of resamples.
* :func:`calibration`: calibration intercept (calibration-in-the-large, the slope fixed at 1) and
  slope (logistic regression of the outcome on the logit of the prediction), with 95 % CIs, and a
  LOWESS-smoothed calibration curve (statsmodels).
* :func:`decision_curve`: net benefit of the model against treat-all and treat-none over
  threshold probabilities (Vickers & Elkin, Med Decis Making 2006).
* :func:`select_predictors`: the combined model's predictors, screened univariably, eliminated
  backward, and capped at one variable per 10 events.
* :func:`optimism_corrected`: Harrell's bootstrap optimism correction of the figures that depend
  on steps fitted on the same predictions they are reported on (Platt calibration and the Youden
  threshold) — the networks are not refitted; :func:`logistic_optimism` does the same for the
  combined and clinical logistic models, predictor selection included.

Labels are 0/1; probabilities in [0, 1]. Nothing here imports :mod:`node` or reads settings.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from model.stats import (
    _both_classes,
    _labels,
    _scores,
    auc,
    brier,
    platt_apply,
    platt_fit,
    sens_spec_acc,
    youden_threshold,
)

__all__ = [
    "DCA_THRESHOLDS",
    "ENTER_P",
    "EVENTS_PER_VARIABLE",
    "STAY_P",
    "calibration",
    "decision_curve",
    "logistic_optimism",
    "optimism_corrected",
    "select_predictors",
    "threshold_metrics",
    "wilson_ci",
]

_F64 = npt.NDArray[np.float64]

#: Threshold probabilities of the decision curve: 5 % to 80 % in steps of 5 %.
DCA_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 17))

_EPS = 1e-6


def wilson_ci(successes: int, total: int, alpha: float = 0.05) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (``None`` when ``total`` is 0)."""
    if total <= 0:
        return None
    from statsmodels.stats.proportion import proportion_confint  # type: ignore[import-untyped]

    low, high = proportion_confint(successes, total, alpha=alpha, method="wilson")
    return float(low), float(high)


def _at_threshold(y: npt.NDArray[np.int64], p: _F64, threshold: float) -> dict[str, Any]:
    called = p >= threshold
    tp = int(np.sum(called & (y == 1)))
    fp = int(np.sum(called & (y == 0)))
    fn = int(np.sum(~called & (y == 1)))
    tn = int(np.sum(~called & (y == 0)))
    nan = float("nan")
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else nan,
        "specificity": tn / (tn + fp) if tn + fp else nan,
        "ppv": tp / (tp + fp) if tp + fp else nan,
        "npv": tn / (tn + fn) if tn + fn else nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def _rounded(value: float, digits: int = 4) -> float | None:
    return None if not math.isfinite(value) else round(float(value), digits)


def threshold_metrics(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics at ``threshold`` with Wilson and bootstrap 95 % CIs, and the AUC and Brier score.

    The bootstrap resamples each class separately (the prevalence stays that of the sample, as
    in :func:`model.stats.bootstrap_ci`); a metric undefined in a resample (no study called
    positive, for the PPV) is left out of that metric's percentiles.

    Returns
    -------
    dict
        ``{metric: {"value", "ci95_bootstrap", ["ci95_wilson"]}}`` for ``auc``, ``brier``,
        ``sensitivity``, ``specificity``, ``ppv``, ``npv``, plus the confusion counts.
    """
    labels = _labels(y)
    scores = _scores(p, labels.size, "probabilities")
    _both_classes(labels)
    point = _at_threshold(labels, scores, threshold)
    rng = np.random.default_rng([int(seed), 5])
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels == 0)
    names = ("auc", "brier", "sensitivity", "specificity", "ppv", "npv")
    draws: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(n_boot):
        index = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        yb, pb = labels[index], scores[index]
        at = _at_threshold(yb, pb, threshold)
        values = {"auc": auc(yb, pb), "brier": brier(yb, pb), **at}
        for name in names:
            if math.isfinite(values[name]):
                draws[name].append(float(values[name]))
    point_values = {"auc": auc(labels, scores), "brier": brier(labels, scores), **point}
    wilson: dict[str, tuple[int, int]] = {
        "sensitivity": (point["tp"], point["tp"] + point["fn"]),
        "specificity": (point["tn"], point["tn"] + point["fp"]),
        "ppv": (point["tp"], point["tp"] + point["fp"]),
        "npv": (point["tn"], point["tn"] + point["fn"]),
    }
    out: dict[str, Any] = {"threshold": float(threshold), "bootstrap_resamples": int(n_boot)}
    for name in names:
        entry: dict[str, Any] = {"value": _rounded(point_values[name])}
        if draws[name]:
            low, high = np.quantile(draws[name], [0.025, 0.975])
            entry["ci95_bootstrap"] = [_rounded(low), _rounded(high)]
        if name in wilson:
            interval = wilson_ci(*wilson[name])
            entry["ci95_wilson"] = None if interval is None else [_rounded(v) for v in interval]
        out[name] = entry
    out["confusion"] = {k: int(point[k]) for k in ("tp", "fp", "fn", "tn")}
    return out


def _logit(p: _F64) -> _F64:
    clipped = np.clip(p, _EPS, 1.0 - _EPS)
    out: _F64 = np.log(clipped / (1.0 - clipped))
    return out


def calibration(y: npt.ArrayLike, p: npt.ArrayLike, *, points: int = 21) -> dict[str, Any]:
    """Calibration intercept and slope with 95 % CIs, and a LOWESS calibration curve.

    The intercept is calibration-in-the-large: a logistic model with ``logit(p)`` as offset and
    only an intercept (0 when the mean prediction matches the observed rate). The slope is that
    of a logistic regression of the outcome on ``logit(p)`` (1 when the spread is right, < 1 when
    predictions are too extreme). The curve is LOWESS (frac 2/3, no robustness iterations) of the
    outcome on the prediction, read at ``points`` evenly spaced probabilities inside the range the
    predictions cover.
    """
    import statsmodels.api as sm  # type: ignore[import-untyped]
    from statsmodels.nonparametric.smoothers_lowess import lowess  # type: ignore[import-untyped]

    labels = _labels(y)
    scores = _scores(p, labels.size, "probabilities")
    _both_classes(labels)
    lp = _logit(scores)
    result: dict[str, Any] = {"studies": int(labels.size)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            large = sm.GLM(
                labels, np.ones((labels.size, 1)), family=sm.families.Binomial(), offset=lp
            ).fit()
            low, high = large.conf_int()[0]
            result["intercept"] = {
                "value": _rounded(large.params[0]),
                "ci95": [_rounded(low), _rounded(high)],
            }
        except Exception as exc:  # statsmodels' convergence and separation errors
            result["intercept"] = {"value": None, "error": str(exc).splitlines()[0]}
        try:
            fit = sm.GLM(labels, sm.add_constant(lp), family=sm.families.Binomial()).fit()
            low, high = fit.conf_int()[1]
            result["slope"] = {
                "value": _rounded(fit.params[1]),
                "ci95": [_rounded(low), _rounded(high)],
            }
        except Exception as exc:
            result["slope"] = {"value": None, "error": str(exc).splitlines()[0]}
        smooth = lowess(labels.astype(float), scores, frac=2.0 / 3.0, it=0, return_sorted=True)
    grid = np.linspace(float(scores.min()), float(scores.max()), points)
    observed = np.interp(grid, smooth[:, 0], smooth[:, 1])
    result["curve"] = {
        "predicted": [_rounded(v) for v in grid],
        "observed": [_rounded(float(np.clip(v, 0.0, 1.0))) for v in observed],
        "method": "lowess, frac 2/3",
    }
    return result


def decision_curve(
    y: npt.ArrayLike, p: npt.ArrayLike, thresholds: Sequence[float] = DCA_THRESHOLDS
) -> list[dict[str, float]]:
    """Net benefit per threshold probability: the model, treat all, treat none (0).

    ``net benefit = TP/n − FP/n × pt / (1 − pt)``: true positives found per study, less false
    positives weighted by the odds at which a clinician is indifferent to treating.
    """
    labels = _labels(y)
    scores = _scores(p, labels.size, "probabilities")
    n = labels.size
    prevalence = float(labels.mean())
    rows = []
    for pt in thresholds:
        if not 0.0 < pt < 1.0:
            raise ValueError(f"threshold probabilities must lie in (0, 1), got {pt}")
        odds = pt / (1.0 - pt)
        called = scores >= pt
        tp = float(np.sum(called & (labels == 1)))
        fp = float(np.sum(called & (labels == 0)))
        rows.append(
            {
                "threshold": float(pt),
                "model": round(tp / n - fp / n * odds, 5),
                "treat_all": round(prevalence - (1.0 - prevalence) * odds, 5),
                "treat_none": 0.0,
            }
        )
    return rows


def optimism_corrected(
    y: npt.ArrayLike,
    logits: npt.ArrayLike,
    *,
    n_boot: int = 200,
    seed: int = 0,
    fit: Callable[[npt.NDArray[np.int64], _F64], tuple[float, float, float]] | None = None,
) -> dict[str, Any]:
    """Harrell's bootstrap optimism correction of calibration and threshold choice.

    Apparent figures come from Platt scaling and the Youden threshold fitted on ``(y, logits)``
    and reported on the same predictions. Each bootstrap resample refits both, and the optimism
    is the mean of (figure on the resample) − (figure of the resample's fit on the original
    predictions); the corrected figure is apparent − optimism. The networks behind the logits
    are not refitted (their out-of-fold logits already are predictions on unseen studies).

    Parameters
    ----------
    fit
        ``(y, logits) -> (a, b, threshold)``; Platt + Youden by default.

    Returns
    -------
    dict
        ``{"apparent": {...}, "optimism": {...}, "corrected": {...}, "resamples": n}`` for
        sensitivity, specificity, accuracy and Brier score (resamples whose refit fails are
        skipped and counted).
    """
    labels = _labels(y)
    x = _scores(logits, labels.size, "logits")
    _both_classes(labels)

    def platt_youden(yy: npt.NDArray[np.int64], xx: _F64) -> tuple[float, float, float]:
        a, b = platt_fit(yy, xx)
        return a, b, youden_threshold(yy, platt_apply(xx, a, b))

    fitter = fit or platt_youden

    def figures(yy: npt.NDArray[np.int64], xx: _F64, params: tuple[float, float, float]) -> _F64:
        a, b, threshold = params
        pp = platt_apply(xx, a, b)
        sensitivity, specificity, accuracy = sens_spec_acc(yy, pp, threshold)
        return np.array([sensitivity, specificity, accuracy, brier(yy, pp)])

    def gap(index: npt.NDArray[np.intp]) -> _F64:
        yb, xb = labels[index], x[index]
        params = fitter(yb, xb)  # ValueError: a resample whose slope is not positive
        return figures(yb, xb, params) - figures(labels, x, params)

    return _harrell(
        labels,
        ("sensitivity", "specificity", "accuracy", "brier"),
        figures(labels, x, fitter(labels, x)),
        gap,
        n_boot=n_boot,
        rng=np.random.default_rng([int(seed), 9]),
        method="Harrell bootstrap: Platt calibration and Youden threshold refitted",
    )


def _harrell(
    labels: npt.NDArray[np.int64],
    names: Sequence[str],
    apparent: _F64,
    gap: Callable[[npt.NDArray[np.intp]], _F64],
    *,
    n_boot: int,
    rng: np.random.Generator,
    method: str,
) -> dict[str, Any]:
    """Harrell's optimism: the mean of ``gap`` (figures on a class-stratified resample minus the
    resample's fit on the original studies) over ``n_boot`` resamples; a resample whose fit
    raises ``ValueError`` or ``LinAlgError`` is skipped and counted."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    gaps, failed = [], 0
    for _ in range(n_boot):
        index = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        try:
            gaps.append(gap(index))
        except (ValueError, np.linalg.LinAlgError):
            failed += 1
    optimism = np.mean(gaps, axis=0) if gaps else np.full(len(names), np.nan)
    corrected = apparent - optimism
    return {
        "apparent": {n: _rounded(v) for n, v in zip(names, apparent, strict=True)},
        "optimism": {n: _rounded(v) for n, v in zip(names, optimism, strict=True)},
        "corrected": {n: _rounded(v) for n, v in zip(names, corrected, strict=True)},
        "resamples": len(gaps),
        "failed_resamples": failed,
        "method": method,
    }


#: Events per variable the combined model needs (Peduzzi et al., J Clin Epidemiol 1996).
EVENTS_PER_VARIABLE = 10
#: Univariable p below which a candidate enters the multivariable model.
ENTER_P = 0.10
#: Multivariable p a predictor must keep (backward elimination above it).
STAY_P = 0.05


def select_predictors(
    columns: dict[str, npt.ArrayLike],
    y: npt.ArrayLike,
    *,
    forced: Sequence[str] = (),
    enter_p: float = ENTER_P,
    stay_p: float = STAY_P,
    events_per_variable: int = EVENTS_PER_VARIABLE,
) -> tuple[list[str], dict[str, Any]]:
    """Univariable screening, then multivariable backward elimination, under an EPV rule.

    Each candidate (every column not in ``forced``) is tested alone; those with ``p < enter_p``
    enter a model with the ``forced`` predictors, and the candidate with the largest p is dropped
    while that p is ``>= stay_p``. The variables may not exceed ``events / events_per_variable``
    (events: the smaller class): beyond that, candidates with the weakest univariable p go first.

    Returns
    -------
    names, report
        The predictors chosen (forced first, in the order given), and what each step saw.

    Raises
    ------
    ValueError
        When the events allow not even the forced predictors.
    """
    from model.stats import logistic_model

    labels = _labels(y)
    n1, n0 = _both_classes(labels)
    events = min(n1, n0)
    allowed = events // events_per_variable
    forced = list(forced)
    if allowed < max(1, len(forced)):
        raise ValueError(
            f"{events} events allow {allowed} predictor(s) at {events_per_variable} events per "
            f"variable; the combined model needs {max(1, len(forced))}"
        )
    data = {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}
    univariable: dict[str, Any] = {}
    for name in data:
        if name in forced:
            continue
        try:
            fit = logistic_model(data[name][:, None], labels, [name])
            univariable[name] = {
                "odds_ratio": fit["odds_ratios"][name],
                "p": fit["p_values"][name],
            }
        except ValueError as exc:
            univariable[name] = {"error": str(exc)}
    entered = sorted(
        (n for n, r in univariable.items() if "p" in r and r["p"] < enter_p),
        key=lambda n: univariable[n]["p"],
    )
    capped = entered[: max(0, allowed - len(forced))]
    chosen = list(capped)
    steps: list[dict[str, Any]] = []
    while chosen:
        names = forced + chosen
        try:
            fit = logistic_model(np.stack([data[n] for n in names], axis=1), labels, names)
        except ValueError as exc:  # separation or collinearity: the weakest candidate goes
            weakest = chosen[-1]
            steps.append({"dropped": weakest, "reason": str(exc).splitlines()[0]})
            chosen.remove(weakest)
            continue
        worst = max(chosen, key=lambda n: fit["p_values"][n])
        if fit["p_values"][worst] < stay_p:
            break
        steps.append({"dropped": worst, "p": fit["p_values"][worst]})
        chosen.remove(worst)
    report = {
        "rule": (
            f"univariable p < {enter_p} enters; backward elimination while multivariable "
            f"p >= {stay_p}; at most one variable per {events_per_variable} events"
        ),
        "events": int(events),
        "variables_allowed": int(allowed),
        "forced": forced,
        "univariable": univariable,
        "entered": entered,
        "capped_by_events": [n for n in entered if n not in capped],
        "eliminated": steps,
        "selected": forced + chosen,
    }
    return forced + chosen, report


def logistic_optimism(
    columns: dict[str, npt.ArrayLike],
    y: npt.ArrayLike,
    *,
    forced: Sequence[str] = (),
    select: bool = True,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Harrell's bootstrap optimism of a logistic model, the predictor selection included.

    The apparent figures are those of the model fitted on all studies (after
    :func:`select_predictors` when ``select``). Each stratified resample repeats the whole
    procedure, selection included (a selection made once and then refitted would hide its own
    optimism), and the optimism is the mean of (figure on the resample) − (the resample's model
    on the original studies). Figures: AUC, Brier score, the calibration slope (the original
    outcome on the resample model's linear predictor: 1 apparent; its corrected value is the
    shrinkage a new cohort should expect), and sensitivity and specificity at the model's own
    Youden threshold, which each resample chooses again on its own fit.

    Returns
    -------
    dict
        ``apparent``, ``optimism``, ``corrected`` (auc, brier, calibration_slope, sensitivity,
        specificity), ``resamples``, ``failed_resamples`` (a resample whose fit separates or whose
        selection fails), ``method``.
    """
    import statsmodels.api as sm

    labels = _labels(y)
    _both_classes(labels)
    data = {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}

    def procedure(index: npt.NDArray[np.intp]) -> tuple[list[str], _F64]:
        yy = labels[index]
        sub: dict[str, npt.ArrayLike] = {name: values[index] for name, values in data.items()}
        if select:
            names, _ = select_predictors(sub, yy, forced=forced)
        else:
            names = list(data)
        design = sm.add_constant(
            np.stack([data[n][index] for n in names], axis=1), has_constant="add"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = sm.Logit(yy, design).fit(disp=0, maxiter=100)
        params = np.asarray(fit.params, dtype=np.float64)
        if not np.all(np.isfinite(params)) or np.max(np.abs(params)) > 50.0:
            raise ValueError("separation")
        return names, params

    def linear(names: list[str], params: _F64, index: npt.NDArray[np.intp]) -> _F64:
        x = np.stack([data[n][index] for n in names], axis=1)
        return np.asarray(params[0] + x @ params[1:], dtype=np.float64)

    def figures(yy: npt.NDArray[np.int64], lp: _F64, threshold: float) -> _F64:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slope = sm.Logit(yy, sm.add_constant(lp, has_constant="add")).fit(disp=0).params[1]
        p = 1.0 / (1.0 + np.exp(-lp))
        sensitivity, specificity, _ = sens_spec_acc(yy, p, threshold)
        return np.array([auc(yy, p), brier(yy, p), float(slope), sensitivity, specificity])

    def youden(yy: npt.NDArray[np.int64], lp: _F64) -> float:
        return youden_threshold(yy, 1.0 / (1.0 + np.exp(-lp)))

    everyone = np.arange(labels.size)

    def gap(index: npt.NDArray[np.intp]) -> _F64:
        boot_names, boot_params = procedure(index)
        on_resample = linear(boot_names, boot_params, index)
        threshold = youden(labels[index], on_resample)
        on_boot = figures(labels[index], on_resample, threshold)
        return on_boot - figures(labels, linear(boot_names, boot_params, everyone), threshold)

    names, params = procedure(everyone)
    apparent_lp = linear(names, params, everyone)
    return _harrell(
        labels,
        ("auc", "brier", "calibration_slope", "sensitivity", "specificity"),
        figures(labels, apparent_lp, youden(labels, apparent_lp)),
        gap,
        n_boot=n_boot,
        rng=np.random.default_rng([int(seed), 11]),
        method=(
            "Harrell bootstrap: predictor selection and logistic fit repeated per resample"
            if select
            else "Harrell bootstrap: logistic fit repeated per resample"
        ),
    )
