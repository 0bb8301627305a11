"""Anytime-valid certification at a radius: a confidence sequence for the top-class probability.

Randomized smoothing certifies radius r for the selected class when pA > p* = Phi(r / sigma)
(Cohen, Rosenfeld & Kolter 2019, Theorem 1). Deciding that with as few samples as possible
is a sequential test of pA against p*; Voracek (NeurIPS 2024, "Treatment of statistical
estimation problems in randomized smoothing for adversarial robustness") shows that
confidence sequences, checked as the samples arrive, need the fewest samples for the
guarantee that a fixed-n bound gives.

Each end of the sequence is Robbins' mixture martingale (Robbins 1970; Howard, Ramdas,
McAuliffe & Sekhon 2021, Annals of Statistics; Waudby-Smith & Ramdas 2023, JRSS B): with S
hits in t samples and a prior Pi over alternatives q,

    M_t(p) = integral q^S (1 - q)^(t - S) dPi(q) / (p^S (1 - p)^(t - S)).

With Pi on q >= p, every q's likelihood ratio has expectation <= 1 per sample whenever
pA <= p, so M_t(p) is a nonnegative supermartingale under the whole null pA <= p and, by
Ville's inequality, P(M_t(p) >= 1/alpha for some t) <= alpha, at any stopping time, for any
prior fixed before the samples (it may depend on p*, which is fixed by r and sigma). Its
rejection puts p below the lower end of the (1 - alpha) confidence sequence {p : not
rejected}; the mirror image (Pi on q <= p) gives the upper end. A Beta prior restricted to an
interval has the marginal likelihood in closed form (Beta functions times Beta probabilities
of the interval), so the sequence is exact, no numerical integration.

How certification uses it (``decide_sequentially``): the lower end passing p* certifies; the
upper end falling below p* stops "not certifiable". A futility stop can only remove
certifications, so it spends none of the certification's alpha; it gets its own level alpha,
which bounds the power it can cost. No anytime-valid test matches a fixed-n Clopper-Pearson
bound at the budget n itself (it must hold at every n), so the decision at ``max_n`` adds one
fixed look: Clopper-Pearson on all ``max_n`` samples at ``FINAL_SHARE * alpha``, the sequence
running at the rest before it; the union bound keeps the total at alpha. Stops that provably
cannot change the outcome (not even all remaining samples being hits would certify) are free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import betainc, betaln, logsumexp

from randkit.deploy.smoothing import lower_confidence_bound

FINAL_SHARE = 0.9  # share of alpha spent on the fixed look at max_n (see decide_sequentially)
FIRST_CHUNK = 16  # samples of the first look; later chunks grow with t (CHUNK_GROWTH)
CHUNK_GROWTH = 8  # a chunk is t / CHUNK_GROWTH samples: overshoot at most ~1/8 of t
MAX_CHUNK = 256  # ... and at most this many (one noise chunk of the smoothing paths)


@dataclass(frozen=True)
class Component:
    """``weight`` times a Beta(a, b) prior over q restricted to [lo, hi]."""

    a: float
    b: float
    lo: float
    hi: float
    weight: float


Prior = tuple[Component, ...]


def _log_mass(a: np.ndarray, b: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """log P(lo <= q <= hi) under Beta(a, b), as a difference of the two lower tails where
    they are small and of the two upper tails (the lower tails of 1 - q) otherwise, so that
    neither tiny masses nor masses near 1 lose their precision to cancellation."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    zero, minus_inf = np.zeros(a.shape), np.full(a.shape, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        below_hi = np.log(betainc(a, b, hi)) if hi < 1 else zero  # log P(q <= hi)
        below_lo = np.log(betainc(a, b, lo)) if lo > 0 else minus_inf
        above_lo = np.log(betainc(b, a, 1 - lo)) if lo > 0 else zero  # log P(q >= lo)
        above_hi = np.log(betainc(b, a, 1 - hi)) if hi < 1 else minus_inf
        from_below = below_hi + np.log1p(-np.exp(np.minimum(below_lo - below_hi, 0.0)))
        from_above = above_lo + np.log1p(-np.exp(np.minimum(above_hi - above_lo, 0.0)))
        mass = np.where(below_hi < np.log(0.5), from_below, from_above)
    return np.where(np.isnan(mass), -np.inf, mass)  # nan only from an empty tail: -inf - -inf


def log_marginal(prior: Prior, hits: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """log of integral q^S (1 - q)^(t - S) dPi(q), elementwise: each component in closed form,
    B(a + S, b + F) P_{a+S, b+F}([lo, hi]) / (B(a, b) P_{a,b}([lo, hi]))."""
    hits = np.asarray(hits, dtype=float)
    misses = np.asarray(trials, dtype=float) - hits
    terms = []
    for c in prior:
        a, b = c.a + hits, c.b + misses
        mass = _log_mass(a, b, c.lo, c.hi) - _log_mass(np.array(c.a), np.array(c.b), c.lo, c.hi)
        terms.append(np.log(c.weight) + betaln(a, b) - betaln(c.a, c.b) + mass)
    return logsumexp(np.stack(terms), axis=0)


def log_evidence(hits: np.ndarray, trials: np.ndarray, p: float, prior: Prior) -> np.ndarray:
    """log M_t(p), the mixture likelihood ratio of the samples against q = p."""
    hits = np.asarray(hits, dtype=float)
    misses = np.asarray(trials, dtype=float) - hits
    return log_marginal(prior, hits, trials) - (hits * np.log(p) + misses * np.log1p(-p))


def above_prior(p: float) -> Prior:
    """Alternatives q >= p, for the lower end at p: half uniform on [p, 1] (inputs just above
    p), half a Beta(a, 1/2) on [p, 1] with mean miss rate (1 - p) / 4 (inputs far above p,
    whose samples are nearly all hits). Each q >= p makes the likelihood ratio a
    supermartingale under every pA <= p, so the test holds for the whole null pA <= p."""
    miss = (1.0 - p) / 4
    return (
        Component(1.0, 1.0, p, 1.0, 0.5),
        Component(0.5 * (1.0 - miss) / miss, 0.5, p, 1.0, 0.5),
    )


def below_prior(p: float) -> Prior:
    """Alternatives q <= p, for the upper end at p: half uniform on [0, p], half uniform on
    the band of miss rates 1 to 4 times p's (inputs just below p)."""
    return (
        Component(1.0, 1.0, 0.0, p, 0.5),
        Component(1.0, 1.0, max(0.0, 1.0 - 4 * (1.0 - p)), p, 0.5),
    )


def lower_exceeds(hits: np.ndarray, trials: np.ndarray, p: float, alpha: float) -> np.ndarray:
    """L_t > p: the lower end of the (1 - alpha) confidence sequence lies above p, i.e. the
    test of pA <= p with alternatives ``above_prior(p)`` rejects (bool per element)."""
    hits, trials = np.asarray(hits), np.asarray(trials)
    evidence = log_evidence(hits, trials, p, above_prior(p))
    return (hits > p * trials) & (evidence >= -np.log(alpha))


def upper_below(hits: np.ndarray, trials: np.ndarray, p: float, alpha: float) -> np.ndarray:
    """U_t < p: the upper end lies below p (the test of pA >= p, ``below_prior(p)``)."""
    hits, trials = np.asarray(hits), np.asarray(trials)
    evidence = log_evidence(hits, trials, p, below_prior(p))
    return (hits < p * trials) & (evidence >= -np.log(alpha))


@dataclass
class SequentialResult:
    certified: np.ndarray  # bool: pA > target established
    established: np.ndarray  # bool: pA > 1/2 established (the class is no abstention)
    samples: np.ndarray  # samples drawn per input


def next_chunk(trials: int, max_n: int) -> int:
    """Samples to draw before the next look: about t / 8, between FIRST_CHUNK and MAX_CHUNK,
    never past max_n. The sequence is valid at every t, so the chunking is only a trade
    between overshoot and calls; it spends no alpha."""
    size = min(max(trials // CHUNK_GROWTH, FIRST_CHUNK), MAX_CHUNK)
    return min(size, max_n - trials)


def decide_sequentially(
    draw: Callable[[np.ndarray, int], np.ndarray],
    count: int,
    target: float,
    alpha: float,
    max_n: int,
    final_share: float = FINAL_SHARE,
) -> SequentialResult:
    """Decide pA > ``target`` for ``count`` Bernoulli streams: ``draw(rows, k)`` returns the
    hits of k more samples of each stream in ``rows``. After each chunk a stream stops when

    - the lower end at level alpha_seq = (1 - final_share) alpha passes the target: certified;
    - the upper end at level alpha falls below it: not certifiable (a futility stop removes
      certifications only, so it spends none of the certification's alpha);
    - not even all remaining samples being hits could certify it (no error at all);
    - or at ``max_n``, where Clopper-Pearson at final_share * alpha decides.

    P(certified and pA <= target) <= alpha_seq + final_share * alpha = alpha (Ville's
    inequality and the union bound). ``established`` (pA > 1/2, the class is no abstention)
    is the lower end at 1/2 at level alpha, or the final look's bound."""
    if not 0 < alpha < 1 or not 0 <= final_share < 1 or not 0 < target < 1 or max_n < 1:
        raise ValueError(
            f"need 0 < alpha < 1, 0 <= final_share < 1, 0 < target < 1, max_n >= 1; got "
            f"{alpha}, {final_share}, {target}, {max_n}"
        )
    alpha_seq, alpha_final = (1 - final_share) * alpha, final_share * alpha
    hits = np.zeros(count, dtype=np.int64)
    used = np.zeros(count, dtype=np.int64)
    open_ = np.ones(count, dtype=bool)
    certified = np.zeros(count, dtype=bool)
    established = np.zeros(count, dtype=bool)
    rows = np.arange(count)
    while open_.any():
        pending = rows[open_]
        size = next_chunk(int(used[pending[0]]), max_n)  # open streams move in step
        hits[pending] += np.asarray(draw(pending, size), dtype=np.int64)
        used[pending] += size
        s, t = hits[pending], used[pending]
        won = lower_exceeds(s, t, target, alpha_seq)
        established[pending] |= lower_exceeds(s, t, 0.5, alpha)
        if t[0] == max_n:
            final = lower_confidence_bound(s, max_n, alpha_final)
            won |= final >= target
            established[pending] |= final >= 0.5
            lost = ~won
        else:
            lost = upper_below(s, t, target, alpha)
            lost |= ~_can_still_certify(s, t, max_n, target, alpha_seq, alpha_final)
        certified[pending[won]] = True
        open_[pending[won | lost]] = False
    return SequentialResult(certified, established | certified, used)


def _can_still_certify(
    hits: np.ndarray,
    trials: np.ndarray,
    max_n: int,
    target: float,
    alpha_seq: float,
    alpha_final: float,
) -> np.ndarray:
    """Whether some outcome of the remaining samples could still certify; the best case is
    every remaining sample a hit. The final look's bound rises with the hits. So does the
    sequence's evidence: its alternatives are all q >= target, so turning a miss into a hit
    multiplies M_t by E[q / (1 - q)] (1 - target) / target >= 1, and each further hit
    multiplies it by E[q] / target >= 1 (posterior means); the all-hit path's best value
    is therefore its last, at max_n."""
    best = hits + (max_n - trials)
    final = lower_confidence_bound(best, max_n, alpha_final) >= target
    return final | lower_exceeds(best, np.full_like(best, max_n), target, alpha_seq)
