"""Statistics of the method: AUC with DeLong CI and test, calibration, thresholds, logistic model.

* :func:`auc`, :func:`delong_ci`, :func:`delong_test`: the area under the ROC curve, its variance
  by DeLong, DeLong & Clarke-Pearson (1988) computed with the fast midrank algorithm of Sun & Xu
  (2014, IEEE Signal Process. Lett. 21:1389), and the paired test of two AUCs on the same cases
  (what the paper uses to compare the fusion and tumour-only models).
* :func:`platt_fit` / :func:`platt_apply`: Platt scaling of logits, with Platt's smoothed targets.
* :func:`youden_threshold`, :func:`sens_spec_acc`, :func:`brier`, :func:`roc_curve`,
  :func:`confusion` and :func:`calibration_bins` (the audit's reliability curve).
* :func:`logistic_model`: multivariable logistic regression (statsmodels) with odds ratios, Wald
  95 % CIs and p-values, for the combined model (DL output + max tumour diameter + LOAT area).

Labels are 0/1 (1 = MVI); scores are "higher means more likely positive". Nothing here imports
:mod:`node` or reads settings.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "auc",
    "bootstrap_ci",
    "brier",
    "calibration_bins",
    "confusion",
    "delong_ci",
    "delong_covariance",
    "delong_test",
    "logistic_model",
    "logistic_predict",
    "platt_apply",
    "platt_fit",
    "roc_curve",
    "sens_spec_acc",
    "youden_threshold",
]

_F64 = npt.NDArray[np.float64]
_NORMAL = NormalDist()


def _labels(y: npt.ArrayLike) -> npt.NDArray[np.int64]:
    array = np.asarray(y)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {array.shape}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return array.astype(np.int64)


def _scores(p: npt.ArrayLike, n: int, name: str = "scores") -> _F64:
    array = np.asarray(p, dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite")
    return array


def _both_classes(y: npt.NDArray[np.int64]) -> tuple[int, int]:
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    if n1 == 0 or n0 == 0:
        raise ValueError(f"both classes are needed ({n1} positive, {n0} negative)")
    return n1, n0


def _midranks(x: _F64) -> _F64:
    """Ranks 1..n of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    n = x.size
    # Boundaries of runs of equal values; each run gets the mean of its positions (1-based).
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], n]
    mid = (starts + ends + 1) / 2.0
    ranks_sorted = np.repeat(mid, ends - starts)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney; ties count one half).

    Raises
    ------
    ValueError
        When a class is absent or the inputs are malformed.
    """
    labels = _labels(y)
    scores = _scores(p, labels.size)
    n1, n0 = _both_classes(labels)
    ranks = _midranks(scores)
    return float((ranks[labels == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def delong_covariance(y: npt.ArrayLike, scores: Sequence[npt.ArrayLike]) -> tuple[_F64, _F64]:
    """AUCs of several scores on the same cases and their DeLong covariance matrix.

    Sun & Xu's algorithm: the structural components ``V10`` (per positive case: the fraction of
    negatives it outranks) and ``V01`` (per negative: the fraction of positives that outrank it)
    come from midranks within each class and over both, in ``O(n log n)``.

    Returns
    -------
    aucs, covariance
        ``(k,)`` AUCs and their ``(k, k)`` covariance ``S10 / m + S01 / n``.
    """
    labels = _labels(y)
    m, n = _both_classes(labels)
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 cases per class ({m} positive, {n} negative)")
    matrix = np.stack([_scores(s, labels.size) for s in scores])
    positives = matrix[:, labels == 1]
    negatives = matrix[:, labels == 0]
    k = matrix.shape[0]
    tx = np.stack([_midranks(positives[r]) for r in range(k)])
    ty = np.stack([_midranks(negatives[r]) for r in range(k)])
    tz = np.stack([_midranks(np.concatenate([positives[r], negatives[r]])) for r in range(k)])
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs.astype(np.float64), (s10 / m + s01 / n).astype(np.float64)


def delong_ci(
    y: npt.ArrayLike, p: npt.ArrayLike, alpha: float = 0.05
) -> tuple[float, float, float]:
    """AUC with its DeLong ``1 - alpha`` confidence interval (normal, clipped to [0, 1]).

    Returns
    -------
    auc, low, high
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    aucs, cov = delong_covariance(y, [p])
    value = float(aucs[0])
    half = _NORMAL.inv_cdf(1.0 - alpha / 2.0) * math.sqrt(max(float(cov[0, 0]), 0.0))
    return value, max(0.0, value - half), min(1.0, value + half)


def delong_test(
    y: npt.ArrayLike, p1: npt.ArrayLike, p2: npt.ArrayLike
) -> tuple[float, float, float, float]:
    """Paired DeLong test of two AUCs measured on the same cases (two-sided).

    Returns
    -------
    auc1, auc2, z, p_value
        ``z = (auc1 - auc2) / sd``; ``p_value`` 1.0 when the difference has no variance (the
        two scores rank the cases identically).
    """
    aucs, cov = delong_covariance(y, [p1, p2])
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if variance <= 1e-15:
        return float(aucs[0]), float(aucs[1]), 0.0, 1.0
    z = difference / math.sqrt(variance)
    return float(aucs[0]), float(aucs[1]), z, math.erfc(abs(z) / math.sqrt(2.0))


def bootstrap_ci(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUC with a stratified percentile bootstrap CI (resampling within each class).

    Returns
    -------
    auc, low, high
    """
    labels = _labels(y)
    scores = _scores(p, labels.size)
    _both_classes(labels)
    rng = np.random.default_rng(seed)
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    y_boot = np.r_[np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)]
    values = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        sample = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        values[b] = auc(y_boot, sample)
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return auc(labels, scores), float(low), float(high)


def roc_curve(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[_F64, _F64, _F64]:
    """ROC points at every distinct score, from the strictest threshold down.

    Returns
    -------
    fpr, tpr, thresholds
        A case is called positive when ``score >= threshold``; the first point is
        ``(0, 0)`` at ``+inf``.
    """
    labels = _labels(y)
    scores = _scores(p, labels.size)
    n1, n0 = _both_classes(labels)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # Last position of each run of equal scores: tied cases switch together.
    last = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1]
    tp = np.cumsum(sorted_labels)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / n1]
    fpr = np.r_[0.0, fp / n0]
    thresholds = np.r_[np.inf, sorted_scores[last]]
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


def youden_threshold(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Threshold maximising sensitivity + specificity − 1 (``score >= threshold`` is positive).

    The threshold is a score the data reach (the lowest score called positive); ties between
    thresholds keep the stricter one.
    """
    fpr, tpr, thresholds = roc_curve(y, p)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # +inf (no positive calls) is never the answer
    return float(thresholds[best])


def sens_spec_acc(
    y: npt.ArrayLike, p: npt.ArrayLike, threshold: float
) -> tuple[float, float, float]:
    """Sensitivity, specificity and accuracy of ``score >= threshold``."""
    labels = _labels(y)
    scores = _scores(p, labels.size)
    n1, n0 = _both_classes(labels)
    called = scores >= threshold
    tp = int(np.count_nonzero(called & (labels == 1)))
    tn = int(np.count_nonzero(~called & (labels == 0)))
    return tp / n1, tn / n0, (tp + tn) / labels.size


def brier(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Mean squared difference between probabilities and labels."""
    labels = _labels(y)
    probabilities = _scores(p, labels.size, "probabilities")
    if (probabilities < 0).any() or (probabilities > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return float(np.mean((probabilities - labels) ** 2))


def confusion(called: npt.ArrayLike, y: npt.ArrayLike) -> dict[str, Any]:
    """Confusion matrix of the calls ``called`` (True = positive) against labels ``y``.

    Returns the counts ``tp``, ``fp``, ``fn``, ``tn`` and the sensitivity, specificity,
    accuracy, PPV and NPV; a ratio whose denominator is 0 is None (a thin audit, not an error).
    """
    calls = np.asarray(called, dtype=bool)
    labels = np.asarray(y)
    tp = int(np.count_nonzero(calls & (labels == 1)))
    fp = int(np.count_nonzero(calls & (labels == 0)))
    fn = int(np.count_nonzero(~calls & (labels == 1)))
    tn = int(np.count_nonzero(~calls & (labels == 0)))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": ratio(tp + tn, int(labels.size)),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def calibration_bins(y: npt.ArrayLike, p: npt.ArrayLike) -> dict[str, Any]:
    """Reliability curve: equal-width bins, 10 or fewer so small audits keep ~10 cases a bin.

    Returns the bins (``low``, ``high``, ``n``, ``mean_predicted`` and ``observed``, None for an
    empty bin), the mean predicted probability and the observed rate.
    """
    labels = np.asarray(y)
    probabilities = np.asarray(p, dtype=np.float64)
    count = int(max(2, min(10, labels.size // 10)))
    edges = np.linspace(0.0, 1.0, count + 1)
    # The last bin is closed so that a probability of exactly 1 is counted.
    index = np.clip(np.searchsorted(edges, probabilities, side="right") - 1, 0, count - 1)
    bins = []
    for b in range(count):
        mask = index == b
        size = int(mask.sum())
        bins.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": size,
                "mean_predicted": float(probabilities[mask].mean()) if size else None,
                "observed": float(labels[mask].mean()) if size else None,
            }
        )
    return {
        "bins": bins,
        "mean_predicted": float(probabilities.mean()),
        "observed_rate": float(labels.mean()),
    }


def _sigmoid(x: _F64) -> _F64:
    out: _F64 = 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form: no overflow warnings
    return out


def platt_fit(
    y: npt.ArrayLike, logits: npt.ArrayLike, *, iterations: int = 100
) -> tuple[float, float]:
    """Platt scaling: ``p = sigmoid(a * logit + b)`` fitted by maximum likelihood.

    Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)`` keep the fit finite when
    the classes separate (small folds do); Newton's method with step halving.

    Returns
    -------
    a, b

    Raises
    ------
    ValueError
        When the fitted slope ``a`` is not positive: the scores rank against the labels (or not
        at all), and a negative slope would silently flip an anti-informative model into one
        that looks good (raw AUC 0.10 reported as 0.90).
    """
    labels = _labels(y)
    x = _scores(logits, labels.size, "logits")
    n1, n0 = _both_classes(labels)
    t = np.where(labels == 1, (n1 + 1.0) / (n1 + 2.0), 1.0 / (n0 + 2.0))
    design = np.stack([x, np.ones_like(x)], axis=1)
    w = np.zeros(2)

    def loss(params: _F64) -> float:
        z = design @ params
        # log(1 + e^z) - t z, written stably.
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    current = loss(w)
    for _ in range(iterations):
        q = _sigmoid(design @ w)
        gradient = design.T @ (q - t)
        hessian = design.T @ (design * (q * (1.0 - q))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6:
            candidate = w - scale * step
            value = loss(candidate)
            if value <= current:
                break
            scale /= 2.0
        else:
            break
        w, previous, current = candidate, current, value
        if previous - current < 1e-12:
            break
    if not w[0] > 0.0:
        raise ValueError(
            f"Platt slope {w[0]:.3g} is not positive (AUC {auc(labels, x):.3f}): the scores do "
            "not rise with the label; refusing to flip or flatten an uninformative model"
        )
    return float(w[0]), float(w[1])


def platt_apply(logits: npt.ArrayLike, a: float, b: float) -> _F64:
    """Calibrated probabilities ``sigmoid(a * logit + b)``."""
    return _sigmoid(a * np.asarray(logits, dtype=np.float64) + b)


def logistic_model(
    X: npt.ArrayLike, y: npt.ArrayLike, names: Sequence[str], *, alpha: float = 0.05
) -> dict[str, Any]:
    """Multivariable logistic regression (statsmodels ``Logit``, maximum likelihood).

    Parameters
    ----------
    X
        ``(n, k)`` predictors (an intercept is added here).
    y
        0/1 outcome.
    names
        The ``k`` predictor names.
    alpha
        For the ``1 - alpha`` Wald intervals.

    Returns
    -------
    dict
        ``names``, ``intercept``, ``coefficients``, ``odds_ratios``, ``ci`` (of the odds ratios,
        ``[low, high]`` per name), ``p_values`` (Wald), ``intercept_p``, ``n``, ``events``,
        ``converged``, ``auc`` (apparent, on the fitting data), ``alpha``.

    Raises
    ------
    ValueError
        When the data cannot be fitted (a class missing, collinear predictors, separation).
    """
    # Imported here: only training needs it, not inference.
    import statsmodels.api as sm  # type: ignore[import-untyped]

    labels = _labels(y)
    design = np.asarray(X, dtype=np.float64)
    if design.ndim == 1:
        design = design[:, None]
    if design.shape != (labels.size, len(names)):
        raise ValueError(f"X must have shape ({labels.size}, {len(names)}), got {design.shape}")
    if not np.isfinite(design).all():
        raise ValueError("X must be finite")
    n1, n0 = _both_classes(labels)
    if min(n1, n0) <= len(names):
        raise ValueError(f"too few events ({n1} positive, {n0} negative) for {len(names)} terms")
    with warnings.catch_warnings():
        # Separation and non-convergence are checked below and reported as errors.
        warnings.simplefilter("ignore")
        try:
            result = sm.Logit(labels, sm.add_constant(design, has_constant="add")).fit(
                disp=0, maxiter=200
            )
        except (np.linalg.LinAlgError, ValueError) as exc:
            raise ValueError(f"logistic model cannot be fitted: {exc}") from exc
        except Exception as exc:  # statsmodels' PerfectSeparationError and friends
            raise ValueError(f"logistic model cannot be fitted: {exc}") from exc
    params = np.asarray(result.params, dtype=np.float64)
    bse = np.asarray(result.bse, dtype=np.float64)
    pvalues = np.asarray(result.pvalues, dtype=np.float64)
    converged = bool(result.mle_retvals.get("converged", False))
    if not (converged and np.isfinite(params).all() and np.isfinite(bse).all()):
        raise ValueError("logistic model did not converge (separation or collinear predictors)")
    zq = _NORMAL.inv_cdf(1.0 - alpha / 2.0)
    fitted = _sigmoid(sm.add_constant(design, has_constant="add") @ params)
    out: dict[str, Any] = {
        "names": [str(n) for n in names],
        "intercept": float(params[0]),
        "intercept_p": float(pvalues[0]),
        "coefficients": {},
        "odds_ratios": {},
        "ci": {},
        "p_values": {},
        "n": int(labels.size),
        "events": n1,
        "converged": converged,
        "auc": auc(labels, fitted),
        "alpha": alpha,
    }
    for index, name in enumerate(names, start=1):
        beta, se = float(params[index]), float(bse[index])
        out["coefficients"][name] = beta
        out["odds_ratios"][name] = math.exp(beta)
        out["ci"][name] = [math.exp(beta - zq * se), math.exp(beta + zq * se)]
        out["p_values"][name] = float(pvalues[index])
    return out


def logistic_predict(model: dict[str, Any], values: dict[str, float]) -> float:
    """Probability from a :func:`logistic_model` result for one case's predictor values.

    Raises
    ------
    KeyError
        When a predictor the model needs is missing from ``values``.
    """
    z = float(model["intercept"])
    for name in model["names"]:
        z += float(model["coefficients"][name]) * float(values[name])
    return float(_sigmoid(np.asarray([z]))[0])
