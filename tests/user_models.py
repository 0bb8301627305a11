"""Model factories as a user would write them, for ``model.name: "user_models:<factory>"``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn


def make(in_shape: Sequence[int], num_classes: int, hidden: int = 16) -> nn.Module:
    """Flatten, one hidden layer of ``hidden`` units."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(in_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def make_any(**kwargs: Any) -> nn.Module:
    """Takes anything; remembers what it was given."""
    model = make(kwargs["in_shape"], kwargs["num_classes"])
    model.received = dict(kwargs)
    return model


def no_classes(in_shape: Sequence[int]) -> nn.Module:
    """Ignores the number of classes (always 10 outputs)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), 10))


def not_a_module(in_shape: Sequence[int], num_classes: int) -> dict[str, int]:
    return {"in": math.prod(in_shape), "out": num_classes}


NOT_CALLABLE = 42


def with_layer_norm(in_shape: Sequence[int], num_classes: int, hidden: int = 16) -> nn.Module:
    """A layer the vectorized runner's stacked path does not know: it falls back to vmap."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(in_shape), hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
