"""The confidence sequence behind ``certify_at_radius`` (``randkit.deploy.sequential``).

Simulation tests use Bernoulli streams with a known p drawn from fixed seeds; a rate passes
unless a one-sided binomial test rejects "rate <= alpha" at level 1e-3 (``TEST_LEVEL``), so
each states its own Monte-Carlo error: with 4,000 streams at alpha = 0.05 the standard error
of a rate is 0.0034 and the test fails beyond about 0.061.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import binomtest, norm

from randkit.deploy.sequential import (
    FINAL_SHARE,
    Component,
    Prior,
    above_prior,
    below_prior,
    decide_sequentially,
    log_evidence,
    log_marginal,
    lower_exceeds,
    next_chunk,
    upper_below,
)
from randkit.deploy.smoothing import lower_confidence_bound

TEST_LEVEL = 1e-3
TARGETS = [norm.cdf(r / 0.25) for r in (0.25, 0.5, 0.75)]  # 0.841, 0.977, 0.99865


def assert_rate_at_most(failures: int, trials: int, alpha: float, what: str) -> None:
    p_value = binomtest(failures, trials, alpha, alternative="greater").pvalue
    assert p_value >= TEST_LEVEL, (
        f"{what}: {failures}/{trials} = {failures / trials:.4f} > alpha = {alpha} "
        f"(p = {p_value:.2g})"
    )


def cumulative_hits(p: float, streams: int, steps: int, seed: int) -> np.ndarray:
    """S_t for t = 1..steps of ``streams`` Bernoulli(p) streams: shape (streams, steps)."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.random((streams, steps)) < p, axis=1)


# ------------------------------------------------------------------ the mixture, exactly


def numeric_log_marginal(prior: Prior, hits: int, trials: int) -> float:
    """Adaptive quadrature of each restricted component after q = 1 - u^2 (which removes
    the (1 - q)^(-1/2) singularity of a b = 1/2 component), normalized the same way."""
    misses, total = trials - hits, 0.0

    def integral(c: Component, s: int, f: int) -> float:
        low, high = np.sqrt(1 - c.hi), np.sqrt(1 - c.lo)
        value, _ = quad(
            lambda u: 2 * u ** (2 * (f + c.b) - 1) * (1 - u * u) ** (s + c.a - 1),
            low,
            high,
            points=[np.clip(np.sqrt((f + c.b) / (s + f + c.a + c.b)), low, high)],
            epsabs=0,
            epsrel=1e-11,
            limit=400,
        )
        return value

    for c in prior:
        total += c.weight * integral(c, hits, misses) / integral(c, 0, 0)
    return float(np.log(total)) if total > 0 else -np.inf


@pytest.mark.parametrize("target", [0.5, *TARGETS])
def test_log_marginal_matches_numerical_integral(target: float) -> None:
    for prior in (above_prior(target), below_prior(target)):
        for hits, trials in ((0, 0), (3, 5), (40, 50), (299, 300), (1000, 1000), (10, 1000)):
            got = float(log_marginal(prior, np.array(hits), np.array(trials)))
            expected = numeric_log_marginal(prior, hits, trials)
            if expected < -700:  # past double range: -inf is the conservative answer
                assert got < -700 or got == -np.inf
                continue
            assert got == pytest.approx(expected, abs=1e-6), (prior, hits, trials)


def test_evidence_rises_with_hits_and_along_the_all_hit_path() -> None:
    """What curtailment relies on: with alternatives q >= p, more hits in the same samples
    never lower M_t(p), nor does a further hit."""
    for p in TARGETS:
        t = 2000
        same_t = log_evidence(np.arange(t + 1), np.full(t + 1, t), p, above_prior(p))
        # Where M_t(p) < e^-5 (far below any threshold) Beta tails deep in underflow carry
        # rounding, or are -inf; where decisions are made the rise is exact.
        relevant = same_t > -5
        assert relevant[-1] and np.all(relevant[np.argmax(relevant) :])
        assert np.all(np.diff(same_t[relevant]) >= -1e-9)
        path = log_evidence(np.arange(300, 4000), np.arange(300, 4000) + 7, p, above_prior(p))
        assert np.all(np.diff(path) >= -1e-9)


def test_anytime_validity_costs_width_at_a_fixed_n() -> None:
    """At a given n the sequence excludes less than Clopper-Pearson does: where the sequence's
    lower end passes p, so does the fixed-n bound, not the other way round."""
    alpha, t = 0.001, 1000
    hits = np.arange(800, t + 1)
    for p in (0.8, 0.9, 0.95):
        sequence = lower_exceeds(hits, np.full_like(hits, t), p, alpha)
        fixed = lower_confidence_bound(hits, t, alpha) > p
        assert np.all(fixed[sequence]) and fixed.sum() > sequence.sum()


# --------------------------------------------------- coverage over simulated streams


@pytest.mark.parametrize("p", [0.3, *TARGETS])
def test_sequence_covers_p_at_every_t_by_simulation(p: float) -> None:
    """Over Bernoulli(p) streams, the fraction whose lower end EVER exceeds p (checked after
    every sample, t = 1..1000) is at most alpha; the same for the upper end below p."""
    alpha, streams, steps = 0.05, 2000, 1000
    hits = cumulative_hits(p, streams, steps, seed=int(p * 1e5))
    trials = np.arange(1, steps + 1)[None, :]
    low_miss = (lower_exceeds(hits, trials, p, alpha)).any(1)
    up_miss = (upper_below(hits, trials, p, alpha)).any(1)
    assert_rate_at_most(int(low_miss.sum()), streams, alpha, f"lower end above p = {p}")
    assert_rate_at_most(int(up_miss.sum()), streams, alpha, f"upper end below p = {p}")
    # Not vacuous: a value a little off p is excluded from most streams' sequences.
    off = max(p / 2, 1 - 10 * (1 - p))  # half of p, or ten times its miss rate
    assert lower_exceeds(hits, trials, off, alpha).any(1).mean() > 0.5


def test_repeated_fixed_n_bounds_fail_the_same_check() -> None:
    """The check has teeth: a Clopper-Pearson bound recomputed after every sample (a fixed-n
    bound used sequentially) exceeds p at some t for far more than alpha of the streams."""
    alpha, streams, steps, p = 0.05, 2000, 1500, 0.5
    hits = cumulative_hits(p, streams, steps, seed=5)
    trials = np.broadcast_to(np.arange(1, steps + 1), hits.shape)
    misses = (lower_confidence_bound(hits, trials, alpha) > p).any(1)
    assert misses.mean() > 3 * alpha


# ----------------------------------------------------------- the sequential decision


def bernoulli_draw(p: np.ndarray, seed: int):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return lambda rows, k: rng.binomial(k, p[rows])


@pytest.mark.parametrize("target", [TARGETS[0], TARGETS[1]])
@pytest.mark.parametrize("below", [0.0, 0.01])
def test_false_certification_at_most_alpha(target: float, below: float) -> None:
    """Streams with pA = target (the worst case) or just below: certified at most alpha of
    the time, counting the fixed look at max_n (union bound)."""
    alpha, streams, max_n = 0.05, 4000, 2000
    p = np.full(streams, target - below)
    result = decide_sequentially(bernoulli_draw(p, 11), streams, target, alpha, max_n)
    assert_rate_at_most(int(result.certified.sum()), streams, alpha, f"certified at {target}")
    assert result.samples.max() <= max_n
    # Not vacuous: the same streams a little above the target are mostly certified.
    easy = np.full(streams, target + 0.5 * (1 - target))
    won = decide_sequentially(bernoulli_draw(easy, 12), streams, target, alpha, max_n)
    assert won.certified.mean() > 0.9


def test_easy_and_hopeless_inputs_stop_early() -> None:
    target, alpha, max_n = TARGETS[0], 0.001, 10_000
    p = np.array([1.0, 1.0, 0.999, 0.3, 0.5, 0.1])
    result = decide_sequentially(bernoulli_draw(p, 3), len(p), target, alpha, max_n)
    assert list(result.certified) == [True, True, True, False, False, False]
    assert np.all(result.samples[:3] <= 96)  # all hits: p*^t <= alpha / 10 at t ~ 55
    assert np.all(result.samples[3:] <= 64)  # "not certifiable" from the upper end
    assert list(result.established) == [True, True, True, False, False, False]


def test_curtailment_stops_only_when_certification_is_impossible() -> None:
    """An input that has already missed too often for the fixed look or the sequence to
    certify, even if every remaining sample were a hit, stops; one that still could, does
    not. Checked by brute force: complete the stream with hits and look at every t."""
    target, alpha, max_n = TARGETS[2], 0.001, 10_000
    p = np.full(300, 0.999)  # about 10 misses in max_n: the fixed look allows about 3
    result = decide_sequentially(bernoulli_draw(p, 4), len(p), target, alpha, max_n)
    stopped = result.samples < max_n
    assert stopped.mean() > 0.5 and result.samples.mean() < 0.8 * max_n
    assert result.certified.mean() < 0.1  # pA above the target, rarely few enough misses
    share = FINAL_SHARE
    for misses in range(0, 8):
        t = np.arange(misses + 1, max_n + 1)
        best = t - misses  # the misses first, then hits to the end: the best case
        could = lower_exceeds(best, t, target, (1 - share) * alpha).any()
        could |= lower_confidence_bound(max_n - misses, max_n, share * alpha) >= target
        if misses <= 2:
            assert could, misses  # still certifiable: must keep sampling
        if misses >= 5:
            assert not could, misses  # hopeless: stopping costs nothing


def test_chunks_grow_and_end_at_max_n() -> None:
    sizes, t = [], 0
    while t < 5000:
        sizes.append(next_chunk(t, 5000))
        t += sizes[-1]
    assert t == 5000 and sizes[0] == 16 and max(sizes) == 256
    assert all(a <= b for a, b in itertools.pairwise(sizes[:-1]))
    assert next_chunk(0, 5) == 5


def test_argument_errors_and_upper_end() -> None:
    draw = bernoulli_draw(np.array([0.5]), 0)
    for bad in ((0.0, 0.001, 10), (0.8, 0.0, 10), (0.8, 1.0, 10), (0.8, 0.01, 0)):
        with pytest.raises(ValueError, match="alpha"):
            decide_sequentially(draw, 1, bad[0], bad[1], bad[2])
    assert upper_below(np.array(2), np.array(100), 0.9, 0.001)
    assert not upper_below(np.array(95), np.array(100), 0.9, 0.001)
