"""K models of one plain architecture run as one: batched matmuls and grouped convolutions.

Written by hand because ``vmap`` pays its Python overhead on every step and no library runs K
stacked ``nn.Sequential`` models directly. For a ``Classifier`` whose network is an
``nn.Sequential`` of the layers below, the K models' stacked weights (as
``stack_module_state`` gives them) drive PyTorch's own kernels:

- ``Linear``: one ``baddbmm`` over the K models;
- ``Conv2d``: one convolution with ``groups`` multiplied by K, the models side by side in the
  channel dimension (what ``vmap``'s own batching rule does, without its overhead);
- pooling and activations: as they are, on the side-by-side channels;
- randkit's ``Dropout`` / ``GaussianDropout``: the numbers pre-drawn from each model's stream.

Anything else (``resnet``, ``text``, custom modules) keeps the ``vmap`` path. Autograd
computes every gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from randkit.models import Classifier, Standardize
from randkit.randomize.modules import Dropout, GaussianDropout

ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity)
POOLING = (nn.MaxPool2d, nn.AvgPool2d)


def _supported(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Flatten):
        return layer.start_dim == 1 and layer.end_dim == -1
    if isinstance(layer, nn.Conv2d):
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return isinstance(layer, (nn.Linear, Dropout, GaussianDropout, *ELEMENTWISE, *POOLING))


class StackedForward:
    """``forward(params, buffers, x, draws)``: logits ``(K, B, classes)`` of the K models for
    inputs ``x`` of shape ``(K, B, ...)``; ``draws`` the pre-drawn numbers of the stochastic
    layers, one ``(K, B, ...)`` tensor per call, in call order."""

    def __init__(self, model: Classifier) -> None:
        self.model = model
        self.layers = _pool_before_relu(list(model.net.named_children()))

    @classmethod
    def build(cls, model: nn.Module) -> StackedForward | None:
        """The stacked forward of ``model``, or None where only ``vmap`` can run it."""
        if not isinstance(model, Classifier) or not isinstance(model.net, nn.Sequential):
            return None
        if not isinstance(model.standardize, (Standardize, nn.Identity)):
            return None
        if not all(_supported(layer) for layer in model.net):
            return None
        if len(list(model.net.named_children())) != len(model.net):
            return None  # a layer used twice: named_children lists it once
        return cls(model)

    def __call__(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        x: torch.Tensor,
        draws: list[torch.Tensor],
    ) -> torch.Tensor:
        return self._run(params, buffers, x, list(draws))

    def loss(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        x: torch.Tensor,
        target: torch.Tensor,
        row_weight: torch.Tensor,
        draws: list[torch.Tensor],
        smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses (K,), logits (K, B, classes)): each model's mean cross-entropy over its
        rows, row b weighted by ``row_weight[k, b]`` (0: a padded row); ``target`` class
        indices (K, B) or probabilities (K, B, classes)."""
        logits = self(params, buffers, x, draws)
        return stacked_cross_entropy(logits, target, row_weight, smoothing), logits

    def _run(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        x: torch.Tensor,
        pending: list[torch.Tensor],
    ) -> torch.Tensor:
        """All layers on ``x`` (K, B, ...), drawing from ``pending``; the result is
        (K, B, ...) again."""
        k, b = x.shape[:2]
        if isinstance(self.model.standardize, Standardize):
            # Stacked buffers are (K, 1, ...): they broadcast over each model's batch.
            x = (x - buffers["standardize.mean"]) / buffers["standardize.std"]
        grouped = False  # False: (K, B, ...); True: (B, K * C, H, W), the models side by side
        for name, layer in self.layers:
            if isinstance(layer, (nn.Conv2d, *POOLING)):
                if not grouped:
                    x = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
                    # Channels-last: torch's CPU max pooling is much faster on it than on
                    # NCHW, and the convolutions and activations keep the format.
                    x = x.contiguous(memory_format=torch.channels_last)
                    grouped = True
                if isinstance(layer, nn.Conv2d):
                    x = self._conv(layer, name, params, x, k)
                else:
                    x = layer(x)
                continue
            if isinstance(layer, ELEMENTWISE):
                x = layer(x)
                continue
            if grouped:
                x = x.reshape(b, k, -1, *x.shape[2:]).transpose(0, 1)
                grouped = False
            if isinstance(layer, nn.Flatten):
                x = x.flatten(2)
            elif isinstance(layer, nn.Linear):
                x = _linear(x, params[f"net.{name}.weight"], params.get(f"net.{name}.bias"))
            else:
                x = _stochastic(layer, x, pending)
        if grouped:
            x = x.reshape(b, k, -1, *x.shape[2:]).transpose(0, 1)
        return x

    @staticmethod
    def _conv(
        layer: nn.Conv2d,
        name: str,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        k: int,
    ) -> torch.Tensor:
        weight = params[f"net.{name}.weight"]
        bias = params.get(f"net.{name}.bias")
        return F.conv2d(
            x,
            weight.reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups * k,
        )


def _pool_before_relu(layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """ReLU then max pooling, swapped: the same numbers and gradients (max commutes with a
    non-decreasing function, and both gradients reach only a positive maximum), with the
    ReLU and its backward on a quarter of the values."""
    out = list(layers)
    for i in range(len(out) - 1):
        if isinstance(out[i][1], nn.ReLU) and isinstance(out[i + 1][1], nn.MaxPool2d):
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` of shape (K, B, ..., in): like ``nn.Linear``, over the last dimension."""
    # Computed transposed, weight @ rows^T: the weight's gradient then comes out of the
    # backward matmul in the weight's own (contiguous) layout; rows @ weight^T would give a
    # transposed gradient that autograd copies on every step.
    rows = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    if bias is None:
        out = torch.bmm(weight, rows)
    else:
        out = torch.baddbmm(bias.unsqueeze(2), weight, rows)
    return out.transpose(1, 2).reshape(*x.shape[:-1], weight.shape[1])


def _stochastic(layer: nn.Module, x: torch.Tensor, pending: list[torch.Tensor]) -> torch.Tensor:
    """randkit's dropout layers on the stacked batch, with each model's pre-drawn numbers."""
    if not layer.training or layer.p == 0:
        return x
    return x * dropout_factor(layer, pending.pop(0))


def dropout_factor(layer: nn.Module, numbers: torch.Tensor) -> torch.Tensor:
    """What randkit's ``Dropout`` or ``GaussianDropout`` multiplies its input by, given the
    uniform or normal ``numbers`` it drew."""
    if isinstance(layer, Dropout):
        return (numbers >= layer.p).to(numbers.dtype) / (1 - layer.p)
    return 1 + (layer.p / (1 - layer.p)) ** 0.5 * numbers


def stacked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Each model's weighted mean cross-entropy (K,) over its rows of ``logits`` (K, B, C)."""
    k, width = row_weight.shape
    ce = F.cross_entropy(
        logits.flatten(0, 1),
        target.flatten(0, 1),
        reduction="none",
        label_smoothing=smoothing,
    ).view(k, width)
    return (ce * row_weight).sum(1) / row_weight.sum(1).clamp(min=1)
