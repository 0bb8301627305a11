"""What one randomized-inference request asks for, and the one keying of its randomness.

A request is a batch of inputs and a ``Sampling``. All its random draws come from one
stream, ``Streams(seed).torch("deploy", mode=mode)`` (``Sampling.generator``), consumed in
the order ``Predictor`` fixes. The library, ``randkit certify``/``evaluate`` and the server
all take their generator from here, so a seed replays the same outputs everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from randkit.streams import Streams, check_seed

MODES = ("none", "mc_dropout", "tta", "weight_noise", "ensemble", "smooth")
# Rows of a request per stochastic pass, transform call or weight stack. Fixed here, never a
# setting: how a request's samples are grouped decides which numbers each sample draws.
PASS_ROWS = 4096


@dataclass(frozen=True)
class Sampling:
    """``Sampling("mc_dropout", samples=32, seed=7)``; ``smooth`` and ``weight_noise`` need
    ``sigma`` (``smooth``: the noise std; ``weight_noise``: the weights' noise std, relative
    to each weight tensor's std when ``relative``); ``smooth`` also takes ``alpha`` and
    ``n0``, and ``samples`` is its n."""

    mode: str
    samples: int
    seed: int
    sigma: float | None = None
    relative: bool = True
    alpha: float = 0.001
    n0: int = 100

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("samples", "n0"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_seed(self.seed)
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        needs_sigma = self.mode in ("smooth", "weight_noise")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if needs_sigma and self.sigma is None:
            raise ValueError(f"mode {self.mode!r} needs sigma")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator of the request's stream: ``Streams(seed)``, source ``deploy``,
        keyed by the mode."""
        return Streams(self.seed).torch("deploy", device=device, mode=self.mode)

    def as_parameters(self) -> dict[str, Any]:
        """The parameters that replay this request exactly (what the server echoes)."""
        out: dict[str, Any] = {"mode": self.mode, "seed": self.seed}
        if self.mode not in ("none", "ensemble"):
            out["samples"] = self.samples
        if self.mode in ("smooth", "weight_noise"):
            out["sigma"] = self.sigma
        if self.mode == "smooth":
            out.update(alpha=self.alpha, n0=self.n0)
        return out

    def forward_rows(self, instances: int, members: int) -> int:
        """Rows this request adds to forward passes (what the server's batcher counts)."""
        if self.mode in ("none", "ensemble"):
            return instances * members
        if self.mode == "smooth":
            return instances * (self.n0 + self.samples)
        return instances * self.samples


def sample_groups(instances: int, samples: int, limit: int = PASS_ROWS) -> list[int]:
    """Samples per pass for one request: as many as fit in ``limit`` rows (at least one)."""
    per_pass = max(1, limit // max(1, instances))
    return [min(per_pass, samples - start) for start in range(0, samples, per_pass)]
