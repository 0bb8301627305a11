"""The nested cross-validation interval of Bates, Hastie & Tibshirani (JASA 2024).

Naive CV intervals treat the n per-item losses of a K-fold run as independent; they are
not (every item trains the models that score the others), so the standard error is too
small. Nested CV estimates the mean squared error of the CV point estimate directly and
widens the interval accordingly (Bates et al. 2024, section "Confidence intervals with
nested cross-validation", Algorithm 1).

Every constant below follows the authors' reference implementation (R package
``nestedcv``, github.com/stephenbates19/nestedcv, ``R/core.R``: ``nested_cv`` and
``nested_cv_helper``), re-written here from its formulas:

* One repetition r: a random partition into K folds. For every pair of folds {k, j} one
  model is trained without both and scores both (its loss on fold j is the "inner" error of
  outer fold k, its loss on fold k the inner error of outer fold j). For every fold k one
  model is trained without fold k only (the usual K-fold CV, the "outer" fit).
* a_{r,k} = mean of the inner errors of outer fold k (items outside fold k, scored by the
  models trained without {k, j}) - mean of the outer errors on fold k;
  b_{r,k} = var(outer errors on fold k) / n_k (sample variance).
* MSE estimate = mean over (r, k) of (a_{r,k}^2 - b_{r,k}), the estimated MSE of the CV
  estimate at training size n (K-2)/K.
* Err_NCV = mean of every inner error (all r, every item, every j != its fold); s = their SD.
* SD inflation = sqrt(max(0, MSE)) / (s / sqrt(n_sub)), n_sub = floor(n (K-1) / K), kept
  in [1, sqrt(K)].
* Bias correction: (Err_NCV - Err_CV) (1 + ((K-2)/K)^{3/2}), Err_CV the standard K-fold
  estimate (the reference code averages ceil(R/5) extra K-fold runs; here the R outer runs
  the plan already trained, the same estimator with more runs, at no extra cost).
* Interval: (Err_NCV - bias) +- z_{1-alpha/2} * s / sqrt(n) * inflation. Since
  s * inflation / sqrt(n) = sqrt(MSE) sqrt(n_sub / n), this is the paper's
  (Err_NCV - bias) +- z sqrt((K-1)/K) sqrt(MSE) when the inflation is not clamped.

The naive interval beside it is the one the paper compares with (reference ``naive_cv``):
Err_CV +- z * sd(outer errors) / sqrt(n).

Reference: S. Bates, T. Hastie, R. Tibshirani (2024), Cross-validation: what does it
estimate and how well does it do it? J. Am. Stat. Assoc. 119 (2024), arXiv 2104.00673.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtri

__all__ = ["LOSSES", "loss_for_metric", "nested_cv_interval", "to_metric_scale"]

# Metric -> per-item loss whose mean the interval is about. Accuracy: the 0-1 loss (the
# interval is for the error rate, reported as 1 - error); MSE and RMSE: the squared error
# (RMSE's interval is the square root of MSE's: sqrt is increasing, coverage is kept).
LOSSES = {"accuracy": "zero_one", "mse": "squared_error", "rmse": "squared_error"}


def loss_for_metric(metric: str) -> str:
    """The per-item loss behind ``metric``; any other metric is refused in one line."""
    if metric not in LOSSES:
        raise ValueError(
            f"the nested interval needs a mean of per-item losses: metric accuracy (0-1 "
            f"loss), mse or rmse (squared error), got {metric!r}"
        )
    return LOSSES[metric]


def _checked(losses: ArrayLike, fold_ids: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """(R, n, K) losses and (R, n) fold ids, validated; K from the losses' last axis."""
    x = np.asarray(losses, dtype=float)
    f = np.asarray(fold_ids)
    if x.ndim == 2:
        x, f = x[None], f[None]
    if x.ndim != 3 or f.shape != x.shape[:2]:
        raise ValueError(
            f"need losses of shape (R, n, K) and fold_ids of shape (R, n), got {x.shape} "
            f"and {f.shape}"
        )
    k = x.shape[2]
    if k < 3:
        raise ValueError(f"nested CV needs K >= 3 folds (an inner (K-1)-fold CV), got {k}")
    if not np.issubdtype(f.dtype, np.integer) or f.min() < 0 or f.max() >= k:
        raise ValueError(f"fold_ids must be integers in 0..{k - 1}")
    if not np.isfinite(x).all():
        raise ValueError("losses must be finite")
    sizes = (f[..., None] == np.arange(k)).sum(1)
    if sizes.min() < 2:
        raise ValueError("every fold of every repetition needs at least 2 items")
    return x, f, k


def _pivots(x: np.ndarray, f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """a_{r,k} and b_{r,k} of Algorithm 1 (reference ``nested_cv_helper``'s ``out_mat``)."""
    member = f[..., None] == np.arange(k)  # (R, n, K): item i is in fold k
    n_in = member.sum(1)  # (R, K)
    n_out = member.shape[1] - n_in
    # Column k of the losses: on fold k the outer model's, elsewhere the models without {k, j}.
    outer_mean = (x * member).sum(1) / n_in
    inner_mean = (x * ~member).sum(1) / n_out
    outer_var = (((x - outer_mean[:, None, :]) ** 2) * member).sum(1) / (n_in - 1)
    return inner_mean - outer_mean, outer_var / n_in


def nested_cv_interval(
    losses: ArrayLike, fold_ids: ArrayLike, confidence: float = 0.90
) -> dict[str, Any]:
    """The nested CV interval for the expected per-item loss (error rate, MSE).

    ``losses[r, i, j]``: in repetition r, the loss on item i of the model trained without
    item i's fold and fold j; where j is item i's own fold (``fold_ids[r, i]``), the model
    trained without that fold only (the outer K-fold fit). ``confidence``: 1 - alpha (the
    paper's experiments use alpha = 0.1).

    Returns ``ci`` (None when every loss is equal: no spread), ``estimate`` (the
    bias-corrected Err_NCV - bias, the interval's centre), ``err_ncv``, ``err_cv``, ``bias``,
    ``mse`` (the MSE estimate, may be negative), ``inflation`` (clamped), ``naive`` and
    ``width_ratio`` (nested / naive half-width), ``reps``, ``folds``, ``n``.

    >>> rng = np.random.default_rng(0)
    >>> folds = np.stack([rng.permutation(np.arange(40) % 4) for _ in range(3)])
    >>> losses = (rng.random((3, 40, 4)) < 0.2).astype(float)
    >>> r = nested_cv_interval(losses, folds)
    >>> r["reps"], r["folds"], r["n"], r["inflation"] >= 1.0
    (3, 4, 40, True)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, f, k = _checked(losses, fold_ids)
    reps, n = x.shape[0], x.shape[1]
    a, b = _pivots(x, f, k)
    own = f[..., None] == np.arange(k)
    inner, outer = x[~own], x[own]  # every inner error; every outer error (R * n)
    err_ncv, s = float(inner.mean()), float(inner.std(ddof=1))
    err_cv = float(outer.mean())
    mse = float(np.mean(a**2 - b))
    bias = (err_ncv - err_cv) * (1.0 + ((k - 2) / k) ** 1.5)  # reference nested_cv
    z = float(ndtri(0.5 + confidence / 2.0))
    out: dict[str, Any] = {
        "estimate": err_ncv - bias,
        "err_ncv": err_ncv,
        "err_cv": err_cv,
        "bias": bias,
        "mse": mse,
        "reps": reps,
        "folds": k,
        "n": n,
        "confidence": confidence,
    }
    s_outer = float(outer.std(ddof=1))  # per-item SD of the outer (plain K-fold) errors
    naive_half = z * s_outer / math.sqrt(n)
    out["naive"] = [err_cv - naive_half, err_cv + naive_half] if s_outer > 0 else None
    if s == 0.0:  # every inner loss equal (e.g. every item right): nothing to scale
        return {**out, "ci": None, "inflation": None, "width_ratio": None}
    n_sub = math.floor(n * (k - 1) / k)
    inflation = math.sqrt(max(0.0, mse)) / (s / math.sqrt(n_sub))
    inflation = min(max(inflation, 1.0), math.sqrt(k))  # reference: kept in [1, sqrt(K)]
    half = z * s / math.sqrt(n) * inflation
    centre = out["estimate"]
    return {
        **out,
        "ci": [centre - half, centre + half],
        "inflation": inflation,
        "width_ratio": half / naive_half if naive_half > 0 else None,
    }


def to_metric_scale(result: dict[str, Any], metric: str) -> dict[str, Any]:
    """The interval and estimate of a loss interval on ``metric``'s scale, inside its range.

    Accuracy = 1 - error, so [1 - hi, 1 - lo], cut to [0, 1]; MSE cut at 0; RMSE the square
    root of the MSE's ends. Cutting an interval to the metric's range never drops the true
    value, which lies in it, so coverage is unchanged.
    """
    loss_for_metric(metric)

    def convert(v: float) -> float:
        if metric == "accuracy":
            return min(1.0, max(0.0, 1.0 - v))
        return math.sqrt(max(0.0, v)) if metric == "rmse" else max(0.0, v)

    def ends(ci: list[float] | None) -> list[float] | None:
        return None if ci is None else sorted(convert(v) for v in ci)

    return {
        "estimate": convert(result["estimate"]),
        "ci": ends(result["ci"]),
        "naive": ends(result["naive"]),
    }
