"""The one headline interval of a cross-validation score, and the naive one beside it.

* Resampling plans (k-fold, repeated k-fold, shuffle splits, 5x2): the Nadeau & Bengio (2003)
  corrected resampled t interval, because trials share training data and the plain t
  interval of their mean is too narrow (with repeated k-fold it covered the learner's
  expected accuracy in under half of simulated data sets; docs/cross-validation.md).
* A single train/test split: the exact Clopper-Pearson interval for a proportion of test
  items (accuracy, subset accuracy); no interval for other metrics, with the reason.
* Bounded metrics (accuracy, F1, AUROC, ... in [0, 1]): the same interval by the delta method
  on the logit scale, logit(m) +- t * se / (m (1 - m)), mapped back, so it never leaves
  (0, 1); this is the "logit interval" of Brown, Cai & DasGupta (2001, Sec. 4.2.2) with the
  corrected standard error. The point estimate stays the plain mean and lies inside.
* No spread (every trial scored the same): no interval and a one-line reason, never a
  zero-width interval.

References (one line each)
    Nadeau & Bengio (2003), Inference for the generalization error, Mach. Learn. 52:239-281.
    Clopper & Pearson (1934), The use of confidence or fiducial limits..., Biometrika 26:404.
    Brown, Cai & DasGupta (2001), Interval estimation for a binomial proportion, Stat. Sci. 16:101.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as st

from randkit.cv.stats import _confidence, _mean_var, _positive, _scores

__all__ = [
    "NAIVE_NOTE",
    "clopper_pearson",
    "headline_interval",
    "metric_range",
    "read_headline",
]

NAIVE_NOTE = (
    "naive t interval: treats trials as independent, too narrow when they share training "
    "data (repeated k-fold: far too narrow)"
)

# Words that name a proportion-like score in [0, 1]. A metric is bounded only when its name
# has one of them AND every score lies in [0, 1]: a name alone could mislead (a user's
# "accuracy_gain" may be negative), and values alone could too (a loss of 0.3 is in [0, 1]).
_BOUNDED_WORDS = {
    "accuracy", "acc", "f1", "auroc", "auc", "roc", "precision", "recall", "iou", "jaccard",
    "dice", "specificity", "sensitivity", "ap", "map",
}  # fmt: skip
# Proportions of test items: one split's score k / n has an exact binomial interval.
_PROPORTION_NAMES = {"accuracy", "acc", "subset_accuracy"}


def metric_range(name: str, scores: Sequence[float]) -> tuple[float, float] | None:
    """(0.0, 1.0) when ``name`` reads as a proportion-like metric and every score is in [0, 1],
    else None (treated as unbounded). Built-in bounded metrics: accuracy, macro_f1, micro_f1,
    subset_accuracy, auroc; rmse, mse, mae, loss and r2 (which may be negative) are not."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    if name.lower() == "balanced_accuracy" or words & _BOUNDED_WORDS:
        x = np.asarray(scores, dtype=float)
        if x.size and bool(((x >= 0.0) & (x <= 1.0)).all()):
            return 0.0, 1.0
    return None


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> list[float]:
    """Exact two-sided interval for a binomial proportion (Clopper & Pearson 1934):
    [Beta(a/2; k, n-k+1), Beta(1-a/2; k+1, n-k)], with 0 and 1 at k = 0 and k = n.

    >>> [round(v, 4) for v in clopper_pearson(45, 50)]
    [0.7819, 0.9667]
    """
    c = _confidence(confidence)
    if not 0 <= successes <= n or n < 1:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    a = 1.0 - c
    lo = 0.0 if successes == 0 else float(st.beta.ppf(a / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(st.beta.ppf(1 - a / 2, successes + 1, n - successes))
    return [lo, hi]


def _t_interval(
    mean: float, se: float, df: int, c: float, bounds: tuple[float, float] | None
) -> list[float]:
    """mean +- t * se; for a bounded metric the same on the logit scale (delta method,
    Brown, Cai & DasGupta 2001 Sec. 4.2.2), mapped back inside the bounds."""
    t = float(st.t.ppf(0.5 + c / 2.0, df))
    if bounds is None:
        return [mean - t * se, mean + t * se]
    lo, hi = bounds
    p = (mean - lo) / (hi - lo)
    if not 0.0 < p < 1.0:  # only when every score sits on a bound, i.e. no spread
        return [mean, mean]
    centre, half = math.log(p / (1.0 - p)), t * se / ((hi - lo) * p * (1.0 - p))
    ends = [1.0 / (1.0 + math.exp(-(centre + s * half))) for s in (-1.0, 1.0)]
    return [lo + (hi - lo) * e for e in ends]


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.6g}"


def _single_split(
    metric: str, score: float, n_test: float, c: float
) -> tuple[list[float] | None, str | None, str]:
    """Clopper-Pearson for a proportion of test items, else no interval and why."""
    k = score * n_test
    whole = float(n_test).is_integer() and abs(k - round(k)) < 1e-6 * max(1.0, n_test)
    if metric.lower() in _PROPORTION_NAMES and whole and 0.0 <= score <= 1.0:
        n = int(n_test)
        note = (
            f"one split: exact binomial interval (Clopper-Pearson) for this trained model's "
            f"{metric} on its {n} test items"
        )
        return clopper_pearson(round(k), n, c), "clopper_pearson", note
    note = (
        f"one split: no exact interval for {metric} from a single test score; "
        "use a resampling plan (k-fold) for an interval"
    )
    return None, None, note


def headline_interval(
    scores: Sequence[float],
    metric: str,
    n_train: float,
    n_test: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The headline interval of the mean of J trial scores (see the module docstring).

    Returns ``ci`` (None when there is none), ``method`` (``nadeau_bengio_logit``,
    ``nadeau_bengio``, ``clopper_pearson`` or None), ``note`` (one line: what it covers or why
    there is none), ``naive`` (the plain t interval of the J scores on the same scale, None
    for J = 1 or no spread), ``naive_note`` and ``bounds``.

    >>> r = headline_interval([0.90, 0.92, 0.94, 0.91, 0.93], "accuracy", 80, 20)
    >>> r["method"], [round(v, 4) for v in r["ci"]]
    ('nadeau_bengio_logit', [0.8852, 0.9449])
    >>> headline_interval([1.0, 1.0, 1.0], "accuracy", 80, 20)["note"]
    'every trial scored 1.0000: no spread to estimate an interval from'
    """
    c = _confidence(confidence)
    x = _scores(scores, "scores")
    n1, n2 = _positive(n_train, "n_train"), _positive(n_test, "n_test")
    bounds = metric_range(metric, x)
    out: dict[str, Any] = {"naive": None, "naive_note": NAIVE_NOTE, "bounds": bounds}
    if x.size == 1:
        ci, method, note = _single_split(metric, float(x[0]), n2, c)
        return {**out, "ci": ci, "method": method, "note": note, "naive_note": None}
    mean, s2 = _mean_var(x)
    if s2 == 0.0:
        note = f"every trial scored {_number(mean)}: no spread to estimate an interval from"
        return {**out, "ci": None, "method": None, "note": note}
    J = int(x.size)
    corrected = math.sqrt((1.0 / J + n2 / n1) * s2)  # Nadeau & Bengio (2003)
    method = "nadeau_bengio_logit" if bounds else "nadeau_bengio"
    note = "corrected resampled t interval (Nadeau & Bengio 2003)" + (
        ", on the logit scale (stays inside [0, 1])" if bounds else ""
    )
    return {
        **out,
        "ci": _t_interval(mean, corrected, J - 1, c, bounds),
        "method": method,
        "note": note,
        "naive": _t_interval(mean, math.sqrt(s2 / J), J - 1, c, bounds),
    }


def read_headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The headline interval of a ``summary.json`` (or one ``per_metric`` entry), old or new.

    Summaries written before ``ci95_method`` existed held the naive interval in ``ci95`` and
    the corrected one, not kept inside [0, 1], in ``ci95_corrected``: those are read as such.
    """
    if "ci95_method" in summary or "ci95_naive" in summary:
        return {
            "ci": summary.get("ci95"),
            "method": summary.get("ci95_method"),
            "note": summary.get("ci95_note") or "",
            "naive": summary.get("ci95_naive"),
        }
    old = "written by an older randkit: not kept inside the metric's range"
    if summary.get("ci95_corrected") is not None:
        note = f"corrected resampled t interval (Nadeau & Bengio 2003), {old}"
        return {"ci": summary["ci95_corrected"], "method": "nadeau_bengio", "note": note,
                "naive": summary.get("ci95")}  # fmt: skip
    return {"ci": None, "method": None, "note": f"no corrected interval ({old})",
            "naive": summary.get("ci95")}  # fmt: skip
