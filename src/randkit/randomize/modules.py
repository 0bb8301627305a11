"""Generator-driven stochastic layers: Dropout, Gaussian dropout, stochastic depth.

``torch.nn.Dropout`` draws from the global RNG and takes no generator. These layers draw from
the generator installed by ``use_generator`` (the training loop installs one from stream
``dropout`` for every step); in training mode without one they refuse to run.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn


class RandomSource(Protocol):
    """Anything that hands stochastic layers their random numbers (the vectorized runner
    hands out numbers drawn beforehand from each trial's generator)."""

    def draw(
        self, kind: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor: ...


_current: contextvars.ContextVar[torch.Generator | RandomSource | None] = contextvars.ContextVar(
    "randkit_generator", default=None
)


@contextlib.contextmanager
def use_generator(
    generator: torch.Generator | RandomSource,
) -> Iterator[torch.Generator | RandomSource]:
    """Make ``generator`` the source of randkit's stochastic layers inside the block."""
    token = _current.set(generator)
    try:
        yield generator
    finally:
        _current.reset(token)


def current_generator(layer: str) -> torch.Generator | RandomSource:
    generator = _current.get()
    if generator is None:
        raise RuntimeError(
            f"{layer} in training mode needs a generator: call the model inside "
            "`with randkit.randomize.use_generator(g):` (or put it in eval mode)"
        )
    return generator


def draw_numbers(
    kind: str,
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """What a stochastic layer draws from a generator: ``kind`` "uniform" or "normal"."""
    sample = torch.rand if kind == "uniform" else torch.randn
    return sample(tuple(shape), generator=generator, device=device, dtype=dtype)


def draw(layer: str, kind: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``kind`` ("uniform" or "normal") numbers of ``shape`` from the current source."""
    source = current_generator(layer)
    if isinstance(source, torch.Generator):
        return draw_numbers(kind, shape, source, like.device, like.dtype)
    return source.draw(kind, tuple(shape), like.device, like.dtype)


class _StochasticLayer(nn.Module):
    """A layer that is random in training mode with probability ``p`` and the identity
    otherwise (or when p is 0)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return self._random_forward(x)

    def _random_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout(_StochasticLayer):
    """Inverted dropout: zero each element with probability ``p``, scale the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def _random_forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = draw("Dropout", "uniform", tuple(x.shape), x) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class GaussianDropout(_StochasticLayer):
    """Multiplicative N(1, p/(1-p)) noise, the Gaussian match of dropout's variance
    (Srivastava et al. 2014, sec. 10)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def _random_forward(self, x: torch.Tensor) -> torch.Tensor:
        std = (self.p / (1 - self.p)) ** 0.5
        return x * (1 + std * draw("GaussianDropout", "normal", tuple(x.shape), x))


class StochasticDepth(_StochasticLayer):
    """Drop a residual branch for a whole sample with probability ``p`` (Huang et al. 2016),
    scaling kept branches by 1/(1-p) so eval needs no change."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__(p)

    def _random_forward(self, branch: torch.Tensor) -> torch.Tensor:
        shape = (branch.shape[0],) + (1,) * (branch.dim() - 1)
        keep = draw("StochasticDepth", "uniform", shape, branch) >= self.p
        return branch * keep.to(branch.dtype) / (1 - self.p)


# torch.nn layers that draw from torch's global RNG in training mode.
GLOBAL_RNG_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)
STREAM_LAYERS = (Dropout, GaussianDropout, StochasticDepth)


def randomness_needs(model: nn.Module) -> tuple[bool, bool]:
    """(uses randkit's stochastic layers, may draw from torch's global RNG).

    Layers of torch.nn and randkit are known; any other module class (a user's) might draw
    from the global RNG in its ``forward``, so it counts as doing so.
    """
    stream, global_rng = False, False
    for module in model.modules():
        kind = type(module)
        if isinstance(module, STREAM_LAYERS):
            stream = stream or module.p > 0
        elif isinstance(module, GLOBAL_RNG_LAYERS):
            global_rng = True
        elif not kind.__module__.startswith(("torch.nn.", "randkit.")):
            global_rng = True
    return stream, global_rng
