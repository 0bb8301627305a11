"""K models of one plain architecture run as one: batched matmuls and grouped convolutions.

Written by hand because ``vmap`` pays its Python overhead on every step (measured on the digits
MLP: about 1.4 ms of flattening and dispatch per step for 5 trials, more than the arithmetic)
and no library runs K stacked ``nn.Sequential`` models directly. For a ``Classifier`` whose
network is an ``nn.Sequential`` of the layers below, the K trials' stacked weights (as
``stack_module_state`` gives them) drive:

- ``Linear``: one ``baddbmm`` over the K models;
- ``Conv2d``: one convolution with ``groups`` multiplied by K, the models side by side in the
  channel dimension (what ``vmap``'s own batching rule does, without its overhead);
- pooling and activations: as they are, on the side-by-side channels;
- randkit's ``Dropout`` / ``GaussianDropout``: the numbers pre-drawn from each trial's stream.

Anything else (``resnet``, ``text``, custom modules) keeps the ``vmap`` path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from randkit.cv.conv_pool import applies, conv_max_pool
from randkit.cv.dense_tail import (
    dense_tail_loss,
    dense_tail_loss_and_grads,
    dropout_factor,
    tail_start,
)
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
        self.tail = tail_start(self.layers)  # None: no dense tail, autograd all the way
        # the parameters of the tail's Linear layers: when they are all of the model's, its
        # gradients need no autograd (``loss_and_grads``)
        self.tail_parameters = {
            f"net.{name}.{kind}"
            for name, layer in (self.layers[self.tail :] if self.tail is not None else [])
            if isinstance(layer, nn.Linear)
            for kind in ("weight", "bias")
            if getattr(layer, kind) is not None
        }

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
        return self._run(params, buffers, x, list(draws), len(self.layers))

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
        """(losses (K,), logits (K, B, classes)): each trial's mean cross-entropy over its
        rows, row b weighted by ``row_weight[k, b]`` (0: a padded row); ``target`` class
        indices (K, B) or probabilities (K, B, classes). A dense tail (``dense_tail.py``)
        runs as one autograd node with its backward written out."""
        pending = list(draws)
        if self.tail is not None:
            h = self._run(params, buffers, x, pending, self.tail)
            if h.dim() == 3:
                tail = self.layers[self.tail :]
                return dense_tail_loss(tail, params, h, target, row_weight, pending, smoothing)
            logits = self._run(params, buffers, h, pending, len(self.layers), self.tail)
        else:
            logits = self._run(params, buffers, x, pending, len(self.layers))
        # contiguous: argmax takes 35 us on the transposed view the last matmul leaves and
        # 4 us on a copy that costs 2 us (digits, 5 trials)
        logits = logits.contiguous()
        k, width = row_weight.shape
        ce = F.cross_entropy(
            logits.flatten(0, 1),
            target.flatten(0, 1),
            reduction="none",
            label_smoothing=smoothing,
        ).view(k, width)
        return (ce * row_weight).sum(1) / row_weight.sum(1).clamp(min=1), logits

    def loss_and_grads(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        x: torch.Tensor,
        target: torch.Tensor,
        row_weight: torch.Tensor,
        draws: list[torch.Tensor],
        smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None:
        """``loss`` and the gradients of ``losses.sum()`` by parameter name, computed without
        autograd, for a model whose parameters all belong to its dense tail (an MLP: the
        layers before the tail have nothing to learn); None where that does not hold."""
        if self.tail is None or not set(params) <= self.tail_parameters:
            return None
        pending = list(draws)
        with torch.no_grad():
            h = self._run(params, buffers, x, pending, self.tail)
        if h.dim() != 3:
            return None
        tail = self.layers[self.tail :]
        return dense_tail_loss_and_grads(tail, params, h, target, row_weight, pending, smoothing)

    def _run(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        x: torch.Tensor,
        pending: list[torch.Tensor],
        end: int,
        begin: int = 0,
    ) -> torch.Tensor:
        """Layers ``begin`` to ``end`` (exclusive) on ``x`` (K, B, ...), drawing from
        ``pending``; the result is (K, B, ...) again."""
        k, b = x.shape[:2]
        if begin == 0 and isinstance(self.model.standardize, Standardize):
            # Stacked buffers are (K, 1, ...): they broadcast over each model's batch.
            x = (x - buffers["standardize.mean"]) / buffers["standardize.std"]
        grouped = False  # False: (K, B, ...); True: (B, K * C, H, W), the models side by side
        skip = -1  # the index of a max pooling already run inside the convolution before it
        for i in range(begin, end):
            name, layer = self.layers[i]
            if i == skip:
                continue
            if isinstance(layer, (nn.Conv2d, *POOLING)):
                following = self.layers[i + 1][1] if i + 1 < end else None
                if not grouped and isinstance(layer, nn.Conv2d) and applies(layer, following, x):
                    skip = i + 1
                    x = conv_max_pool(
                        x,
                        params[f"net.{name}.weight"],
                        params.get(f"net.{name}.bias"),
                        layer,
                        following,
                    )
                    grouped = True
                    continue
                if not grouped:
                    x = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
                    # Channels-last: torch's CPU max pooling is about 20x faster on it than
                    # on NCHW (measured: 47 us against 960 us for 64 x 160 x 8 x 8), and
                    # the convolutions and activations keep the format.
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
    # backward matmul in the weight's own (contiguous) layout. rows @ weight^T would give a
    # transposed gradient that autograd copies on every step (the torch profiler counted
    # 54 ms of such copies in a 0.33 s run of the digits MLP benchmark; 3 ms after).
    rows = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    if bias is None:
        out = torch.bmm(weight, rows)
    else:
        out = torch.baddbmm(bias.unsqueeze(2), weight, rows)
    return out.transpose(1, 2).reshape(*x.shape[:-1], weight.shape[1])


def _stochastic(layer: nn.Module, x: torch.Tensor, pending: list[torch.Tensor]) -> torch.Tensor:
    """randkit's dropout layers on the stacked batch, with each trial's pre-drawn numbers."""
    if not layer.training or layer.p == 0:
        return x
    return x * dropout_factor(layer, pending.pop(0))
