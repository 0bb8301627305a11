"""Per-version accuracy and an A/B verdict from user feedback.

The server records each prediction in a ``FeedbackLedger`` (``randkit.serve.ledger``); a
client later sends the true label for a request id. Only requests whose version the policy
chose (``routed``) count: a client that names a version is not randomized, so its requests
could differ from the rest in ways that bias the comparison.

``experiment_report`` compares each version with the baseline. By default (policy
``test: sequential``) the verdict is the anytime-valid test of ``randkit.serve.sequential``:
it may be read after every label, and a candidate that is not more accurate than the
baseline is promoted with probability at most ``alpha`` however often anyone looks. With
``test: fixed`` it is the pooled two-proportion z-test at level ``alpha`` with a Newcombe
interval for the difference: valid at one look at a sample size chosen in advance; read
every 10 labels and stopped at the first "promote", it promoted 18% of equal versions at a
nominal 2.5% in simulation, so its comparisons carry a ``warning``. Assumptions, plainly:

- Requests are independent and the split is random. Repeated requests from one user, or
  sticky routing with few keys, make both tests too optimistic.
- The label a client sends is the truth, and whether (and when) a client sends a label does
  not depend on whether the prediction was right (feedback that does biases the accuracies).

>>> [round(x, 3) for x in wilson_interval(45, 50)]
[0.786, 0.957]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from scipy.stats import norm

from randkit.serve.sequential import block_ratio, sequential_test
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


FIXED_WARNING = (
    "test: fixed is valid at one look at a sample size chosen in advance; reading this "
    "report again and again and promoting at the first 'promote' inflates false promotions "
    "far above alpha (18% at a nominal 2.5% in simulation). Set test: sequential to watch "
    "a canary."
)


def _short_of_samples(
    base: tuple[int, int], cand: tuple[int, int], policy: TrafficPolicy
) -> str | None:
    short = [
        f"{side} has {n} of {policy.min_samples} labelled requests"
        for side, (n, _) in (("baseline", base), ("candidate", cand))
        if n < policy.min_samples
    ]
    return "; ".join(short) if short else None


def _verdict(
    test: dict[str, Any], base: tuple[int, int], cand: tuple[int, int], policy: TrafficPolicy
) -> tuple[str, str]:
    """The fixed-horizon verdict: promote when p < alpha and the candidate is better."""
    short = _short_of_samples(base, cand, policy)
    if short:
        return "not enough data yet", short
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


def _sequential_verdict(
    test: dict[str, Any], base: tuple[int, int], cand: tuple[int, int], policy: TrafficPolicy
) -> tuple[str, str]:
    """The anytime-valid verdict: promote once the e-value has reached 1/alpha."""
    short = _short_of_samples(base, cand, policy)
    if short:
        return "not enough data yet", short
    alpha = policy.alpha
    lo, hi = test["cs"]
    stats = (
        f"e-value {test['max_e_value']:.3g} (largest so far; promote at {1 / alpha:g}), "
        f"anytime p = {test['p_value']:.3g}, difference {lo:+.4f} to {hi:+.4f} "
        f"({100 * (1 - alpha):g}% confidence sequence)"
    )
    if test["reject"]:
        return "promote", f"candidate is more accurate (anytime-valid): {stats}"
    if hi < 0:
        return "keep", f"candidate is less accurate (anytime-valid): {stats}"
    return "keep", f"no anytime-valid evidence of an improvement yet: {stats}; may be read again"


def _fixed_comparison(
    base: tuple[int, int], cand: tuple[int, int], policy: TrafficPolicy
) -> dict[str, Any]:
    test = two_proportion_test(base[1], base[0], cand[1], cand[0], policy.alpha)
    recommendation, reason = _verdict(test, base, cand, policy)
    return {
        "test": "fixed",
        "difference": test["difference"],
        "ci": list(test["ci"]),
        "p_value": test["p_value"],
        "recommendation": recommendation,
        "reason": reason,
        "warning": FIXED_WARNING,
    }


def _sequential_comparison(
    outcomes: tuple[list[int], list[int]],
    ratio: tuple[int, int],
    base: tuple[int, int],
    cand: tuple[int, int],
    policy: TrafficPolicy,
) -> dict[str, Any]:
    test = sequential_test(outcomes[0], outcomes[1], ratio, policy.alpha)
    recommendation, reason = _sequential_verdict(test, base, cand, policy)
    return {
        "test": "sequential",
        "difference": cand[1] / cand[0] - base[1] / base[0] if base[0] and cand[0] else None,
        "ci": list(test["cs"]),  # anytime-valid: holds at every look
        "p_value": test["p_value"],  # anytime-valid
        "e_value": test["e_value"],
        "max_e_value": test["max_e_value"],
        "blocks": {"ratio": list(ratio), "complete": test["blocks"], "labels": list(test["used"])},
        "recommendation": recommendation,
        "reason": reason,
    }


def _version_row(
    version: str,
    policy: TrafficPolicy,
    share: float,
    requests: int,
    counted: tuple[int, int],
) -> dict[str, Any]:
    labelled, correct = counted
    return {
        "version": version,
        "labels": sorted(k for k, v in policy.labels.items() if v == version),
        "weight": share,
        "requests": requests,
        "labelled": labelled,
        "correct": correct,
        "accuracy": correct / labelled if labelled else None,
        "ci95": list(wilson_interval(correct, labelled, 0.95)),
    }


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
    traffic (routed requests, or a weight > 0) other than the baseline are compared with it,
    by ``policy.test`` (see the module docstring).
    """
    versions = sorted_versions(versions)
    counts, requests = ledger.counts(model, epoch), ledger.requests(model, epoch)
    weights = effective_weights(policy, versions)
    total_weight = sum(weights.values()) or 1.0
    rows = [
        _version_row(
            v, policy, weights.get(v, 0.0) / total_weight, requests.get(v, 0), counts.get(v, (0, 0))
        )
        for v in versions
    ]
    baseline = _baseline(policy, versions)
    comparisons = []
    for row in rows:
        version = row["version"]
        if baseline is None or version == baseline or (row["requests"] == 0 and row["weight"] == 0):
            continue
        base, cand = counts.get(baseline, (0, 0)), (row["labelled"], row["correct"])
        if policy.test == "fixed":
            comparison = _fixed_comparison(base, cand, policy)
        else:
            outcomes = (
                ledger.outcomes(model, epoch, baseline),
                ledger.outcomes(model, epoch, version),
            )
            ratio = block_ratio(weights.get(baseline, 0.0), weights.get(version, 0.0))
            comparison = _sequential_comparison(outcomes, ratio, base, cand, policy)
        comparisons.append({"baseline": baseline, "candidate": version, **comparison})
    return {
        "model": model,
        "epoch": epoch,
        "baseline": baseline,
        "alpha": policy.alpha,
        "min_samples": policy.min_samples,
        "test": policy.test,
        "versions": rows,
        "comparisons": comparisons,
    }
