"""randkit.cv.intervals: the headline interval, checked by simulation on a learner whose
expected accuracy is known exactly.

The learner: two Gaussian classes N(+-mu, I_d) with mu = (delta / 2) e_1, equal sizes, and
the nearest-class-mean rule w = m1 - m0, predict 1 when w.x > w.(m1 + m0) / 2, fitted in
closed form. For a fitted rule the accuracy is exact: x.w is normal, so each class is right
with probability Phi(+-(w.mu_c + b) / |w|). The learner's expected accuracy at training size
n_train (the quantity the Nadeau-Bengio interval is about) is the mean of these exact values
over 200,000 simulated training sets (the fitted class means are drawn directly:
m_c ~ N(mu_c, I / n_c)), Monte-Carlo error below 1e-5. Each test then runs stratified K-fold
cross-validation on many simulated data sets and counts how often the interval covers it.
Seeds are fixed, so every test is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ndtr

from randkit.cv.intervals import clopper_pearson, headline_interval, metric_range, read_headline
from randkit.cv.stats import nadeau_bengio_ci

# The regime of the coverage tests, fixed before measuring: n = 200 items, d = 10 features,
# class separation delta = 2.5 (Bayes accuracy Phi(1.25) = 0.894), 10 folds, so n_train = 180
# and the learner's expected accuracy is 0.890 (realistic: 0.8-0.95).
N, DIM, DELTA, K = 200, 10, 2.5, 10


def class_mean(dim: int, delta: float) -> np.ndarray:
    mu = np.zeros(dim)
    mu[0] = delta / 2.0
    return mu


def rule_accuracy(m1: np.ndarray, m0: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Exact accuracy of the nearest-class-mean rule(s) of class means m1, m0 (last axis d)."""
    w = m1 - m0
    b = -(w * (m1 + m0) / 2.0).sum(-1)
    norm = np.linalg.norm(w, axis=-1)
    return 0.5 * ndtr((w @ mu + b) / norm) + 0.5 * ndtr((w @ mu - b) / norm)


def expected_accuracy(rng: np.random.Generator, n_train: int, dim: int, delta: float) -> float:
    """E[accuracy] of the learner trained on n_train / 2 items per class (MC error < 1e-5)."""
    mu, sets, per = class_mean(dim, delta), 200_000, n_train // 2
    m1 = mu + rng.standard_normal((sets, dim)) / math.sqrt(per)
    m0 = -mu + rng.standard_normal((sets, dim)) / math.sqrt(per)
    return float(rule_accuracy(m1, m0, mu).mean())


def simulate_data(rng: np.random.Generator, sets: int, n: int, dim: int, delta: float):
    """``sets`` data sets of n / 2 items of class 1 (first) then n / 2 of class 0."""
    y = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    x = rng.standard_normal((sets, n, dim)) + np.where(y[:, None], 1.0, -1.0) * class_mean(
        dim, delta
    )
    return x, y


def kfold_scores(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, folds: int, repeats: int):
    """(sets, repeats * folds) test accuracies of stratified K-fold CV repeated ``repeats``
    times with fresh splits, every fold's rule fitted in closed form."""
    sets, n, _ = x.shape
    half = n // 2
    scores = np.empty((sets, repeats, folds))
    for r in range(repeats):
        fold = np.empty((sets, n), dtype=np.int64)
        for part in (slice(0, half), slice(half, n)):  # stratified: each class dealt in turn
            fold[:, part] = (
                rng.permuted(np.broadcast_to(np.arange(half), (sets, half)), axis=1) % folds
            )
        member = fold[..., None] == np.arange(folds)  # (sets, n, folds)
        means = []
        for part in (slice(0, half), slice(half, n)):
            xs, ms = x[:, part], member[:, part]
            held = np.einsum("snk,snd->skd", ms, xs)
            means.append((xs.sum(1)[:, None] - held) / (half - ms.sum(1))[..., None])
        w = means[0] - means[1]
        b = -(w * (means[0] + means[1]) / 2.0).sum(-1)
        predicted = np.einsum("snd,skd->snk", x, w) + b[:, None] > 0
        right = (predicted == y[None, :, None]) & member
        scores[:, r] = right.sum(1) / member.sum(1)
    return scores.reshape(sets, repeats * folds)


def coverage(scores: np.ndarray, truth: float, n_train: int, n_test: int) -> dict[str, float]:
    """Share of data sets whose headline (and naive) interval covers ``truth``; a data set
    without an interval (no spread) counts as not covered."""
    hit, naive, none, outside = 0, 0, 0, 0
    for s in scores:
        r = headline_interval(s, "accuracy", n_train, n_test)
        if r["ci"] is None:
            none += 1
            continue
        hit += r["ci"][0] <= truth <= r["ci"][1]
        naive += r["naive"][0] <= truth <= r["naive"][1]
        outside += not (0.0 <= r["ci"][0] <= r["ci"][1] <= 1.0)
    n = len(scores)
    return {"headline": hit / n, "naive": naive / n, "none": none / n, "outside": outside}


@pytest.fixture(scope="module")
def truth() -> float:
    return expected_accuracy(np.random.default_rng(7), N * (K - 1) // K, DIM, DELTA)


@pytest.fixture(scope="module")
def repeated(truth: float) -> dict[str, float]:
    """2,000 data sets, 10 x 10-fold CV each (shared by the two R = 10 tests)."""
    rng = np.random.default_rng(10)
    x, y = simulate_data(rng, 2000, N, DIM, DELTA)
    return coverage(kfold_scores(rng, x, y, K, 10), truth, N * (K - 1) // K, N // K)


def test_expected_accuracy_is_in_a_realistic_regime(truth: float) -> None:
    assert 0.88 < truth < 0.90  # 0.8901; Bayes accuracy 0.8944


@pytest.fixture(scope="module")
def single(truth: float) -> dict[str, float]:
    """4,000 data sets, one 10-fold CV each (shared by the two R = 1 tests)."""
    rng = np.random.default_rng(1)
    x, y = simulate_data(rng, 4000, N, DIM, DELTA)
    return coverage(kfold_scores(rng, x, y, K, 1), truth, N * (K - 1) // K, N // K)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured 99.4% (MC error 0.12 pt): the Nadeau-Bengio correction (1/J + 1/(K-1)) "
    "roughly doubles the variance of a single K-fold run, where fold test sets are disjoint; "
    "conservative, above the 93-97% target (docs/cross-validation.md)",
)
def test_headline_coverage_single_kfold(single: dict[str, float]) -> None:
    """R = 1: 4,000 data sets, 10-fold CV; target 93-97% at nominal 95%.

    Monte-Carlo error of a coverage near 95% over 4,000 data sets: sqrt(.95 * .05 / 4000) =
    0.34 points (0.12 at 99.4%). Measured: headline (Nadeau-Bengio, logit scale) 99.4%,
    naive t 95.3%.
    """
    assert 0.93 <= single["headline"] <= 0.97, single


def test_headline_single_kfold_is_never_too_narrow(single: dict[str, float]) -> None:
    """What R = 1 does guarantee here: at least nominal coverage, and the naive t interval
    (right for one repeat of a stable learner) near nominal."""
    assert single["headline"] >= 0.95 and single["outside"] == 0, single
    assert 0.93 <= single["naive"] <= 0.97, single


def test_headline_coverage_repeated_kfold(repeated: dict[str, float]) -> None:
    """R = 10: 2,000 data sets, 10 x 10-fold CV; coverage 93-97% at nominal 95%.

    Monte-Carlo error: sqrt(.95 * .05 / 2000) = 0.49 points (one standard error).
    Measured: 96.7% (+- 0.4), every interval inside [0, 1].
    """
    assert 0.93 <= repeated["headline"] <= 0.97, repeated
    assert repeated["outside"] == 0


def test_naive_interval_undercovers_repeated_kfold(repeated: dict[str, float]) -> None:
    """The naive t interval of the same 100 scores covers in well under half the data sets
    (the issue measured 41-47%; measured here 46.2%, MC error 1.1 points)."""
    assert repeated["naive"] < 0.6, repeated


# A less stable learner: 5% of the items are gross outliers (noise sd 10 instead of 1). One
# outlier drags the class mean of every training set that holds it, so the folds of one
# repeat are correlated and the naive interval fails even for R = 1. A fitted rule's
# accuracy stays exact: x.w is normal within each of the two noise levels.
OUTLIERS, OUTLIER_SD = 0.05, 10.0


def contaminated_accuracy(m1: np.ndarray, m0: np.ndarray, mu: np.ndarray) -> np.ndarray:
    w = m1 - m0
    b = -(w * (m1 + m0) / 2.0).sum(-1)
    norm = np.linalg.norm(w, axis=-1)
    total = np.zeros(norm.shape)
    for sd, share in ((1.0, 1.0 - OUTLIERS), (OUTLIER_SD, OUTLIERS)):
        right = ndtr((w @ mu + b) / (sd * norm)) + ndtr((w @ mu - b) / (sd * norm))
        total += share * 0.5 * right
    return total


def contaminated_expected_accuracy(rng: np.random.Generator, n_train: int) -> float:
    """E[accuracy] at n_train: a class mean of n_c items, k of them outliers (binomial), is
    normal with variance (n_c - k + 100 k) / n_c^2 per feature; MC error 2e-5."""
    mu, sets, per = class_mean(DIM, DELTA), 400_000, n_train // 2
    means = []
    for sign in (1.0, -1.0):
        k = rng.binomial(per, OUTLIERS, sets)
        sd = np.sqrt(per - k + OUTLIER_SD**2 * k) / per
        means.append(sign * mu + rng.standard_normal((sets, DIM)) * sd[:, None])
    return float(contaminated_accuracy(means[0], means[1], mu).mean())


def contaminated_data(rng: np.random.Generator, sets: int):
    y = np.r_[np.ones(N // 2, bool), np.zeros(N // 2, bool)]
    sd = np.where(rng.random((sets, N, 1)) < OUTLIERS, OUTLIER_SD, 1.0)
    x = rng.standard_normal((sets, N, DIM)) * sd
    return x + np.where(y[:, None], 1.0, -1.0) * class_mean(DIM, DELTA), y


def test_with_outliers_the_naive_interval_fails_even_for_one_repeat() -> None:
    """4,000 contaminated data sets, one 10-fold CV each (expected accuracy 0.853): the
    headline interval still covers (measured 98.1%, MC error 0.22 points); the naive one
    does not (92.2%, MC error 0.42). With 10 repeats (seed 30, 2,000 data sets, same
    helpers) the headline covers 93.4% (MC error 0.56) and the naive 40.4%."""
    truth = contaminated_expected_accuracy(np.random.default_rng(7), N * (K - 1) // K)
    assert 0.85 < truth < 0.86
    rng = np.random.default_rng(21)
    x, y = contaminated_data(rng, 4000)
    result = coverage(kfold_scores(rng, x, y, K, 1), truth, N * (K - 1) // K, N // K)
    assert result["headline"] >= 0.95 and result["naive"] < 0.93, result


def test_single_split_clopper_pearson_covers_the_trained_models_accuracy() -> None:
    """One 150/50 split of each of 4,000 data sets: the exact interval is about the accuracy
    of the one trained rule (exact by the normal CDF), and Clopper-Pearson is conservative:
    coverage at least 95% (measured 96.1%, MC error 0.3 points)."""
    rng = np.random.default_rng(3)
    x, y = simulate_data(rng, 4000, N, DIM, DELTA)
    mu, train = class_mean(DIM, DELTA), np.r_[np.arange(75), np.arange(100, 175)]
    test = np.setdiff1d(np.arange(N), train)
    m1, m0 = x[:, train[:75]].mean(1), x[:, train[75:]].mean(1)
    w = m1 - m0
    b = -(w * (m1 + m0) / 2.0).sum(-1)
    right = ((np.einsum("snd,sd->sn", x[:, test], w) + b[:, None]) > 0) == y[test]
    truth = rule_accuracy(m1, m0, mu)
    hits = []
    for score, exact in zip(right.mean(1), truth, strict=True):
        r = headline_interval([score], "accuracy", 150, 50)
        assert r["method"] == "clopper_pearson" and r["naive"] is None
        hits.append(r["ci"][0] <= exact <= r["ci"][1])
    assert np.mean(hits) >= 0.95, np.mean(hits)


def test_bounded_intervals_never_leave_zero_one() -> None:
    """Near-perfect scores, where the plain corrected interval passes 1 (the issue's demo
    ended at 1.0012): 2,000 random score vectors of 2-100 trials; the headline interval of
    every bounded metric stays inside [0, 1] and contains the mean."""
    rng = np.random.default_rng(4)
    passed_one = 0
    for _ in range(2000):
        j = int(rng.integers(2, 101))
        scores = np.minimum(1.0, rng.binomial(30, rng.uniform(0.9, 1.0), j) / 30.0)
        r = headline_interval(scores, "macro_f1", 120, 30)
        if r["ci"] is None:
            assert scores.min() == scores.max()
            continue
        lo, hi = r["ci"]
        assert 0.0 <= lo <= scores.mean() <= hi <= 1.0
        assert 0.0 <= r["naive"][0] <= r["naive"][1] <= 1.0
        passed_one += nadeau_bengio_ci(scores, 120, 30)["ci"][1] > 1.0
    assert passed_one > 100  # the unbounded interval passes 1 on 812 of these 1,966 vectors


def test_zero_spread_has_no_interval_and_says_why() -> None:
    r = headline_interval([1.0] * 10, "accuracy", 90, 10)
    assert r["ci"] is None and r["naive"] is None and r["method"] is None
    assert r["note"] == "every trial scored 1.0000: no spread to estimate an interval from"
    assert headline_interval([2.5] * 4, "rmse", 90, 10)["note"].startswith(
        "every trial scored 2.5000"
    )


def test_single_split_of_a_metric_without_an_exact_interval() -> None:
    r = headline_interval([0.8], "macro_f1", 150, 50)
    assert r["ci"] is None and "no exact interval for macro_f1" in r["note"]
    # an accuracy that is no proportion of the 50 test items (weighted, say) has none either
    assert headline_interval([0.8123], "accuracy", 150, 50)["ci"] is None
    assert clopper_pearson(50, 50)[1] == 1.0 and clopper_pearson(0, 50)[0] == 0.0


def test_unbounded_metric_keeps_the_plain_corrected_interval() -> None:
    scores = [0.31, 0.35, 0.29, 0.33, 0.30]
    r = headline_interval(scores, "rmse", 80, 20)
    assert r["method"] == "nadeau_bengio" and r["bounds"] is None
    assert r["ci"] == pytest.approx(nadeau_bengio_ci(scores, 80, 20)["ci"])


@pytest.mark.parametrize(
    ("name", "scores", "bounded"),
    [
        ("accuracy", [0.9, 1.0], True),
        ("macro_f1", [0.5], True),
        ("subset_accuracy", [0.2], True),
        ("auroc", [0.7], True),
        ("test_acc", [0.7], True),  # a Lightning-logged test/acc
        ("balanced_accuracy", [0.7], True),
        ("rmse", [0.5], False),
        ("loss", [0.3], False),
        ("r2", [0.5], False),  # r2 may be negative
        ("my_score", [0.5], False),  # unknown name: unbounded, even with values in [0, 1]
        ("accuracy_gain", [-0.1, 0.2], False),  # proportion-like name, values outside [0, 1]
    ],
)
def test_which_metrics_are_bounded(name: str, scores: list[float], bounded: bool) -> None:
    assert (metric_range(name, scores) == (0.0, 1.0)) is bounded


def test_old_summaries_are_read_with_their_old_meaning() -> None:
    old = {"ci95": [0.85, 0.90], "ci95_corrected": [0.83, 0.92]}
    r = read_headline(old)
    assert r["ci"] == [0.83, 0.92] and r["naive"] == [0.85, 0.90]
    assert "older randkit" in r["note"]
    new = {"ci95": [0.8, 0.9], "ci95_method": "nadeau_bengio_logit", "ci95_naive": [0.84, 0.86]}
    assert read_headline(new)["naive"] == [0.84, 0.86]


def test_a_single_split_run_reports_the_exact_interval_everywhere(tmp_path) -> None:
    """End to end: one stratified 75/25 split of digits; summary.json, the Python result and
    the report all carry the Clopper-Pearson interval, and the other metrics say why they
    have none."""
    import json

    from sklearn.model_selection import StratifiedShuffleSplit

    import randkit

    one = StratifiedShuffleSplit(n_splits=1, test_size=0.25, random_state=0)
    result = randkit.cross_validate(
        "mlp", splitter=one, train={"epochs": 1, "batch_size": 256}, out=tmp_path / "run"
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["n_trials"] == 1 and summary["ci95_method"] == "clopper_pearson"
    k = round(summary["mean"] * 450)
    assert summary["ci95"] == pytest.approx(clopper_pearson(k, 450))
    assert summary["ci95_naive"] is None and summary["ci95_corrected"] is None
    assert "no exact interval for macro_f1" in summary["per_metric"]["macro_f1"]["ci95_note"]
    if result.report is not None:
        html = result.report.read_text()
        low, high = summary["ci95"]
        assert f"95% CI [{low:.4f}, {high:.4f}]" in html and "Clopper-Pearson" in html


def test_docstring_examples() -> None:
    import doctest

    import randkit.cv.bayes
    import randkit.cv.intervals

    for module in (randkit.cv.intervals, randkit.cv.bayes):
        assert doctest.testmod(module, verbose=False).failed == 0
