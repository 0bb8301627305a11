"""Batched randomized inference: many requests, shared forward passes, per-request randomness.

The inference itself is deploy's ``Predictor`` (the library's and the CLI's too): this module
only packs requests. Every request draws from its own generator (``Sampling.generator``) and
its rows sit in one contiguous block of a pass whose rows never interact, so what a request
gets never depends on what it was batched with, and equals ``Predictor.predict`` alone:

* ``none``, ``tta`` and ``smooth`` requests share deterministic forward passes;
* ``ensemble`` requests share each member's passes;
* ``mc_dropout`` requests share stochastic passes of at most ``max_rows`` rows; one bigger
  than ``PASS_ROWS`` runs alone, pass by pass;
* ``weight_noise`` needs other weights per sample, so each such request runs on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from randkit.deploy.bundle import LoadedBundle
from randkit.deploy.forward import MIN_FORWARD_ROWS
from randkit.deploy.predictor import Outputs, Predictor
from randkit.deploy.sampling import PASS_ROWS
from randkit.serve.options import Options, RequestError

__all__ = ["Engine", "Job", "Outputs"]


@dataclass
class Job:
    """One request: its validated inputs ``(N, *shape)`` and options."""

    x: torch.Tensor
    options: Options


class Engine:
    """Runs batches of jobs for one bundle, one batch at a time (it toggles layer modes): its
    batcher runs each on the event loop or in the worker thread, never two at once."""

    def __init__(self, bundle: LoadedBundle, max_rows: int = PASS_ROWS) -> None:
        self.bundle = bundle
        self.max_rows = max(max_rows, MIN_FORWARD_ROWS)
        self.predictor = Predictor.from_bundle(bundle, max_rows=self.max_rows)

    def rows(self, job: Job) -> int:
        return job.options.forward_rows(len(job.x), len(self.bundle.models))

    @torch.no_grad()
    def run(self, jobs: Sequence[Job]) -> list[Outputs | RequestError]:
        """The outputs of each job, in order (or the 400 it earned)."""
        results: dict[int, Outputs] = {}
        by_mode: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_mode.setdefault(job.options.mode, []).append(index)
        predictor = self.predictor
        plain = [i for m in ("none", "tta", "smooth") for i in by_mode.get(m, [])]
        if plain:
            outputs = predictor.run_plain([(jobs[i].x, jobs[i].options) for i in plain])
            results.update(zip(plain, outputs, strict=True))
        if by_mode.get("ensemble"):
            indices = by_mode["ensemble"]
            outputs = predictor.run_ensemble([(jobs[i].x, jobs[i].options) for i in indices])
            results.update(zip(indices, outputs, strict=True))
        for group in self._groups(jobs, by_mode.get("mc_dropout", [])):
            if self.rows(jobs[group[0]]) > PASS_ROWS:  # such a job is alone in its group
                results[group[0]] = predictor.predict(jobs[group[0]].x, jobs[group[0]].options)
                continue
            outputs = predictor.run_mc_dropout([(jobs[i].x, jobs[i].options) for i in group])
            results.update(zip(group, outputs, strict=True))
        for i in by_mode.get("weight_noise", []):
            results[i] = predictor.predict(jobs[i].x, jobs[i].options)
        return [_finite_or_refused(results[i]) for i in range(len(jobs))]

    def _groups(self, jobs: Sequence[Job], indices: list[int]) -> list[list[int]]:
        """Consecutive jobs in stochastic passes of at most max_rows rows; a job bigger than
        that is alone in its group. A job's rows are never split across passes."""
        groups: list[list[int]] = []
        size = 0
        for i in indices:
            rows = self.rows(jobs[i])
            if groups and size + rows <= self.max_rows and rows <= PASS_ROWS:
                groups[-1].append(i)
                size += rows
            else:
                groups.append([i])
                size = rows if rows <= PASS_ROWS else self.max_rows + 1  # nothing joins it
        return groups


def _finite_or_refused(outputs: Outputs) -> Outputs | RequestError:
    """Finite inputs can still overflow inside the model (values far outside the training
    range); such a request gets a 400, never a response with nulls in it."""
    # Every other float output (entropy, mutual information, radius) is computed from the
    # probabilities or from vote counts, so finite probabilities make them finite too.
    if np.isfinite(outputs["probabilities"]).all():
        return outputs
    return RequestError(
        400, "inputs: the model's outputs overflow for these values (far outside its range)"
    )
