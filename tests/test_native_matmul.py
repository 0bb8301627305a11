"""randkit's AVX-512 kernel for the stacked dense layers' products (``randkit/_native/densemm.c``)
against torch, on the shapes and views the dense tail hands it."""

from __future__ import annotations

import pytest
import torch

from randkit.cv import native_matmul

pytestmark = pytest.mark.skipif(
    not native_matmul.has_native_kernel(),
    reason="the AVX-512 kernel is not built or this CPU lacks AVX-512",
)


def _reference(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.bmm(a.double(), b.double())
    return out if bias is None else out + bias.double().unsqueeze(1)


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 64])
@pytest.mark.parametrize("columns", [1, 10, 16, 17, 32, 33, 128])
@pytest.mark.parametrize("depth", [0, 1, 7, 64])
def test_products_equal_torch_for_every_tile_edge(rows: int, columns: int, depth: int) -> None:
    """Row counts that leave 4-row and 1-row tiles, column counts that end inside a vector
    or inside the second vector of a tile, an empty sum (bias only), with and without bias."""
    g = torch.Generator().manual_seed(rows * 1000 + columns * 10 + depth)
    models = 3
    a = torch.randn(models, rows, depth, generator=g)
    b = torch.randn(models, depth, columns, generator=g)
    bias = torch.randn(models, columns, generator=g)
    for with_bias in (None, bias):
        ours = native_matmul.bmm(a, b, with_bias)
        assert ours.shape == (models, rows, columns) and ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), _reference(a, b, with_bias), atol=1e-5, rtol=1e-5)


def test_strided_operands_are_read_through_their_strides() -> None:
    """The weight gradient passes a transposed view as ``a``; a ``b`` whose rows are not
    contiguous is copied first; neither input is changed."""
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(5, 64, 10, generator=g)
    h = torch.randn(5, 64, 128, generator=g)
    a, b = grad.transpose(1, 2), h
    before = (grad.clone(), h.clone())
    torch.testing.assert_close(
        native_matmul.bmm(a, b).double(), _reference(a, b, None), atol=1e-5, rtol=1e-5
    )
    b_t = torch.randn(5, 128, 64, generator=g).transpose(1, 2)  # (5, 64, 128), strided rows
    torch.testing.assert_close(
        native_matmul.bmm(grad.transpose(1, 2), b_t).double(),
        _reference(grad.transpose(1, 2), b_t, None),
        atol=1e-5,
        rtol=1e-5,
    )
    assert torch.equal(grad, before[0]) and torch.equal(h, before[1])


def test_relu_and_mask_epilogues_follow_torch_including_nan() -> None:
    """relu as torch.relu (a NaN stays NaN); the mask as threshold_backward(v, mask, 0): zero
    where the mask is 0 or negative, kept where it is positive or NaN."""
    a = torch.tensor([[[1.0], [-1.0], [float("nan")], [2.0]]])  # (1, 4, 1)
    b = torch.ones(1, 1, 3)
    out = native_matmul.bmm(a, b, relu=True)
    torch.testing.assert_close(out, torch.relu(torch.bmm(a, b)), equal_nan=True)
    assert torch.isnan(out[0, 2]).all()
    mask = torch.tensor([[[1.0, 0.0, -1.0]] * 2 + [[float("nan"), 2.0, 0.5]] * 2])
    values = torch.ones(1, 4, 1) * 3
    expected = torch.ops.aten.threshold_backward(torch.bmm(values, b), mask, 0)
    assert torch.equal(native_matmul.bmm(values, b, mask=mask), expected)
    assert expected[0, 2, 0] == 3  # torch keeps the value where the mask is NaN


@pytest.mark.parametrize("rows", [1, 13, 64])
@pytest.mark.parametrize("columns", [1, 10, 16, 17, 33, 128])
@pytest.mark.parametrize("depth", [0, 5, 16, 37, 64])
def test_a_linear_layer_packs_its_weight_and_equals_torch(
    rows: int, columns: int, depth: int
) -> None:
    """``linear`` takes a Linear layer's stacked weight (K, out, in) as it is and packs its
    rows inside the kernel, in 16 x 16 register blocks with the leftovers one by one: every
    edge of those blocks, with bias and ReLU, equals torch's baddbmm."""
    g = torch.Generator().manual_seed(rows * 1000 + columns * 10 + depth)
    x = torch.randn(3, rows, depth, generator=g)
    weight = torch.randn(3, columns, depth, generator=g)
    bias = torch.randn(3, columns, generator=g)
    expected = _reference(x, weight.transpose(1, 2), bias)
    ours = native_matmul.linear(x, weight, bias)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)
    relu = native_matmul.linear(x, weight, bias, relu=True)
    torch.testing.assert_close(relu.double(), expected.clamp(min=0), atol=1e-5, rtol=1e-5)
    strided = torch.randn(3, depth, columns, generator=g).transpose(1, 2)  # rows not contiguous
    torch.testing.assert_close(
        native_matmul.linear(x, strided).double(),
        _reference(x, strided.transpose(1, 2), None),
        atol=1e-5,
        rtol=1e-5,
    )


def test_results_do_not_depend_on_the_thread_count() -> None:
    """Each output is one thread's sum in a fixed order: 1 and 2 threads agree bit for bit."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 64, 256, generator=g), torch.randn(5, 256, 128, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_matmul.bmm(a, b), native_matmul.linear(a, b.transpose(1, 2))
        torch.set_num_threads(2)
        two = native_matmul.bmm(a, b), native_matmul.linear(a, b.transpose(1, 2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_mismatched_shapes_are_refused_before_the_kernel_reads_memory() -> None:
    a = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="do not match"):
        native_matmul.bmm(a, torch.zeros(2, 5, 6))
    with pytest.raises(ValueError, match="do not match"):
        native_matmul.bmm(a, torch.zeros(2, 3, 6), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="mask shape"):
        native_matmul.bmm(a, torch.zeros(2, 3, 6), mask=torch.zeros(2, 4, 5))


def test_other_dtypes_are_refused_and_empty_products_need_no_kernel() -> None:
    """The kernel reads raw float32 memory, so a float64, half or bool operand (which it
    would read past its end) is refused with the operand's name; an empty product returns
    its empty result, as torch does, even with a mask."""
    a, b = torch.randn(1, 4, 3), torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="a must be a 3-d float32 CPU tensor"):
        native_matmul.bmm(a.double(), b)
    with pytest.raises(ValueError, match="mask must be"):
        native_matmul.bmm(a, b, mask=torch.ones(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bias must be a 2-d"):
        native_matmul.bmm(a, b, torch.zeros(1, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight must be"):
        native_matmul.linear(torch.randn(1, 4, 64), torch.randn(1, 64, 64).half())
    empty = native_matmul.bmm(torch.randn(2, 0, 3), torch.randn(2, 3, 5), mask=torch.randn(2, 0, 5))
    assert empty.shape == (2, 0, 5)
    assert native_matmul.linear(torch.randn(2, 3, 0), torch.randn(2, 0, 0)).shape == (2, 3, 0)


def _torch_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.detach().double().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target.flatten(), reduction="none", label_smoothing=smoothing
    ).view(target.shape)
    (grad,) = torch.autograd.grad(ce.sum(), logits)
    return (ce * weight).sum(1) / weight.sum(1).clamp(min=1), grad


@pytest.mark.parametrize("classes", [1, 2, 10, 16, 17, 40])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_compiled_cross_entropy_equals_torch(classes: int, smoothing: float) -> None:
    """Each model's weighted mean cross-entropy (padded rows weigh 0, a model with no rows
    divides by 1) and each row's gradient, against torch's cross_entropy and autograd in
    float64; logits up to +-60 exercise the exp's range reduction, -inf a class never
    chosen."""
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(4, 33, classes, generator=g) * 20
    logits[0, 0] = 60.0 * torch.linspace(-1, 1, classes)
    if classes > 2:
        logits[1, 1, 2] = -float("inf")
    target = torch.randint(0, classes, (4, 33), generator=g)
    if classes > 2:
        target[1, 1] = 0
    weight = torch.ones(4, 33)
    weight[2, -5:] = 0
    weight[3] = 0
    losses, counts, grad = native_matmul.cross_entropy(logits, target, weight, smoothing)
    ref_losses, ref_grad = _torch_cross_entropy(logits, target, weight, smoothing)
    torch.testing.assert_close(losses.double(), ref_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(counts, weight.sum(1).clamp(min=1))
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert losses[3] == 0


def test_the_compiled_cross_entropy_refuses_a_target_outside_the_classes() -> None:
    logits, weight = torch.zeros(1, 3, 4), torch.ones(1, 3)
    for bad in (4, -1):
        with pytest.raises(ValueError, match=f"target {bad} is not a class in \\[0, 4\\)"):
            native_matmul.cross_entropy(logits, torch.tensor([[0, bad, 1]]), weight, 0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("position", [3, 20, 39])
def test_the_compiled_cross_entropy_passes_nan_and_inf_on_as_torch(
    bad: float, position: int
) -> None:
    """A row with a NaN or +inf logit (in any 16-class block) makes its model's loss and its
    own gradient NaN, as torch's cross_entropy does; the other rows keep finite gradients.
    A row of only -inf is NaN too."""
    logits = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(position))
    logits[0, 1, position] = bad
    logits[1, 2] = -float("inf")
    target = torch.zeros(2, 3, dtype=torch.long)
    losses, _, grad = native_matmul.cross_entropy(logits, target, torch.ones(2, 3), 0.1)
    ref_losses, ref_grad = _torch_cross_entropy(logits, target, torch.ones(2, 3), 0.1)
    assert torch.isnan(losses).all() and torch.isnan(ref_losses).all()
    assert torch.equal(torch.isnan(grad), torch.isnan(ref_grad))
    assert torch.isnan(grad[0, 1]).all() and torch.isfinite(grad[0, 0]).all()


def test_the_compiled_cross_entropy_keeps_its_precision_far_from_zero() -> None:
    """Logits around 1e6 (rounding would cancel in x - logsumexp): loss as torch's float32."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 64, 10, generator=g) + 1e6
    target = torch.randint(0, 10, (1, 64), generator=g)
    for smoothing in (0.0, 0.1):
        losses, _, _ = native_matmul.cross_entropy(logits, target, torch.ones(1, 64), smoothing)
        ref, _ = _torch_cross_entropy(logits, target, torch.ones(1, 64), smoothing)
        torch.testing.assert_close(losses.double(), ref, atol=1e-5, rtol=1e-5)
