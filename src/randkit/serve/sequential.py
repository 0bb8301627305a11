"""An anytime-valid test that a candidate version is more accurate than the baseline.

The fixed-horizon z-test of ``experiment.py`` is valid at one sample size chosen in advance;
a canary is watched continuously, and stopping at the first "promote" inflates its false
promotions far above alpha. This module's test may be read after every label.

**The e-process** is the safe test for two Bernoulli streams of Turner, Ly & Grünwald,
"Generic E-variables for exact sequential k-sample tests that allow for optional stopping",
J. Statist. Plann. Inference 230:106116 (2024), arXiv:2106.02693, the one the R package
``safestats`` implements (``safeTwoProportionsTest``). Labels are cut into *blocks* of ``ra``
baseline and ``rb`` candidate labels, each version's labels taken in its own label order
(block j: the baseline's labels ``(j-1)·ra+1 .. j·ra``, the candidate's ``(j-1)·rb+1 ..
j·rb``). For an alternative ``(θa, θb)`` with ``θb > θa`` the block's factor is its
likelihood under ``(θa, θb)`` over its likelihood under the common rate ``θ0 = (ra·θa +
rb·θb) / (ra + rb)``, the reverse information projection of the alternative on the null.
Its expectation is at most 1 under *every* null point ``θb' <= θa'``: it equals
``(1 + (θa'-θ0)·ca)^ra · (1 + (θb'-θ0)·cb)^rb`` with ``ca = (θa-θ0)/(θ0(1-θ0)) <= 0``,
``cb = (θb-θ0)/(θ0(1-θ0)) >= 0`` and ``ra·ca + rb·cb = 0``; its log is concave in
``(θa', θb')``, 0 at ``(θ0, θ0)``, and its gradient there, ``(ra·ca, rb·cb)``, is zero along
the diagonal and points out of the null, so it is at most 0 on the whole null. The
alternative of block j is estimated from blocks 1..j-1 only (a prequential plug-in, as in
the paper), shrunk toward the pooled rate; a block whose estimate is not better bets
nothing. The product over blocks is a nonnegative supermartingale with mean at most 1 under
the null, and by Ville's inequality (1939)

    P(the e-value ever reaches 1/alpha) <= alpha,

exactly (not asymptotically), whatever the common accuracy, however often anyone looks, and
whatever share of labels each version gets (the share only decides how many labels wait for
the other version's to fill a block). Assumption: each version's labels are independent
draws of one success rate; in particular the order in which labels arrive must not depend
on whether the prediction was right. The blocks are read in order (the plug-in learns from
the earlier ones), so the ledger keeps each routed label's outcome in order.

**The confidence sequence** inverts the same construction for the nulls ``θb - θa <= d``
(Turner & Grünwald, "Exact anytime-valid confidence intervals for contingency tables and
beyond", arXiv:2203.09785): the projection is then the point ``(ηa, ηa + d)`` that solves
``ra(θa-ηa)/(ηa(1-ηa)) + rb(θb-ηb)/(ηb(1-ηb)) = 0``, and the same argument holds with the
line ``θb' - θa' = d`` in place of the diagonal. The lower bound is the largest ``d``
rejected at level alpha, so it is above 0 exactly when the test promotes; the upper bound
swaps the versions. Each bound holds at every look with probability at least 1 - alpha.

>>> rng = np.random.default_rng(0)
>>> base, cand = rng.random(3000) < 0.80, rng.random(3000) < 0.90
>>> result = sequential_test(base, cand, (1, 1), alpha=0.05)
>>> result["reject"], result["e_value"] > 1e6, 0 < result["cs"][0] < 0.1 < result["cs"][1]
(True, True, True)
>>> sequential_test(base, base, (1, 1), alpha=0.05)["reject"]
False
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

MAX_BLOCK = 20  # labels per block at most: up to a block's labels wait for the other version
SHRINK = 50.0  # pseudo-labels pulling each plug-in rate toward the pooled one (see _plug_in)


def block_ratio(
    weight_base: float, weight_cand: float, max_block: int = MAX_BLOCK
) -> tuple[int, int]:
    """Baseline and candidate labels per block, close to the ratio of their traffic.

    Blocks matching the expected share of labels waste the fewest labels (the version ahead
    waits for the other); any ratio is valid. Unknown or zero weights give (1, 1).

    >>> block_ratio(90, 10), block_ratio(50, 50), block_ratio(70, 30), block_ratio(99, 1)
    ((9, 1), (1, 1), (7, 3), (19, 1))
    """
    if not (weight_base > 0 and weight_cand > 0):
        return (1, 1)
    share = Fraction(weight_cand / (weight_base + weight_cand)).limit_denominator(max_block)
    if share.numerator == 0:  # a candidate share under 1/max_block
        return (max_block - 1, 1)
    if share.numerator == share.denominator:
        return (1, max_block - 1)
    return (share.denominator - share.numerator, share.numerator)


def block_sums(
    base: np.ndarray, cand: np.ndarray, ratio: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Correct labels per complete block: baseline (…, m) and candidate (…, m).

    ``base`` and ``cand`` are 0/1 outcomes in label order, along the last axis (leading axes:
    independent streams, as in a simulation).
    """
    ra, rb = ratio
    base, cand = np.asarray(base), np.asarray(cand)
    m = min(base.shape[-1] // ra, cand.shape[-1] // rb)
    xa = base[..., : m * ra].reshape(*base.shape[:-1], m, ra).sum(axis=-1)
    xb = cand[..., : m * rb].reshape(*cand.shape[:-1], m, rb).sum(axis=-1)
    return xa, xb


def _plug_in(xa: np.ndarray, xb: np.ndarray, ratio: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Rates (θa, θb) for each block from the blocks before it only (predictable)."""
    ra, rb = ratio
    m = xa.shape[-1]
    before_a = np.cumsum(xa, axis=-1) - xa  # correct labels in the blocks before block j
    before_b = np.cumsum(xb, axis=-1) - xb
    blocks_before = np.arange(m)
    pooled = (before_a + before_b + 1.0) / ((ra + rb) * blocks_before + 2.0)
    # Shrinking toward the pooled rate damps the first blocks' wild estimates, which would
    # bet hard on noise (any predictable estimate keeps the guarantee; this one was chosen for
    # power by simulation, tests/test_serve_sequential.py).
    theta_a = (before_a + SHRINK * pooled) / (ra * blocks_before + SHRINK)
    theta_b = (before_b + SHRINK * pooled) / (rb * blocks_before + SHRINK)
    return theta_a, theta_b


def _projection(
    theta_a: np.ndarray, theta_b: np.ndarray, ratio: tuple[int, int], shift: float
) -> tuple[np.ndarray, np.ndarray]:
    """The null point ``(ηa, ηa + shift)`` closest to ``(θa, θb)`` in Kullback-Leibler
    divergence for one block: the root in ``ηa`` of ``f = ra·g(θa, ηa) + rb·g(θb, ηb)``,
    ``g(θ, η) = (θ-η)/(η(1-η))``. ``f`` falls strictly from +inf to -inf over the bracket, so
    Newton's method, kept inside the bracket, converges from the shift-free answer."""
    ra, rb = ratio
    eta = (ra * theta_a + rb * (theta_b - shift)) / (ra + rb)
    if shift == 0.0:
        return eta, eta
    low = np.full_like(eta, max(0.0, -shift))
    high = np.full_like(eta, min(1.0, 1.0 - shift))
    eta = np.clip(eta, low + 1e-9, high - 1e-9)
    for _ in range(100):  # safeguarded Newton: a step that leaves the bracket bisects it
        eta_b = eta + shift
        va, vb = eta * (1 - eta), eta_b * (1 - eta_b)
        f = ra * (theta_a - eta) / va + rb * (theta_b - eta_b) / vb
        low, high = np.where(f > 0, eta, low), np.where(f > 0, high, eta)
        # g's derivative in η is -((η-θ)² + θ(1-θ)) / (η(1-η))².
        df = (
            -ra * ((eta - theta_a) ** 2 + theta_a * (1 - theta_a)) / va**2
            - rb * ((eta_b - theta_b) ** 2 + theta_b * (1 - theta_b)) / vb**2
        )
        newton = eta - f / df
        inside = (newton >= low) & (newton <= high)
        new = np.where(inside, newton, (low + high) / 2)
        done = float(np.max(np.abs(new - eta), initial=0.0)) < 1e-12
        eta = new
        if done:
            break
    return eta, eta + shift


def log_e_process(
    xa: np.ndarray, xb: np.ndarray, ratio: tuple[int, int], shift: float = 0.0
) -> np.ndarray:
    """The log e-value after each block (…, m) against the null ``θb - θa <= shift``.

    ``xa``, ``xb``: correct labels per block (``block_sums``). ``shift`` 0 tests "the
    candidate is no better"; other shifts give the confidence sequence.
    """
    ra, rb = ratio
    xa, xb = np.asarray(xa, dtype=float), np.asarray(xb, dtype=float)
    theta_a, theta_b = _plug_in(xa, xb, ratio)
    bet = theta_b - theta_a > shift  # otherwise the estimate lies in the null: factor 1
    log_factor = np.zeros_like(xa)
    ta, tb, ya, yb = theta_a[bet], theta_b[bet], xa[bet], xb[bet]
    eta_a, eta_b = _projection(ta, tb, ratio, shift)
    log_factor[bet] = (
        ya * np.log(ta / eta_a)
        + (ra - ya) * np.log((1 - ta) / (1 - eta_a))
        + yb * np.log(tb / eta_b)
        + (rb - yb) * np.log((1 - tb) / (1 - eta_b))
    )
    return np.cumsum(log_factor, axis=-1)


def _rejects(
    xa: np.ndarray, xb: np.ndarray, ratio: tuple[int, int], shift: float, alpha: float
) -> bool:
    path = log_e_process(xa, xb, ratio, shift)
    return bool(path.size) and float(path.max()) >= math.log(1 / alpha)


def lower_bound(xa: np.ndarray, xb: np.ndarray, ratio: tuple[int, int], alpha: float) -> float:
    """Anytime-valid lower confidence bound for ``θb - θa``, to 1e-4: the largest shift whose
    null ``θb - θa <= shift`` the e-process has rejected at level ``alpha`` (-1 if none).

    Above 0 exactly when the test of "no better" rejects. The bisection assumes that
    rejection is monotone in the shift.
    """
    low, high = (0.0, 1.0) if _rejects(xa, xb, ratio, 0.0, alpha) else (-1.0, 0.0)
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (middle, high) if _rejects(xa, xb, ratio, middle, alpha) else (low, middle)
    return low


def sequential_test(
    base: np.ndarray, cand: np.ndarray, ratio: tuple[int, int], alpha: float
) -> dict[str, Any]:
    """The anytime-valid comparison of two versions from their 0/1 outcomes in label order.

    ``e_value``: the e-value now; ``max_e_value``: its largest value so far (the test rejects
    once it has reached ``1/alpha``); ``p_value``: the anytime p-value ``min(1,
    1/max_e_value)``; ``reject``: the candidate is more accurate at level ``alpha``; ``cs``:
    lower and upper confidence bounds for candidate minus baseline, each valid at every look
    with probability 1 - alpha; ``blocks`` and ``used``: complete blocks and the labels
    (baseline, candidate) they hold.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    xa, xb = block_sums(np.asarray(base, dtype=np.int64), np.asarray(cand, dtype=np.int64), ratio)
    path = log_e_process(xa, xb, ratio)
    log_e = float(path[-1]) if path.size else 0.0
    log_max = max(0.0, float(path.max())) if path.size else 0.0
    low = lower_bound(xa, xb, ratio, alpha)
    # The upper bound: the lower bound of baseline minus candidate, roles and blocks swapped.
    high = -lower_bound(xb, xa, (ratio[1], ratio[0]), alpha)
    return {
        "e_value": math.exp(min(log_e, 700.0)),
        "max_e_value": math.exp(min(log_max, 700.0)),
        "p_value": min(1.0, math.exp(-log_max)),
        "reject": log_max >= math.log(1 / alpha),
        "cs": (low, high),
        "blocks": int(xa.shape[-1]),
        "used": (int(xa.shape[-1]) * ratio[0], int(xb.shape[-1]) * ratio[1]),
    }
