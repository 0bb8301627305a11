"""randkit.cv.stats: formulas checked by hand, calibration checked by simulation.

Simulations use fixed seeds (each test is deterministic) and are vectorized over data sets;
the only Python loops call the function under test once per simulated data set.
"""

from __future__ import annotations

import doctest
import json
import math
import random

import numpy as np
import pytest
from scipy import stats as st

import randkit.cv.stats as cvstats
from randkit.cv.stats import (
    corrected_resampled_ttest,
    five_by_two_ttest,
    nadeau_bengio_ci,
    paired_ttest,
    per_class_report,
    summarize,
    variance_components,
    verdict,
)

SIMS = 2000
D = [0.02, 0.01, 0.03, 0.02, 0.02]  # small paired differences used by hand checks
P5X2 = [[0.02, 0.04], [0.01, 0.03], [0.03, 0.01], [0.02, 0.02], [0.00, 0.02]]


# ---------------------------------------------------------------- simulated learners


def regression_data(rng: np.random.Generator, sets: int, n: int, c: float):
    """``sets`` data sets of y = x1 + c * x2 + N(0, 1), x ~ N(0, I_2).

    Learner A fits y ~ b * x1 by least squares, learner B fits y ~ b * x2. At c = 1 the two
    are exchangeable, so their expected test losses are exactly equal (a true null); at
    c < 1, A is better.
    """
    x = rng.standard_normal((sets, n, 2))
    y = x[..., 0] + c * x[..., 1] + rng.standard_normal((sets, n))
    return x, y


def score_difference(x_tr, y_tr, x_te, y_te) -> np.ndarray:
    """Score difference A - B with score = -(test MSE); trailing axis of x = the 2 features."""
    beta = (x_tr * y_tr[..., None]).sum(-2) / (x_tr**2).sum(-2)  # one slope per learner
    mse = ((y_te[..., None] - beta[..., None, :] * x_te) ** 2).mean(-2)
    return mse[..., 1] - mse[..., 0]


def resampled_differences(rng, x, y, repeats: int, n_test: int) -> np.ndarray:
    """(sets, repeats) differences from random train/test subsamples of each data set."""
    sets, n = y.shape
    idx = rng.permuted(np.broadcast_to(np.arange(n), (sets, repeats, n)), axis=-1)
    xs = np.take_along_axis(x[:, None], idx[..., None], axis=2)
    ys = np.take_along_axis(y[:, None], idx, axis=2)
    tr, te = slice(n_test, None), slice(None, n_test)
    return score_difference(xs[:, :, tr], ys[:, :, tr], xs[:, :, te], ys[:, :, te])


def five_by_two_differences(rng, x, y) -> np.ndarray:
    """(sets, 5, 2) differences: 5 random halvings; fold j trains on half j, tests on the other."""
    sets, n = y.shape
    idx = rng.permuted(np.broadcast_to(np.arange(n), (sets, 5, n)), axis=-1)
    halves = idx.reshape(sets, 5, 2, n // 2)
    xs = np.take_along_axis(x[:, None, None], halves[..., None], axis=3)
    ys = np.take_along_axis(y[:, None, None], halves, axis=3)
    return score_difference(xs, ys, xs[:, :, ::-1], ys[:, :, ::-1])


# ---------------------------------------------------------------- formulas by hand


def test_summarize_by_hand():
    r = summarize([1.0, 2.0, 3.0, 4.0])
    s = math.sqrt(5.0 / 3.0)  # squares of deviations 2.25 + 0.25 + 0.25 + 2.25 over 3
    half = st.t.ppf(0.975, 3) * s / 2.0
    assert r["mean"] == 2.5 and r["n"] == 4
    assert r["std"] == pytest.approx(s, rel=1e-12)
    assert r["ci"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-12)
    one = {"mean": 0.7, "std": 0.0, "n": 1, "ci": [0.7, 0.7], "confidence": 0.95}
    assert summarize([0.7]) == one


def test_paired_ttest_matches_scipy():
    d = np.random.default_rng(0).normal(0.01, 0.02, size=12)
    r = paired_ttest(d, confidence=0.9)
    ref = st.ttest_1samp(d, 0.0)
    assert r["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert r["df"] == 11
    assert r["ci"] == pytest.approx(list(ref.confidence_interval(0.9)), rel=1e-10)


def test_nadeau_bengio_by_hand():
    # mean 0.02, s^2 = (0.01^2 + 0.01^2) / 4 = 5e-5, correction 1/5 + 20/80 = 0.45
    var = 0.45 * 5e-5
    r = corrected_resampled_ttest(D, n_train=80, n_test=20)
    assert r["test"] == "nadeau_bengio_corrected_t" and r["df"] == 4
    assert r["mean"] == pytest.approx(0.02)
    assert r["t"] == pytest.approx(0.02 / math.sqrt(var), rel=1e-10)
    assert r["p_value"] == pytest.approx(2 * st.t.sf(0.02 / math.sqrt(var), 4), rel=1e-10)
    half = st.t.ppf(0.975, 4) * math.sqrt(var)
    assert r["ci"] == pytest.approx([0.02 - half, 0.02 + half], rel=1e-10)
    ci = nadeau_bengio_ci(D, n_train=80, n_test=20)
    assert ci["corrected_variance"] == pytest.approx(var, rel=1e-10)
    assert ci["std"] == pytest.approx(math.sqrt(5e-5), rel=1e-10)
    assert ci["ci"] == pytest.approx(r["ci"], rel=1e-12) and ci["n"] == 5


def test_nadeau_bengio_without_overlap_is_the_plain_test():
    plain = paired_ttest(D)
    nb = corrected_resampled_ttest(D, n_train=10**15, n_test=1)
    assert nb["t"] == pytest.approx(plain["t"], rel=1e-9)
    assert nb["p_value"] == pytest.approx(plain["p_value"], rel=1e-9)


def test_five_by_two_by_hand():
    # s_i^2 = 2e-4, 2e-4, 2e-4, 0, 2e-4 -> mean 1.6e-4; numerator p_11 = 0.02
    r = five_by_two_ttest(np.array(P5X2))
    t = 0.02 / math.sqrt(1.6e-4)
    assert r["test"] == "dietterich_5x2cv_t" and r["df"] == 5
    assert r["t"] == pytest.approx(t, rel=1e-10)
    assert r["p_value"] == pytest.approx(2 * st.t.sf(t, 5), rel=1e-10)
    assert r["mean"] == pytest.approx(0.02)


def test_variance_components_by_hand():
    y = np.array([[0.90, 0.91], [0.95, 0.96], [0.92, 0.93]])
    # group means 0.905, 0.955, 0.925 (grand 0.928333...); MSB = 2 * SS(means) / 2
    msb = 2 * ((0.905 - 0.92833333333) ** 2 + (0.955 - 0.92833333333) ** 2) / 2
    msb += 2 * (0.925 - 0.92833333333) ** 2 / 2
    msw = 6 * 0.005**2 / 3  # SSW / (G (J - 1))
    r = variance_components(y)
    assert r["within"]["variance"] == pytest.approx(msw, rel=1e-9)
    assert r["between"]["variance"] == pytest.approx((msb - msw) / 2, rel=1e-6)
    ssw = 3 * msw
    assert r["within"]["ci"] == pytest.approx(
        [ssw / st.chi2.ppf(0.975, 3), ssw / st.chi2.ppf(0.025, 3)], rel=1e-9
    )
    assert r["between"]["share"] + r["within"]["share"] == pytest.approx(1.0)
    assert r["total_variance"] == pytest.approx((msb - msw) / 2 + msw, rel=1e-6)
    assert (r["groups"], r["replicates"]) == (3, 2)
    lo, hi = r["between"]["ci"]
    assert 0.0 <= lo <= r["between"]["variance"] <= hi


def test_between_interval_is_exact_when_within_is_zero():
    # MSW = 0: the MLS interval reduces to the exact chi-square interval for MSB / J.
    y = np.repeat(np.array([[0.1], [0.4], [0.2], [0.7]]), 3, axis=1)
    r = variance_components(y, confidence=0.9)
    msb_over_j = float(np.var([0.1, 0.4, 0.2, 0.7], ddof=1))  # MSB / J = var(group means)
    expected = [3 * msb_over_j / st.chi2.ppf(0.95, 3), 3 * msb_over_j / st.chi2.ppf(0.05, 3)]
    assert r["within"]["variance"] == 0.0 and r["within"]["ci"] == [0.0, 0.0]
    assert r["between"]["variance"] == pytest.approx(msb_over_j, rel=1e-12)
    assert r["between"]["ci"] == pytest.approx(expected, rel=1e-9)
    assert r["between"]["share"] == 1.0


def test_variance_components_edge_cases():
    flat = variance_components(np.full((3, 4), 0.5))
    assert flat["total_variance"] == 0.0
    assert flat["between"]["share"] == 0.0 and flat["within"]["share"] == 0.0
    # group means identical, so MSB = 0 < MSW: between truncated to 0, CI [0, 0]
    r = variance_components(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert r["between"]["variance"] == 0.0 and r["between"]["ci"] == [0.0, 0.0]
    assert r["within"]["share"] == 1.0


def test_zero_variance_differences():
    for result in (
        corrected_resampled_ttest([0.0, 0.0, 0.0], n_train=8, n_test=2),
        paired_ttest([0.0, 0.0]),
        five_by_two_ttest(np.zeros((5, 2))),
    ):
        assert result["t"] == 0.0 and result["p_value"] == 1.0
    up = corrected_resampled_ttest([0.1, 0.1, 0.1], n_train=8, n_test=2)
    assert up["t"] == math.inf and up["p_value"] == 0.0 and up["ci"] == [0.1, 0.1]
    down = five_by_two_ttest(np.full((5, 2), -0.1))
    assert down["t"] == -math.inf and down["p_value"] == 0.0


def test_per_class_report():
    r = per_class_report([0, 1, 1, 2], [0, 1, 2, 2], num_classes=4)
    assert r["precision"] == [1.0, 1.0, 0.5, 0.0]
    assert r["recall"] == [1.0, 0.5, 1.0, 0.0]
    assert r["f1"] == pytest.approx([1.0, 2 / 3, 2 / 3, 0.0])
    assert r["support"] == [1, 2, 1, 0]
    assert all(type(v) is int for v in r["support"])


def test_results_are_plain_json():
    results = [
        summarize(D),
        nadeau_bengio_ci(D, 80, 20),
        corrected_resampled_ttest(D, 80, 20),
        paired_ttest(D),
        five_by_two_ttest(np.array(P5X2)),
        variance_components(np.array(P5X2)),
        per_class_report([0, 1], [1, 1], 2),
    ]
    for r in results:
        assert json.loads(json.dumps(r, allow_nan=False)) == r

    def plain(v):
        if isinstance(v, dict):
            return all(plain(u) for u in v.values())
        if isinstance(v, list):
            return all(plain(u) for u in v)
        return type(v) in (float, int, str)

    assert all(plain(r) for r in results)


def test_verdict_sentences():
    r = {"mean": 0.012, "t": 3.1, "p_value": 0.003, "ci": [0.004, 0.02], "confidence": 0.95}
    expected = "A is better than B (mean difference +0.012, 95% CI [0.004, 0.020], p = 0.003)"
    assert verdict(r) == expected
    neg = {"mean": -0.012, "t": -3.1, "p_value": 0.0001, "ci": [-0.02, -0.004], "confidence": 0.9}
    assert verdict(neg, names=("resnet", "mlp")) == (
        "mlp is better than resnet (mean difference +0.012, 90% CI [0.004, 0.020], p < 0.001)"
    )
    assert verdict({"mean": 0.01, "t": 0.8, "p_value": 0.41}) == (
        "no significant difference between A and B (p = 0.41)"
    )
    assert verdict(five_by_two_ttest(np.array(P5X2)), alpha=0.2).startswith("A is better than B")
    assert "CI" not in verdict(five_by_two_ttest(np.array(P5X2)), alpha=0.2)


def test_docstring_examples():
    assert doctest.testmod(cvstats, verbose=False).failed == 0


def test_no_global_rng_use():
    np_state = np.random.get_state()  # noqa: NPY002  (reading the legacy state is the point)
    py_state = random.getstate()
    summarize(D)
    corrected_resampled_ttest(D, 80, 20)
    five_by_two_ttest(np.array(P5X2))
    variance_components(np.array(P5X2))
    after = np.random.get_state()  # noqa: NPY002
    assert all(np.array_equal(a, b) for a, b in zip(np_state, after, strict=True))
    assert random.getstate() == py_state


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: summarize([]), "scores needs at least 1"),
        (lambda: summarize([0.1, float("nan")]), r"scores must be finite, got nan at index 1"),
        (lambda: summarize([[0.1, 0.2]]), r"scores must be one-dimensional, got shape \(1, 2\)"),
        (lambda: summarize(D, confidence=1.0), r"confidence must be in \(0, 1\), got 1.0"),
        (lambda: summarize(D, confidence=0), r"confidence must be in \(0, 1\), got 0"),
        (lambda: nadeau_bengio_ci([0.1], 8, 2), "scores needs at least 2 value"),
        (lambda: nadeau_bengio_ci(D, 0, 2), "n_train must be a positive number, got 0"),
        (lambda: corrected_resampled_ttest(D, 8, -1), "n_test must be a positive number, got -1"),
        (lambda: corrected_resampled_ttest([], 8, 2), "differences needs at least 2"),
        (lambda: corrected_resampled_ttest(D, 8, 2, confidence=1.5), "confidence .* got 1.5"),
        (lambda: paired_ttest([0.1, math.inf]), "differences must be finite, got inf at index 1"),
        (lambda: five_by_two_ttest(np.zeros((4, 2))), r"shape \(5, 2\), got shape \(4, 2\)"),
        (lambda: five_by_two_ttest(np.full((5, 2), np.nan)), r"got nan at index \(0, 0\)"),
        (lambda: variance_components(np.zeros((1, 5))), r"got shape \(1, 5\)"),
        (lambda: variance_components(np.zeros((5, 1))), r"got shape \(5, 1\)"),
        (lambda: variance_components(np.zeros(6)), r"got shape \(6,\)"),
        (lambda: variance_components(np.zeros((2, 2)), confidence=-0.1), "got -0.1"),
        (lambda: per_class_report([0, 1], [0], 2), "same length, got 2 and 1"),
        (lambda: per_class_report([0, 3], [0, 1], 3), "y_true has label 3 outside 0..2"),
        (lambda: per_class_report([0, 1], [0, 1.5], 3), "y_pred must hold integer class labels"),
        (lambda: per_class_report([0, 1], [0, 1], 0), "num_classes must be a positive integer"),
        (lambda: verdict({"mean": 0.1}), "result must have 'p_value'"),
        (lambda: verdict(paired_ttest(D), alpha=2), r"alpha must be in \(0, 1\), got 2"),
    ],
)
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- calibration by simulation


def test_summarize_ci_coverage():
    """2,000 data sets of 10 N(0.8, 0.05^2) scores: the 95% t interval covers 0.8 in 93-97%."""
    scores = np.random.default_rng(11).normal(0.8, 0.05, size=(SIMS, 10))
    covered = [lo <= 0.8 <= hi for lo, hi in (summarize(s)["ci"] for s in scores)]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_corrected_resampled_ttest_size_under_overlap():
    """True null where the correction is needed: J = 10 random 160/40 train/test subsamples
    of one data set of n = 200, learners A and B of equal expected loss (``regression_data``
    with c = 1), 2,000 data sets.

    The 10 differences of a data set share most of their training and some test points, so
    they are positively correlated (rho ~ n_test / n = 0.2 when the learners hardly depend
    on the training set) and s^2 / J badly underestimates the variance of their mean.
    The corrected test stays at alpha + 1 point; the plain paired t-test on the same
    differences rejects several times alpha (about 26%; the corrected test about 5.0%
    over 40,000 data sets).
    """
    rng = np.random.default_rng(2024)
    x, y = regression_data(rng, SIMS, n=200, c=1.0)
    diffs = resampled_differences(rng, x, y, repeats=10, n_test=40)
    corrected = np.mean([corrected_resampled_ttest(d, 160, 40)["p_value"] < 0.05 for d in diffs])
    plain = np.mean([paired_ttest(d)["p_value"] < 0.05 for d in diffs])
    assert corrected <= 0.06
    assert plain >= 0.15 and plain >= 3 * corrected


def test_five_by_two_size():
    """True null: 5 random halvings of each of 2,000 data sets of n = 200 (c = 1), two-fold CV
    of learners A and B; the 5x2cv t-test rejects at most alpha + 1 point (about 3.3%:
    Dietterich's test is slightly conservative here)."""
    rng = np.random.default_rng(5)
    x, y = regression_data(rng, SIMS, n=200, c=1.0)
    diffs = five_by_two_differences(rng, x, y)
    rate = np.mean([five_by_two_ttest(d)["p_value"] < 0.05 for d in diffs])
    assert rate <= 0.06


def test_power_both_tests():
    """A real difference (c = 0.3: A's expected test MSE is ~0.9 lower than B's) is detected
    at alpha 5% by both tests in most of 500 data sets of n = 200."""
    rng = np.random.default_rng(9)
    x, y = regression_data(rng, 500, n=200, c=0.3)
    nb = resampled_differences(rng, x, y, repeats=10, n_test=40)
    fxt = five_by_two_differences(rng, x, y)
    nb_power = np.mean([corrected_resampled_ttest(d, 160, 40)["p_value"] < 0.05 for d in nb])
    fxt_results = [five_by_two_ttest(d) for d in fxt]
    fxt_power = np.mean([r["p_value"] < 0.05 for r in fxt_results])
    assert nb_power >= 0.9 and fxt_power >= 0.75
    assert all(r["t"] > 0 for r in fxt_results if r["p_value"] < 0.05)  # right direction


def test_variance_components_recovers_planted_values():
    """Planted s2_between = 0.004, s2_within = 0.001. With 2,000 groups x 10 replicates the
    relative standard error of the between estimate is ~3.2% (sqrt(2 / (G - 1)) * E[MSB] /
    (J s2_b)), so 15% is more than 4 standard errors; at 200 groups it would be ~10%."""
    rng = np.random.default_rng(3)
    y = math.sqrt(0.004) * rng.standard_normal((2000, 1))
    y = y + math.sqrt(0.001) * rng.standard_normal((2000, 10))
    r = variance_components(y)
    assert r["between"]["variance"] == pytest.approx(0.004, rel=0.15)
    assert r["within"]["variance"] == pytest.approx(0.001, rel=0.15)
    assert r["between"]["share"] == pytest.approx(0.8, abs=0.03)


def test_variance_components_coverage():
    """2,000 simulated 200 x 10 tables (s2_b = 0.004, s2_w = 0.001): the exact within CI and
    the MLS between CI each cover the truth in 93-97%; the estimators are unbiased within
    6 standard errors of the simulation mean."""
    rng = np.random.default_rng(4)
    y = math.sqrt(0.004) * rng.standard_normal((SIMS, 200, 1))
    y = y + math.sqrt(0.001) * rng.standard_normal((SIMS, 200, 10))
    results = [variance_components(t) for t in y]
    for part, truth in (("within", 0.001), ("between", 0.004)):
        est = np.array([r[part]["variance"] for r in results])
        cover = np.mean([r[part]["ci"][0] <= truth <= r[part]["ci"][1] for r in results])
        assert 0.93 <= cover <= 0.97, (part, cover)
        assert abs(est.mean() - truth) < 6 * est.std(ddof=1) / math.sqrt(SIMS), part
