"""Gaussian noise on the CPU from a counter-based generator: Philox4x32-10 + Box-Muller.

Normal number ``i`` of a seed is a pure function of ``(seed, i)``, computed by a compiled
kernel (``randkit/_native/philox.c``, multi-threaded, faster than ``torch.randn``'s serial
mt19937) or, when the extension was not built, by :func:`philox_normal_reference`, the same
arithmetic in torch operations (much slower; figures in docs/benchmarks.md). Both give the
same bits: the kernel uses only IEEE single-precision operations (no FMA contraction, no
libm), which the reference repeats one by one. The C file's header documents the layout of
the outputs.
"""

from __future__ import annotations

import math

import torch

try:
    from randkit._native import _philox as native
except ImportError:  # pragma: no cover - built by `pip install`; the reference stands in
    native = None

BLOCK = 64  # Philox calls per block, as in the C kernel
MODE = {"fill": 0, "add": 1, "multiply": 2}
_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def has_native_kernel() -> bool:
    return native is not None


def gaussian_noise(
    x: torch.Tensor | None,
    seed: int,
    level: float = 1.0,
    mode: str = "fill",
    clip: bool = False,
    shape: torch.Size | tuple[int, ...] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard normals (``mode="fill"``, of ``shape``), ``x + level * z`` (``"add"``) or
    ``x * (1 + level * z)`` (``"multiply"``), clipped to [0, 1] when ``clip``; float32 on
    the CPU. ``out`` may be ``x`` itself (in place)."""
    if x is not None and not (x.dtype == torch.float32 and x.is_contiguous()):
        raise ValueError("gaussian_noise needs a contiguous float32 tensor")
    shape = tuple(x.shape) if x is not None else tuple(shape or ())
    n = math.prod(shape)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    if native is not None and out.is_contiguous() and out.dtype == torch.float32:
        x_address = 0 if x is None else x.data_ptr()
        native.gaussian(out.data_ptr(), x_address, n, seed, MODE[mode], level, clip)
        return out
    z = philox_normal_reference(n, seed).reshape(shape)
    result = z if x is None else _combine(x, z, level, mode)
    if clip:
        result = result.clamp(0, 1)
    return out.copy_(result)


def _combine(x: torch.Tensor, z: torch.Tensor, level: float, mode: str) -> torch.Tensor:
    scaled = z * torch.tensor(level, dtype=torch.float32)
    return x + scaled if mode == "add" else x * (scaled + 1.0)


def philox_normal_reference(n: int, seed: int) -> torch.Tensor:
    """The kernel's ``n`` normals in torch operations (int64 for the 32-bit words)."""
    calls = -(-n // (4 * BLOCK)) * BLOCK
    counter = torch.arange(calls, dtype=torch.int64)
    c0, c1 = counter & _MASK32, counter >> 32
    c2, c3 = torch.zeros_like(counter), torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MULTIPLIERS[0], c0)
        hi1, lo1 = _mulhilo(_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _MASK32, (k1 + _WEYL[1]) & _MASK32
    cos0, sin0 = _box_muller(c0, c1)
    cos1, sin1 = _box_muller(c2, c3)
    blocks = torch.stack([v.reshape(-1, BLOCK) for v in (cos0, sin0, cos1, sin1)], dim=1)
    return blocks.reshape(-1)[:n]


def _mulhilo(multiplier: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``multiplier * word``, with 16-bit halves of the multiplier so
    that no product leaves int64."""
    low_part = word * (multiplier & 0xFFFF)  # < 2^48
    high_part = word * (multiplier >> 16)  # < 2^48
    low = (((high_part & 0xFFFF) << 16) + low_part) & _MASK32
    high = (high_part + (low_part >> 16)) >> 16
    return high, low


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _log_unit(u: torch.Tensor) -> torch.Tensor:
    bits = u.view(torch.int32)
    e = (bits >> 23) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    small = (m < _f32(0.70710678118654752440)).to(torch.int32)
    e = e - small
    x = (m.view(torch.int32) + (small << 23)).view(torch.float32) - _f32(1.0)
    z = x * x
    y = torch.full_like(x, 7.0376836292e-2)
    for coefficient in (
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    ):
        y = y * x + _f32(coefficient)
    y = y * x * z
    fe = e.to(torch.float32)
    y = y + _f32(-2.12194440e-4) * fe
    y = y - _f32(0.5) * z
    x = x + y
    return x + _f32(0.693359375) * fe


def _horner(v: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """c0 + v (c1 + v (c2 + ...)), innermost first, as the kernel's nested expression."""
    result = _f32(coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):
        result = _f32(coefficient) + v * result
    return result


def _box_muller(wr: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    step = _f32(5.9604644775390625e-8)  # 2^-24
    u = ((wr >> 8) + 1).to(torch.int32).to(torch.float32) * step
    t = (wt >> 8).to(torch.int32).to(torch.float32) * step
    # torch's float32 sqrt is not always correctly rounded; through float64 it is (53 bits
    # are more than 2 * 24 + 2), which is what the kernel's sqrtf gives.
    radius = torch.sqrt((_f32(-2.0) * _log_unit(u)).double()).float()
    quarter = (t * _f32(4.0) + _f32(0.5)).to(torch.int32)
    a = (t - quarter.to(torch.float32) * _f32(0.25)) * _f32(6.28318530717958647692)
    a2 = a * a
    s = a * _horner(a2, (1.0, -1.6666667163e-1, 8.3333337680e-3, -1.9841270114e-4, 2.7557314297e-6))
    c = _horner(a2, (1.0, -0.5, 4.1666667908e-2, -1.3888889225e-3, 2.4801587642e-5))
    swap = (quarter & 1).bool()
    sin_flip = (quarter & 2) << 30
    cos_flip = ((quarter + 1) & 2) << 30
    sine = (torch.where(swap, c, s).view(torch.int32) ^ sin_flip).view(torch.float32)
    cosine = (torch.where(swap, s, c).view(torch.int32) ^ cos_flip).view(torch.float32)
    return radius * cosine, radius * sine
