"""Uncertainty and calibration metrics for classifier probabilities (plain NumPy, JSON-able out).

Every function takes ``probs`` of shape (N, K) (finite, non-negative, rows summing to 1 within
1e-3) and, where needed, integer ``labels`` of shape (N,) in [0, K). The top-1 prediction is
``argmax`` (first maximum on ties) and its confidence is the top-1 probability.

Equal-width bins are ``[b / bins, (b + 1) / bins)`` for b = 0 .. bins - 1, the last one closed
(a confidence of exactly 1.0 goes in it). Selective-classification curves sort by confidence
descending with ties kept in sample order (stable sort), so tied scores are ranked by index.

>>> p = np.array([[0.9, 0.1], [0.4, 0.6]])
>>> uncertainty_report(p, np.array([0, 0]), bins=2)["accuracy"]
0.5
"""

from __future__ import annotations

import io
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy.special import xlogy

ROW_SUM_TOL = 1e-3
RELIABILITY_KEYS = ("bin_lower", "bin_upper", "confidence", "accuracy", "count")


# ----------------------------------------------------------------------------- validation


def _check_prob_rows(arr: np.ndarray, name: str) -> None:
    """Raise naming ``name`` and the first row (index tuple) that is not a distribution."""
    flat = arr.reshape(-1, arr.shape[-1])
    finite = np.isfinite(flat).all(axis=1)
    nonneg = (flat >= 0).all(axis=1)
    sums = np.where(finite, flat.sum(axis=1), np.nan)
    summed = np.abs(sums - 1.0) <= ROW_SUM_TOL
    bad = np.flatnonzero(~(finite & nonneg & summed))
    if bad.size == 0:
        return
    first = int(bad[0])
    where = np.unravel_index(first, arr.shape[:-1])
    index = ", ".join(str(int(i)) for i in where)
    row = flat[first]
    if not finite[first]:
        why = "is not finite"
    elif not nonneg[first]:
        why = "has a negative entry"
    else:
        why = f"sums to {sums[first]:.6g}, expected 1 (within {ROW_SUM_TOL:g})"
    raise ValueError(f"{name}[{index}] {why}: {np.array2string(row, threshold=8)}")


def _probs(probs: Any) -> np.ndarray:
    arr = np.asarray(probs, dtype=float)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"probs must be 2-D (N, K) with N, K >= 1, got shape {arr.shape}")
    _check_prob_rows(arr, "probs")
    return arr


def _labels(labels: Any, n: int, k: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"labels has {arr.shape[0]} entries but probs has N={n} rows")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= k))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"labels[{i}] = {int(arr[i])} is outside [0, {k}) (K={k} classes)")
    return arr.astype(np.int64)


def _inputs(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _probs(probs)
    return p, _labels(labels, *p.shape)


def _bins(bins: Any) -> int:
    if isinstance(bins, bool):
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    try:
        value = operator.index(bins)
    except TypeError:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}") from None
    if value < 1:
        raise ValueError(f"bins must be an integer >= 1, got {value}")
    return value


def _coverage(coverage: Any, name: str = "coverage") -> float:
    try:
        value = float(coverage)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {coverage!r}") from None
    if isinstance(coverage, bool) or not 0.0 < value <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in (0, 1], got {coverage!r}")
    return value


def _confidence(confidence: Any, p: np.ndarray) -> np.ndarray:
    if confidence is None:
        return p.max(axis=1)
    arr = np.asarray(confidence, dtype=float)
    if arr.shape != (p.shape[0],):
        raise ValueError(f"confidence must have shape ({p.shape[0]},), got {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"confidence[{i}] = {arr[i]} is not finite")
    return arr


def _top1(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 confidence, 1.0 where the top-1 class is the label else 0.0)."""
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(float)


def _bin_index(conf: np.ndarray, bins: int) -> np.ndarray:
    edges = np.arange(bins + 1) / bins
    return np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)


# ----------------------------------------------------------------------------- metrics


def nll(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-log max(p_y, eps)`` (natural log).

    Cite: the log score (Good 1952, "Rational Decisions").

    >>> round(nll(np.array([[0.5, 0.5], [0.25, 0.75]]), np.array([0, 1])), 4)  # (ln2+ln4/3)/2
    0.4904
    """
    p, y = _inputs(probs, labels)
    try:
        eps_value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}") from None
    if isinstance(eps, bool) or not (eps_value > 0 and math.isfinite(eps_value)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    py = p[np.arange(p.shape[0]), y]
    return float(np.mean(-np.log(np.maximum(py, eps_value)))) + 0.0  # + 0.0: no -0.0


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of ``sum_k (p_k - onehot_k)^2`` (in [0, 2]).

    Cite: Brier 1950, "Verification of forecasts expressed in terms of probability".

    >>> brier(np.array([[0.5, 0.5]]), np.array([0]))  # 0.25 + 0.25
    0.5
    """
    p, y = _inputs(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15, adaptive: bool = False) -> float:
    """Expected calibration error of the top-1 confidence: ``sum_b |B_b|/n * |acc_b - conf_b|``.

    Equal-width bins on [0, 1] (Guo et al. 2017, "On Calibration of Modern Neural Networks"),
    or with ``adaptive=True`` equal-mass bins (Nixon et al. 2019, "Measuring Calibration in
    Deep Learning"): samples sorted by confidence (stable) and split into ``bins`` consecutive
    groups whose sizes differ by at most one (``np.array_split``); empty groups are skipped.

    >>> round(ece(np.array([[0.8, 0.2], [0.6, 0.4]]), np.array([0, 1]), bins=1), 6)  # |0.5-0.7|
    0.2
    """
    p, y = _inputs(probs, labels)
    nbins = _bins(bins)
    conf, correct = _top1(p, y)
    n = conf.shape[0]
    if adaptive:
        order = np.argsort(conf, kind="stable")
        groups = [g for g in np.array_split(order, nbins) if g.size]
        gaps = [g.size * abs(correct[g].mean() - conf[g].mean()) for g in groups]
        return float(np.sum(gaps) / n)
    idx = _bin_index(conf, nbins)
    acc_sum = np.bincount(idx, weights=correct, minlength=nbins)
    conf_sum = np.bincount(idx, weights=conf, minlength=nbins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / n)  # |B|*|acc-conf| = |sum acc - sum conf|


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, list]:
    """Per-bin mean confidence, accuracy and count over equal-width bins (``None`` if empty).

    Cite: reliability diagrams (DeGroot & Fienberg 1983; Niculescu-Mizil & Caruana 2005).

    >>> r = reliability(np.array([[0.8, 0.2], [0.6, 0.4]]), np.array([0, 1]), bins=2)
    >>> r["count"], r["accuracy"]
    ([0, 2], [None, 0.5])
    """
    p, y = _inputs(probs, labels)
    nbins = _bins(bins)
    conf, correct = _top1(p, y)
    idx = _bin_index(conf, nbins)
    count = np.bincount(idx, minlength=nbins)
    acc_sum = np.bincount(idx, weights=correct, minlength=nbins)
    conf_sum = np.bincount(idx, weights=conf, minlength=nbins)
    edges = np.arange(nbins + 1) / nbins
    return {
        "bin_lower": [float(v) for v in edges[:-1]],
        "bin_upper": [float(v) for v in edges[1:]],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, count, strict=True)],
        "count": [int(c) for c in count],
    }


def risk_coverage(
    probs: np.ndarray, labels: np.ndarray, confidence: np.ndarray | None = None
) -> dict[str, Any]:
    """Risk-coverage curve of selective classification and its area (AURC).

    Sort by ``confidence`` (default: top-1 probability) descending, ties by sample order; for
    k = 1..n, coverage k/n and risk = error rate of the k most confident; AURC = mean risk.
    Cite: Geifman et al. 2018, "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers".

    >>> risk_coverage(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([1, 0]))["risk"]
    [1.0, 0.5]
    """
    p, y = _inputs(probs, labels)
    conf = _confidence(confidence, p)
    errors = (p.argmax(axis=1) != y).astype(float)
    order = np.argsort(-conf, kind="stable")
    n = conf.shape[0]
    k = np.arange(1, n + 1)
    risk = np.cumsum(errors[order]) / k
    return {
        "coverage": [float(v) for v in k / n],
        "risk": [float(v) for v in risk],
        "aurc": float(risk.mean()),
    }


def risk_at_coverage(
    probs: np.ndarray,
    labels: np.ndarray,
    coverage: float,
    confidence: np.ndarray | None = None,
) -> float:
    """Error rate of the ``ceil(coverage * n)`` most confident samples, coverage in (0, 1].

    ``coverage * n`` within 1e-9 of an integer counts as that integer (0.9 * 10 -> 9, not 10).
    Cite: Geifman & El-Yaniv 2017, "Selective Classification for Deep Neural Networks".

    >>> risk_at_coverage(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]), 0.5)
    0.0
    """
    cov = _coverage(coverage)
    return _risk_at(risk_coverage(probs, labels, confidence)["risk"], cov)


def _risk_at(risk: list[float], coverage: float) -> float:
    n = len(risk)
    k = min(max(math.ceil(coverage * n - 1e-9), 1), n)
    return risk[k - 1]


def entropy(probs: np.ndarray, check: bool = True) -> np.ndarray:
    """Predictive entropy ``-sum_k p_k log p_k`` per sample (natural log, 0 log 0 = 0).

    Cite: Shannon 1948, "A Mathematical Theory of Communication". ``check=False`` skips the
    checks (the predictor's outputs, NaN after an overflow, are refused by their caller).

    >>> entropy(np.array([[0.5, 0.5], [1.0, 0.0]])).round(4).tolist()
    [0.6931, 0.0]
    """
    p = _probs(probs) if check else np.asarray(probs)
    return 0.0 - xlogy(p, p).sum(axis=-1)  # 0.0 - x: no -0.0


def mutual_information(sample_probs: np.ndarray, check: bool = True) -> np.ndarray:
    """BALD mutual information ``H(mean_s p_s) - mean_s H(p_s)`` per sample, clipped at 0.

    ``sample_probs`` has shape (S, N, K): S Monte Carlo samples (e.g. dropout or randomized
    passes) of the (N, K) probabilities. Cite: Houlsby et al. 2011, "Bayesian Active Learning
    for Classification and Preference Learning".

    >>> s = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # two samples that disagree
    >>> mutual_information(s).round(4).tolist()  # log 2
    [0.6931]
    """
    arr = np.asarray(sample_probs, dtype=float if check else None)
    if check and (arr.ndim != 3 or min(arr.shape) < 1):
        raise ValueError(
            f"sample_probs must be 3-D (S, N, K) with S, N, K >= 1, got shape {arr.shape}"
        )
    if check:
        _check_prob_rows(arr, "sample_probs")
    total = entropy(arr.mean(axis=0), check=False)
    expected = entropy(arr, check=False).mean(axis=0)
    return np.maximum(total - expected, 0.0)


def uncertainty_report(
    probs: np.ndarray,
    labels: np.ndarray,
    bins: int = 15,
    coverages: Sequence[float] = (0.5, 0.8, 0.9, 0.95),
) -> dict[str, Any]:
    """All metrics in one JSON-able dict; ``risk_at_coverage`` keys are ``str(float(c))``.

    Keys: accuracy, nll, brier, ece, ece_adaptive (same ``bins``), aurc, risk_at_coverage,
    reliability. Cite: see each metric (Guo et al. 2017 for the calibration summary).

    >>> p = np.array([[0.9, 0.1], [0.4, 0.6]])
    >>> uncertainty_report(p, np.array([0, 1]), bins=2, coverages=(0.5,))["risk_at_coverage"]
    {'0.5': 0.0}
    """
    p, y = _inputs(probs, labels)
    nbins = _bins(bins)
    if isinstance(coverages, str | bytes) or not isinstance(coverages, Iterable):
        raise ValueError(f"coverages must be a sequence of numbers in (0, 1], got {coverages!r}")
    covs = [_coverage(c, "coverages") for c in coverages]
    _, correct = _top1(p, y)
    curve = risk_coverage(p, y)
    return {
        "accuracy": float(correct.mean()),
        "nll": nll(p, y),
        "brier": brier(p, y),
        "ece": ece(p, y, nbins),
        "ece_adaptive": ece(p, y, nbins, adaptive=True),
        "aurc": curve["aurc"],
        "risk_at_coverage": {str(c): _risk_at(curve["risk"], c) for c in covs},
        "reliability": reliability(p, y, nbins),
    }


# ----------------------------------------------------------------------------- plot


def reliability_png(report_or_reliability: dict[str, Any], title: str = "Reliability") -> bytes:
    """Reliability diagram (accuracy bars, mean-confidence markers, diagonal) as PNG bytes.

    Takes a ``uncertainty_report`` (its ``"reliability"`` is drawn and its ECE shown) or a
    ``reliability`` dict. Cite: Niculescu-Mizil & Caruana 2005; Guo et al. 2017 (Figure 1).

    >>> png = reliability_png(reliability(np.eye(2), np.array([0, 1]), bins=4))
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    from randkit.extras import require

    require("report", "randkit.deploy.reliability_png")  # matplotlib draws it
    from matplotlib.figure import Figure

    if not isinstance(report_or_reliability, dict):
        raise ValueError(
            "report_or_reliability must be a dict from uncertainty_report or reliability, "
            f"got {type(report_or_reliability).__name__}"
        )
    rel = report_or_reliability.get("reliability", report_or_reliability)
    missing = [k for k in RELIABILITY_KEYS if not isinstance(rel, dict) or k not in rel]
    if missing:
        raise ValueError(f"report_or_reliability lacks reliability keys {missing}")
    lower = np.asarray(rel["bin_lower"], dtype=float)
    upper = np.asarray(rel["bin_upper"], dtype=float)
    full = [i for i, c in enumerate(rel["count"]) if c]
    acc = [rel["accuracy"][i] for i in full]
    conf = [rel["confidence"][i] for i in full]
    centers = (lower + upper) / 2

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.bar(
        lower[full], acc, width=(upper - lower)[full], align="edge",
        color="tab:blue", edgecolor="black", alpha=0.8, label="accuracy",
    )  # fmt: skip
    ax.plot(centers[full], conf, "o-", color="tab:red", markersize=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    if "ece" in report_or_reliability:
        title = f"{title} (ECE {report_or_reliability['ece']:.4f})"
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
