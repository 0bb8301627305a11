"""Photometric batch transforms: brightness/contrast jitter and random erasing (cutout)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from randkit.randomize.base import BatchTransform, Params, Shape, check_range, log_uniform, uniform
from randkit.randomize.rng import random_fill


class ColorJitter(BatchTransform):
    """Brightness factor in ``1 +- brightness`` then contrast factor in ``1 +- contrast``
    (around each image's mean), per sample; results clamped to [0, 1]."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, p: float = 1.0) -> None:
        super().__init__(p)
        for name, value in (("brightness", brightness), ("contrast", contrast)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.brightness = float(brightness)
        self.contrast = float(contrast)

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        n = shape[0]
        b, c = self.brightness, self.contrast
        return {
            "brightness": uniform(n, 1 - b, 1 + b, generator, device),
            "contrast": uniform(n, 1 - c, 1 + c, generator, device),
        }

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        view = (-1, 1, 1, 1)
        out = (x * params["brightness"].view(view).to(x.dtype)).clamp(0, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        return ((out - mean) * params["contrast"].view(view).to(x.dtype) + mean).clamp(0, 1)


class RandomErasing(BatchTransform):
    """Erase one rectangle per sample (Zhong et al. 2020; cutout): area fraction in ``scale``,
    aspect ratio log-uniform in ``ratio``, filled with ``value`` or, with ``value="random"``,
    uniform noise in [0, 1]."""

    def __init__(
        self,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: float | str = 0.0,
        p: float = 0.5,
    ) -> None:
        super().__init__(p)
        self.scale = check_range(scale, "scale", low=0.0)
        if self.scale[1] > 1:
            raise ValueError(f"scale must be within [0, 1], got {list(scale)}")
        self.ratio = check_range(ratio, "ratio", low=1e-6)
        if isinstance(value, str) and value != "random":
            raise ValueError(f"value must be a number or 'random', got {value!r}")
        self.value = value

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        n, _, h, w = shape
        area = uniform(n, *self.scale, generator, device) * (h * w)
        aspect = log_uniform(n, *self.ratio, generator, device)
        eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
        ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
        top = (torch.rand(n, generator=generator, device=device) * (h - eh + 1)).long()
        left = (torch.rand(n, generator=generator, device=device) * (w - ew + 1)).long()
        params = {"top": top, "left": left, "height": eh, "width": ew}
        if self.value == "random":
            params["fill_seed"] = torch.randint(0, 2**62, (1,), generator=generator, device=device)
        return params

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if not params["applied"].any():
            return x
        return self._apply(x, params)  # the box mask already leaves undrawn samples alone

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= params["top"][:, None]) & (
            rows < (params["top"] + params["height"])[:, None]
        )
        in_cols = (cols >= params["left"][:, None]) & (
            cols < (params["left"] + params["width"])[:, None]
        )
        mask = in_rows[:, :, None] & in_cols[:, None, :] & params["applied"][:, None, None]
        mask = mask[:, None]  # (N, 1, H, W)
        if self.value != "random":
            # A multiply by the 0/1 mask is several times faster than a broadcast masked_fill.
            out = x * (~mask).to(x.dtype)
            if float(self.value) != 0.0:
                out.add_(mask.to(x.dtype), alpha=float(self.value))
            return out
        fill = random_fill(x.shape, int(params["fill_seed"][0]), x.device, x.dtype, "uniform")
        return torch.where(mask, fill, x)
