"""Monte-Carlo predictors: MC dropout, test-time augmentation, weight-noise sampling and
ensembles, each returning mean probabilities and per-sample uncertainty.

``MonteCarlo`` is the library's face of ``Predictor`` (one inference path): a request with
seed ``seed`` draws from ``Sampling.generator`` (``Streams(seed)``, source ``deploy``, keyed
by the mode), so the same inputs and seed give the same numbers here and in the server.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from randkit.deploy.predictor import MCResult, Predictor, summarize_samples
from randkit.deploy.sampling import PASS_ROWS, Sampling
from randkit.randomize.base import Compose

MC_KINDS = ("dropout", "tta", "weight_noise", "ensemble")
MODE_OF_KIND = {"dropout": "mc_dropout", "tta": "tta", "weight_noise": "weight_noise"}

__all__ = ["MC_KINDS", "MCResult", "MonteCarlo", "summarize_samples"]


class MonteCarlo:
    """``MonteCarlo(model, "dropout", samples=32).predict(x, seed=7)``.

    kinds: ``dropout`` (stochastic layers on, BatchNorm and the rest in eval mode; the
    server's ``mc_dropout``), ``tta`` (``transforms``, a ``Compose`` of batch transforms,
    drawn per sample), ``weight_noise`` (Gaussian noise of ``noise_std`` on the weights,
    relative to each tensor's std when ``relative``), ``ensemble`` (``models``: one sample per
    member, no randomness). ``batch_size`` bounds the rows of a deterministic forward pass; it
    never changes the numbers.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        kind: str,
        samples: int = 32,
        transforms: Compose | None = None,
        noise_std: float = 0.01,
        relative: bool = True,
        batch_size: int = PASS_ROWS,
    ) -> None:
        if kind not in MC_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MC_KINDS)}, got {kind!r}")
        models = list(model) if isinstance(model, Sequence) else [model]
        if not models:
            raise ValueError("needs at least one model")
        if kind != "ensemble" and len(models) != 1:
            raise ValueError(f"kind {kind!r} takes one model, got {len(models)}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if kind == "tta" and transforms is None:
            raise ValueError("kind 'tta' needs transforms (a randkit.randomize.Compose)")
        self.models, self.kind, self.samples = models, kind, samples
        self.transforms, self.noise_std, self.relative = transforms, noise_std, relative
        self.batch_size = batch_size

    def sampling(self, seed: int) -> Sampling:
        """The request this predictor makes for ``seed`` (what a server request would carry)."""
        if self.kind == "ensemble":
            return Sampling("ensemble", len(self.models), seed)
        sigma = self.noise_std if self.kind == "weight_noise" else None
        return Sampling(MODE_OF_KIND[self.kind], self.samples, seed, sigma, self.relative)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, seed: int = 0) -> MCResult:
        # A fresh Predictor per call: its channels-last copy never goes stale.
        predictor = Predictor(self.models, self.transforms, self.batch_size)
        return summarize_samples(predictor.sample_probs(x, self.sampling(seed)), seed)
