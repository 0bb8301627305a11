"""Parameter randomization: initializers by name, weight noise and DropConnect for each
forward pass, and annealed gradient noise."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import get_args

import torch
from torch import nn

from randkit.config import Initializer

INITIALIZERS: tuple[str, ...] = get_args(Initializer)


def initialize(model: nn.Module, scheme: str, generator: torch.Generator) -> nn.Module:
    """Re-initialize every Linear/Conv weight with ``scheme`` (biases to 0), drawing only from
    ``generator`` (from stream ``init``). Other layers keep their own initialization."""
    if scheme not in INITIALIZERS:
        raise ValueError(f"initializer must be one of {', '.join(INITIALIZERS)}, got {scheme!r}")
    init = nn.init
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            continue
        w = module.weight
        with torch.no_grad():
            if scheme == "kaiming_normal":
                init.kaiming_normal_(w, nonlinearity="relu", generator=generator)
            elif scheme == "kaiming_uniform":
                init.kaiming_uniform_(w, nonlinearity="relu", generator=generator)
            elif scheme == "xavier_normal":
                init.xavier_normal_(w, generator=generator)
            elif scheme == "xavier_uniform":
                init.xavier_uniform_(w, generator=generator)
            elif scheme == "orthogonal":
                init.orthogonal_(w, generator=generator)
            else:
                fan_in = w[0].numel()
                std = 1.0 / math.sqrt(fan_in)
                init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
    return model


def perturbed_parameters(
    model: nn.Module,
    generator: torch.Generator,
    noise_std: float = 0.0,
    relative: bool = False,
    drop_connect: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Weights (parameters with >= 2 dims) with DropConnect masks (Wan et al. 2013) and
    additive Gaussian noise, as new tensors that keep the autograd link to the originals.

    Call the model with ``torch.func.functional_call(model, perturbed, x)``: the stored
    weights never change, so nothing has to be undone after the step. ``relative`` scales
    the noise by each weight tensor's standard deviation.
    """
    named = list(model.named_parameters())
    parts = perturbation_parts(named, generator, noise_std, relative, drop_connect)
    return {name: apply_perturbation(w, parts[name]) for name, w in named if name in parts}


def perturbation_parts(
    named: list[tuple[str, torch.Tensor]],
    generator: torch.Generator,
    noise_std: float = 0.0,
    relative: bool = False,
    drop_connect: float = 0.0,
) -> dict[str, dict[str, torch.Tensor]]:
    """For each weight (>= 2 dims) of one model, in order, its DropConnect ``factor`` and
    additive ``noise`` (either may be missing); ``apply_perturbation`` combines them."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in named:
        if w.dim() < 2:
            continue
        factor, noise = weight_perturbation(w, generator, noise_std, relative, drop_connect)
        out[name] = {k: v for k, v in (("factor", factor), ("noise", noise)) if v is not None}
    return out


def apply_perturbation(w: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``w * factor + noise``, with what ``parts`` holds of the two."""
    if "factor" in parts:
        w = w * parts["factor"]
    if "noise" in parts:
        w = w + parts["noise"]
    return w


def weight_perturbation(
    w: torch.Tensor,
    generator: torch.Generator,
    noise_std: float = 0.0,
    relative: bool = False,
    drop_connect: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The random parts of one weight's perturbation, always drawn in this order: the
    DropConnect factor (the keep mask divided by 1 - ``drop_connect``; None when it is 0),
    then the scaled Gaussian noise (None when ``noise_std`` is 0). The perturbed weight is
    ``w * factor + noise``."""
    factor = noise = None
    if drop_connect > 0:
        keep = torch.rand(w.shape, generator=generator, device=w.device) >= drop_connect
        factor = keep.to(w.dtype) / (1 - drop_connect)
    if noise_std > 0:
        scale = noise_std * (w.detach().std() if relative else 1.0)
        noise = scale * torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    return factor, noise


class GradientNoise:
    """Annealed Gaussian gradient noise (Neelakantan et al. 2015, eq. 1): at step t add
    N(0, sigma_t^2) with the *variance* sigma_t^2 = eta / (1 + t)^gamma."""

    def __init__(self, eta: float = 0.01, gamma: float = 0.55) -> None:
        if eta <= 0 or gamma < 0:
            raise ValueError(f"need eta > 0 and gamma >= 0, got eta={eta}, gamma={gamma}")
        self.eta = float(eta)
        self.gamma = float(gamma)

    def variance(self, step: int) -> float:
        return self.eta / (1 + step) ** self.gamma

    @torch.no_grad()
    def add_(
        self, parameters: Iterable[nn.Parameter], step: int, generator: torch.Generator
    ) -> None:
        """Noise the gradients of ``parameters`` in place for optimizer step ``step``."""
        self.add_to_([p.grad for p in parameters if p.grad is not None], step, generator)

    @torch.no_grad()
    def add_to_(self, grads: Iterable[torch.Tensor], step: int, generator: torch.Generator) -> None:
        """Noise ``grads`` in place, one standard normal draw per element, in order."""
        std = math.sqrt(self.variance(step))
        for g in grads:
            g.add_(
                torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype),
                alpha=std,
            )
