"""The vectorized runner's convolution + max pooling in one compiled kernel gives torch's
values and gradients, ties, NaN and floor-mode edges included."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from randkit.cv import conv_pool
from randkit.cv.conv_pool import applies, conv_max_pool

K, B = 3, 5

# (in_channels, out_channels, conv kwargs, pool kernel, input size)
CASES = {
    "digits": (1, 32, {"kernel_size": 3, "padding": 1}, 2, 8),
    "rgb-27-taps": (3, 16, {"kernel_size": 3, "padding": 1}, 2, 8),
    "odd-size-floor": (1, 16, {"kernel_size": 3, "padding": 1}, 2, 9),
    "3x3-pool": (1, 32, {"kernel_size": 3, "padding": 1}, 3, 9),
    "strided-dilated": (2, 16, {"kernel_size": 2, "stride": 2, "dilation": 2, "padding": 2}, 2, 11),
    "no-bias": (1, 16, {"kernel_size": 3, "bias": False}, 2, 8),
}

needs_kernel = pytest.mark.skipif(
    not conv_pool.has_native_kernel(), reason="the compiled kernel is not built"
)


def _reference(x: torch.Tensor, weight: torch.Tensor, bias, conv: nn.Conv2d, window: int):  # type: ignore[no-untyped-def]
    """Each model on its own: torch's conv2d then max_pool2d, as (B, K * C, H, W)."""
    outs = []
    for k in range(K):
        y = F.conv2d(
            x[k],
            weight[k],
            None if bias is None else bias[k],
            conv.stride,
            conv.padding,
            conv.dilation,
        )
        outs.append(F.max_pool2d(y, window))
    return torch.cat(outs, dim=1)


def _layers(case: str) -> tuple[nn.Conv2d, nn.MaxPool2d, int, int]:
    cin, cout, kwargs, window, size = CASES[case]
    return nn.Conv2d(cin, cout, **kwargs), nn.MaxPool2d(window), window, size


@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_equal_torch(case: str) -> None:
    ours = _assert_matches_torch(case, batch=B, seed=0)
    assert ours.is_contiguous(memory_format=torch.channels_last)


def _assert_matches_torch(case: str, batch: int, seed: int) -> torch.Tensor:
    """Random inputs for ``case``: the path's values and weight (and bias) gradients equal
    torch's conv2d + max_pool2d; returns the path's output."""
    conv, pool, window, size = _layers(case)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, batch, conv.in_channels, size, size, generator=g)
    weight = torch.randn(K, *conv.weight.shape, generator=g).requires_grad_(True)
    bias = torch.randn(K, conv.out_channels, generator=g).requires_grad_(True)
    bias_or_none = bias if conv.bias is not None else None
    assert applies(conv, pool, x)
    ours = conv_max_pool(x, weight, bias_or_none, conv, pool)
    theirs = _reference(x, weight, bias_or_none, conv, window)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(theirs.shape, generator=g)
    wanted = [weight] + ([bias] if bias_or_none is not None else [])
    grads_ours = torch.autograd.grad((ours * upstream).sum(), wanted)
    grads_theirs = torch.autograd.grad((theirs * upstream).sum(), wanted)
    for a, b in zip(grads_ours, grads_theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    return ours


@needs_kernel
def test_ties_send_the_gradient_to_the_first_maximum() -> None:
    """max_pool2d's backward gives each pooled gradient to the first maximum of its window
    only. Here every window ties (each 2x2 block of pixels is one value and the kernels use
    only their centre tap) while the patches differ (their neighbours), so the weight
    gradient shows which position got it."""
    conv, pool, window, size = _layers("digits")
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(K, B, 1, size // 2, size // 2, generator=g)
    x = blocks.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    weight = torch.zeros(K, *conv.weight.shape)
    weight[..., 1, 1] = torch.randn(K, conv.out_channels, 1, generator=g)
    weight.requires_grad_(True)
    bias = torch.randn(K, conv.out_channels, generator=g)
    ours = conv_max_pool(x, weight, bias, conv, pool)
    theirs = _reference(x, weight, bias, conv, window)
    torch.testing.assert_close(ours, theirs)
    (grad_ours,) = torch.autograd.grad(ours.sum(), [weight])
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), [weight])
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_a_nan_wins_its_window_as_in_max_pool2d() -> None:
    conv, pool, window, size = _layers("digits")
    x = torch.randn(K, B, 1, size, size, generator=torch.Generator().manual_seed(3))
    x[0, 0, 0, 5, 5] = float("nan")
    weight = torch.randn(K, *conv.weight.shape)
    ours = conv_max_pool(x, weight, None, conv, pool)
    theirs = _reference(x, weight, None, conv, window)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert ours.isnan().any()
    torch.testing.assert_close(ours.nan_to_num(), theirs.nan_to_num(), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_only_a_first_layer_with_tiling_max_pooling_takes_the_path() -> None:
    conv = nn.Conv2d(1, 16, 3, padding=1)
    x = torch.zeros(K, B, 1, 8, 8)
    assert applies(conv, nn.MaxPool2d(2), x)
    assert not applies(conv, nn.MaxPool2d(3, stride=1), x)  # overlapping windows
    assert not applies(conv, nn.MaxPool2d(2, padding=1), x)
    assert not applies(conv, nn.MaxPool2d(2, ceil_mode=True), x)
    assert not applies(conv, nn.AvgPool2d(2), x)
    assert not applies(conv, None, x)
    assert not applies(conv, nn.MaxPool2d(2), x.clone().requires_grad_(True))  # not first
    assert not applies(conv, nn.MaxPool2d(2), x.double())
    assert not applies(nn.Conv2d(4, 16, 3), nn.MaxPool2d(2), x)  # 36 taps: oneDNN's job
    assert not applies(nn.Conv2d(2, 16, 3, groups=2), nn.MaxPool2d(2), x)
    assert not applies(nn.Conv2d(1, 24, 3), nn.MaxPool2d(2), x)  # not a multiple of 16
    big = torch.zeros(5, 256, 1, 32, 32)  # 35M patch numbers: oneDNN's job
    assert not applies(conv, nn.MaxPool2d(2), big)
    assert applies(conv, nn.MaxPool2d(2), torch.zeros(5, 256, 1, 8, 8))


def test_without_the_kernel_the_stacked_forward_keeps_onednn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conv_pool, "native", None)
    assert not applies(nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2), torch.zeros(K, B, 1, 8, 8))


@needs_kernel
@pytest.mark.parametrize("isa", ["v4", "v3", "base"])
@pytest.mark.parametrize("case", ["digits", "3x3-pool", "rgb-27-taps"])
def test_every_compiled_copy_gives_the_same_numbers(isa: str, case: str) -> None:
    """gcc builds the kernel for AVX-512, AVX2 and plain x86-64; the CPU picks the widest at
    import. Each copy this CPU can run is pinned in turn and checked against torch."""
    native = conv_pool.native
    if not native.kernels(isa):
        pytest.skip(f"this CPU cannot run the {isa} copy")
    try:
        _assert_matches_torch(case, batch=70, seed=5)
    finally:  # back to the widest copy, as at import
        assert native.kernels("v4") or native.kernels("v3") or native.kernels("base")
