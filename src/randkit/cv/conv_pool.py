"""A convolution with few input channels followed by non-overlapping max pooling, for K
stacked models, in one compiled kernel (``randkit/_native/patchpool.c``).

Written by hand because no library does it well on the CPU. The first convolution of a small
CNN (1 input channel, 3x3 kernel) has the largest output of the network (2.6 MB for K = 5
models, 64 digits images each, 32 channels); oneDNN computes and writes all of it, max
pooling reads it back, and the pooling's backward zero-fills and scatters a gradient of the
same size.

Here the input patches (``in_channels * kh * kw`` numbers per output pixel, 9 for the digits
CNN) are gathered once, ordered by their position q in the pooling window; the kernel
computes the Q outputs of each window in registers and keeps only their maximum and the
position of the first maximum (``max_pool2d``'s tie rule). The backward needs no dense
gradient: each pooled gradient goes to the patch of the position that won.

Measured on 2 cores for the case above, wall clock: the kernel takes 43 us forward and
90 us backward; with the patch gather, the block's forward and backward take about 300 us
against 380-490 us for oneDNN's grouped convolution, max pooling and their backward, and the
whole training step about 4% less (2.66 -> 2.58 ms). A version in torch operations (a
``bmm`` per window position, float masks) was slower than oneDNN, so without the compiled
kernel the stacked forward keeps oneDNN's grouped convolution.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

try:  # the compiled kernel (setup.py); without it the stacked forward keeps oneDNN
    from randkit._native import _patchpool as native
except ImportError:  # pragma: no cover  (no C compiler at install)
    native = None

MAX_PATCH = 27  # in_channels * kh * kw: MAX_PATCH of patchpool.c
# The gathered patches (and their cached int64 offsets, twice their size) grow with the
# image: beyond this many numbers oneDNN's convolution keeps the job. The digits CNN's
# steps need 184k; a batch of 256 32x32 images for 5 trials would need 35M.
MAX_PATCH_NUMBERS = 1 << 22
NATIVE_LANES, NATIVE_MAX_WINDOW = 16, 16  # LANES and MAX_WINDOW of patchpool.c


def has_native_kernel() -> bool:
    return native is not None


def applies(conv: nn.Conv2d, pool: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``pool(conv(x))`` can take this path: the compiled kernel is built; a plain
    convolution with a small patch, zero padding and a multiple of 16 output channels, then
    max pooling whose windows tile the output (kernel = stride, no padding or dilation), on a
    float32 CPU input (K, B, C, H, W) that needs no gradient (the network's first layer) and
    is small enough (``MAX_PATCH_NUMBERS``)."""
    if native is None or not isinstance(pool, nn.MaxPool2d) or x.requires_grad:
        return False
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and kernel == stride
        and kernel[0] * kernel[1] <= NATIVE_MAX_WINDOW
        and _pair(pool.padding) == (0, 0)
        and _pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.weight.dtype == torch.float32
        and conv.out_channels % NATIVE_LANES == 0
        and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= MAX_PATCH
        and x.shape[0] * x.shape[1] * x.shape[3] * x.shape[4] * MAX_PATCH <= MAX_PATCH_NUMBERS
    )


def _patches(
    x: torch.Tensor, conv: nn.Conv2d, window: tuple[int, int]
) -> tuple[torch.Tensor, int, int]:
    """(K, wh * ww, B * Ho * Wo, Cin * kh * kw): the input patch of every convolution output
    that a pooling window covers, grouped by its position in the window."""
    k, b, c = x.shape[:3]
    ph, pw = _pair(conv.padding)
    sh, sw = _pair(conv.stride)
    dh, dw = _pair(conv.dilation)
    kh, kw = conv.kernel_size
    wh, ww = window
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
    hp, wp = padded.shape[-2:]
    conv_h, conv_w = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    out_h, out_w = conv_h // wh, conv_w // ww
    st = padded.stride()
    size = (k, wh, ww, b, out_h, out_w, c, kh, kw)
    steps = (st[0], sh * st[3], sw * st[4], st[1], wh * sh * st[3], ww * sw * st[4], st[2])
    steps += (dh * st[3], dw * st[4])
    index = _gather_index(padded.numel(), size, steps, padded.device)
    # One gather with precomputed offsets: copying the strided view instead runs torch's
    # copy kernel over 9 dimensions with inner sizes of 3 (measured 4x slower).
    patches = padded.view(-1).index_select(0, index)
    return patches.view(k, wh * ww, b * out_h * out_w, c * kh * kw), out_h, out_w


@functools.lru_cache(maxsize=16)
def _gather_index(
    numel: int, size: tuple[int, ...], steps: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    offsets = torch.arange(numel, device=device).as_strided(size, steps)
    return offsets.reshape(-1)


class _PatchMaxPool(torch.autograd.Function):
    """patches (K, Q, N, T), weight (K, T, C), bias (K, C) or None -> pooled (N, K, C)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        patches: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        k, q_count, n, t = patches.shape
        c = weight.shape[2]
        out = torch.empty((n, k, c), dtype=patches.dtype)
        position = torch.empty((n, k, c), dtype=torch.uint8)
        native.forward(
            patches.data_ptr(),
            weight.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            out.data_ptr(),
            position.data_ptr(),
            k,
            q_count,
            n,
            t,
            c,
        )
        ctx.save_for_backward(patches, position)
        ctx.has_bias, ctx.channels = bias is not None, c
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        patches, position = ctx.saved_tensors
        k, q_count, n, t = patches.shape
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad = grad.contiguous()
            grad_weight = torch.empty((k, t, ctx.channels), dtype=grad.dtype)
            native.backward(
                patches.data_ptr(),
                position.data_ptr(),
                grad.data_ptr(),
                grad_weight.data_ptr(),
                k,
                q_count,
                n,
                t,
                ctx.channels,
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return None, grad_weight, grad_bias


def conv_max_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv: nn.Conv2d,
    pool: nn.MaxPool2d,
) -> torch.Tensor:
    """``pool(conv(x))`` for K stacked models: ``x`` (K, B, Cin, H, W), ``weight``
    (K, C, Cin, kh, kw), ``bias`` (K, C) or None. Returns (B, K * C, Ho, Wo) in channels-last
    memory, the models side by side, as the stacked forward's grouped convolutions do."""
    window = _pair(pool.kernel_size)
    patches, out_h, out_w = _patches(x, conv, window)
    k, c, b = weight.shape[0], weight.shape[1], x.shape[1]
    weight_t = weight.flatten(2).transpose(1, 2).contiguous()
    bias = None if bias is None else bias.contiguous()
    pooled = _PatchMaxPool.apply(patches, weight_t, bias)
    # (B * Ho * Wo, K, C) is (B, K * C, Ho, Wo) in channels-last memory
    return pooled.view(b, out_h, out_w, k * c).permute(0, 3, 1, 2)
