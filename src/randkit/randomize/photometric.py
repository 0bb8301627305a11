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

    def apply_(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if self.value == "random" or not params["applied"].any():
            return self.apply(x, params)
        return self._fill_constant(x, params, out=x)

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if self.value != "random":
            return self._fill_constant(x, params)
        mask = self._keep(x, params) == 0
        fill = random_fill(x.shape, int(params["fill_seed"][0]), x.device, x.dtype, "uniform")
        return torch.where(mask, fill, x)

    def _keep(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """``(N, 1, H, W)``: 0 inside the box of each drawn sample, 1 elsewhere."""
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        top, left = params["top"][:, None], params["left"][:, None]
        in_rows = (rows >= top) & (rows < top + params["height"][:, None])
        in_rows &= params["applied"][:, None]
        in_cols = (cols >= left) & (cols < left + params["width"][:, None])
        # The box as an outer product of its row and column ranges: two small (N, H) and
        # (N, W) masks and one (N, H, W) op, instead of boolean ops on the whole batch.
        one = torch.ones((), dtype=x.dtype, device=x.device)
        r, c = in_rows.to(x.dtype)[:, :, None], in_cols.to(x.dtype)[:, None, :]
        return torch.addcmul(one, r, c, value=-1)[:, None]

    def _fill_constant(
        self, x: torch.Tensor, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        keep = self._keep(x, params)
        # A multiply by the 0/1 mask: cheaper than a broadcast masked_fill.
        out = torch.mul(x, keep, out=out)
        if float(self.value) != 0.0:
            out.add_(1 - keep, alpha=float(self.value))
        return out
