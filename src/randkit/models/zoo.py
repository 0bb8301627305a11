"""A small model zoo. Every factory takes the input description it needs by keyword."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from randkit.errors import UserError
from randkit.randomize.modules import Dropout, StochasticDepth


def _image_shape(model: str, in_shape: Sequence[int]) -> tuple[int, int, int]:
    """(channels, height, width) of image inputs; other data is refused by model name."""
    if len(in_shape) != 3:
        raise UserError(
            "model.name",
            f"{model!r} needs image inputs (channels, height, width), but the data's inputs "
            f"have shape {list(in_shape)}; use 'mlp' for vectors or 'text' for CSV text",
        )
    channels, height, width = in_shape
    return channels, height, width


def mlp(
    in_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (256, 128),
    dropout: float = 0.0,
) -> nn.Module:
    """Flatten, then ReLU layers of sizes ``hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    in_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (32, 64),
    hidden: int = 128,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Module:
    """3x3 conv blocks, each halving the resolution (while it is > 1), then an MLP head.

    No BatchNorm by default, so that many copies can be trained at once with ``vmap``.
    """
    channels, height, width = _image_shape("cnn", in_shape)
    layers: list[nn.Module] = []
    for out in widths:
        layers.append(nn.Conv2d(channels, out, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = out
    layers += [nn.Flatten(), nn.Linear(channels * height * width, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, drop_path: float) -> None:
        super().__init__()
        self.drop_path = StochasticDepth(drop_path)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
        self.norm2 = _norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.drop_path(self.norm2(self.conv2(out))) + self.shortcut(x))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def resnet(
    in_shape: Sequence[int],
    num_classes: int,
    depth: int = 20,
    width: int = 16,
    norm: str = "batch",
    drop_path: float = 0.0,
) -> nn.Module:
    """ResNet for 32x32 images (He et al. 2016, sec. 4.2): depth = 6n + 2, three stages.

    ``norm`` is ``batch``, ``group`` (vmap-friendly) or ``none``; ``drop_path`` is the
    stochastic-depth probability of every residual branch.
    """
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"depth must be 6n + 2 (8, 14, 20, 32, ...), got {depth}")
    if norm not in ("batch", "group", "none"):
        raise ValueError(f"norm must be batch, group or none, got {norm!r}")
    blocks_per_stage = (depth - 2) // 6
    channels = _image_shape("resnet", in_shape)[0]
    layers: list[nn.Module] = [
        nn.Conv2d(channels, width, 3, 1, 1, bias=norm == "none"),
        _norm(norm, width),
        nn.ReLU(),
    ]
    channels = width
    for stage, out in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_BasicBlock(channels, out, stride, norm, drop_path))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def text(
    vocab_size: int | None = None,
    num_classes: int = 2,
    embed_dim: int = 64,
    hidden: int = 64,
    dropout: float = 0.0,
    in_shape: Sequence[int] = (),
) -> nn.Module:
    """Mean of word embeddings (padding id 0 ignored), then a one-hidden-layer MLP."""
    if vocab_size is None:  # only text data has a vocabulary
        raise UserError(
            "model.name",
            f"'text' needs CSV text data (data.kind csv_text), but the data's inputs have "
            f"shape {list(in_shape)}",
        )
    layers: list[nn.Module] = [
        _MeanEmbedding(vocab_size, embed_dim),
        nn.Linear(embed_dim, hidden),
        nn.ReLU(),
    ]
    if dropout > 0:
        layers.append(Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


class _MeanEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(ids)
