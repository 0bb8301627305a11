"""Per-version accuracy and an A/B verdict from user feedback.

The server records each prediction in a ``FeedbackLedger`` (``randkit.serve.ledger``); a
client later sends the true label for a request id. Only requests whose version the policy
chose (``routed``) count: a client that names a version is not randomized, so its requests
could differ from the rest in ways that bias the comparison.

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

>>> [round(x, 3) for x in wilson_interval(45, 50)]
[0.786, 0.957]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from scipy.stats import norm

from randkit.serve.traffic import (
    TrafficPolicy,
    effective_weights,
    resolve_version,
    sorted_versions,
)

if TYPE_CHECKING:
    from randkit.serve.ledger import FeedbackLedger


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
    model: str,
    ledger: FeedbackLedger,
    policy: TrafficPolicy,
    versions: list[str],
    epoch: int | None = None,
) -> dict[str, Any]:
    """Accuracy per version and a verdict for each version compared with the baseline.

    Counts are those of the policy ``epoch`` (default: the model's latest in the ledger):
    routed predictions made since the current policy was loaded. ``weight`` is the share of
    routed traffic the policy gives a version when all versions are available. Versions with
    traffic (routed requests, or a weight > 0) other than the baseline are compared with it.
    """
    versions = sorted_versions(versions)
    counts, requests = ledger.counts(model, epoch), ledger.requests(model, epoch)
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
        "epoch": epoch,
        "baseline": baseline,
        "alpha": policy.alpha,
        "min_samples": policy.min_samples,
        "versions": rows,
        "comparisons": comparisons,
    }
