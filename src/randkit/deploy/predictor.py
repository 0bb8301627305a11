"""One inference path: randomized prediction for the library, the CLI and the server.

``Predictor(models).predict(x, Sampling(mode, samples, seed, ...))`` answers one request (a
batch of inputs). The server packs many requests into shared forward passes with the
``run_*`` methods, which give each request what ``predict`` gives it alone. A request draws
only from its own generator (``Sampling.generator``), in this order:

* ``tta``: the transforms of its sample-major repeated inputs, ``sample_groups`` at a time;
* ``smooth``: Gaussian noise input by input (``smoothing.noise_chunks``), first the n0
  selection samples of every input, then the n estimation samples; CERTIFY's statistics are
  ``smoothing.certify_from_counts``;
* ``mc_dropout``: randkit's stochastic layers, pass by pass (``sample_groups``), each layer
  one draw for the request's rows (torch's global-RNG layers, in-process only, from a global
  RNG seeded by the generator);
* ``weight_noise``: one weight perturbation per sample, in sample order;
* ``none`` and ``ensemble``: no draws.

Rows never interact in a forward pass (``forward.RowForward``), so the packing is invisible.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from randkit.deploy.forward import (
    MIN_FORWARD_ROWS,
    RowForward,
    layer_modes,
    pad_rows,
    repeat_rows,
)
from randkit.deploy.sampling import PASS_ROWS, Sampling, sample_groups
from randkit.deploy.smoothing import add_votes, certify_from_counts, noise_chunks
from randkit.deploy.uncertainty import entropy, mutual_information
from randkit.randomize.base import Compose
from randkit.randomize.modules import draw_numbers, randomness_needs, use_generator
from randkit.randomize.weights import perturbed_parameters
from randkit.streams import Streams

if TYPE_CHECKING:
    from randkit.deploy.bundle import LoadedBundle

Outputs = dict[str, np.ndarray]
Request = tuple[torch.Tensor, Sampling]
WEIGHT_VALUES = 1 << 26  # perturbed weight values stacked for one vmap call (256 MB)


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
    """The mean, predictive entropy, mutual information and variance of (S, N, K) samples."""
    mean = sample_probs.mean(0)
    return MCResult(
        mean,
        sample_probs,
        entropy(mean, check=False),
        mutual_information(sample_probs, check=False),
        sample_probs.var(0).sum(-1),
        seed,
    )


def outputs(sample_probs: np.ndarray, seed: int) -> Outputs:
    """The outputs of a request from its ``(S, N, K)`` sample probabilities."""
    result = summarize_samples(sample_probs, seed)
    return {
        "probabilities": result.probs.astype(np.float32),
        "predicted": result.predicted.astype(np.int64),
        "entropy": result.entropy.astype(np.float32),
        "mutual_information": result.mutual_information.astype(np.float32),
    }


def outputs_of_many(blocks: Sequence[np.ndarray]) -> list[Outputs]:
    """``outputs`` of many requests' ``(S, N_i, K)`` sample probabilities at once.

    Requests with the same number of samples are summarized in one set of array operations
    (every statistic is per input row, so joining rows changes no value), then split: a
    call per request would cost more than a small model's forward pass.
    """
    results: list[Outputs] = [{} for _ in blocks]
    by_samples: dict[int, list[int]] = {}
    for index, block in enumerate(blocks):
        by_samples.setdefault(block.shape[0], []).append(index)
    for indices in by_samples.values():
        joined = outputs(np.concatenate([blocks[i] for i in indices], axis=1), 0)
        bounds = _bounds([blocks[i].shape[1] for i in indices])
        for index, (start, end) in zip(indices, bounds, strict=True):
            results[index] = {name: values[start:end] for name, values in joined.items()}
    return results


def _bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of consecutive blocks of ``sizes`` (plain slices: ``np.split`` costs
    more per block than the arithmetic of a small request)."""
    ends = list(itertools.accumulate(sizes))
    return list(zip([0, *ends[:-1]], ends, strict=True))


class RequestSource:
    """Random numbers for stochastic layers in a pass whose rows belong to several requests:
    each block of rows from its request's generator, the padding zeros (written by hand:
    torch has no per-row generators)."""

    def __init__(self, blocks: Sequence[tuple[int, torch.Generator]], padding: int) -> None:
        self.blocks, self.padding = blocks, padding
        self.total = sum(rows for rows, _ in blocks) + padding

    def draw(
        self, kind: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        if shape[0] != self.total:
            raise RuntimeError(
                f"a stochastic layer drew shape {shape}, not one row per batch row "
                f"({self.total}); mc_dropout cannot batch this model"
            )
        parts = [
            draw_numbers(kind, (rows, *shape[1:]), g, device, dtype) for rows, g in self.blocks
        ]
        if self.padding:
            parts.append(torch.zeros((self.padding, *shape[1:]), device=device, dtype=dtype))
        return torch.cat(parts)


class Predictor:
    """Randomized prediction with one model, or an ensemble's ``models`` (mode ``ensemble``).

    >>> out = Predictor([model]).predict(x, Sampling("mc_dropout", 32, seed=7))  # doctest: +SKIP
    >>> out["probabilities"], out["entropy"], out["mutual_information"]          # doctest: +SKIP

    ``tta`` is the ``Compose`` of batch transforms of mode ``tta``; ``max_rows`` bounds the
    rows of a deterministic forward pass (any value gives the same numbers).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        tta: Compose | None = None,
        max_rows: int = PASS_ROWS,
        device: torch.device | str | None = None,
    ) -> None:
        self.models = list(models)
        if not self.models:
            raise ValueError("needs at least one model")
        first = self.models[0]
        self.device = torch.device(device) if device else next(first.parameters()).device
        self.tta, self.max_rows = tta, max(1, max_rows)
        self.forward = RowForward(first, self.device)
        self.members = [self.forward] + [RowForward(m, self.device) for m in self.models[1:]]
        self._global_layers = randomness_needs(first)[1]

    @classmethod
    def from_bundle(cls, bundle: LoadedBundle, max_rows: int = PASS_ROWS) -> Predictor:
        """The predictor of a loaded bundle (its test-time augmentation from its config)."""
        from pydantic import TypeAdapter

        from randkit.config import TransformSpec
        from randkit.randomize.build import build_transform

        specs = (bundle.meta.get("randomized") or {}).get("augment") or []
        adapter: TypeAdapter = TypeAdapter(TransformSpec)
        transforms = [build_transform(adapter.validate_python(spec)) for spec in specs]
        tta = Compose(transforms) if transforms else None
        return cls(bundle.models, tta, max_rows, bundle.device)

    # -- one request ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, x: torch.Tensor, sampling: Sampling) -> Outputs:
        """The outputs of one request: ``probabilities``, ``predicted``, ``entropy`` and
        ``mutual_information`` (``smooth``: class frequencies, ``predicted`` or ABSTAIN,
        ``entropy`` and the certified ``radius``)."""
        self._check(x, sampling)
        x = x.to(self.device)
        if sampling.mode == "smooth":
            return self.run_plain([(x, sampling)])[0]
        return outputs(self._sample_probs(x, sampling), sampling.seed)

    @torch.no_grad()
    def sample_probs(self, x: torch.Tensor, sampling: Sampling) -> np.ndarray:
        """The ``(samples, N, K)`` probabilities behind ``predict`` (not for ``smooth``)."""
        self._check(x, sampling)
        if sampling.mode == "smooth":
            raise ValueError("mode 'smooth' votes with classes; it has no sample probabilities")
        return self._sample_probs(x.to(self.device), sampling)

    def _sample_probs(self, x: torch.Tensor, sampling: Sampling) -> np.ndarray:
        mode, n = sampling.mode, len(x)
        if mode in ("none", "tta"):
            logits = self._plain_logits([(x, sampling)])[0]
        elif mode == "ensemble":
            return self._member_probs(x)
        elif mode == "mc_dropout":
            g = sampling.generator(self.device)
            groups = sample_groups(n, sampling.samples)
            logits = torch.cat([self._stochastic_pass([(x, k, g)]) for k in groups])
        else:
            return self._weight_noise_probs(x, sampling)
        return _probs(logits, n)

    # -- packed requests (the server's batches) -------------------------------------------------

    @torch.no_grad()
    def run_plain(self, requests: Sequence[Request]) -> list[Outputs]:
        """Requests of modes ``none``, ``tta`` and ``smooth`` in shared forward passes."""
        logits = self._plain_logits(requests)
        # One softmax for the whole batch (rows are independent): a call per request costs a
        # thread-pool round trip each, which dominates a small model's batch.
        probs = _split_probs(torch.cat(logits), [len(part) for part in logits])
        results: list[Outputs] = [{} for _ in requests]
        summarized = []  # every request but ``smooth``'s: its sample probabilities
        for i, ((x, s), part) in enumerate(zip(requests, logits, strict=True)):
            if s.mode == "smooth":
                results[i] = self._certified(x, s, part)
            else:
                summarized.append(i)
        blocks = [probs[i].reshape(-1, len(requests[i][0]), probs[i].shape[-1]) for i in summarized]
        for i, out in zip(summarized, outputs_of_many(blocks), strict=True):
            results[i] = out
        return results

    @torch.no_grad()
    def run_ensemble(self, requests: Sequence[Request]) -> list[Outputs]:
        """Requests of mode ``ensemble``: every member on all their inputs at once."""
        probs = self._member_probs(torch.cat([x for x, _ in requests]))
        sizes = [len(x) for x, _ in requests]
        parts = np.split(probs, np.cumsum(sizes)[:-1], axis=1)
        return [outputs(p, s.seed) for (_, s), p in zip(requests, parts, strict=True)]

    @torch.no_grad()
    def run_mc_dropout(self, requests: Sequence[Request]) -> list[Outputs]:
        """Requests of mode ``mc_dropout`` in one stochastic pass; each must fit one pass
        (``PASS_ROWS`` rows): ``predict`` runs a bigger one alone, pass by pass."""
        for x, s in requests:
            if len(x) * s.samples > PASS_ROWS:
                raise ValueError(f"a request of {len(x) * s.samples} rows needs predict()")
        blocks = [(x, s.samples, s.generator(self.device)) for x, s in requests]
        logits = self._stochastic_pass(blocks)
        probs = _split_probs(logits, [len(x) * s.samples for x, s in requests])
        return outputs_of_many(
            [p.reshape(-1, len(x), p.shape[-1]) for (x, _), p in zip(requests, probs, strict=True)]
        )

    # -- the modes ------------------------------------------------------------------------------

    def _plain_logits(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        blocks = [self._prepare(x, s) for x, s in requests]
        with layer_modes(self.forward.net, stochastic=False):
            logits = self.forward(torch.cat(blocks), self.max_rows)
        return list(logits.split([len(b) for b in blocks]))

    def _prepare(self, x: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """The request's forward rows, its randomness drawn: ``tta`` and ``smooth``."""
        if sampling.mode == "none":
            return x
        g = sampling.generator(self.device)
        if sampling.mode == "tta":
            assert self.tta is not None
            groups = sample_groups(len(x), sampling.samples)
            return torch.cat([self.tta(repeat_rows(x, k), g) for k in groups])
        assert sampling.sigma is not None
        selection = [rows for _, rows in noise_chunks(x, sampling.n0, sampling.sigma, g)]
        estimation = [rows for _, rows in noise_chunks(x, sampling.samples, sampling.sigma, g)]
        return torch.cat(selection + estimation)

    def _certified(self, x: torch.Tensor, sampling: Sampling, logits: torch.Tensor) -> Outputs:
        """A ``smooth`` request's outputs from its selection and estimation logits."""
        n, n0, classes = len(x), sampling.n0, logits.shape[-1]
        votes = logits.argmax(-1)
        selection = _vote_counts(votes[: n * n0], n, classes)
        counts = _vote_counts(votes[n * n0 :], n, classes)
        assert sampling.sigma is not None
        predicted, radius = certify_from_counts(
            selection, counts, sampling.samples, sampling.alpha, sampling.sigma
        )
        out = outputs((counts / sampling.samples).astype(np.float32)[None], sampling.seed)
        del out["mutual_information"]  # one vote per sample: the samples cannot disagree
        out["predicted"] = predicted.astype(np.int64)  # ABSTAIN (-1) where not certified
        out["radius"] = radius.astype(np.float32)
        return out

    def _member_probs(self, x: torch.Tensor) -> np.ndarray:
        logits = []
        for member in self.members:
            with layer_modes(member.net, stochastic=False):
                logits.append(member(x, self.max_rows))
        return torch.softmax(torch.stack(logits).float(), -1).cpu().numpy()

    def _stochastic_pass(
        self, blocks: Sequence[tuple[torch.Tensor, int, torch.Generator]]
    ) -> torch.Tensor:
        """One forward pass over the sample-major rows of ``(x, samples, generator)`` blocks,
        the stochastic layers on, each block's rows drawing from its own generator."""
        rows = torch.cat([repeat_rows(x, k) for x, k, _ in blocks])
        padding = max(0, MIN_FORWARD_ROWS - len(rows))
        source = RequestSource([(len(x) * k, g) for x, k, g in blocks], padding)
        with (
            layer_modes(self.forward.net, stochastic=True),
            use_generator(source),
            self._global_rng([g for _, _, g in blocks]),
        ):
            return self.forward.once(rows)

    @contextlib.contextmanager
    def _global_rng(self, generators: list[torch.Generator]) -> Iterator[None]:
        """Seed torch's global RNG from the request's generator for layers that draw from it
        (``nn.Dropout``), and restore it afterwards."""
        if not self._global_layers:
            yield
            return
        if len(generators) != 1:
            raise RuntimeError("a model with global-RNG layers cannot share a stochastic pass")
        seed = torch.randint(0, 2**62, (1,), generator=generators[0], device=self.device)
        with Streams(int(seed.item())).fork_global("deploy", device=self.device):
            yield

    def _weight_noise_probs(self, x: torch.Tensor, sampling: Sampling) -> np.ndarray:
        model, g, padded = self.models[0], sampling.generator(self.device), pad_rows(x)
        # Samples per vmap call: bounded by rows and by the stacked weights' size.
        weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
        per_stack = max(1, min(PASS_ROWS // len(x), WEIGHT_VALUES // max(1, weights)))
        total = sampling.samples
        assert sampling.sigma is not None

        def one(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(model, stacked, (padded,))

        parts = []
        with layer_modes(model, stochastic=False):
            for k in [min(per_stack, total - start) for start in range(0, total, per_stack)]:
                draws = [
                    perturbed_parameters(model, g, sampling.sigma, sampling.relative)
                    for _ in range(k)
                ]
                if not draws[0]:  # no weight to perturb: every sample is the plain model
                    parts.append(model(padded).expand(k, -1, -1))
                    continue
                stacked = {name: torch.stack([d[name] for d in draws]) for name in draws[0]}
                parts.append(vmap(one)(stacked))
        return torch.softmax(torch.cat(parts)[:, : len(x)].float(), -1).cpu().numpy()

    def _check(self, x: torch.Tensor, sampling: Sampling) -> None:
        mode = sampling.mode
        if mode != "ensemble" and len(self.models) != 1:
            raise ValueError(f"mode {mode!r} takes one model, got {len(self.models)}")
        if mode == "tta" and self.tta is None:
            raise ValueError("mode 'tta' needs transforms (a randkit.randomize.Compose)")
        if mode == "smooth" and not x.is_floating_point():
            raise ValueError("mode 'smooth' needs real-valued inputs")


def _probs(logits: torch.Tensor, n: int) -> np.ndarray:
    """Sample-major logits of n inputs -> ``(samples, n, K)`` probabilities."""
    probs = torch.softmax(logits.float(), -1)
    return probs.view(-1, n, logits.shape[-1]).cpu().numpy()


def _split_probs(logits: torch.Tensor, sizes: list[int]) -> list[np.ndarray]:
    """Softmax of all rows at once, split into the requests' row blocks (NumPy views)."""
    probs = torch.softmax(logits.float(), -1).cpu().numpy()
    return [probs[start:end] for start, end in _bounds(sizes)]


def _vote_counts(votes: torch.Tensor, inputs: int, classes: int) -> np.ndarray:
    """Input-major class votes (``noise_chunks`` order) -> (inputs, classes) counts."""
    counts = torch.zeros(inputs, classes, dtype=torch.long, device=votes.device)
    owners = torch.arange(inputs, device=votes.device).repeat_interleave(len(votes) // inputs)
    add_votes(counts, owners, votes.long())
    return counts.cpu().numpy()
