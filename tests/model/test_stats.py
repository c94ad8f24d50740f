"""Specification of the statistics: AUC, DeLong CI and test, Platt, Youden, logistic model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model import stats


def _delong_direct(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) straight from the definitions, O(m n): the reference."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    v10, v01, aucs = [], [], []
    for s in scores:
        x, z = s[pos][:, None], s[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    cov = np.atleast_2d(np.cov(np.array(v10))) / m + np.atleast_2d(np.cov(np.array(v01))) / n
    return np.array(aucs), cov


def test_auc_and_delong_variance_of_a_hand_computed_case() -> None:
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: V10 = (0.5, 1), V01 = (1, 0.5),
    # S10 = S01 = 0.125, var = 0.125 / 2 + 0.125 / 2 = 0.125.
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert stats.auc(y, p) == pytest.approx(0.75)
    aucs, cov = stats.delong_covariance(y, [p])
    assert aucs[0] == pytest.approx(0.75)
    assert cov[0, 0] == pytest.approx(0.125)
    value, low, high = stats.delong_ci(y, p)
    half = 1.959963984540054 * math.sqrt(0.125)
    assert (low, high) == (pytest.approx(max(0.0, 0.75 - half)), pytest.approx(1.0))
    assert value == pytest.approx(0.75)


def test_ties_count_one_half() -> None:
    y = np.array([0, 1, 0, 1])
    assert stats.auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert stats.auc(y, np.array([0.2, 0.5, 0.5, 0.9])) == pytest.approx(0.875)


def test_fast_delong_equals_the_direct_definition_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    s1 = np.round(y + rng.normal(size=150), 1)  # rounded: many ties
    s2 = np.round(0.5 * y + rng.normal(size=150), 1)
    aucs, cov = stats.delong_covariance(y, [s1, s2])
    ref_aucs, ref_cov = _delong_direct(y, [s1, s2])
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)


def test_delong_variance_agrees_with_a_large_bootstrap() -> None:
    rng = np.random.default_rng(7)
    y = np.r_[np.ones(120, dtype=int), np.zeros(180, dtype=int)]
    s = 1.2 * y + rng.normal(size=y.size)
    _, cov = stats.delong_covariance(y, [s])
    boot = []
    pos, neg = s[y == 1], s[y == 0]
    for _ in range(1500):
        boot.append(stats.auc(y, np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]))
    assert math.sqrt(cov[0, 0]) == pytest.approx(float(np.std(boot)), rel=0.1)
    _, low, high = stats.bootstrap_ci(y, s, n_boot=400, seed=1)
    _, dlow, dhigh = stats.delong_ci(y, s)
    assert low == pytest.approx(dlow, abs=0.02) and high == pytest.approx(dhigh, abs=0.02)


def test_paired_delong_test() -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 400)
    strong = 1.5 * y + rng.normal(size=400)
    weak = 0.4 * y + rng.normal(size=400)
    a1, a2, z, p = stats.delong_test(y, strong, weak)
    assert a1 > a2 and z > 0 and p < 1e-6
    # Against itself (or a monotone transform): no difference, p = 1.
    assert stats.delong_test(y, strong, np.exp(strong))[2:] == (0.0, 1.0)
    # Symmetric in the order of the two scores.
    b1, b2, z2, p2 = stats.delong_test(y, weak, strong)
    assert (b1, b2, z2) == (pytest.approx(a2), pytest.approx(a1), pytest.approx(-z))
    assert p2 == pytest.approx(p)


def test_platt_recovers_a_known_calibration() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 20000)
    # The true probability is sigmoid(0.5 * logit - 0.7): an overconfident, shifted model.
    y = (rng.random(logits.size) < 1.0 / (1.0 + np.exp(-(0.5 * logits - 0.7)))).astype(int)
    a, b = stats.platt_fit(y, logits)
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(-0.7, abs=0.05)
    p = stats.platt_apply(logits, a, b)
    assert float(p.min()) > 0.0 and float(p.max()) < 1.0
    # Calibrated probabilities beat the raw sigmoid on the Brier score.
    raw = 1.0 / (1.0 + np.exp(-logits))
    assert stats.brier(y, p) < stats.brier(y, raw)


def test_platt_stays_finite_when_the_classes_separate() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    a, b = stats.platt_fit(y, np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0]))
    assert math.isfinite(a) and math.isfinite(b) and a > 0


def test_platt_refuses_to_flip_an_anti_informative_model() -> None:
    # Logits that fall with the label: a negative slope would report AUC 0.9 for AUC 0.1.
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 50)
    logits = -2.0 * y + rng.normal(0.0, 1.0, y.size)
    with pytest.raises(ValueError, match=r"Platt slope -[0-9.]+ is not positive \(AUC 0\.0"):
        stats.platt_fit(y, logits)


def test_youden_threshold_and_sens_spec() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # ≥ 0.7: sens 3/4, spec 1 (J 0.75); ≥ 0.4: sens 1, spec 3/4 (J 0.75): the stricter wins.
    threshold = stats.youden_threshold(y, p)
    assert threshold == pytest.approx(0.7)
    assert stats.sens_spec_acc(y, p, threshold) == (0.75, 1.0, 0.875)
    rng = np.random.default_rng(5)
    yy = rng.integers(0, 2, 2000)
    ss = yy + rng.normal(size=2000)  # two unit normals 1 apart: the optimum is near 0.5
    assert stats.youden_threshold(yy, ss) == pytest.approx(0.5, abs=0.2)


def test_roc_curve_runs_from_origin_to_one() -> None:
    y = np.array([0, 1, 0, 1, 1])
    fpr, tpr, thresholds = stats.roc_curve(y, np.array([0.1, 0.9, 0.5, 0.5, 0.3]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert math.isinf(thresholds[0]) and np.all(np.diff(thresholds) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(stats.auc(y, [0.1, 0.9, 0.5, 0.5, 0.3]))


def test_logistic_model_reports_odds_ratios_ci_and_p() -> None:
    rng = np.random.default_rng(2)
    n = 3000
    x1 = rng.normal(40.0, 10.0, n)  # like a diameter in mm
    x2 = rng.normal(6.0, 2.0, n)  # like a LOAT area in cm²
    noise = rng.normal(size=n)  # unrelated
    logit = -4.0 + 0.08 * x1 + 0.2 * x2
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
    model = stats.logistic_model(np.c_[x1, x2, noise], y, ["d", "a", "noise"])
    assert model["coefficients"]["d"] == pytest.approx(0.08, abs=0.015)
    assert model["coefficients"]["a"] == pytest.approx(0.2, abs=0.06)
    assert model["odds_ratios"]["d"] == pytest.approx(math.exp(model["coefficients"]["d"]))
    low, high = model["ci"]["d"]
    assert low < model["odds_ratios"]["d"] < high
    assert model["p_values"]["d"] < 1e-6 and model["p_values"]["noise"] > 0.001
    assert model["n"] == n and model["events"] == int(y.sum()) and model["converged"]
    prob = stats.logistic_predict(model, {"d": 40.0, "a": 6.0, "noise": 0.0})
    assert prob == pytest.approx(1.0 / (1.0 + math.exp(-(-4.0 + 3.2 + 1.2))), abs=0.05)


def test_logistic_model_refuses_separated_data() -> None:
    x = np.arange(20, dtype=float)
    y = (x >= 10).astype(int)
    with pytest.raises(ValueError):
        stats.logistic_model(x[:, None], y, ["x"])


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="both classes"):
        stats.auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        stats.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        stats.auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="at least 2"):
        stats.delong_ci([0, 1, 1], [0.1, 0.2, 0.3])


def test_confusion_counts_and_ratios_of_a_hand_computed_case() -> None:
    called = [True, True, False, False, True]
    y = [1, 0, 1, 0, 1]
    assert stats.confusion(called, y) == {
        "tp": 2,
        "fp": 1,
        "fn": 1,
        "tn": 1,
        "sensitivity": 2 / 3,
        "specificity": 1 / 2,
        "accuracy": 3 / 5,
        "ppv": 2 / 3,
        "npv": 1 / 2,
    }
    # A ratio without a denominator is absent, not an error: no positive was called.
    nothing = stats.confusion([False, False], [0, 0])
    assert nothing["ppv"] is None and nothing["sensitivity"] is None and nothing["npv"] == 1.0


def test_calibration_bins_count_every_probability_once() -> None:
    p = np.array([0.0, 0.05, 0.5, 0.51, 0.99, 1.0])
    y = np.array([0, 0, 1, 0, 1, 1])
    calibration = stats.calibration_bins(y, p)
    bins = calibration["bins"]
    assert len(bins) == 2  # fewer than 20 cases: the floor of two bins
    assert [b["n"] for b in bins] == [2, 4]  # 1.0 falls in the closed last bin
    assert bins[0]["observed"] == 0.0 and bins[1]["observed"] == 0.75
    assert bins[0]["mean_predicted"] == pytest.approx(0.025)
    assert calibration["observed_rate"] == pytest.approx(0.5)
    many = stats.calibration_bins(np.zeros(500, dtype=int), np.full(500, 0.15))
    assert len(many["bins"]) == 10 and [b["n"] for b in many["bins"]][1] == 500
    assert many["bins"][0]["mean_predicted"] is None  # an empty bin has no mean
