"""Bulk random numbers regenerated from a seed (noise tensors are not kept in parameters)."""

from __future__ import annotations

from typing import Literal

import torch

from randkit.randomize.philox import gaussian_noise
from randkit.streams import seeded_generator


def random_fill(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    kind: Literal["normal", "uniform"] = "normal",
) -> torch.Tensor:
    """A tensor of N(0, 1) or U[0, 1) numbers, a pure function of (shape, seed, device type).

    Normals on the CPU come from the counter-based Philox kernel (:mod:`.philox`, faster
    than torch's mt19937); everything else from one torch generator seeded with ``seed``.
    (Separate mt19937 generators per block on a thread pool were tried: no faster, because
    torch's OpenMP workers spin on the same cores.)
    """
    if kind == "normal" and torch.device(device).type == "cpu":
        return gaussian_noise(None, seed, shape=tuple(shape)).to(dtype)
    out = torch.empty(shape, device=device, dtype=dtype)
    generator = seeded_generator(seed, device)
    if kind == "normal":
        return out.normal_(generator=generator)
    return out.uniform_(generator=generator)
