"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): predict and certify an L2 radius.

g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I). ``certify`` follows the paper's
CERTIFY (Algorithm 1 / ``core.py``): n0 samples pick the class, n fresh samples count it, a
one-sided Clopper-Pearson lower bound pA_lower at level alpha, radius sigma * PhiInv(pA_lower),
abstain when pA_lower < 1/2. ``predict`` is the paper's PREDICT: abstain unless a two-sided
binomial test of the top two counts rejects p = 1/2 at level alpha.

``certify_at_radius`` decides "certified at radius r" sequentially, anytime-valid: a
confidence sequence for pA checked after every chunk of samples (``sequential.py``; Voracek,
NeurIPS 2024), with the n0 selection step of CERTIFY unchanged.

``noise_chunks`` (the order of the noise draws) and ``certify_from_counts`` (CERTIFY's
statistics) are the only copies: ``Predictor``'s ``smooth`` mode, and so the server, uses them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from randkit.deploy.forward import RowForward, layer_modes

ABSTAIN = -1
NOISE_CHUNK = 256  # noise is drawn in chunks of this many samples per input
FORWARD_CHUNK = 512  # rows per forward call: cache-sized passes are faster per row on the CPU


def lower_confidence_bound(
    successes: np.ndarray, trials: np.ndarray | int, alpha: float
) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion."""
    successes = np.asarray(successes, dtype=float)
    trials = np.broadcast_to(np.asarray(trials, dtype=float), successes.shape)
    bound = beta.ppf(alpha, successes, trials - successes + 1)
    return np.where(successes > 0, bound, 0.0)


def upper_confidence_bound(
    successes: np.ndarray, trials: np.ndarray | int, alpha: float
) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound of a binomial proportion."""
    successes = np.asarray(successes, dtype=float)
    trials = np.broadcast_to(np.asarray(trials, dtype=float), successes.shape)
    bound = beta.ppf(1 - alpha, successes + 1, trials - successes)
    return np.where(successes < trials, bound, 1.0)


@dataclass
class RadiusDecision:
    predicted: np.ndarray  # class picked with n0 samples (ABSTAIN never here)
    certified: np.ndarray  # bool: certified at the radius
    samples: np.ndarray  # samples used after selection, per input
    established: np.ndarray  # bool: pA > 1/2 shown too (else the class is an abstention)


class Smoothed:
    """The smoothed classifier of ``model`` (logits of ``num_classes``) under N(0, sigma^2).

    >>> smoothed = Smoothed(model, num_classes=10, sigma=0.25)           # doctest: +SKIP
    >>> classes, radii = smoothed.certify(x, 100, 10_000, 0.001, 1000, g)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float,
        device: torch.device | str | None = None,
    ) -> None:
        if not sigma > 0:  # also refuses NaN
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.model = model
        self.num_classes = num_classes
        self.sigma = float(sigma)
        # A model without parameters (e.g. an OnnxClassifier) runs on the CPU.
        first = next(model.parameters(), torch.empty(0))
        self.device = torch.device(device) if device is not None else first.device

    @torch.no_grad()
    def sample_counts(
        self, x: torch.Tensor, n: int, batch_size: int, generator: torch.Generator
    ) -> np.ndarray:
        """Class counts of f(x_i + e) over n noise draws for each input: ``(len(x), K)``.

        Noise batches hold up to ``batch_size`` samples, several inputs per batch when n is
        smaller than the batch; draws follow input order (``noise_chunks``), so the counts of
        an input do not depend on how the inputs are grouped. Each call runs on a fresh
        channels-last copy on the CPU (``RowForward``), so the model is never stale.
        """
        counts = torch.zeros(len(x), self.num_classes, dtype=torch.long, device=self.device)
        x = x.to(self.device)
        pending: list[torch.Tensor] = []
        owners: list[torch.Tensor] = []
        with layer_modes(self.model, stochastic=False):
            forward = RowForward(self.model, self.device)

            def run(batch: torch.Tensor, who: torch.Tensor) -> None:
                add_votes(counts, who, forward(batch, FORWARD_CHUNK).argmax(1))

            for i, noisy in noise_chunks(x, n, self.sigma, generator):
                pending.append(noisy)
                owners.append(torch.full((len(noisy),), i, device=self.device))
                if sum(len(p) for p in pending) >= batch_size:
                    batch, who = torch.cat(pending), torch.cat(owners)
                    full = len(batch) - len(batch) % batch_size
                    for b in range(0, full, batch_size):
                        run(batch[b : b + batch_size], who[b : b + batch_size])
                    pending[:], owners[:] = [batch[full:]], [who[full:]]
            if pending and sum(len(p) for p in pending):
                run(torch.cat(pending), torch.cat(owners))
        return counts.cpu().numpy()

    def predict(
        self, x: torch.Tensor, n: int, alpha: float, batch_size: int, generator: torch.Generator
    ) -> np.ndarray:
        """PREDICT: the top class, or ABSTAIN when the binomial test of the top two counts
        does not reject p = 1/2 at level alpha."""
        counts = self.sample_counts(x, n, batch_size, generator)
        order = np.argsort(-counts, axis=1, kind="stable")
        top, second = order[:, 0], order[:, 1]
        n_a = counts[np.arange(len(x)), top]
        n_b = counts[np.arange(len(x)), second]
        p_value = np.minimum(1.0, 2 * binom.cdf(n_b, n_a + n_b, 0.5))  # two-sided, p0 = 1/2
        return np.where(p_value <= alpha, top, ABSTAIN)

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """CERTIFY: (class or ABSTAIN, L2 radius; 0.0 when abstaining)."""
        selection = self.sample_counts(x, n0, batch_size, generator)
        counts = self.sample_counts(x, n, batch_size, generator)
        return certify_from_counts(selection, counts, n, alpha, self.sigma)

    def certify_at_radius(
        self,
        x: torch.Tensor,
        radius: float,
        alpha: float,
        max_n: int,
        batch_size: int,
        generator: torch.Generator,
        n0: int = 100,
    ) -> RadiusDecision:
        """Certified at ``radius`` or not, anytime-valid: n0 samples pick the class (as in
        CERTIFY), then ``sequential.decide_sequentially`` draws chunks of samples until a
        confidence sequence for pA settles pA against Phi(radius / sigma), or ``max_n``.
        P(certified while pA <= Phi(radius / sigma)) <= alpha for each input."""
        from randkit.deploy.sequential import decide_sequentially  # it imports this module

        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        # Phi rounds to 1 past ~8.3 sigma: such a radius is never certifiable (the bounds stay
        # below 1), so the target just below 1 gives the same answer without log(0).
        target = min(float(norm.cdf(radius / self.sigma)), float(np.nextafter(1.0, 0.0)))
        selection = self.sample_counts(x, n0, batch_size, generator).argmax(1)

        def draw(rows: np.ndarray, k: int) -> np.ndarray:
            counts = self.sample_counts(x[torch.as_tensor(rows)], k, batch_size, generator)
            return counts[np.arange(len(rows)), selection[rows]]

        result = decide_sequentially(draw, len(x), target, alpha, max_n)
        return RadiusDecision(selection, result.certified, result.samples, result.established)


def noise_chunks(
    x: torch.Tensor, n: int, sigma: float, generator: torch.Generator
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, x_i + sigma * e)`` for n draws e of each input, in the one order in which every
    path draws smoothing noise: input by input, ``NOISE_CHUNK`` samples at a time (so an
    input's draws do not depend on batch sizes)."""
    for i in range(len(x)):
        for start in range(0, n, NOISE_CHUNK):
            shape = (min(NOISE_CHUNK, n - start), *x.shape[1:])
            noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            yield i, x[i] + sigma * noise


def add_votes(counts: torch.Tensor, owners: torch.Tensor, predicted: torch.Tensor) -> None:
    """Count each noisy sample's class for its input: ``counts[owners[j], predicted[j]] += 1``
    (the one vote counter of every smoothing path)."""
    counts.index_put_((owners, predicted), torch.ones_like(predicted), accumulate=True)


def certify_from_counts(
    selection_counts: np.ndarray, counts: np.ndarray, n: int, alpha: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """CERTIFY's decision (Cohen et al. 2019, Algorithm 1) from the n0 selection counts and
    the n estimation counts: (class or ABSTAIN, radius sigma * PhiInv(pA_lower) or 0.0)."""
    selection = np.asarray(selection_counts).argmax(1)
    n_a = np.asarray(counts)[np.arange(len(selection)), selection]
    p_a = lower_confidence_bound(n_a, n, alpha)
    certified = p_a >= 0.5
    radius = np.where(certified, sigma * norm.ppf(np.clip(p_a, 0.5, 1.0)), 0.0)
    return np.where(certified, selection, ABSTAIN), radius
