"""Uncertainty and calibration metrics (``randkit.deploy.uncertainty``).

Reference values are worked by hand on a fixed 4-sample, 3-class input (``P``, ``Y`` below);
the random-data checks compare against naive loop reimplementations written here.

    row  probs               label  top-1  conf  correct
    0    [0.70, 0.20, 0.10]  0      0      0.7   yes
    1    [0.20, 0.60, 0.20]  2      1      0.6   no
    2    [0.10, 0.10, 0.80]  2      2      0.8   yes
    3    [0.40, 0.35, 0.25]  1      0      0.4   no
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from randkit.deploy.uncertainty import (
    brier,
    ece,
    entropy,
    mutual_information,
    nll,
    reliability,
    reliability_png,
    risk_at_coverage,
    risk_coverage,
    uncertainty_report,
)

P = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.20, 0.60, 0.20],
        [0.10, 0.10, 0.80],
        [0.40, 0.35, 0.25],
    ]
)
Y = np.array([0, 2, 2, 1])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_probs(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, k))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs, rng.integers(0, k, size=n)


# ----------------------------------------------------------------------------- hand values


def test_nll_by_hand() -> None:
    # p_y = 0.7, 0.2, 0.8, 0.35
    expected = -(math.log(0.7) + math.log(0.2) + math.log(0.8) + math.log(0.35)) / 4
    assert nll(P, Y) == pytest.approx(expected, abs=1e-12)


def test_nll_eps_floors_zero_probability() -> None:
    probs = np.array([[1.0, 0.0]])
    assert nll(probs, np.array([1]), eps=1e-4) == pytest.approx(-math.log(1e-4))


def test_brier_by_hand() -> None:
    # row 0: 0.3^2 + 0.2^2 + 0.1^2          = 0.09 + 0.04 + 0.01      = 0.14
    # row 1: 0.2^2 + 0.6^2 + 0.8^2          = 0.04 + 0.36 + 0.64      = 1.04
    # row 2: 0.1^2 + 0.1^2 + 0.2^2          = 0.01 + 0.01 + 0.04      = 0.06
    # row 3: 0.4^2 + 0.65^2 + 0.25^2        = 0.16 + 0.4225 + 0.0625  = 0.645
    assert brier(P, Y) == pytest.approx((0.14 + 1.04 + 0.06 + 0.645) / 4, abs=1e-12)


def test_ece_two_bins_by_hand() -> None:
    # bins [0, 0.5) and [0.5, 1]: bin 0 = {row 3}: acc 0, conf 0.4 -> 1/4 * 0.4 = 0.1
    # bin 1 = {rows 0, 1, 2}: acc 2/3, conf (0.7 + 0.6 + 0.8) / 3 = 0.7 -> 3/4 * 1/30 = 0.025
    assert ece(P, Y, bins=2) == pytest.approx(0.1 + 0.025, abs=1e-12)
    # bins thirds: {0.4, 0.6} acc 0 conf 0.5 -> 2/4 * 0.5; {0.7, 0.8} acc 1 conf 0.75 -> 2/4 * 0.25
    assert ece(P, Y, bins=3) == pytest.approx(0.25 + 0.125, abs=1e-12)
    # one bin: acc 0.5, conf (0.7 + 0.6 + 0.8 + 0.4) / 4 = 0.625
    assert ece(P, Y, bins=1) == pytest.approx(0.125, abs=1e-12)


def test_adaptive_ece_by_hand() -> None:
    # sorted confidences: 0.4 (wrong), 0.6 (wrong), 0.7 (right), 0.8 (right)
    # 2 equal-mass bins: {0.4, 0.6}: |0 - 0.5| * 2/4 = 0.25; {0.7, 0.8}: |1 - 0.75| * 2/4 = 0.125
    assert ece(P, Y, bins=2, adaptive=True) == pytest.approx(0.375, abs=1e-12)
    # 3 bins, sizes 2, 1, 1: 0.25 + |1 - 0.7| / 4 + |1 - 0.8| / 4 = 0.25 + 0.075 + 0.05
    assert ece(P, Y, bins=3, adaptive=True) == pytest.approx(0.375, abs=1e-12)
    # 4 bins: one sample each: (0.4 + 0.6 + 0.3 + 0.2) / 4
    assert ece(P, Y, bins=4, adaptive=True) == pytest.approx(0.375, abs=1e-12)
    # 1 bin = plain ECE with one bin
    assert ece(P, Y, bins=1, adaptive=True) == pytest.approx(0.125, abs=1e-12)


def test_adaptive_differs_from_equal_width() -> None:
    # confidences 0.9, 0.8, 0.7, 0.6 (all in the upper half); right, right, wrong, wrong
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])
    # equal width, 2 bins: everything in [0.5, 1]: |0.5 - 0.75| = 0.25
    assert ece(probs, labels, bins=2) == pytest.approx(0.25)
    # equal mass, 2 bins: {0.6, 0.7} wrong: |0 - 0.65| * 2/4 = 0.325;
    # {0.8, 0.9} right: |1 - 0.85| * 2/4 = 0.075
    assert ece(probs, labels, bins=2, adaptive=True) == pytest.approx(0.4)
    # 4 bins: per-sample |correct - conf| = 0.1, 0.2, 0.7, 0.6
    assert ece(probs, labels, bins=4, adaptive=True) == pytest.approx((0.1 + 0.2 + 0.7 + 0.6) / 4)


def test_reliability_by_hand() -> None:
    rel = reliability(P, Y, bins=2)
    assert rel["bin_lower"] == [0.0, 0.5]
    assert rel["bin_upper"] == [0.5, 1.0]
    assert rel["count"] == [1, 3]
    assert rel["confidence"] == pytest.approx([0.4, 0.7])
    assert rel["accuracy"] == pytest.approx([0.0, 2 / 3])


def test_reliability_empty_bins_are_none() -> None:
    # edges 0, .2, .4, .6, .8, 1 (lower-closed): {0.4 wrong}, {0.6 wrong, 0.7 right}, {0.8 right}
    rel = reliability(P, Y, bins=5)
    assert rel["count"] == [0, 0, 1, 2, 1]
    assert rel["confidence"][:2] == [None, None]
    assert rel["accuracy"][:2] == [None, None]
    assert rel["accuracy"][2:] == pytest.approx([0.0, 0.5, 1.0])
    assert rel["confidence"][2:] == pytest.approx([0.4, 0.65, 0.8])


def test_bin_edges_lower_closed_and_one_in_last_bin() -> None:
    probs = np.array([[0.5, 0.25, 0.25], [0.4, 0.3, 0.3], [1.0, 0.0, 0.0]])
    assert reliability(probs, np.array([0, 0, 0]), bins=2)["count"] == [1, 2]
    assert reliability(probs, np.array([0, 0, 0]), bins=10)["count"][-1] == 1
    # 1/49 * 49 rounds below 1 in floating point, yet 1/49 lies on the edge of bin 1
    edge = 1 / 49
    probs = np.full((1, 49), (1 - edge) / 48)
    probs[0, 0] = edge
    assert reliability(probs, np.array([0]), bins=49)["count"][1] == 1


def test_risk_coverage_by_hand() -> None:
    # most confident first: row 2 (0.8, right), row 0 (0.7, right), row 1 (0.6, wrong),
    # row 3 (0.4, wrong): risks 0/1, 0/2, 1/3, 2/4; AURC = (0 + 0 + 1/3 + 1/2) / 4 = 5/24
    curve = risk_coverage(P, Y)
    assert curve["coverage"] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert curve["risk"] == pytest.approx([0.0, 0.0, 1 / 3, 0.5])
    assert curve["aurc"] == pytest.approx(5 / 24)


def test_risk_coverage_custom_confidence() -> None:
    # order rows 1 (wrong), 3 (wrong), 2 (right), 0 (right): risks 1, 1, 2/3, 1/2
    curve = risk_coverage(P, Y, confidence=np.array([0.1, 0.9, 0.2, 0.8]))
    assert curve["risk"] == pytest.approx([1.0, 1.0, 2 / 3, 0.5])
    assert curve["aurc"] == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)


def test_risk_at_coverage_by_hand() -> None:
    assert risk_at_coverage(P, Y, 0.1) == 0.0  # ceil(0.4) = 1 sample
    assert risk_at_coverage(P, Y, 0.5) == 0.0  # 2 samples
    assert risk_at_coverage(P, Y, 0.6) == pytest.approx(1 / 3)  # ceil(2.4) = 3
    assert risk_at_coverage(P, Y, 0.75) == pytest.approx(1 / 3)  # exactly 3
    assert risk_at_coverage(P, Y, 1.0) == pytest.approx(0.5)
    conf = np.array([0.1, 0.9, 0.2, 0.8])
    assert risk_at_coverage(P, Y, 0.5, confidence=conf) == 1.0


def test_risk_at_coverage_float_product_not_rounded_up() -> None:
    # 0.9 * 10 = 9.000000000000002 in floating point; the 9 most confident are all right
    conf = np.linspace(0.95, 0.55, 10)
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.array([0] * 9 + [1])
    assert risk_at_coverage(probs, labels, 0.9) == 0.0
    assert risk_at_coverage(probs, labels, 1.0) == pytest.approx(0.1)


def test_entropy_by_hand() -> None:
    probs = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
    # ln 3; 0; ln 2; 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    expected = [math.log(3), 0.0, math.log(2), 1.5 * math.log(2)]
    got = entropy(probs)
    assert isinstance(got, np.ndarray)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_entropy_max_for_uniform() -> None:
    k = 6
    probs, _ = random_probs(1, 200, k)
    uniform = np.full((1, k), 1 / k)
    assert entropy(uniform)[0] == pytest.approx(math.log(k))
    assert np.all(entropy(probs) <= math.log(k) + 1e-12)
    assert np.all(entropy(probs) >= 0)


def test_mutual_information_by_hand() -> None:
    identical = np.stack([P, P, P])
    assert np.all(mutual_information(identical) == pytest.approx(0.0, abs=1e-12))
    assert np.all(mutual_information(identical) >= 0)
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert mutual_information(disagree).tolist() == pytest.approx([math.log(2)])
    # samples [0.5, 0.5] and [1, 0]: mean [0.75, 0.25];
    # H(mean) = -(0.75 ln 0.75 + 0.25 ln 0.25), mean H = (ln 2 + 0) / 2
    mixed = np.array([[[0.5, 0.5]], [[1.0, 0.0]]])
    h_mean = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mutual_information(mixed)[0] == pytest.approx(h_mean - math.log(2) / 2)


def test_mutual_information_nonnegative_and_bounded() -> None:
    rng = np.random.default_rng(7)
    samples = rng.dirichlet(np.ones(4), size=(5, 50))
    mi = mutual_information(samples)
    assert mi.shape == (50,)
    assert np.all(mi >= 0)
    assert np.all(mi <= entropy(samples.mean(axis=0)) + 1e-12)


# ----------------------------------------------------------------------------- limit cases


def test_perfect_predictions() -> None:
    labels = np.array([0, 2, 1, 1, 0])
    probs = np.eye(3)[labels]
    assert nll(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert brier(probs, labels) == 0.0
    assert ece(probs, labels) == 0.0
    assert ece(probs, labels, adaptive=True) == 0.0
    curve = risk_coverage(probs, labels)
    assert curve["risk"] == [0.0] * 5
    assert curve["aurc"] == 0.0
    assert risk_at_coverage(probs, labels, 0.5) == 0.0
    assert entropy(probs).tolist() == [0.0] * 5


@pytest.mark.parametrize("k", [2, 3, 10])
def test_uniform_predictions(k: int) -> None:
    labels = np.arange(12) % k
    probs = np.full((12, k), 1 / k)
    assert nll(probs, labels) == pytest.approx(math.log(k))
    # (1 - 1/k)^2 + (k - 1) / k^2 = 1 - 1/k
    assert brier(probs, labels) == pytest.approx(1 - 1 / k)


# ----------------------------------------------------------------------------- naive versions


def naive_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    total = 0.0
    n = len(labels)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = []
        for i in range(n):
            c = probs[i].max()
            if lo <= c < hi or (b == bins - 1 and c >= hi):
                members.append(i)
        if members:
            acc = sum(float(probs[i].argmax() == labels[i]) for i in members) / len(members)
            conf = sum(probs[i].max() for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


def naive_adaptive_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    n = len(labels)
    order = sorted(range(n), key=lambda i: probs[i].max())
    total, start = 0.0, 0
    for b in range(bins):
        size = n // bins + (1 if b < n % bins else 0)
        members = order[start : start + size]
        start += size
        if members:
            acc = sum(float(probs[i].argmax() == labels[i]) for i in members) / size
            conf = sum(probs[i].max() for i in members) / size
            total += size / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("bins", [1, 2, 7, 10, 15, 49])
def test_ece_matches_naive_loop(bins: int) -> None:
    probs, labels = random_probs(0, 300, 5)
    assert ece(probs, labels, bins=bins) == pytest.approx(naive_ece(probs, labels, bins))
    assert ece(probs, labels, bins=bins, adaptive=True) == pytest.approx(
        naive_adaptive_ece(probs, labels, bins)
    )


@pytest.mark.parametrize("bins", [20, 21, 100])
def test_adaptive_ece_with_many_bins_is_mean_gap(bins: int) -> None:
    probs, labels = random_probs(3, 20, 4)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    expected = float(np.mean(np.abs(correct - probs.max(axis=1))))
    assert ece(probs, labels, bins=bins, adaptive=True) == pytest.approx(expected)


def test_reliability_counts_sum_to_n_and_match_ece() -> None:
    probs, labels = random_probs(5, 257, 3)
    rel = reliability(probs, labels, bins=15)
    assert sum(rel["count"]) == 257
    weighted = sum(
        c / 257 * abs(a - f)
        for c, a, f in zip(rel["count"], rel["accuracy"], rel["confidence"], strict=True)
        if c
    )
    assert weighted == pytest.approx(ece(probs, labels, bins=15))


def test_aurc_matches_naive_loop() -> None:
    probs, labels = random_probs(11, 60, 4)
    conf = probs.max(axis=1)
    order = sorted(range(60), key=lambda i: -conf[i])
    risks = [
        sum(float(probs[i].argmax() != labels[i]) for i in order[:k]) / k for k in range(1, 61)
    ]
    curve = risk_coverage(probs, labels)
    assert curve["risk"] == pytest.approx(risks)
    assert curve["aurc"] == pytest.approx(sum(risks) / 60)


# ----------------------------------------------------------------------------- report and plot


def test_report_by_hand_and_json() -> None:
    report = uncertainty_report(P, Y, bins=2)
    assert report["accuracy"] == 0.5
    assert report["nll"] == pytest.approx(nll(P, Y))
    assert report["brier"] == pytest.approx(0.47125)
    assert report["ece"] == pytest.approx(0.125)
    assert report["ece_adaptive"] == pytest.approx(0.375)
    assert report["aurc"] == pytest.approx(5 / 24)
    assert set(report["risk_at_coverage"]) == {"0.5", "0.8", "0.9", "0.95"}
    # 0.8 * 4 = 3.2 -> 4 samples; 0.5 -> 2 samples
    assert report["risk_at_coverage"]["0.5"] == 0.0
    assert report["risk_at_coverage"]["0.8"] == pytest.approx(0.5)
    assert report["reliability"] == reliability(P, Y, bins=2)
    assert json.loads(json.dumps(report)) == report


def test_report_custom_coverages() -> None:
    report = uncertainty_report(P, Y, coverages=[0.75, 1])
    assert report["risk_at_coverage"] == {"0.75": pytest.approx(1 / 3), "1.0": 0.5}


def test_reliability_png() -> None:
    probs, labels = random_probs(2, 100, 3)
    png = reliability_png(reliability(probs, labels, bins=10), title="test")
    assert png.startswith(PNG_SIGNATURE)
    report = uncertainty_report(P, Y, bins=5)  # has empty bins
    assert reliability_png(report).startswith(PNG_SIGNATURE)


# ----------------------------------------------------------------------------- validation

PROB_FUNCS = [
    lambda p: nll(p, np.zeros(len(p), dtype=int)),
    lambda p: brier(p, np.zeros(len(p), dtype=int)),
    lambda p: ece(p, np.zeros(len(p), dtype=int)),
    lambda p: ece(p, np.zeros(len(p), dtype=int), adaptive=True),
    lambda p: reliability(p, np.zeros(len(p), dtype=int)),
    lambda p: risk_coverage(p, np.zeros(len(p), dtype=int)),
    lambda p: risk_at_coverage(p, np.zeros(len(p), dtype=int), 0.5),
    lambda p: uncertainty_report(p, np.zeros(len(p), dtype=int)),
    entropy,
]


@pytest.mark.parametrize("func", PROB_FUNCS)
@pytest.mark.parametrize(
    ("probs", "match"),
    [
        (np.array([0.5, 0.5]), r"probs must be 2-D.*\(2,\)"),
        (np.ones((2, 1, 1)), r"probs must be 2-D.*\(2, 1, 1\)"),
        (np.zeros((0, 3)), r"probs must be 2-D.*\(0, 3\)"),
        (np.array([[0.5, 0.5], [np.nan, 1.0]]), r"probs\[1\] is not finite"),
        (np.array([[0.5, 0.5], [np.inf, 0.0]]), r"probs\[1\] is not finite"),
        (np.array([[0.5, 0.5], [1.0, 0.0], [0.6, 0.6]]), r"probs\[2\] sums to 1\.2"),
        (np.array([[1.2, -0.2]]), r"probs\[0\] has a negative entry"),
    ],
)
def test_bad_probs(func, probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        func(probs)


def test_row_sum_tolerance() -> None:
    assert nll(np.array([[0.5, 0.5005]]), np.array([0])) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match=r"probs\[0\] sums to 1\.002"):
        nll(np.array([[0.5, 0.502]]), np.array([0]))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([[0, 1, 2, 0]]), r"labels must be 1-D, got shape \(1, 4\)"),
        (np.array([0, 1, 2]), r"labels has 3 entries but probs has N=4"),
        (np.array([0.0, 1.0, 2.0, 0.0]), r"labels must be integers, got dtype float64"),
        (np.array([0, 1, 3, 0]), r"labels\[2\] = 3 is outside \[0, 3\)"),
        (np.array([0, -1, 2, 0]), r"labels\[1\] = -1 is outside \[0, 3\)"),
    ],
)
@pytest.mark.parametrize("func", [nll, brier, ece, reliability, risk_coverage, uncertainty_report])
def test_bad_labels(func, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        func(P, labels)


@pytest.mark.parametrize("bins", [0, -3, 2.5, True, "3", None])
@pytest.mark.parametrize(
    "func",
    [
        lambda b: ece(P, Y, bins=b),
        lambda b: ece(P, Y, bins=b, adaptive=True),
        lambda b: reliability(P, Y, bins=b),
        lambda b: uncertainty_report(P, Y, bins=b),
    ],
)
def test_bad_bins(func, bins) -> None:
    with pytest.raises(ValueError, match=rf"bins must be an integer >= 1, got {bins!r}"):
        func(bins)


@pytest.mark.parametrize("coverage", [0, 0.0, -0.1, 1.5, float("nan"), "x", None, True])
def test_bad_coverage(coverage) -> None:
    value = re.escape(repr(coverage))
    with pytest.raises(ValueError, match=rf"coverage must be .*got {value}"):
        risk_at_coverage(P, Y, coverage)
    with pytest.raises(ValueError, match=rf"coverages must be .*got {value}"):
        uncertainty_report(P, Y, coverages=(0.5, coverage))


def test_bad_coverages_container() -> None:
    with pytest.raises(ValueError, match=r"coverages must be a sequence.*0\.9"):
        uncertainty_report(P, Y, coverages=0.9)


@pytest.mark.parametrize("eps", [0, 0.0, -1e-3, float("nan"), float("inf"), "a"])
def test_bad_eps(eps) -> None:
    with pytest.raises(ValueError, match=rf"eps must be a finite number > 0, got {eps!r}"):
        nll(P, Y, eps=eps)


@pytest.mark.parametrize(
    ("confidence", "match"),
    [
        (np.ones(3), r"confidence must have shape \(4,\), got \(3,\)"),
        (np.ones((4, 1)), r"confidence must have shape \(4,\), got \(4, 1\)"),
        (np.array([0.1, np.nan, 0.2, 0.3]), r"confidence\[1\] = nan is not finite"),
    ],
)
def test_bad_confidence(confidence: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        risk_coverage(P, Y, confidence=confidence)
    with pytest.raises(ValueError, match=match):
        risk_at_coverage(P, Y, 0.5, confidence=confidence)


def test_bad_sample_probs() -> None:
    with pytest.raises(ValueError, match=r"sample_probs must be 3-D.*\(4, 3\)"):
        mutual_information(P)
    with pytest.raises(ValueError, match=r"sample_probs must be 3-D.*\(0, 4, 3\)"):
        mutual_information(np.zeros((0, 4, 3)))
    bad = np.stack([P, P])
    bad[1, 2] = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"sample_probs\[1, 2\] sums to 1\.5"):
        mutual_information(bad)
    bad[1, 2] = [np.nan, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"sample_probs\[1, 2\] is not finite"):
        mutual_information(bad)


def test_bad_reliability_png_input() -> None:
    with pytest.raises(ValueError, match=r"report_or_reliability must be a dict.*list"):
        reliability_png([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"report_or_reliability lacks.*'count'"):
        reliability_png({"bin_lower": [0.0], "bin_upper": [1.0], "confidence": [0.5]})
    with pytest.raises(ValueError, match=r"report_or_reliability lacks"):
        reliability_png({"reliability": None})
