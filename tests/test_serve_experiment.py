"""Feedback ledger, interval and test calibration, and the A/B report end to end."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
from scipy import stats

from randkit.serve.experiment import experiment_report, two_proportion_test, wilson_interval
from randkit.serve.ledger import FeedbackLedger, LedgerError
from randkit.serve.traffic import Router, TrafficPolicy

# --- intervals and tests -------------------------------------------------------------------


def test_wilson_matches_scipy_and_edges() -> None:
    for correct, n in [(0, 10), (7, 10), (10, 10), (180, 200)]:
        expected = stats.binomtest(correct, n).proportion_ci(0.9, method="wilson")
        assert wilson_interval(correct, n, 0.9) == pytest.approx(
            (expected.low, expected.high), abs=1e-12
        )
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(5, 3)


def test_wilson_coverage() -> None:
    rng = np.random.default_rng(7)
    n, p = 200, 0.9
    draws = rng.binomial(n, p, size=2000)
    covered = [lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in draws)]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_newcombe_interval_matches_the_paper() -> None:
    # Newcombe (1998) Table II, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339.
    result = two_proportion_test(48, 80, 56, 70)
    assert result["difference"] == pytest.approx(0.2)
    assert result["ci"] == pytest.approx((0.0524, 0.3339), abs=1e-4)


def test_degenerate_cases_have_no_nan() -> None:
    for args in [(0, 0, 0, 0), (0, 0, 5, 10), (100, 100, 50, 50), (0, 30, 0, 40)]:
        result = two_proportion_test(*args)
        assert result["p_value"] == 1.0
        values = [result["p_value"], *result["ci"], result["z"]]
        assert all(math.isfinite(v) for v in values)
    assert two_proportion_test(0, 0, 5, 10)["difference"] is None
    assert two_proportion_test(100, 100, 50, 50)["difference"] == 0.0


def test_test_size_under_the_null() -> None:
    rng = np.random.default_rng(11)
    a = rng.binomial(500, 0.9, size=2000)
    b = rng.binomial(500, 0.9, size=2000)
    p_values = [
        two_proportion_test(int(x), 500, int(y), 500)["p_value"] for x, y in zip(a, b, strict=True)
    ]
    assert np.mean(np.array(p_values) < 0.05) <= 0.06


def test_power_against_a_planted_difference() -> None:
    rng = np.random.default_rng(12)
    a = rng.binomial(1000, 0.85, size=500)
    b = rng.binomial(1000, 0.92, size=500)
    results = [two_proportion_test(int(x), 1000, int(y), 1000) for x, y in zip(a, b, strict=True)]
    assert np.mean([r["p_value"] < 0.05 and r["difference"] > 0 for r in results]) >= 0.90
    # The interval covers the true difference about as often as it claims to.
    covered = np.mean([r["ci"][0] <= 0.07 <= r["ci"][1] for r in results])
    assert covered >= 0.92


# --- ledger (in memory; its storage is tested in test_serve_ledger.py) ----------------------


def test_feedback_unknown_and_twice() -> None:
    ledger = FeedbackLedger()
    ledger.record_prediction("digits", "a", "1", predicted=4, routed=True)
    with pytest.raises(LedgerError) as info:
        ledger.record_feedback("digits", "nope", 4)
    assert info.value.status == 404
    with pytest.raises(LedgerError) as info:
        ledger.record_feedback("text", "a", 4)  # ids belong to one model
    assert info.value.status == 404
    assert ledger.record_feedback("digits", "a", 4) == {
        "id": "a",
        "version": "1",
        "predicted": 4,
        "label": 4,
        "correct": True,
    }
    with pytest.raises(LedgerError) as info:
        ledger.record_feedback("digits", "a", 5)
    assert info.value.status == 409
    assert ledger.counts("digits") == {"1": (1, 1)}  # the first label won


def test_clients_naming_a_version_are_not_counted() -> None:
    ledger = FeedbackLedger()
    ledger.record_prediction("digits", "chosen", "2", predicted=1, routed=False)
    ledger.record_prediction("digits", "routed", "2", predicted=1, routed=True)
    assert ledger.record_feedback("digits", "chosen", 1)["correct"] is True
    ledger.record_feedback("digits", "routed", 0)
    assert ledger.counts("digits") == {"2": (1, 0)}
    assert ledger.requests("digits") == {"2": 1}


def test_ledger_threads() -> None:
    ledger = FeedbackLedger()

    def work(thread: int) -> None:
        for i in range(1000):
            request_id = f"{thread}-{i}"
            ledger.record_prediction("digits", request_id, str(1 + i % 2), i % 3, routed=True)
            ledger.record_feedback("digits", request_id, 0)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = ledger.counts("digits")
    correct = {v: 8 * sum(i % 3 == 0 for i in range(1000) if str(1 + i % 2) == v) for v in "12"}
    assert counts == {v: (4000, correct[v]) for v in "12"}
    assert ledger.requests("digits") == {"1": 4000, "2": 4000}


# --- the report ----------------------------------------------------------------------------


def simulate(
    accuracy: dict[str, float], n: int, policy: TrafficPolicy, seed: int
) -> FeedbackLedger:
    """Route ``n`` requests, predict correctly with each version's accuracy, send labels."""
    ledger = FeedbackLedger()
    router = Router(policy, "digits", seed=seed)
    rng = np.random.default_rng(seed)
    for request in range(n):
        version = router.route(request, None, list(accuracy))
        assert version is not None
        label = int(rng.integers(10))
        predicted = label if rng.random() < accuracy[version] else (label + 1) % 10
        ledger.record_prediction("digits", f"r{request}", version, predicted, routed=True)
        ledger.record_feedback("digits", f"r{request}", label)
    return ledger


POLICY = TrafficPolicy(
    labels={"stable": "1", "canary": "2"}, weights={"stable": 50, "canary": 50}, min_samples=200
)


def test_report_promotes_a_better_version() -> None:
    ledger = simulate({"1": 0.80, "2": 0.90}, 2000, POLICY, seed=21)
    ledger.record_prediction("digits", "pinned", "3", 0, routed=False)
    report = experiment_report("digits", ledger, POLICY, ["1", "2", "3"])
    json.dumps(report)
    assert report["baseline"] == "1"
    rows = {row["version"]: row for row in report["versions"]}
    assert rows["1"]["labels"] == ["stable"] and rows["2"]["labels"] == ["canary"]
    assert rows["1"]["weight"] == rows["2"]["weight"] == 0.5 and rows["3"]["weight"] == 0.0
    assert rows["1"]["requests"] + rows["2"]["requests"] == 2000
    assert rows["3"]["accuracy"] is None and rows["3"]["ci95"] == [0.0, 1.0]
    assert rows["2"]["ci95"][0] <= rows["2"]["accuracy"] <= rows["2"]["ci95"][1]
    [comparison] = report["comparisons"]  # version 3 had no routed traffic
    assert comparison["candidate"] == "2"
    assert comparison["recommendation"] == "promote"
    assert comparison["ci"][0] > 0 and comparison["p_value"] < 0.05


def test_report_keeps_when_worse_or_equal() -> None:
    worse = simulate({"1": 0.90, "2": 0.80}, 2000, POLICY, seed=22)
    [comparison] = experiment_report("digits", worse, POLICY, ["1", "2"])["comparisons"]
    assert comparison["recommendation"] == "keep"
    assert "less accurate" in comparison["reason"]
    same = simulate({"1": 0.85, "2": 0.85}, 2000, POLICY, seed=23)
    [comparison] = experiment_report("digits", same, POLICY, ["1", "2"])["comparisons"]
    assert comparison["recommendation"] != "promote"


def test_report_waits_for_min_samples() -> None:
    ledger = simulate({"1": 0.5, "2": 0.99}, 300, POLICY, seed=24)
    [comparison] = experiment_report("digits", ledger, POLICY, ["1", "2"])["comparisons"]
    assert comparison["recommendation"] == "not enough data yet"
    assert "of 200 labelled" in comparison["reason"]


def test_baseline_choice() -> None:
    ledger = FeedbackLedger()
    for version in ["1", "2", "3"]:
        ledger.record_prediction("m", version, version, 0, routed=True)
    plain = TrafficPolicy()
    assert experiment_report("m", ledger, plain, ["3", "2", "1"])["baseline"] == "1"
    labelled = TrafficPolicy(labels={"stable": "2"})
    assert experiment_report("m", ledger, labelled, ["1", "2", "3"])["baseline"] == "2"
    explicit = TrafficPolicy(labels={"stable": "2"}, baseline="3")
    report = experiment_report("m", ledger, explicit, ["1", "2", "3"])
    assert report["baseline"] == "3"
    assert [c["candidate"] for c in report["comparisons"]] == ["1", "2"]
    assert experiment_report("m", FeedbackLedger(), plain, [])["comparisons"] == []
