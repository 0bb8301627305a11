"""Statistical tests of randkit's random draws: the distributions match what the docs promise.

Tolerances are derived from standard errors (6 sigma) or from exact chi-square / binomial
quantiles, never picked by eye; seeds are fixed, so each test is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from randkit.randomize import (
    CutMix,
    Dropout,
    GaussianDropout,
    GradientNoise,
    HorizontalFlip,
    InputNoise,
    Mixup,
    RandomErasing,
    StochasticDepth,
    sample_beta,
    use_generator,
)

N = 10**6
Z = 6.0  # tolerance in standard errors
CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def assert_mean(values: torch.Tensor, mean: float, variance: float) -> None:
    """Sample mean of iid draws within Z standard errors of ``mean``."""
    se = math.sqrt(variance / values.numel())
    assert abs(values.double().mean().item() - mean) < Z * se


def assert_variance(values: torch.Tensor, variance: float, mu4: float, mean: float) -> None:
    """Variance of iid draws around a known ``mean``, within Z standard errors; the standard
    error of the mean square uses the fourth central moment ``mu4``."""
    n = values.numel()
    observed = (values.double() - mean).pow(2).mean().item()
    se = math.sqrt((mu4 - variance**2) / n)
    assert abs(observed - variance) < Z * se, (observed, variance)


def assert_binomial(count: int, n: int, p: float) -> None:
    assert abs(count - n * p) < Z * math.sqrt(n * p * (1 - p)) + 1, (count, n * p)


def chi2_bounds(n: int, variance: float) -> tuple[float, float]:
    """Bounds for the mean square of n draws of N(0, variance): n * s^2 / variance ~ chi2(n)."""
    lo, hi = stats.chi2.ppf([1e-9, 1 - 1e-9], n)
    return lo / n * variance, hi / n * variance


def noisy(kind: str, level: float, seed: int) -> torch.Tensor:
    x = torch.full((4, 1, 500, 500), 0.5, dtype=torch.float64)  # 10^6 pixels
    return InputNoise(kind, level, p=1.0, clip=False)(x, gen(seed))


# --- input noise ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.05, 0.3])
def test_gaussian_noise_moments(level: float) -> None:
    out = noisy("gaussian", level, 1)
    assert_mean(out, 0.5, level**2)
    lo, hi = chi2_bounds(N, level**2)
    assert lo < (out - 0.5).pow(2).mean().item() < hi


@pytest.mark.parametrize("level", [0.05, 0.3])
def test_uniform_noise_moments(level: float) -> None:
    out = noisy("uniform", level, 2)
    assert (out - 0.5).abs().max() <= level
    # U(-a, a): variance a^2/3, fourth moment a^4/5.
    assert_mean(out, 0.5, level**2 / 3)
    assert_variance(out, level**2 / 3, level**4 / 5, 0.5)


@pytest.mark.parametrize("level", [0.1, 0.4])
def test_speckle_noise_std_is_level_times_the_signal(level: float) -> None:
    out = noisy("speckle", level, 3)
    sigma2 = (0.5 * level) ** 2
    assert_mean(out, 0.5, sigma2)
    lo, hi = chi2_bounds(N, sigma2)
    assert lo < (out - 0.5).pow(2).mean().item() < hi


@pytest.mark.parametrize("level", [0.02, 0.3, 1.0])
def test_salt_pepper_changes_a_level_fraction_half_black_half_white(level: float) -> None:
    out = noisy("salt_pepper", level, 4)
    changed = out != 0.5
    assert ((out[changed] == 0) | (out[changed] == 1)).all()
    hits = int(changed.sum())
    assert_binomial(hits, N, level)
    assert_binomial(int((out == 0).sum()), hits, 0.5)


@pytest.mark.parametrize("level", [0.01, 0.1])
def test_poisson_noise_mean_is_the_signal_and_variance_signal_times_level(level: float) -> None:
    out = noisy("poisson", level, 5)
    photons = out / level
    assert torch.allclose(photons, photons.round(), atol=1e-9)  # whole photon counts
    lam = 0.5 / level  # photons per pixel; Poisson: variance lam, 4th central moment lam+3lam^2
    assert_mean(out, 0.5, 0.5 * level)
    assert_variance(out, 0.5 * level, (lam + 3 * lam**2) * level**4, 0.5)


def test_noise_of_different_samples_and_pixels_is_uncorrelated() -> None:
    out = noisy("gaussian", 0.2, 6).view(4, -1) - 0.5
    corr = np.corrcoef(out.numpy())
    off_diagonal = corr[~np.eye(4, dtype=bool)]
    assert np.abs(off_diagonal).max() < Z / math.sqrt(out.shape[1])
    neighbours = np.corrcoef(out[0, :-1].numpy(), out[0, 1:].numpy())[0, 1]
    assert abs(neighbours) < Z / math.sqrt(out.shape[1])


# --- Beta lambdas -----------------------------------------------------------------------------

ALPHAS = [0.2, 1.0, 2.0]
EDGE = 1e-4  # float32 rounds Beta(0.2, 0.2) draws within ~3e-8 of 1 to 1.0 exactly


def _beta_tails(a: float, b: float) -> tuple[float, float]:
    dist = stats.beta(a, b)
    return float(dist.cdf(EDGE)), float(dist.sf(1 - EDGE))


def assert_beta_tails(lam: torch.Tensor, a: float, b: float) -> None:
    """The mass below EDGE and above 1 - EDGE, within binomial tolerance (float32 cannot
    resolve the tails: 1.6% of Beta(0.2, 0.2) draws land on 1.0 exactly)."""
    lo_mass, hi_mass = _beta_tails(a, b)
    assert_binomial(int((lam < EDGE).sum()), lam.numel(), lo_mass)
    assert_binomial(int((lam > 1 - EDGE).sum()), lam.numel(), hi_mass)


def beta_ks(lam: torch.Tensor, a: float, b: float) -> float:
    """KS p-value of the draws inside [EDGE, 1 - EDGE] against Beta(a, b) conditioned on that
    interval."""
    values = lam.double().numpy()
    inside = values[(values >= EDGE) & (values <= 1 - EDGE)]
    lo_mass, hi_mass = _beta_tails(a, b)
    dist = stats.beta(a, b)

    def cdf(x: np.ndarray) -> np.ndarray:
        return (dist.cdf(x) - lo_mass) / (1 - lo_mass - hi_mass)

    return float(stats.kstest(inside, cdf).pvalue)


def _draws(source: str, alpha: float, seed: int, n: int = 20000) -> torch.Tensor:
    if source == "sample_beta":
        return sample_beta(n, alpha, gen(seed), CPU)
    if source == "mixup":
        return Mixup(alpha=alpha).draw((n, 1, 1, 1), gen(seed))["lam"]
    return CutMix(alpha=alpha).draw((n, 1, 4, 4), gen(seed))["drawn_lam"]


@pytest.mark.parametrize("source", ["sample_beta", "mixup", "cutmix"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_lambda_follows_beta_alpha_alpha(source: str, alpha: float) -> None:
    lam = _draws(source, alpha, seed=7)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert_beta_tails(lam, alpha, alpha)
    assert beta_ks(lam, alpha, alpha) > 1e-3
    # The same test rejects clearly wrong distributions: it has power at this sample size.
    assert beta_ks(lam, alpha, 2 * alpha) < 1e-6
    assert beta_ks(lam, 1.5 * alpha, 1.5 * alpha) < 1e-6


def test_lambda_draws_differ_by_seed_and_repeat_by_seed() -> None:
    a, b = sample_beta(100, 0.4, gen(1), CPU), sample_beta(100, 0.4, gen(1), CPU)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_beta(100, 0.4, gen(2), CPU))


def test_small_alpha_beta_has_no_point_mass_at_one_half() -> None:
    alpha, n = 0.02, 200000
    lam = sample_beta(n, alpha, gen(8), CPU)
    middle = int(((lam > 0.25) & (lam < 0.75)).sum())
    p_middle = stats.beta(alpha, alpha).cdf(0.75) - stats.beta(alpha, alpha).cdf(0.25)
    assert_binomial(middle, n, p_middle)


# --- per-sample probability p -------------------------------------------------------------------

TRANSFORMS = {
    "hflip": HorizontalFlip,
    "erasing": lambda p: RandomErasing(p=p),
    "mixup": lambda p: Mixup(p=p),
    "noise": lambda p: InputNoise("gaussian", 0.1, p=p),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fraction_applied_is_p(name: str, p: float) -> None:
    n = 200000
    applied = TRANSFORMS[name](p).draw((n, 1, 4, 4), gen(9))["applied"]
    assert_binomial(int(applied.sum()), n, p)
    # Independent across samples: neighbours are both applied with probability p^2.
    assert_binomial(int((applied[:-1] & applied[1:]).sum()), n - 1, p * p)


# --- gradient noise -----------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 9, 99])
def test_gradient_noise_variance_is_eta_over_1_plus_t_to_the_gamma(step: int) -> None:
    eta, gamma = 0.3, 0.55
    noise = GradientNoise(eta, gamma)
    variance = eta / (1 + step) ** gamma
    assert noise.variance(step) == pytest.approx(variance)
    weight = torch.nn.Parameter(torch.zeros(1000, 1000, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.zeros(10))  # no gradient: left alone
    weight.grad = torch.zeros_like(weight)
    noise.add_([weight, bias], step, gen(10 + step))
    assert bias.grad is None
    g = weight.grad
    assert_mean(g, 0.0, variance)
    lo, hi = chi2_bounds(N, variance)
    assert lo < g.pow(2).mean().item() < hi  # variance eta/(1+t)^gamma, not the std


def test_gradient_noise_is_added_to_the_existing_gradient() -> None:
    weight = torch.nn.Parameter(torch.zeros(1000, 1000))
    weight.grad = torch.full_like(weight, 2.0)
    GradientNoise(0.01, 0.0).add_([weight], 0, gen(11))
    assert_mean(weight.grad, 2.0, 0.01)


def test_gradient_noise_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="eta"):
        GradientNoise(eta=0.0)
    with pytest.raises(ValueError, match="gamma"):
        GradientNoise(eta=0.1, gamma=-1.0)


# --- stochastic layers ----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_1_minus_p_and_preserves_the_mean(p: float) -> None:
    x = torch.ones(1000, 1000, dtype=torch.float64)
    with use_generator(gen(12)):
        out = Dropout(p).train()(x)
    kept = out != 0
    assert_binomial(int(kept.sum()), N, 1 - p)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    assert_mean(out, 1.0, p / (1 - p))  # inverted scaling: E[out] = x


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gaussian_dropout_variance_is_p_over_1_minus_p(p: float) -> None:
    x = torch.full((1000, 1000), 2.0, dtype=torch.float64)
    with use_generator(gen(13)):
        out = GaussianDropout(p).train()(x) / 2.0  # multiplicative: the factor's moments
    variance = p / (1 - p)
    assert_mean(out, 1.0, variance)
    lo, hi = chi2_bounds(N, variance)
    assert lo < (out - 1).pow(2).mean().item() < hi


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_stochastic_depth_drops_whole_samples(p: float) -> None:
    n = 200000
    x = torch.ones(n, 3, 2, dtype=torch.float64)
    with use_generator(gen(14)):
        out = StochasticDepth(p).train()(x)
    per_sample = out.view(n, -1)
    dropped = (per_sample == 0).all(dim=1)
    kept = (per_sample == 1 / (1 - p)).all(dim=1)
    assert (dropped | kept).all()  # never part of a sample
    assert_binomial(int(dropped.sum()), n, p)
    assert_mean(per_sample[:, 0], 1.0, p / (1 - p))
