"""Bulk random numbers regenerated from a seed (noise tensors are not kept in parameters)."""

from __future__ import annotations

from typing import Literal

import torch

from randkit.streams import seeded_generator


def random_fill(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    kind: Literal["normal", "uniform"] = "normal",
) -> torch.Tensor:
    """A tensor of N(0, 1) or U[0, 1) numbers, a pure function of (shape, seed, device type).

    One generator fills the whole tensor. (Filling fixed blocks from separate generators on a
    thread pool was tried and measured: on 2 cores it was no faster, because torch's OpenMP
    workers spin on the same cores.)
    """
    out = torch.empty(shape, device=device, dtype=dtype)
    generator = seeded_generator(seed, device)
    if kind == "normal":
        return out.normal_(generator=generator)
    return out.uniform_(generator=generator)
