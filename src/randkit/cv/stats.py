"""Honest statistics for cross-validation scores: intervals, paired tests, variance components.

Every function takes plain scores (one number per trial, or per-trial differences A - B of a
score where higher is better) and returns a dict of plain Python floats, ints and lists, ready
for JSON. Formulas follow the cited papers line by line; nothing here draws random numbers.

References (one line each)
    Nadeau & Bengio (2003), Inference for the generalization error, Mach. Learn. 52:239-281.
    Bouckaert & Frank (2004), Evaluating the replicability of significance tests..., PAKDD.
    Dietterich (1998), Approximate statistical tests for comparing..., Neural Comput. 10:1895.
    Ting, Burdick, Graybill, Jeyaratnam & Lu (1990), J. Stat. Comput. Simul. 35:135-143.
    Burdick & Graybill (1992), Confidence Intervals on Variance Components, Marcel Dekker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from numbers import Real
from typing import Any

import numpy as np
from scipy import stats as st
from sklearn.metrics import precision_recall_fscore_support

__all__ = [
    "corrected_resampled_ttest",
    "five_by_two_ttest",
    "nadeau_bengio_ci",
    "paired_ttest",
    "per_class_report",
    "summarize",
    "variance_components",
    "verdict",
]


# ---------------------------------------------------------------- validation helpers


def _scores(values: Any, name: str, minimum: int = 1) -> np.ndarray:
    """``values`` as a finite 1-D float array of at least ``minimum`` entries."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if x.size < minimum:
        raise ValueError(f"{name} needs at least {minimum} value(s), got {x.size}")
    _check_finite(x, name)
    return x


def _check_finite(x: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        i = np.unravel_index(bad[0], x.shape)
        where = i[0] if len(i) == 1 else tuple(int(k) for k in i)
        raise ValueError(f"{name} must be finite, got {x[i]} at index {where}")


def _real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _confidence(confidence: float, name: str = "confidence") -> float:
    if not _real(confidence) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _positive(value: float, name: str) -> float:
    if not _real(value) or float(value) <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _mean_var(x: np.ndarray) -> tuple[float, float]:
    """Mean and ddof=1 variance; exactly (x[0], 0.0) for constant input (no rounding noise)."""
    if x.min() == x.max():
        return float(x[0]), 0.0
    return float(x.mean()), float(x.var(ddof=1))


def _t_and_p(estimate: float, se: float, df: int) -> tuple[float, float]:
    """t = estimate / se and its two-sided p on ``df`` degrees of freedom.

    Zero variance (se == 0): t = 0, p = 1 when the estimate is 0; t = +-inf, p = 0 otherwise.
    """
    if se == 0.0:
        return (0.0, 1.0) if estimate == 0.0 else (math.copysign(math.inf, estimate), 0.0)
    t = estimate / se
    return t, float(2.0 * st.t.sf(abs(t), df))


def _t_test(name: str, mean: float, se: float, df: int, confidence: float) -> dict:
    """Two-sided t-test of mean = 0 with standard error ``se`` and a t interval."""
    t, p = _t_and_p(mean, se, df)
    half = float(st.t.ppf(0.5 + confidence / 2.0, df)) * se
    return {
        "test": name,
        "mean": mean,
        "t": float(t),
        "df": df,
        "p_value": p,
        "ci": [mean - half, mean + half],
        "confidence": confidence,
    }


# ---------------------------------------------------------------- intervals for one score


def summarize(scores: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, std (ddof=1) and Student-t confidence interval for the mean of iid scores.

    CI = mean +- t_{(1+c)/2, n-1} * s / sqrt(n). With one score, std is 0.0 and the CI is the
    point [mean, mean]. The t interval assumes independent scores: for cross-validation
    scores that share data use :func:`nadeau_bengio_ci`.

    >>> r = summarize([0.90, 0.92, 0.94])
    >>> round(r["mean"], 3), r["n"], [round(v, 3) for v in r["ci"]]
    (0.92, 3, [0.87, 0.97])
    """
    c = _confidence(confidence)
    x = _scores(scores, "scores")
    mean, var = _mean_var(x)
    n = int(x.size)  # n = 1: var is 0.0, so the interval is the point [mean, mean]
    half = 0.0 if n == 1 else float(st.t.ppf(0.5 + c / 2.0, n - 1)) * math.sqrt(var / n)
    return {
        "mean": mean,
        "std": math.sqrt(var),
        "n": n,
        "ci": [mean - half, mean + half],
        "confidence": c,
    }


def nadeau_bengio_ci(
    scores: Sequence[float], n_train: int, n_test: int, confidence: float = 0.95
) -> dict:
    """Confidence interval for the mean of J resampled (overlapping) train/test scores.

    Nadeau & Bengio (2003) corrected resampled variance: Var(mean) ~ (1/J + n_test/n_train) s^2,
    with a t quantile on J - 1 df. For K-fold CV repeated R times (Bouckaert & Frank 2004),
    J = K * R and n_test / n_train = 1 / (K - 1). "std" is the plain ddof=1 std of the scores;
    "corrected_variance" is the corrected variance of their mean.

    >>> r = nadeau_bengio_ci([0.90, 0.92, 0.94, 0.91, 0.93], n_train=80, n_test=20)
    >>> round(r["corrected_variance"], 7)
    0.0001125
    """
    c = _confidence(confidence)
    x = _scores(scores, "scores", minimum=2)
    n1, n2 = _positive(n_train, "n_train"), _positive(n_test, "n_test")
    J = x.size
    mean, s2 = _mean_var(x)
    corrected = (1.0 / J + n2 / n1) * s2  # Nadeau & Bengio (2003), corrected resampled variance
    half = float(st.t.ppf(0.5 + c / 2.0, J - 1)) * math.sqrt(corrected)
    return {
        "mean": mean,
        "std": math.sqrt(s2),
        "n": int(J),
        "ci": [mean - half, mean + half],
        "corrected_variance": corrected,
        "confidence": c,
    }


# ---------------------------------------------------------------- paired comparisons A - B


def corrected_resampled_ttest(
    differences: Sequence[float], n_train: int, n_test: int, confidence: float = 0.95
) -> dict:
    """Nadeau-Bengio corrected resampled t-test on paired per-trial differences A - B.

    t = mean(d) / sqrt((1/J + n_test/n_train) s_d^2), J - 1 df (Nadeau & Bengio 2003); valid
    for random subsampling and, as Bouckaert & Frank (2004) use it, for repeated K-fold CV
    (J = K * R, n_test / n_train = 1 / (K - 1)). Zero variance: t = 0, p = 1 if the mean is
    0, else t = +-inf, p = 0.

    >>> r = corrected_resampled_ttest([0.02, 0.01, 0.03, 0.02, 0.02], n_train=80, n_test=20)
    >>> r["test"], r["df"], round(r["t"], 3), round(r["p_value"], 3)
    ('nadeau_bengio_corrected_t', 4, 4.216, 0.014)
    """
    c = _confidence(confidence)
    d = _scores(differences, "differences", minimum=2)
    n1, n2 = _positive(n_train, "n_train"), _positive(n_test, "n_test")
    J = d.size
    mean, s2 = _mean_var(d)
    se = math.sqrt((1.0 / J + n2 / n1) * s2)
    return _t_test("nadeau_bengio_corrected_t", mean, se, J - 1, c)


def paired_ttest(differences: Sequence[float], confidence: float = 0.95) -> dict:
    """Plain paired t-test on differences A - B: t = mean / (s / sqrt(n)), n - 1 df.

    For reference only: cross-validation differences share training data, so this test is
    far too liberal for them; use :func:`corrected_resampled_ttest` or
    :func:`five_by_two_ttest`. Zero variance is handled as in those tests.

    >>> r = paired_ttest([0.02, 0.01, 0.03, 0.02, 0.02])
    >>> r["test"], round(r["t"], 3)
    ('paired_t', 6.325)
    """
    c = _confidence(confidence)
    d = _scores(differences, "differences", minimum=2)
    mean, s2 = _mean_var(d)
    return _t_test("paired_t", mean, math.sqrt(s2 / d.size), d.size - 1, c)


def five_by_two_ttest(differences: np.ndarray) -> dict:
    """Dietterich (1998) 5x2cv paired t-test; ``differences[i, j]`` = A - B on fold j of
    replication i of 2-fold CV.

    t = p_11 / sqrt((1/5) sum_i s_i^2), s_i^2 = (p_i1 - pbar_i)^2 + (p_i2 - pbar_i)^2, 5 df.
    "mean" is the mean of all ten differences (the numerator uses p_11 alone, as in the
    paper). Zero variance: t = 0, p = 1 if p_11 is 0, else t = +-inf, p = 0.

    >>> d = [[0.02, 0.04], [0.01, 0.03], [0.03, 0.01], [0.02, 0.02], [0.00, 0.02]]
    >>> r = five_by_two_ttest(d)
    >>> r["df"], round(r["t"], 3)
    (5, 1.581)
    """
    p = np.asarray(differences, dtype=float)
    if p.shape != (5, 2):
        raise ValueError(f"differences must have shape (5, 2), got shape {p.shape}")
    _check_finite(p, "differences")
    s2 = ((p - p.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)  # Dietterich (1998): s_i^2
    t, pval = _t_and_p(float(p[0, 0]), math.sqrt(float(s2.mean())), 5)
    return {"test": "dietterich_5x2cv_t", "mean": float(p.mean()), "t": t, "df": 5, "p_value": pval}


# ---------------------------------------------------------------- variance components

_VC_METHOD = (
    "one-way random-effects ANOVA; within CI exact chi-square; "
    "between CI modified large-sample (Ting et al. 1990), truncated at 0"
)


@lru_cache(maxsize=64)
def _mls_constants(n1: int, n2: int, alpha: float) -> tuple[float, ...]:
    """Ting et al. (1990) constants for (S1 - S2): S1 on n1 df, S2 on n2 df, two-sided 1-alpha.

    F(q; a, inf) = chi2(q; a) / a; G = 1 - 1/F(1-alpha/2), H = 1/F(alpha/2) - 1.
    """
    lo, hi = alpha / 2.0, 1.0 - alpha / 2.0
    g1 = 1.0 - n1 / st.chi2.ppf(hi, n1)
    h1 = n1 / st.chi2.ppf(lo, n1) - 1.0
    g2 = 1.0 - n2 / st.chi2.ppf(hi, n2)
    h2 = n2 / st.chi2.ppf(lo, n2) - 1.0
    f_hi, f_lo = st.f.ppf(hi, n1, n2), st.f.ppf(lo, n1, n2)
    g12 = ((f_hi - 1.0) ** 2 - g1**2 * f_hi**2 - h2**2) / f_hi
    h12 = ((1.0 - f_lo) ** 2 - h1**2 * f_lo**2 - g2**2) / f_lo
    return float(g1), float(h1), float(g2), float(h2), float(g12), float(h12)


def variance_components(scores: np.ndarray, confidence: float = 0.95) -> dict:
    """Between- and within-group variance of ``scores[g, j]`` (balanced one-way random effects).

    Model y_gj = mu + a_g + e_gj, a ~ N(0, s2_b), e ~ N(0, s2_w), G groups of J replicates
    (e.g. g = split seed, j = init seed). ANOVA estimators (Searle, Casella & McCulloch 1992,
    ch. 3): s2_w = MSW, s2_b = max(0, (MSB - MSW) / J).
    Within CI (exact): [SSW / chi2_{1-a/2}, SSW / chi2_{a/2}] on G(J-1) df.
    Between CI: modified large-sample (MLS) interval of Ting et al. (1990) for (MSB - MSW) / J
    (Burdick & Graybill 1992, ch. 3), lower and upper ends truncated at 0.
    "share" = component / (s2_b + s2_w), 0.0 for both when the scores are all equal.

    >>> y = np.array([[0.90, 0.91], [0.95, 0.96], [0.92, 0.93]])
    >>> r = variance_components(y)
    >>> round(r["within"]["variance"], 6), round(r["between"]["variance"], 6)
    (5e-05, 0.000608)
    """
    c = _confidence(confidence)
    y = np.asarray(scores, dtype=float)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(
            "scores must have shape (groups, replicates) with at least 2 groups and "
            f"2 replicates, got shape {y.shape}"
        )
    _check_finite(y, "scores")
    G, J = y.shape
    n1, n2 = G - 1, G * (J - 1)
    msb = J * float(np.var(y.mean(axis=1), ddof=1))
    z = y - y[:, :1]  # shift each group by its first value: constant groups give exact zeros
    ssw = float(((z - z.mean(axis=1, keepdims=True)) ** 2).sum())
    msw = ssw / n2
    within, between = msw, max(0.0, (msb - msw) / J)
    alpha = 1.0 - c
    w_ci = [ssw / float(st.chi2.ppf(1 - alpha / 2, n2)), ssw / float(st.chi2.ppf(alpha / 2, n2))]
    g1, h1, g2, h2, g12, h12 = _mls_constants(n1, n2, alpha)
    theta = (msb - msw) / J  # untruncated estimate, the centre of the MLS interval
    v_lo = g1**2 * msb**2 + h2**2 * msw**2 + g12 * msb * msw
    v_hi = h1**2 * msb**2 + g2**2 * msw**2 + h12 * msb * msw
    b_ci = [max(0.0, theta - math.sqrt(max(v_lo, 0.0)) / J)]
    b_ci.append(max(0.0, theta + math.sqrt(max(v_hi, 0.0)) / J))
    total = between + within

    def part(variance: float, ci: list[float]) -> dict:
        return {"variance": variance, "ci": ci, "share": variance / total if total > 0 else 0.0}

    return {
        "method": _VC_METHOD,
        "between": part(between, b_ci),
        "within": part(within, w_ci),
        "total_variance": total,
        "groups": int(G),
        "replicates": int(J),
        "confidence": c,
    }


# ---------------------------------------------------------------- per-class metrics


def _labels(values: Any, name: str, num_classes: int) -> np.ndarray:
    y = np.asarray(values)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of labels, got shape {y.shape}")
    yf = np.asarray(y, dtype=float)
    _check_finite(yf, name)
    frac = yf != np.round(yf)
    if frac.any():
        raise ValueError(f"{name} must hold integer class labels, got {yf[frac][0]}")
    bad = (yf < 0) | (yf >= num_classes)
    if bad.any():
        raise ValueError(f"{name} has label {int(yf[bad][0])} outside 0..{num_classes - 1}")
    return yf.astype(np.int64)


def per_class_report(y_true: Any, y_pred: Any, num_classes: int) -> dict:
    """Precision, recall, F1 and support for each class 0..num_classes-1 (scikit-learn).

    A class never predicted (or absent) gets 0.0 instead of a warning (``zero_division=0``).

    >>> per_class_report([0, 1, 1, 2], [0, 1, 2, 2], num_classes=3)["recall"]
    [1.0, 0.5, 1.0]
    """
    is_int = isinstance(num_classes, int | np.integer) and not isinstance(num_classes, bool)
    if not is_int or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    t = _labels(y_true, "y_true", int(num_classes))
    p = _labels(y_pred, "y_pred", int(num_classes))
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}")
    prec, rec, f1, sup = precision_recall_fscore_support(
        t, p, labels=list(range(int(num_classes))), zero_division=0
    )
    return {
        "precision": [float(v) for v in prec],
        "recall": [float(v) for v in rec],
        "f1": [float(v) for v in f1],
        "support": [int(v) for v in sup],
    }


# ---------------------------------------------------------------- one sentence


def _decimals(values: Sequence[float]) -> int:
    """Enough decimals to show two significant digits of the largest value (at least 3)."""
    m = max((abs(v) for v in values if math.isfinite(v) and v != 0.0), default=0.0)
    return 3 if m == 0.0 else min(10, max(3, 1 - math.floor(math.log10(m))))


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def verdict(result: dict, alpha: float = 0.05, names: tuple[str, str] = ("A", "B")) -> str:
    """One plain sentence from a test result (differences A - B of a higher-is-better score).

    The direction follows the sign of "t" (of "mean" when there is no "t"); the difference and
    CI are reported as winner - loser.

    >>> verdict({"mean": 0.012, "t": 3.1, "p_value": 0.003, "ci": [0.004, 0.02],
    ...          "confidence": 0.95})
    'A is better than B (mean difference +0.012, 95% CI [0.004, 0.020], p = 0.003)'
    >>> verdict({"mean": -0.004, "t": -0.9, "p_value": 0.41})
    'no significant difference between A and B (p = 0.41)'
    """
    _confidence(alpha, "alpha")
    if len(names) != 2:
        raise ValueError(f"names must be two names, got {names!r}")
    if "p_value" not in result or "mean" not in result:
        raise ValueError(f"result must have 'p_value' and 'mean', got keys {sorted(result)}")
    a, b = str(names[0]), str(names[1])
    p, mean = float(result["p_value"]), float(result["mean"])
    if not p < alpha:
        return f"no significant difference between {a} and {b} ({_p_text(p)})"
    sign = float(result.get("t", mean))
    winner, loser, flip = (a, b, 1.0) if sign >= 0 else (b, a, -1.0)
    shown = [flip * mean]
    if "ci" in result:
        shown += sorted(flip * float(v) for v in result["ci"])
    d = _decimals(shown)
    parts = [f"mean difference {shown[0]:+.{d}f}"]
    if "ci" in result:
        level = f"{100 * float(result['confidence']):g}% CI" if "confidence" in result else "CI"
        parts.append(f"{level} [{shown[1]:.{d}f}, {shown[2]:.{d}f}]")
    parts.append(_p_text(p))
    return f"{winner} is better than {loser} ({', '.join(parts)})"
