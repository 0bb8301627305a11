"""Batched matrix products of K stacked dense layers: randkit's AVX-512 kernel where the CPU
has AVX-512, else torch.

Why a kernel of our own (``randkit/_native/densemm.c``): torch's CPU matmul calls MKL, which
runs its AVX2 code on AMD processors even when they have AVX-512. On the stacked digits MLP
(5 models, batch 64, Linear 64-256-128-10; AMD EPYC with AVX-512, 2 threads) the step's
eight products took 198 us against torch's 510 us (bmm and baddbmm); the forward packs
each weight's rows per column tile inside the kernel instead of transposing it first. Each
output is one thread's sum in a fixed order, so the results do not depend on the thread
count; they differ from torch's in float rounding only.

``bmm`` and ``linear`` take float32 CPU tensors shaped (K, ...) and refuse anything else;
callers check ``usable`` first and keep torch otherwise.
"""

from __future__ import annotations

import torch

try:  # the compiled kernel (setup.py); without it torch.bmm keeps the job
    from randkit._native import _densemm as native
except ImportError:  # pragma: no cover  (no C compiler at install)
    native = None

NONE, RELU, MASK = 0, 1, 2  # the kernel's epilogues
CPU_HAS_AVX512 = native is not None and native.available()  # asked once: checked every step


def has_native_kernel() -> bool:
    """Whether the kernel is built and this CPU runs it (AVX-512)."""
    return native is not None and CPU_HAS_AVX512


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take products of these tensors: float32 on the CPU."""
    return has_native_kernel() and all(t.is_cpu and t.dtype == torch.float32 for t in tensors)


def _check(name: str, t: torch.Tensor, dims: int = 3) -> None:
    """The kernel reads raw float32 memory: anything else is refused before it runs."""
    if t.dtype != torch.float32 or not t.is_cpu or t.dim() != dims or t.is_neg():
        raise ValueError(
            f"native_matmul: {name} must be a {dims}-d float32 CPU tensor, "
            f"got {t.dim()}-d {t.dtype} on {t.device}"
        )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, relu: bool = False
) -> torch.Tensor:
    """``x @ weight^T + bias`` per model, (K, M, R) with a Linear layer's stacked weight
    (K, N, R) and bias (K, N), then ``relu``: the kernel packs the weight's rows per column
    tile itself, so no transposed copy is made (the weight is copied only when its rows are
    not contiguous)."""
    _check("weight", weight)
    if weight.stride(2) != 1:
        weight = weight.contiguous()
    return _gemm(x, weight, weight.shape[1], bias, relu, None, transposed=True)


def bmm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    relu: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a @ b`` per model, (K, M, R) @ (K, R, N), plus ``bias`` (K, N) when given; then
    ``relu``, or ``mask``: 0 where ``mask`` (K, M, N) is at most 0, else the result (what
    torch's ``threshold_backward`` does with a ReLU's output). ``a`` may be any strided view;
    ``b`` is copied when its rows are not contiguous. All float32 CPU tensors (checked: the
    kernel reads raw memory)."""
    _check("b", b)
    if b.stride(2) != 1:
        b = b.contiguous()
    return _gemm(a, b, b.shape[2], bias, relu, mask, transposed=False)


def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    columns: int,
    bias: torch.Tensor | None,
    relu: bool,
    mask: torch.Tensor | None,
    *,
    transposed: bool,
) -> torch.Tensor:
    _check("a", a)
    if bias is not None:
        _check("bias", bias, 2)
    if mask is not None:
        _check("mask", mask)
    models, rows, depth = a.shape
    expected = (models, columns, depth) if transposed else (models, depth, columns)
    if b.shape != expected or (bias is not None and bias.shape != (models, columns)):
        raise ValueError(
            f"native_matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match"
        )
    if mask is not None and mask.shape != (models, rows, columns):
        raise ValueError(
            f"native_matmul: mask shape {tuple(mask.shape)}, expected {(models, rows, columns)}"
        )
    out = torch.empty((models, rows, columns), dtype=torch.float32)
    epilogue = NONE
    if relu:
        epilogue = RELU
    elif mask is not None:
        epilogue = MASK
        mask = mask.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if not out.numel():  # nothing to compute (and an empty mask's address would read as none)
        return out
    native.gemm(
        a.data_ptr(),
        b.data_ptr(),
        out.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        0 if mask is None else mask.data_ptr(),
        models,
        rows,
        columns,
        depth,
        a.stride(1),
        a.stride(2),
        a.stride(0),
        b.stride(1),
        b.stride(0),
        columns,
        rows * columns,
        columns,
        epilogue,
        torch.get_num_threads(),
        transposed,
    )
    return out


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (K,), counts (K,), gradient (K, B, C)) for logits (K, B, C), class indices
    (K, B) and row weights (K, B): each model's weighted mean cross-entropy with label
    smoothing, the clamped weight sum it divides by, and each row's unweighted gradient with
    respect to its logits. One compiled pass with a vectorized exp: torch's log_softmax,
    gather and the gradient's scatter cost about 50 us on the digits MLP's 320 rows."""
    _check("logits", logits)
    _check("row_weight", row_weight, 2)
    if target.dtype != torch.int64 or not target.is_cpu or target.shape != logits.shape[:2]:
        raise ValueError(f"native_matmul: target must be int64 {tuple(logits.shape[:2])}")
    if row_weight.shape != logits.shape[:2]:
        raise ValueError(f"native_matmul: row_weight must be {tuple(logits.shape[:2])}")
    logits, target, row_weight = logits.contiguous(), target.contiguous(), row_weight.contiguous()
    models, rows, classes = logits.shape
    losses = torch.empty(models, dtype=torch.float32)
    counts = torch.empty(models, dtype=torch.float32)
    grad = torch.empty_like(logits)
    native.cross_entropy(
        logits.data_ptr(),
        target.data_ptr(),
        row_weight.data_ptr(),
        losses.data_ptr(),
        counts.data_ptr(),
        grad.data_ptr(),
        models,
        rows,
        classes,
        float(smoothing),
    )
    return losses, counts, grad
