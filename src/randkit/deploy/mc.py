"""Monte-Carlo predictors: MC dropout, test-time augmentation, weight-noise sampling and
ensembles, each returning mean probabilities and per-sample uncertainty.

Sample ``s`` of a request with seed ``seed`` draws from ``Streams(seed)`` source ``deploy``
keyed by (kind, sample), so a given seed replays exactly, whatever the number of samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from randkit.randomize.base import Compose
from randkit.randomize.modules import GLOBAL_RNG_LAYERS, STREAM_LAYERS, use_generator
from randkit.randomize.weights import perturbed_parameters
from randkit.streams import Streams

MC_KINDS = ("dropout", "tta", "weight_noise", "ensemble")


@dataclass
class MCResult:
    probs: np.ndarray  # (N, K) mean over samples
    sample_probs: np.ndarray  # (S, N, K)
    entropy: np.ndarray  # (N,) predictive entropy of the mean (nats)
    mutual_information: np.ndarray  # (N,) H(mean) - mean H(sample): the samples' disagreement
    variance: np.ndarray  # (N,) sum over classes of the variance across samples
    seed: int

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)


def summarize_samples(sample_probs: np.ndarray, seed: int) -> MCResult:
    mean = sample_probs.mean(0)
    log = np.log(np.clip(sample_probs, 1e-12, 1.0))
    entropy = -(mean * np.log(np.clip(mean, 1e-12, 1.0))).sum(-1)
    expected = -(sample_probs * log).sum(-1).mean(0)
    return MCResult(
        mean,
        sample_probs,
        entropy,
        np.clip(entropy - expected, 0.0, None),
        sample_probs.var(0).sum(-1),
        seed,
    )


def stochastic_only(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put the model in eval mode except its dropout-like layers; return previous modes."""
    previous = [(m, m.training) for m in model.modules()]
    model.eval()
    for module in model.modules():
        if isinstance(module, STREAM_LAYERS + GLOBAL_RNG_LAYERS):
            module.train()
    return previous


class MonteCarlo:
    """``MonteCarlo(model, "dropout", samples=32).predict(x, seed=7)``.

    kinds: ``dropout`` (stochastic layers on, BatchNorm and the rest in eval mode), ``tta``
    (``transforms``, a ``Compose`` of batch transforms, drawn per sample), ``weight_noise``
    (Gaussian noise of ``noise_std`` on the weights, relative to each tensor's std when
    ``relative``), ``ensemble`` (``models``: one sample per member, no randomness).
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        kind: str,
        samples: int = 32,
        transforms: Compose | None = None,
        noise_std: float = 0.01,
        relative: bool = True,
        batch_size: int = 1024,
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

    @torch.no_grad()
    def predict(self, x: torch.Tensor, seed: int = 0) -> MCResult:
        device = next(self.models[0].parameters()).device
        x = x.to(device)
        if self.kind == "ensemble":
            stacked = [self._probs(m, x) for m in self.models]
            return summarize_samples(np.stack(stacked), seed)
        model = self.models[0]
        streams = Streams(seed)
        previous = (
            stochastic_only(model)
            if self.kind == "dropout"
            else [(m, m.training) for m in model.modules()]
        )
        if self.kind != "dropout":
            model.eval()
        try:
            outputs = []
            for s in range(self.samples):
                keys = {"kind": self.kind, "sample": s}
                generator = streams.torch("deploy", device=device, **keys)
                outputs.append(self._one_sample(model, x, generator, streams, keys, device))
        finally:
            for module, mode in previous:
                module.training = mode
        return summarize_samples(np.stack(outputs), seed)

    def _one_sample(
        self,
        model: nn.Module,
        x: torch.Tensor,
        generator: torch.Generator,
        streams: Streams,
        keys: dict[str, int | str],
        device: torch.device,
    ) -> np.ndarray:
        if self.kind == "tta":
            assert self.transforms is not None
            return self._probs(model, self.transforms(x, generator))
        if self.kind == "weight_noise":
            weights = perturbed_parameters(model, generator, self.noise_std, self.relative)
            return self._probs(model, x, weights)
        with (
            streams.fork_global("deploy", device=device, rng="global", **keys),
            use_generator(generator),
        ):
            return self._probs(model, x)

    def _probs(
        self, model: nn.Module, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None
    ) -> np.ndarray:
        parts = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            logits = functional_call(model, weights, (chunk,)) if weights else model(chunk)
            parts.append(torch.softmax(logits.float(), dim=1).cpu())
        return torch.cat(parts).numpy()
