"""Label-mixing transforms: mixup and cutmix, with a per-sample lambda and soft labels."""

from __future__ import annotations

import torch

from randkit.randomize.base import BatchTransform, Params, Shape


def sample_beta(
    n: int, alpha: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``n`` draws from Beta(alpha, alpha) as G1 / (G1 + G2) with Gamma(alpha) draws.

    ``torch.distributions.Beta`` has no ``generator=``; ``torch._standard_gamma`` does. For
    small alpha the Gamma draws underflow, so they are taken in log space:
    log G = log Gamma(alpha + 1) + log(U) / alpha (Marsaglia & Tsang 2000, sec. 6), and
    G1 / (G1 + G2) = sigmoid(log G1 - log G2).
    """
    concentration = torch.full((2, n), float(alpha) + 1.0, device=device, dtype=torch.float64)
    gammas = torch._standard_gamma(concentration, generator=generator)
    uniforms = torch.rand((2, n), generator=generator, device=device, dtype=torch.float64)
    log_gammas = gammas.log() + uniforms.clamp(min=1e-300).log() / alpha
    return torch.sigmoid(log_gammas[0] - log_gammas[1]).float()


class _Mix(BatchTransform):
    mixes_labels = True

    def __init__(self, alpha: float, p: float) -> None:
        super().__init__(p)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def _partner(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randperm(n, generator=generator, device=device)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        # Partners index the whole batch, so mix everything and keep undrawn samples as they
        # were (the base class would slice the batch).
        if not params["applied"].any():
            return x
        keep = params["applied"].view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, self._apply(x, params), x)

    def apply_targets(self, targets: torch.Tensor, params: Params) -> torch.Tensor:
        lam = torch.where(params["applied"], params["lam"], torch.ones_like(params["lam"]))
        lam = lam[:, None].to(targets.dtype)
        return lam * targets + (1 - lam) * targets[params["partner"]]


class Mixup(_Mix):
    """x = lam * x + (1 - lam) * x[partner], lam ~ Beta(alpha, alpha) per sample
    (Zhang et al. 2018); targets mixed with the same lam."""

    def __init__(self, alpha: float = 0.2, p: float = 1.0) -> None:
        super().__init__(alpha, p)

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        n = shape[0]
        return {
            "lam": sample_beta(n, self.alpha, generator, device),
            "partner": self._partner(n, generator, device),
        }

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        lam = params["lam"].view(-1, 1, 1, 1).to(x.dtype)
        return lam * x + (1 - lam) * x[params["partner"]]


class CutMix(_Mix):
    """Paste a box of the partner image (Yun et al. 2019): box area 1 - lam with
    lam ~ Beta(alpha, alpha), centre uniform, clipped to the image; the label weight is the
    area actually kept, recorded as ``lam``."""

    def __init__(self, alpha: float = 1.0, p: float = 1.0) -> None:
        super().__init__(alpha, p)

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        n, _, h, w = shape
        drawn = sample_beta(n, self.alpha, generator, device)
        cut = torch.sqrt(1 - drawn)
        cy = torch.rand(n, generator=generator, device=device) * h
        cx = torch.rand(n, generator=generator, device=device) * w
        top = (cy - cut * h / 2).round().clamp(0, h).long()
        bottom = (cy + cut * h / 2).round().clamp(0, h).long()
        left = (cx - cut * w / 2).round().clamp(0, w).long()
        right = (cx + cut * w / 2).round().clamp(0, w).long()
        lam = 1 - ((bottom - top) * (right - left)).float() / (h * w)
        return {
            "lam": lam,
            "drawn_lam": drawn,
            "partner": self._partner(n, generator, device),
            "top": top,
            "bottom": bottom,
            "left": left,
            "right": right,
        }

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= params["top"][:, None]) & (rows < params["bottom"][:, None])
        in_cols = (cols >= params["left"][:, None]) & (cols < params["right"][:, None])
        box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
        return torch.where(box, x[params["partner"]], x)
