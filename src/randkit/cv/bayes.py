"""Bayesian comparison of two learners on the same cross-validation trials.

The Bayesian correlated t-test (Corani & Benavoli 2015): the J paired differences
d_j = A - B (positive favours A) share training data, modelled as equicorrelated with
rho = n_test / (n_train + n_test). Under the non-informative prior, the posterior of the mean
difference mu is Student t with J - 1 df, location mean(d) and scale^2 = (1/J + rho/(1-rho)) s^2
(rho / (1 - rho) = n_test / n_train: the Nadeau-Bengio factor). A region of practical
equivalence (ROPE) [-rope, rope] splits the posterior into P(A better) = P(mu > rope),
P(equivalent) and P(B better) = P(mu < -rope) (Benavoli, Corani, Demsar & Zaffalon 2017).

References (one line each)
    Corani & Benavoli (2015), A Bayesian approach for comparing cross-validated algorithms on
        multiple data sets, Mach. Learn. 100:285-304.
    Benavoli, Corani, Demsar & Zaffalon (2017), Time for a change: a tutorial for comparing
        multiple classifiers through Bayesian analysis, JMLR 18(77):1-36.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy import stats as st

from randkit.cv.stats import _mean_var, _positive, _real, _scores

__all__ = ["DECISION", "bayesian_correlated_ttest", "bayesian_verdict", "default_rope"]

# A posterior probability above this is reported as a decision (Benavoli et al. 2017).
DECISION = 0.95


def default_rope(bounded: bool, mean_a: float, mean_b: float) -> tuple[float, str]:
    """The ROPE half-width when ``--rope`` is not given, and how it was chosen.

    A metric in [0, 1] (accuracy, F1, AUROC): 0.01, one point, the usual practical threshold
    for accuracy (Benavoli et al. 2017). Another metric has no natural unit, so 1% of the
    runs' mean absolute score (0 when both means are 0): scale-free and small.
    """
    if bounded:
        return 0.01, "1 point on a [0, 1] metric"
    scale = (abs(mean_a) + abs(mean_b)) / 2.0
    return 0.01 * scale, "1% of the runs' mean absolute score"


def bayesian_correlated_ttest(
    differences: Sequence[float], n_train: float, n_test: float, rope: float = 0.01
) -> dict[str, Any]:
    """Posterior probabilities that A is better, equivalent or B is better (module docstring).

    Zero variance (all J differences equal, as when two runs score identically): the
    posterior is a point mass at the mean difference; P(A better) = 1 if it exceeds ``rope``,
    P(B better) = 1 if it is below ``-rope``, else P(equivalent) = 1 (with rope = 0 and a
    mean of exactly 0, the mass is split 0.5 / 0.5 between A and B, as ``baycomp`` does).
    Equal to ``baycomp.two_on_single(a, b, rope, runs)`` with x = A, y = B.

    >>> r = bayesian_correlated_ttest([0.02, 0.01, 0.03, 0.02, 0.02], 80, 20, rope=0.01)
    >>> round(r["p_a_better"], 4), round(r["p_equivalent"], 4), round(r["p_b_better"], 4)
    (0.9486, 0.0498, 0.0016)
    """
    d = _scores(differences, "differences", minimum=2)
    n1, n2 = _positive(n_train, "n_train"), _positive(n_test, "n_test")
    if not _real(rope) or rope < 0:
        raise ValueError(f"rope must be a non-negative number, got {rope!r}")
    J = int(d.size)
    mean, s2 = _mean_var(d)
    rho = n2 / (n1 + n2)  # Corani & Benavoli (2015): correlation of two trials' differences
    # Posterior scale of mu (Corani & Benavoli 2015); rho / (1 - rho) = n_test / n_train.
    scale = math.sqrt((1.0 / J + rho / (1.0 - rho)) * s2)
    if scale == 0.0:  # point mass at the mean: no division by zero
        a, b = float(mean > rope), float(mean < -rope)
        if rope == 0.0 and mean == 0.0:
            a = b = 0.5
    else:
        a = float(st.t.sf(rope, J - 1, loc=mean, scale=scale))
        b = float(st.t.cdf(-rope, J - 1, loc=mean, scale=scale))
    return {
        "test": "bayesian_correlated_t",
        "rope": float(rope),
        "rho": rho,
        "posterior": {"mean": mean, "scale": scale, "df": J - 1},
        "p_a_better": a,
        "p_equivalent": max(0.0, 1.0 - a - b),
        "p_b_better": b,
    }


def bayesian_verdict(result: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """One plain sentence: the outcome whose posterior probability passes 0.95, if any.

    >>> bayesian_verdict({"p_a_better": 0.97, "p_equivalent": 0.03, "p_b_better": 0.0,
    ...                   "rope": 0.01})
    'A is practically better than B (P = 0.970, ROPE +-0.01)'
    """
    a, b = names
    rope = f"ROPE +-{result['rope']:.3g}"
    outcomes = [
        (result["p_a_better"], f"{a} is practically better than {b}"),
        (result["p_equivalent"], f"{a} and {b} are practically equivalent"),
        (result["p_b_better"], f"{b} is practically better than {a}"),
    ]
    p, text = max(outcomes, key=lambda o: o[0])
    if p > DECISION:
        return f"{text} (P = {p:.3f}, {rope})"
    return f"no decision at P > {DECISION:g}; most probable: {text} (P = {p:.3f}, {rope})"
