"""Geometric batch transforms: crop with padding, flips, resized crop, affine."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from randkit.randomize.base import (
    BatchTransform,
    Params,
    Shape,
    check_range,
    log_uniform,
    uniform,
)


class RandomCrop(BatchTransform):
    """Pad by ``padding`` (``zeros`` or ``reflect``) and crop back to the original size at a
    random offset per sample."""

    def __init__(self, padding: int = 4, padding_mode: str = "zeros", p: float = 1.0) -> None:
        super().__init__(p)
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"padding_mode must be zeros or reflect, got {padding_mode!r}")
        self.padding = int(padding)
        self.padding_mode = padding_mode

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        n, pad = shape[0], self.padding
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=device)
        return {"top": offsets[0], "left": offsets[1]}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        # The centre offset is the identity, so samples not drawn need no final select.
        if not params["applied"].any() or self.padding == 0:
            return x
        centre = torch.full_like(params["top"], self.padding)
        return self._apply(
            x,
            {
                "top": torch.where(params["applied"], params["top"], centre),
                "left": torch.where(params["applied"], params["left"], centre),
            },
        )

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        n, c, h, w = x.shape
        pad = self.padding
        if self.padding_mode == "reflect" and pad >= min(h, w):
            raise ValueError(f"reflect padding {pad} needs images larger than {pad}, got {h}x{w}")
        mode = "reflect" if self.padding_mode == "reflect" else "constant"
        padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
        wide = w + 2 * pad
        rows = params["top"][:, None] + torch.arange(h, device=x.device)  # (N, H)
        cols = params["left"][:, None] + torch.arange(w, device=x.device)  # (N, W)
        # One flat gather per sample: index of output pixel (i, j) in the padded image.
        flat = (rows[:, :, None] * wide + cols[:, None, :]).reshape(n, 1, h * w)
        picked = padded.reshape(n, c, -1).gather(2, flat.expand(n, c, h * w))
        return picked.reshape(n, c, h, w)


class _Flip(BatchTransform):
    dim: int  # the flipped dimension, set by each subclass

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def apply_(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        applied = params["applied"]
        if applied.all() or not applied.any():
            return self.apply(x, params)
        index = applied.nonzero().squeeze(1)
        # index_select/index_copy_ rather than x[index] = ...: the same rows, one pass less
        return x.index_copy_(0, index, x.index_select(0, index).flip(self.dim))

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return x.flip(self.dim)


class HorizontalFlip(_Flip):
    dim = -1


class VerticalFlip(_Flip):
    dim = -2


def _sample_grid(x: torch.Tensor, theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class RandomAffine(BatchTransform):
    """Rotation (degrees, uniform in +-``degrees``), translation (fraction of the size,
    uniform in +-``translate``) and scale (uniform in ``scale``), one set per sample, with
    ``affine_grid`` + ``grid_sample``; uncovered pixels are 0."""

    def __init__(
        self,
        degrees: float = 0.0,
        translate: Sequence[float] = (0.0, 0.0),
        scale: Sequence[float] = (1.0, 1.0),
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        if degrees < 0:
            raise ValueError(f"degrees must be >= 0, got {degrees}")
        self.degrees = float(degrees)
        self.translate = (float(translate[0]), float(translate[1]))
        if min(self.translate) < 0 or max(self.translate) > 1:
            raise ValueError(f"translate must be two fractions in [0, 1], got {list(translate)}")
        self.scale = check_range(scale, "scale", low=1e-3)

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        n = shape[0]
        return {
            "angle": uniform(n, -self.degrees, self.degrees, generator, device),
            "tx": uniform(n, -self.translate[0], self.translate[0], generator, device),
            "ty": uniform(n, -self.translate[1], self.translate[1], generator, device),
            "scale": uniform(n, *self.scale, generator, device),
        }

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        h, w = x.shape[-2:]
        a = params["angle"] * (math.pi / 180.0)
        cos, sin, s = torch.cos(a), torch.sin(a), params["scale"]
        # Output -> input map in pixel units is R(-a) / s; normalized coordinates rescale the
        # axes by 2/W and 2/H, which matters for non-square images.
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
        theta[:, 0, 0] = cos / s
        theta[:, 0, 1] = sin / s * (h / w)
        theta[:, 1, 0] = -sin / s * (w / h)
        theta[:, 1, 1] = cos / s
        shift = torch.stack([params["tx"] * 2, params["ty"] * 2], dim=1)  # normalized units
        theta[:, :, 2] = -(theta[:, :, :2] @ shift[:, :, None]).squeeze(-1)
        return _sample_grid(x, theta, (h, w))


class RandomResizedCrop(BatchTransform):
    """A random area fraction (``scale``) and aspect ratio (``ratio``, log-uniform) per sample,
    resized to ``size`` (default: the input size). Unlike torchvision, which retries up to 10
    times, an oversize crop is clamped to the image, keeping it vectorized."""

    def __init__(
        self,
        size: Sequence[int] | None = None,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        self.size = tuple(int(s) for s in size) if size is not None else None
        self.scale = check_range(scale, "scale", low=1e-6)
        if self.scale[1] > 1:
            raise ValueError(f"scale must be within (0, 1], got {list(scale)}")
        self.ratio = check_range(ratio, "ratio", low=1e-6)

    def output_shape(self, shape: Shape) -> Shape:
        return (*shape[:2], *self.size) if self.size else shape  # type: ignore[return-value]

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        n = shape[0]
        area = uniform(n, *self.scale, generator, device)
        aspect = log_uniform(n, *self.ratio, generator, device)
        width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
        height = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = uniform(n, -1.0, 1.0, generator, device) * (1 - width)
        cy = uniform(n, -1.0, 1.0, generator, device) * (1 - height)
        return {"width": width, "height": height, "cx": cx, "cy": cy}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if self.size is None:
            return super().apply(x, params)
        # Output size changes: samples not drawn are the whole image, resized.
        full = {**params}
        keep = params["applied"]
        for key, identity in (("width", 1.0), ("height", 1.0), ("cx", 0.0), ("cy", 0.0)):
            full[key] = torch.where(keep, params[key], torch.full_like(params[key], identity))
        return self._apply(x, full)

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1] = params["width"], params["height"]
        theta[:, 0, 2], theta[:, 1, 2] = params["cx"], params["cy"]
        return _sample_grid(x, theta, self.size or x.shape[-2:])
