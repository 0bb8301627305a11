"""Fast bulk random numbers on the CPU: fixed-size blocks, each from its own generator.

Written by hand because torch's CPU generator (mt19937) is serial: one ``randn`` call over a
batch of images runs on one core and dominates an augmentation pipeline. Here the tensor is cut
into blocks of a fixed size, block ``b`` is filled from a generator seeded by a hash of
(seed, b), and blocks run on a thread pool (torch releases the GIL while filling). The block
size is fixed, so the numbers do not depend on the number of threads. On CUDA one generator
fills the whole tensor (the GPU generator is already parallel).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch

from randkit.streams import seeded_generator

BLOCK = 1 << 16
_MASK64 = (1 << 64) - 1
_pool: ThreadPoolExecutor | None = None


def _block_seed(seed: int, block: int) -> int:
    """SplitMix64 finaliser of (seed, block): well-mixed, independent seeds per block."""
    z = (seed * 0x9E3779B97F4A7C15 + (block + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="randkit-rng")
    return _pool


def random_fill(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    kind: Literal["normal", "uniform"] = "normal",
) -> torch.Tensor:
    """A tensor of N(0, 1) or U[0, 1) numbers, a pure function of (shape, seed, device type)."""
    out = torch.empty(shape, device=device, dtype=dtype)
    if device.type != "cpu":
        generator = seeded_generator(seed, device)
        if kind == "normal":
            return out.normal_(generator=generator)
        return out.uniform_(generator=generator)
    flat = out.view(-1)

    def fill(block: int) -> None:
        generator = seeded_generator(_block_seed(seed, block))
        part = flat[block * BLOCK : (block + 1) * BLOCK]
        if kind == "normal":
            part.normal_(generator=generator)
        else:
            part.uniform_(generator=generator)

    blocks = range((flat.numel() + BLOCK - 1) // BLOCK)
    if len(blocks) > 1 and _threads() > 1:
        list(_executor().map(fill, blocks))
    else:
        for block in blocks:
            fill(block)
    return out
