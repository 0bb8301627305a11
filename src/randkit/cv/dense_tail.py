"""The dense end of K stacked models and their cross-entropy, forward and backward by hand.

Written by hand because autograd's bookkeeping costs more than the arithmetic in small dense
layers. One autograd node stands for the whole tail: its Linear layers, ReLUs, randkit's
dropout layers and identities, then each trial's weighted mean cross-entropy (label
smoothing and soft targets included). The backward is the chain rule written out: a batched
matmul per weight gradient and per input gradient, ``threshold_backward`` for a ReLU, the
dropout factor again for a dropout layer. Where the CPU has AVX-512 the products run on
randkit's own kernel (``native_matmul``), which also applies a ReLU in the forward product and
its mask in the backward one. Layers before the tail (convolutions, pooling)
keep autograd, and the tail hands them the gradient of its input.

Measured on the digits MLP benchmark (5 trials, batch 64, Linear 64-256-128-10, 2 cores):
see the README's cross-validation benchmark; the batched matmuls are about 0.5 ms of a step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from randkit.cv import native_matmul
from randkit.randomize.modules import Dropout, GaussianDropout

TAIL_LAYERS = (nn.Linear, nn.ReLU, nn.Identity, Dropout, GaussianDropout)


def tail_start(layers: list[tuple[str, nn.Module]]) -> int | None:
    """Where the dense tail of ``layers`` begins: the first Linear of the longest run of
    ``TAIL_LAYERS`` that ends the network; None when the network does not end that way."""
    start = len(layers)
    while start > 0 and isinstance(layers[start - 1][1], TAIL_LAYERS):
        start -= 1
    while start < len(layers) and not isinstance(layers[start][1], nn.Linear):
        start += 1
    return start if start < len(layers) else None


def dense_tail_loss(
    layers: list[tuple[str, nn.Module]],
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor,
    draws: list[torch.Tensor],
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (K,), logits (K, B, classes)) of the tail ``layers`` on ``x`` (K, B, in):
    trial k's loss is the mean cross-entropy over its rows, row b weighted by
    ``row_weight[k, b]`` (0 for a padded row). ``target`` holds class indices (K, B) or
    probabilities (K, B, classes); ``draws`` are the pre-drawn numbers of the tail's
    dropout layers, in call order. Only ``losses`` carries a gradient."""
    ops, tensors, _ = _tail_ops(layers, params, draws)
    return _DenseTailLoss.apply(x, target, row_weight, smoothing, ops, *tensors)


def dense_tail_loss_and_grads(
    layers: list[tuple[str, nn.Module]],
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor,
    draws: list[torch.Tensor],
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``dense_tail_loss`` and the gradient of ``losses.sum()`` for every tail parameter by
    name, without autograd: for a network that is all tail (an MLP), whose input needs no
    gradient. The same forward and backward as the autograd node, so the same numbers; it
    saves autograd's engine and bookkeeping, about 55 us of a digits MLP step."""
    ops, tensors, names = _tail_ops(layers, params, draws)
    with torch.no_grad():
        losses, logits, saved = _forward(x, target, row_weight, smoothing, ops, tensors)
        wanted = [False] + [t is not None for t in tensors]
        ones = torch.ones_like(losses)
        _, grads = _backward(saved, ones, ops, smoothing, len(tensors), wanted)
    return losses, logits, {n: g for n, g in zip(names, grads, strict=True) if n is not None}


def _tail_ops(
    layers: list[tuple[str, nn.Module]], params: dict[str, torch.Tensor], draws: list[torch.Tensor]
) -> tuple[list[tuple[str, Any]], list[torch.Tensor | None], list[str | None]]:
    """The tail as ops, its parameters (weight, bias or None per Linear) and their names."""
    ops: list[tuple[str, Any]] = []
    tensors: list[torch.Tensor | None] = []
    names: list[str | None] = []
    pending = list(draws)
    for name, layer in layers:
        if isinstance(layer, nn.Linear):
            ops.append(("linear", None))
            bias = f"net.{name}.bias"
            tensors += [params[f"net.{name}.weight"], params.get(bias)]
            names += [f"net.{name}.weight", bias if bias in params else None]
        elif isinstance(layer, nn.ReLU):
            ops.append(("relu", None))
        elif isinstance(layer, (Dropout, GaussianDropout)) and layer.training and layer.p:
            ops.append(("scale", dropout_factor(layer, pending.pop(0))))
    return ops, tensors, names


def dropout_factor(layer: nn.Module, numbers: torch.Tensor) -> torch.Tensor:
    """What randkit's ``Dropout`` or ``GaussianDropout`` multiplies its input by, given the
    uniform or normal ``numbers`` it drew."""
    if isinstance(layer, Dropout):
        return (numbers >= layer.p).to(numbers.dtype) / (1 - layer.p)
    return 1 + (layer.p / (1 - layer.p)) ** 0.5 * numbers


def _forward(
    x: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor,
    smoothing: float,
    ops: list[tuple[str, Any]],
    tensors: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(losses, logits, what the backward needs: row weights, their count, each row's
    gradient with respect to its logits, the parameters, then the input of each
    Linear and the output of each ReLU). Class targets on the AVX-512 path take the
    compiled cross-entropy (``native_matmul.cross_entropy``)."""
    factors = [factor for kind, factor in ops if kind == "scale"]
    native = native_matmul.usable(x, *(t for t in tensors if t is not None), *factors)
    h, saved, weights = x, [], iter(tensors)
    i = 0
    while i < len(ops):
        kind, factor = ops[i]
        if kind == "linear":
            weight, bias = next(weights), next(weights)
            saved.append(h)  # the input, for the weight's gradient
            if native:  # a ReLU right after is done in the same pass
                fused = i + 1 < len(ops) and ops[i + 1][0] == "relu"
                h = native_matmul.linear(h, weight, bias, relu=fused)
                if fused:
                    saved.append(h)  # the ReLU's output, for its backward
                    i += 1
            else:
                w_t = weight.transpose(1, 2)
                h = torch.baddbmm(bias.unsqueeze(1), h, w_t) if bias is not None else h.bmm(w_t)
        elif kind == "relu":
            # in place on a fresh output; not on one saved for a backward
            h = h.relu() if h is saved[-1] else h.relu_()
            saved.append(h)  # the output, for threshold_backward
        else:
            h = h * factor
        i += 1
    logits = h
    class_targets = target.dim() == 2 and target.dtype == torch.int64
    if native and class_targets and row_weight.dtype == torch.float32 and logits.shape[-1] > 0:
        losses, count, logit_grad = native_matmul.cross_entropy(
            logits, target, row_weight, smoothing
        )
        return losses, logits, [row_weight, count, logit_grad, *tensors, *saved]
    log_p = torch.log_softmax(logits, -1)
    classes = logits.shape[-1]
    if target.dim() == log_p.dim():  # probabilities
        q = target * (1 - smoothing) + smoothing / classes if smoothing else target
        ce = -(q * log_p).sum(-1)
    else:
        ce = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if smoothing:
            ce = (1 - smoothing) * ce - smoothing / classes * log_p.sum(-1)
    count = row_weight.sum(1).clamp(min=1)
    losses = (ce * row_weight).sum(1) / count
    logit_grad = _logit_gradient(log_p, target, smoothing)
    return losses, logits, [row_weight, count, logit_grad, *tensors, *saved]


def _backward(
    saved: list[torch.Tensor],
    grad_losses: torch.Tensor,
    ops: list[tuple[str, Any]],
    smoothing: float,
    n_tensors: int,
    wanted: list[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(gradient of the input, gradient of each tail parameter) for ``grad_losses``;
    ``saved`` as ``_forward`` gave it, ``wanted`` whether the input and each parameter need
    theirs."""
    row_weight, count, logit_grad, *rest = saved
    tensors, saved = rest[:n_tensors], rest[n_tensors:]
    g = logit_grad * (row_weight * (grad_losses / count).unsqueeze(1)).unsqueeze(-1)
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    slot = len(tensors)
    factors = [factor for kind, factor in ops if kind == "scale"]
    native = native_matmul.usable(g, *(t for t in tensors if t is not None), *factors)
    product = native_matmul.bmm if native else torch.bmm
    i = len(ops) - 1
    while i >= 0:
        kind, factor = ops[i]
        if kind == "linear":
            slot -= 2
            h_in = saved.pop()
            weight, bias = tensors[slot], tensors[slot + 1]
            if wanted[1 + slot]:
                grads[slot] = product(g.transpose(1, 2), h_in)
            if bias is not None and wanted[2 + slot]:
                grads[slot + 1] = g.sum(1)
            if slot == 0 and not wanted[0]:
                break  # the network's input: no gradient to pass on
            if native and i > 0 and ops[i - 1][0] == "relu":
                # the ReLU before this layer, in the same pass
                g = native_matmul.bmm(g, weight, mask=saved.pop())
                i -= 1
            else:
                g = product(g, weight)
        elif kind == "relu":
            g = torch.ops.aten.threshold_backward(g, saved.pop(), 0)
        else:
            g = g * factor
        i -= 1
    return (g if wanted[0] else None), grads


class _DenseTailLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        target: torch.Tensor,
        row_weight: torch.Tensor,
        smoothing: float,
        ops: list[tuple[str, Any]],
        *tensors: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        losses, logits, saved = _forward(x, target, row_weight, smoothing, ops, list(tensors))
        ctx.ops, ctx.smoothing, ctx.params = ops, smoothing, len(tensors)
        # through save_for_backward, so that an in-place change before the backward is caught
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(logits)
        return losses, logits

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_losses: torch.Tensor, _grad_logits: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        wanted = [ctx.needs_input_grad[0], *ctx.needs_input_grad[5:]]
        grad_x, grads = _backward(
            list(ctx.saved_tensors), grad_losses, ctx.ops, ctx.smoothing, ctx.params, wanted
        )
        return grad_x, None, None, None, None, *grads


def _logit_gradient(log_p: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """d(cross-entropy)/d(logits) per row: softmax * sum(q) - q, q the smoothed target."""
    classes = log_p.shape[-1]
    g = log_p.exp()
    if target.dim() == log_p.dim():
        q = target * (1 - smoothing) + smoothing / classes if smoothing else target
        return g.mul_(q.sum(-1, keepdim=True)).sub_(q)
    hit = torch.full((1,) * g.dim(), smoothing - 1, dtype=g.dtype, device=g.device)
    g.scatter_add_(-1, target.unsqueeze(-1), hit.expand(*target.shape, 1))
    return g.sub_(smoothing / classes) if smoothing else g
