"""Input noise per sample: Gaussian, uniform, salt-and-pepper, speckle, Poisson (shot).

Each kind has one strength ``level`` (0 = no noise), so robustness curves can sweep it:

- ``gaussian``: x + N(0, level^2)
- ``uniform``: x + U(-level, level)
- ``salt_pepper``: a fraction ``level`` of the pixels set to 0 or 1 (half each)
- ``speckle``: x * (1 + N(0, level^2))
- ``poisson``: Poisson(x / level) * level, i.e. 1/level photons per unit intensity

The noise tensor is not stored in the parameters: ``draw`` keeps a seed and ``apply``
regenerates the noise from it, so a replay is exact and the parameters stay small.
"""

from __future__ import annotations

import math

import torch

from randkit.randomize.base import BatchTransform, Params, Shape
from randkit.randomize.philox import gaussian_noise
from randkit.randomize.rng import random_fill
from randkit.streams import seeded_generator

NOISE_KINDS = ("gaussian", "uniform", "salt_pepper", "speckle", "poisson")


class InputNoise(BatchTransform):
    """Noise of ``kind`` at strength ``level``; ``clip`` keeps values in [0, 1]."""

    def __init__(
        self, kind: str = "gaussian", level: float = 0.1, p: float = 1.0, clip: bool = True
    ) -> None:
        super().__init__(p)
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
        if level < 0 or (kind == "salt_pepper" and level > 1):
            bound = "[0, 1]" if kind == "salt_pepper" else ">= 0"
            raise ValueError(f"{kind} level must be {bound}, got {level}")
        self.kind = kind
        self.level = float(level)
        self.clip = clip

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        return {"seed": torch.randint(0, 2**62, (1,), generator=generator, device=device)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if self.level == 0:
            return x
        return super().apply(x, params)

    def apply_(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if self._fused(x) and x.is_contiguous() and self.level != 0 and params["applied"].all():
            return self._fused_noise(x, int(params["seed"][0]), out=x)
        return self.apply(x, params)

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether the compiled Philox kernel does the whole job in one pass."""
        return (
            self.kind in ("gaussian", "speckle")
            and x.device.type == "cpu"
            and x.dtype == torch.float32
        )

    def _fused_noise(
        self, x: torch.Tensor, seed: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        mode = "add" if self.kind == "gaussian" else "multiply"
        return gaussian_noise(x, seed, self.level, mode, clip=self.clip, out=out)

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        seed = int(params["seed"][0])
        level, kind = self.level, self.kind
        if kind == "poisson":
            counts = torch.poisson(
                x.clamp(min=0) / level, generator=seeded_generator(seed, x.device)
            )
            out = counts * level
        elif kind == "salt_pepper":
            u = random_fill((2, *x.shape), seed, x.device, kind="uniform")
            hit, salt = u[0] < level, u[1] < 0.5
            out = torch.where(hit, salt.to(x.dtype), x)
        elif self._fused(x):
            # One pass of the compiled Philox kernel: noise, scale, add and clip together.
            return self._fused_noise(x.contiguous(), seed)
        else:
            # In place on the fresh random tensor: one allocation, no temporaries.
            draw = "uniform" if kind == "uniform" else "normal"
            out = random_fill(x.shape, seed, x.device, x.dtype, kind=draw)
            if kind == "gaussian":
                out.mul_(level).add_(x)
            elif kind == "uniform":
                out.mul_(2 * level).sub_(level).add_(x)
            else:  # speckle: x * (1 + level * n)
                out.mul_(level).add_(1).mul_(x)
        return out.clamp_(0, 1) if self.clip else out


def parse_noise_levels(spec: str) -> tuple[str, list[float]]:
    """``"gaussian:0,0.1,0.2"`` -> ``("gaussian", [0.0, 0.1, 0.2])``; ValueError if malformed."""
    kind, sep, levels = spec.partition(":")
    if not sep or kind not in NOISE_KINDS:
        raise ValueError(
            f"expected KIND:L1,L2,... with KIND one of {', '.join(NOISE_KINDS)}, got {spec!r}"
        )
    try:
        values = [float(v) for v in levels.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"levels must be numbers, got {levels!r}") from None
    if not values:
        raise ValueError(f"no levels given in {spec!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"levels must be finite numbers, got {levels!r}")
    for value in values:
        InputNoise(kind, value)  # validates the range
    return kind, values
