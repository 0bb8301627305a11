"""A convolution with few input channels followed by non-overlapping max pooling, for K
stacked models, as batched matrix products over the pooling window's positions.

Written by hand because no library does it well on the CPU. The first convolution of a small
CNN (1 input channel, 3x3 kernel) has the largest output of the network, and oneDNN runs it,
grouped over the K models, at a few GFLOP/s: measured on 2 cores, 478 us for K = 5 models,
64 digits images each, 32 channels (the same products as ``bmm`` take 82 us). Its output
(2.6 MB) then leaves the cache and every pass over it runs at memory speed: the pooling's
backward alone spends 406 us per step zero-filling its gradient.

Here the input patches (``in_channels * kh * kw`` numbers per output pixel, 9 for the
digits CNN) are gathered once, ordered by their position q in the pooling window, and for
each q one ``bmm`` gives the convolution's outputs at that position for every window, a
slice a quarter of the full output that stays in the cache. A running maximum over q keeps
the pooled values and the position of the first maximum (``max_pool2d``'s tie rule). The
backward needs no dense gradient: for each q, the weight gradient gets the patches at q
times the pooled gradient where q was the maximum. The bias is added after the maximum
(it is the same for all q), and its gradient is the pooled gradient's sum.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

MAX_PATCH = 27  # in_channels * kh * kw up to which the patch products beat oneDNN
NATIVE_LANES, NATIVE_MAX_WINDOW = 16, 16  # LANES and MAX_WINDOW of patchpool.c


def applies(conv: nn.Conv2d, pool: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``pool(conv(x))`` can take this path: a plain convolution with a small patch
    and zero padding, then max pooling whose windows tile the output (kernel = stride, no
    padding or dilation), on an input that needs no gradient (the network's first layer)."""
    if not isinstance(pool, nn.MaxPool2d) or x.requires_grad:
        return False
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return (
        kernel == stride
        and _pair(pool.padding) == (0, 0)
        and _pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= MAX_PATCH
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


try:  # the compiled kernel (setup.py); the torch operations below stand in without it
    from randkit._native import _patchpool as native
except ImportError:  # pragma: no cover  (no C compiler at install)
    native = None


def has_native_kernel() -> bool:
    return native is not None


class _PatchMaxPool(torch.autograd.Function):
    """patches (K, Q, N, T), weight (K, T, C), bias (K, C) or None -> pooled (N, K, C)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        patches: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        use_native: bool,
    ) -> torch.Tensor:
        k, q_count, n, t = patches.shape
        c = weight.shape[2]
        if use_native:
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
        else:
            best, position = _forward_torch(patches, weight)
            if bias is not None:
                best.add_(bias.unsqueeze(1))
            out = best.transpose(0, 1).contiguous()
        ctx.save_for_backward(patches, position)
        ctx.has_bias, ctx.use_native, ctx.channels = bias is not None, use_native, c
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        patches, position = ctx.saved_tensors
        k, q_count, n, t = patches.shape
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] and ctx.use_native:
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
        elif ctx.needs_input_grad[1]:
            grad_weight = _weight_grad_torch(patches, position, grad.transpose(0, 1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return None, grad_weight, grad_bias, None


def _forward_torch(
    patches: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled products (K, N, C) and the window position of each maximum, as floats:
    on this CPU torch's masked_fill_ and where are about 30x slower than a float
    multiply-add on the same tensor."""
    best = torch.bmm(patches[:, 0], weight)
    position = torch.zeros_like(best)
    for q in range(1, patches.shape[1]):
        value = torch.bmm(patches[:, q], weight)
        # 1 where value > best, 0 on a tie: the first maximum wins, as in max_pool2d
        higher = torch.sub(value, best).sign_().clamp_(min=0)
        position.addcmul_(higher, q - position)
        torch.maximum(best, value, out=best)
    return best, position


def _weight_grad_torch(
    patches: torch.Tensor, position: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """(K, T, C): for each window position q, its patches times the gradient where q won."""
    total = None
    for q in range(patches.shape[1]):
        mine = torch.sub(position, q).abs_().clamp_(max=1).neg_().add_(1)  # 1 where q won
        part = torch.bmm(patches[:, q].transpose(1, 2), mine.mul_(grad))
        total = part if total is None else total.add_(part)
    return total


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
    use_native = (
        native is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and c % NATIVE_LANES == 0
        and patches.shape[1] <= NATIVE_MAX_WINDOW
    )
    weight_t = weight.flatten(2).transpose(1, 2).contiguous()
    bias = None if bias is None else bias.contiguous()
    pooled = _PatchMaxPool.apply(patches, weight_t, bias, use_native)
    # (B * Ho * Wo, K, C) is (B, K * C, Ho, Wo) in channels-last memory
    return pooled.view(b, out_h, out_w, k * c).permute(0, 3, 1, 2)
