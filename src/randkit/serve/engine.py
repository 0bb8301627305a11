"""Batched randomized inference: many requests, one forward pass, per-request randomness.

Every request draws from its own generator, ``Streams(seed)`` source ``deploy`` keyed by its
mode, and its rows sit in one contiguous block of the batch, so what a request gets never
depends on what it was batched with:

* ``tta`` and ``smooth`` transform or perturb the request's own rows before batching;
* ``mc_dropout`` runs one forward pass in which randkit's stochastic layers take their
  numbers from ``_PerRequestSource``: each request's block from its own generator, drawn in
  the same order as when it runs alone;
* ``weight_noise`` needs other weights per sample, so each such request runs on its own
  (its samples at once with ``vmap``);
* ``none`` and ``ensemble`` are deterministic.

Forward passes are padded to at least ``MIN_FORWARD_ROWS`` rows: MKL's matrix products round
a row differently when the batch has fewer than 12 rows (measured with torch 2.14 on the
CPU), and with the padding a row's logits are the same bits in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import TypeAdapter
from scipy.stats import norm
from torch import nn
from torch.func import functional_call, vmap

from randkit.config import TransformSpec
from randkit.deploy.bundle import LoadedBundle
from randkit.deploy.mc import stochastic_only, summarize_samples
from randkit.deploy.smoothing import ABSTAIN, lower_confidence_bound
from randkit.randomize.base import Compose
from randkit.randomize.build import build_transform
from randkit.randomize.modules import use_generator
from randkit.randomize.weights import perturbed_parameters
from randkit.serve.options import Options, RequestError
from randkit.streams import Streams

MIN_FORWARD_ROWS = 16

Outputs = dict[str, np.ndarray]


@dataclass
class Job:
    """One request: its validated inputs ``(N, *shape)`` and options."""

    x: torch.Tensor
    options: Options
    rows: int = 0  # forward rows, set by the engine
    generator: torch.Generator | None = field(default=None, repr=False)


class _PerRequestSource:
    """Random numbers for a batch whose rows belong to several requests: each block of rows
    from its request's generator (written by hand: torch has no per-row generators)."""

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
        sample = torch.rand if kind == "uniform" else torch.randn
        parts = [
            sample((rows, *shape[1:]), generator=g, device=device, dtype=dtype)
            for rows, g in self.blocks
        ]
        if self.padding:
            parts.append(torch.zeros((self.padding, *shape[1:]), device=device, dtype=dtype))
        return torch.cat(parts)


class Engine:
    """Runs batches of jobs for one bundle (in one worker thread: it toggles layer modes)."""

    def __init__(self, bundle: LoadedBundle, max_rows: int = 4096) -> None:
        self.bundle = bundle
        self.device = bundle.device
        self.max_rows = max(max_rows, MIN_FORWARD_ROWS)
        specs = (bundle.meta.get("randomized") or {}).get("augment") or []
        adapter: TypeAdapter = TypeAdapter(TransformSpec)
        transforms = [build_transform(adapter.validate_python(spec)) for spec in specs]
        self.tta = Compose(transforms) if transforms else None

    def rows(self, job: Job) -> int:
        return job.options.forward_rows(len(job.x), len(self.bundle.models))

    @torch.no_grad()
    def run(self, jobs: Sequence[Job]) -> list[Outputs | RequestError]:
        """The outputs of each job, in order (or the 400 it earned)."""
        results: dict[int, Outputs] = {}
        by_mode: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_mode.setdefault(job.options.mode, []).append(index)
        plain = [i for m in ("none", "tta", "smooth") for i in by_mode.get(m, [])]
        if plain:
            blocks = [self._prepare(jobs[i]) for i in plain]
            logits = self._forward(self.bundle.models[0], torch.cat(blocks))
            for i, part in zip(plain, logits.split([len(b) for b in blocks]), strict=True):
                results[i] = self._finish(jobs[i], part)
        if by_mode.get("ensemble"):
            indices = by_mode["ensemble"]
            x = torch.cat([jobs[i].x for i in indices])
            members = torch.stack([self._forward(m, x) for m in self.bundle.models])
            sizes = [len(jobs[i].x) for i in indices]
            for i, part in zip(indices, members.split(sizes, dim=1), strict=True):
                probs = torch.softmax(part.float(), -1).cpu().numpy()
                results[i] = _outputs(probs, jobs[i].options.seed)
        for group in self._groups(jobs, by_mode.get("mc_dropout", [])):
            outputs = self._mc_dropout([jobs[i] for i in group])
            results.update(zip(group, outputs, strict=True))
        for i in by_mode.get("weight_noise", []):
            results[i] = self._weight_noise(jobs[i])
        return [_finite_or_refused(results[i]) for i in range(len(jobs))]

    # -- per-request preparation and summaries ----------------------------------------------

    def _generator(self, options: Options) -> torch.Generator:
        return Streams(options.seed).torch("deploy", device=self.device, mode=options.mode)

    def _prepare(self, job: Job) -> torch.Tensor:
        options, x = job.options, job.x
        if options.mode == "none":
            return x
        g = self._generator(options)
        if options.mode == "tta":
            assert self.tta is not None
            return self.tta(_repeat(x, options.samples), g)
        shape = (len(x) * (options.n0 + options.samples), *x.shape[1:])
        noise = torch.randn(shape, generator=g, device=x.device, dtype=x.dtype)
        assert options.sigma is not None
        return _repeat(x, options.n0 + options.samples) + options.sigma * noise

    def _finish(self, job: Job, logits: torch.Tensor) -> Outputs:
        options, n = job.options, len(job.x)
        if options.mode == "smooth":
            return self._certify(job, logits.argmax(-1).view(options.n0 + options.samples, n))
        probs = torch.softmax(logits.float(), -1).view(-1, n, logits.shape[-1])
        return _outputs(probs.cpu().numpy(), options.seed)

    def _certify(self, job: Job, votes: torch.Tensor) -> Outputs:
        """CERTIFY of Cohen et al. 2019 (Algorithm 1) on the request's own samples."""
        options, classes = job.options, len(self.bundle.classes)
        assert options.sigma is not None
        selection = _counts(votes[: options.n0], classes).argmax(1)
        counts = _counts(votes[options.n0 :], classes)
        hits = counts[np.arange(len(selection)), selection]
        p_lower = lower_confidence_bound(hits, options.samples, options.alpha)
        certified = p_lower >= 0.5
        radius = np.where(certified, options.sigma * norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)
        frequencies = (counts / options.samples).astype(np.float32)
        out = _outputs(frequencies[None], options.seed)
        del out["mutual_information"]  # one vote per sample: the samples cannot disagree
        out["predicted"] = np.where(certified, selection, ABSTAIN).astype(np.int64)
        out["radius"] = radius.astype(np.float32)
        return out

    # -- forward passes ---------------------------------------------------------------------

    def _forward(self, net: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        padded = _pad(rows)
        parts = [net(chunk) for chunk in padded.split(self.max_rows)]
        return torch.cat(parts)[: len(rows)]

    def _groups(self, jobs: Sequence[Job], indices: list[int]) -> list[list[int]]:
        """Consecutive jobs in forward passes of at most max_rows rows (a bigger job alone):
        a request's rows are never split, so its generators draw as they would alone."""
        groups: list[list[int]] = []
        size = 0
        for i in indices:
            rows = self.rows(jobs[i])
            if groups and size + rows <= self.max_rows:
                groups[-1].append(i)
                size += rows
            else:
                groups.append([i])
                size = rows
        return groups

    def _mc_dropout(self, group: list[Job]) -> list[Outputs]:
        model = self.bundle.models[0]
        previous = stochastic_only(model)
        try:
            if len(group) == 1 and self.rows(group[0]) > self.max_rows:
                return [self._mc_dropout_alone(model, group[0])]
            rows = torch.cat([_repeat(job.x, job.options.samples) for job in group])
            padding = max(0, MIN_FORWARD_ROWS - len(rows))
            blocks = [(self.rows(job), self._generator(job.options)) for job in group]
            with use_generator(_PerRequestSource(blocks, padding)):
                logits = model(_pad(rows))[: len(rows)]
        finally:
            for module, mode in previous:
                module.training = mode
        parts = logits.split([rows for rows, _ in blocks])
        return [self._finish(job, part) for job, part in zip(group, parts, strict=True)]

    def _mc_dropout_alone(self, model: nn.Module, job: Job) -> Outputs:
        """A request bigger than a batch runs alone, a fixed number of samples at a time
        (the same split every time, so it replays)."""
        g, parts = self._generator(job.options), []
        for samples in _sample_chunks(job, self.max_rows):
            rows = _repeat(job.x, samples)
            padding = max(0, MIN_FORWARD_ROWS - len(rows))
            with use_generator(_PerRequestSource([(len(rows), g)], padding)):
                parts.append(model(_pad(rows))[: len(rows)])
        return self._finish(job, torch.cat(parts))

    def _weight_noise(self, job: Job) -> Outputs:
        model, options = self.bundle.models[0], job.options
        g = self._generator(options)
        x = _pad(job.x)

        def one(weights: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(model, weights, (x,))

        parts = []
        for samples in _sample_chunks(job, self.max_rows):  # bounds the stacked weights too
            draws = [
                perturbed_parameters(model, g, options.sigma or 0.0, options.relative)
                for _ in range(samples)
            ]
            stacked = {name: torch.stack([d[name] for d in draws]) for name in draws[0]}
            parts.append(vmap(one)(stacked)[:, : len(job.x)])
        probs = torch.softmax(torch.cat(parts).float(), -1)
        return _outputs(probs.cpu().numpy(), options.seed)


def _sample_chunks(job: Job, max_rows: int) -> list[int]:
    """Samples per forward pass for one request: as many as fit in max_rows rows."""
    per_chunk = max(1, max_rows // len(job.x))
    total = job.options.samples
    return [min(per_chunk, total - start) for start in range(0, total, per_chunk)]


def _repeat(x: torch.Tensor, times: int) -> torch.Tensor:
    """``times`` copies of the batch, sample-major: rows s*N .. (s+1)*N are sample s."""
    return x.repeat(times, *([1] * (x.dim() - 1)))


def _pad(rows: torch.Tensor) -> torch.Tensor:
    missing = MIN_FORWARD_ROWS - len(rows)
    if missing <= 0:
        return rows
    return torch.cat([rows, rows.new_zeros((missing, *rows.shape[1:]))])


def _finite_or_refused(outputs: Outputs) -> Outputs | RequestError:
    """Finite inputs can still overflow inside the model (values far outside the training
    range); such a request gets a 400, never a response with nulls in it."""
    if all(np.isfinite(v).all() for v in outputs.values() if v.dtype.kind == "f"):
        return outputs
    return RequestError(
        400, "inputs: the model's outputs overflow for these values (far outside its range)"
    )


def _counts(votes: torch.Tensor, classes: int) -> np.ndarray:
    """(samples, N) class votes -> (N, classes) counts."""
    one_hot = torch.nn.functional.one_hot(votes.long(), classes)
    return one_hot.sum(0).cpu().numpy()


def _outputs(sample_probs: np.ndarray, seed: int) -> Outputs:
    result = summarize_samples(sample_probs, seed)
    return {
        "probabilities": result.probs.astype(np.float32),
        "predicted": result.predicted.astype(np.int64),
        "entropy": result.entropy.astype(np.float32),
        "mutual_information": result.mutual_information.astype(np.float32),
    }
