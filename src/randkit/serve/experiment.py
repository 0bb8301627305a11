"""Per-version accuracy and an A/B verdict from user feedback.

The server records each prediction in a ``FeedbackLedger``; a client later sends the true
label for a request id. Only requests whose version the policy chose (``routed``) count:
a client that names a version is not randomized, so its requests could differ from the
rest in ways that bias the comparison.

``experiment_report`` compares each version with the baseline by a pooled two-proportion
z-test at level ``alpha`` and a Newcombe interval for the difference. Assumptions, plainly:

- Requests are independent and the split is random. Repeated requests from one user, or
  sticky routing with few keys, make the intervals too narrow.
- The label a client sends is the truth, and clients send labels equally often for every
  version (feedback that depends on the version biases the accuracies).
- The test is fixed-horizon: it is valid once, at a sample size chosen in advance. Looking
  at the report again and again after ``min_samples`` and stopping at the first "promote"
  inflates the false-positive rate well above ``alpha`` (with enough looks, toward
  certainty). Decide the sample size first, or use a sequential test.

>>> ledger = FeedbackLedger()
>>> ledger.record_prediction("digits", "r1", "2", predicted=3, routed=True)
>>> ledger.record_feedback("digits", "r1", 3)["correct"]
True
>>> ledger.counts("digits")
{'2': (1, 1)}
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

from scipy.stats import norm

from randkit.serve.traffic import (
    TrafficPolicy,
    effective_weights,
    resolve_version,
    sorted_versions,
)


class FeedbackError(Exception):
    """Feedback that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class FeedbackLedger:
    """Predictions awaiting feedback, and per-version tallies; thread-safe, bounded.

    At most ``capacity`` predictions are kept (oldest forgotten first); feedback for a
    forgotten one is a 404. The tallies (requests, labelled, correct) are running totals and
    do not shrink when a prediction is forgotten. A request id recorded again replaces the
    earlier prediction (ids should be unique per model).
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._lock = threading.Lock()
        # (model, id) -> [version, predicted, routed, label or None]; lists keep it small.
        self._predictions: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()
        self._requests: dict[str, dict[str, int]] = {}
        self._tallies: dict[str, dict[str, list[int]]] = {}  # model -> version -> [n, correct]

    def record_prediction(
        self, model: str, request_id: str, version: str, predicted: int, routed: bool
    ) -> None:
        """Remember a prediction so that feedback can be matched to it later."""
        key = (model, request_id)
        with self._lock:
            self._predictions.pop(key, None)
            self._predictions[key] = [version, predicted, routed, None]
            while len(self._predictions) > self.capacity:
                self._predictions.popitem(last=False)
            if routed:
                per_version = self._requests.setdefault(model, {})
                per_version[version] = per_version.get(version, 0) + 1
                self._tallies.setdefault(model, {}).setdefault(version, [0, 0])

    def record_feedback(self, model: str, request_id: str, label: int) -> dict[str, Any]:
        """Attach the true ``label`` to a prediction; the first label for an id wins.

        Raises ``FeedbackError`` 404 for an unknown or forgotten id, 409 for a second label.
        """
        with self._lock:
            record = self._predictions.get((model, request_id))
            if record is None:
                raise FeedbackError(
                    404,
                    f"no prediction with id {request_id!r} for model {model!r} "
                    "(unknown, or forgotten to bound memory)",
                )
            version, predicted, routed, previous = record
            if previous is not None:
                raise FeedbackError(
                    409, f"feedback for id {request_id!r} was already given (label {previous})"
                )
            record[3] = label
            correct = predicted == label
            if routed:
                tally = self._tallies.setdefault(model, {}).setdefault(version, [0, 0])
                tally[0] += 1
                tally[1] += int(correct)
        return {
            "id": request_id,
            "version": version,
            "predicted": predicted,
            "label": label,
            "correct": correct,
        }

    def counts(self, model: str) -> dict[str, tuple[int, int]]:
        """Version -> (labelled, correct), routed requests only."""
        with self._lock:
            return {v: (n, c) for v, (n, c) in self._tallies.get(model, {}).items()}

    def requests(self, model: str) -> dict[str, int]:
        """Version -> routed predictions, labelled or not."""
        with self._lock:
            return dict(self._requests.get(model, {}))

    def __len__(self) -> int:
        with self._lock:
            return len(self._predictions)


def _check_counts(correct: int, n: int) -> None:
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when ``n`` is 0.

    >>> [round(x, 3) for x in wilson_interval(90, 100)]
    [0.826, 0.945]
    """
    _check_counts(correct, n)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return (0.0, 1.0)
    z = float(norm.ppf(0.5 + confidence / 2))
    p = correct / n
    # Wilson (1927), JASA 22:209: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n).
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def two_proportion_test(
    correct_a: int, n_a: int, correct_b: int, n_b: int, alpha: float = 0.05
) -> dict[str, Any]:
    """Compare accuracy b with accuracy a: difference b - a, its (1 - alpha) CI, p-value.

    The p-value is the two-sided pooled two-proportion z-test; 1.0 when the pooled variance
    is 0 (both all correct or both all wrong). With ``n_a`` or ``n_b`` 0 the difference is
    None and the CI is (-1, 1).

    >>> result = two_proportion_test(850, 1000, 920, 1000)
    >>> round(result["difference"], 2), result["p_value"] < 0.001
    (0.07, True)
    """
    _check_counts(correct_a, n_a)
    _check_counts(correct_b, n_b)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_a == 0 or n_b == 0:
        return {"difference": None, "ci": (-1.0, 1.0), "z": 0.0, "p_value": 1.0, "alpha": alpha}
    p_a, p_b = correct_a / n_a, correct_b / n_b
    difference = p_b - p_a
    # Newcombe (1998), Stat Med 17:873, method 10: hybrid score CI from the two Wilson CIs.
    lo_a, hi_a = wilson_interval(correct_a, n_a, 1 - alpha)
    lo_b, hi_b = wilson_interval(correct_b, n_b, 1 - alpha)
    lower = difference - math.sqrt((p_b - lo_b) ** 2 + (hi_a - p_a) ** 2)
    upper = difference + math.sqrt((hi_b - p_b) ** 2 + (p_a - lo_a) ** 2)
    # Pooled z-test: z = (p_b - p_a) / sqrt(p(1-p)(1/n_a + 1/n_b)), p = pooled proportion.
    pooled = (correct_a + correct_b) / (n_a + n_b)
    variance = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
    z = difference / math.sqrt(variance) if variance > 0 else 0.0
    p_value = float(2 * norm.sf(abs(z))) if variance > 0 else 1.0
    return {
        "difference": difference,
        "ci": (max(-1.0, lower), min(1.0, upper)),
        "z": z,
        "p_value": p_value,
        "alpha": alpha,
    }


def _baseline(policy: TrafficPolicy, versions: list[str]) -> str | None:
    """policy.baseline resolved, else the version labelled "stable", else the lowest."""
    if policy.baseline is not None:
        resolved = resolve_version(policy, versions, policy.baseline)
        if resolved is not None:
            return resolved
    stable = policy.labels.get("stable")
    if stable in versions:
        return stable
    ordered = sorted_versions(versions)
    return ordered[0] if ordered else None


def _verdict(
    test: dict[str, Any], base: tuple[int, int], cand: tuple[int, int], policy: TrafficPolicy
) -> tuple[str, str]:
    short = [
        f"{side} has {n} of {policy.min_samples} labelled requests"
        for side, (n, _) in (("baseline", base), ("candidate", cand))
        if n < policy.min_samples
    ]
    if short:
        return "not enough data yet", "; ".join(short)
    difference, p_value, alpha = test["difference"], test["p_value"], policy.alpha
    lo, hi = test["ci"]
    stats = (
        f"difference {difference:+.4f} ({100 * (1 - alpha):g}% CI {lo:+.4f} to {hi:+.4f}), "
        f"p = {p_value:.3g}"
    )
    if p_value < alpha and difference > 0:
        return "promote", f"candidate is significantly more accurate: {stats} < alpha {alpha}"
    if p_value < alpha:
        return "keep", f"candidate is significantly less accurate: {stats} < alpha {alpha}"
    return "keep", f"no significant improvement: {stats} >= alpha {alpha}"


def experiment_report(
    model: str, ledger: FeedbackLedger, policy: TrafficPolicy, versions: list[str]
) -> dict[str, Any]:
    """Accuracy per version and a verdict for each version compared with the baseline.

    ``weight`` is the share of routed traffic the policy gives a version when all versions
    are available. Versions with traffic (routed requests, or a weight > 0) other than the
    baseline are compared with it.
    """
    versions = sorted_versions(versions)
    counts, requests = ledger.counts(model), ledger.requests(model)
    weights = effective_weights(policy, versions)
    total_weight = sum(weights.values()) or 1.0
    rows = []
    for version in versions:
        labelled, correct = counts.get(version, (0, 0))
        rows.append(
            {
                "version": version,
                "labels": sorted(k for k, v in policy.labels.items() if v == version),
                "weight": weights.get(version, 0.0) / total_weight,
                "requests": requests.get(version, 0),
                "labelled": labelled,
                "correct": correct,
                "accuracy": correct / labelled if labelled else None,
                "ci95": list(wilson_interval(correct, labelled, 0.95)),
            }
        )
    baseline = _baseline(policy, versions)
    comparisons = []
    for row in rows:
        version = row["version"]
        if version == baseline or (row["requests"] == 0 and row["weight"] == 0):
            continue
        base = counts.get(baseline, (0, 0)) if baseline is not None else (0, 0)
        cand = (row["labelled"], row["correct"])
        test = two_proportion_test(base[1], base[0], cand[1], cand[0], policy.alpha)
        recommendation, reason = _verdict(test, base, cand, policy)
        comparisons.append(
            {
                "baseline": baseline,
                "candidate": version,
                "difference": test["difference"],
                "ci": list(test["ci"]),
                "p_value": test["p_value"],
                "recommendation": recommendation,
                "reason": reason,
            }
        )
    return {
        "model": model,
        "baseline": baseline,
        "alpha": policy.alpha,
        "min_samples": policy.min_samples,
        "versions": rows,
        "comparisons": comparisons,
    }
