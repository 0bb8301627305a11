"""Zeroth-order SGD: the two-point SPSA gradient estimate of MeZO (Malladi et al. 2023,
Algorithm 1), with the perturbation z regenerated from a seed instead of stored."""

from __future__ import annotations

from collections.abc import Callable

import torch

from randkit.streams import seeded_generator


class ZerothOrderSGD(torch.optim.Optimizer):
    """theta <- theta - lr * (g * z + weight_decay * theta) with
    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps), z ~ N(0, I) from ``seed``.

    ``step(closure, seed)``: ``closure()`` returns the loss (no backward needed). Memory is
    that of inference: z is drawn again, parameter by parameter, from the same seed.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        eps: float = 1e-3,  # type: ignore[no-untyped-def]
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(
                f"need lr > 0, eps > 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}"
            )
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        if len({group["eps"] for group in self.param_groups}) > 1:
            # One loss difference serves every group, so it needs one perturbation size.
            raise ValueError("ZerothOrderSGD needs the same eps in every parameter group")

    def _params(self) -> list[tuple[torch.nn.Parameter, dict]]:
        return [(p, group) for group in self.param_groups for p in group["params"]]

    def _walk(self, seed: int, update: Callable[[torch.Tensor, torch.Tensor, dict], None]) -> None:
        generators: dict[torch.device, torch.Generator] = {}
        for p, group in self._params():
            if p.device not in generators:
                generators[p.device] = seeded_generator(seed, p.device)
            z = torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)
            update(p, z, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor], seed: int = 0) -> torch.Tensor:  # type: ignore[override]
        def shift(scale: float) -> Callable[[torch.Tensor, torch.Tensor, dict], None]:
            return lambda p, z, group: p.add_(z, alpha=scale * group["eps"])

        self._walk(seed, shift(1.0))
        plus = closure()
        self._walk(seed, shift(-2.0))
        minus = closure()
        self._walk(seed, shift(1.0))
        eps = self.param_groups[0]["eps"]
        projected = float((plus - minus) / (2 * eps))

        def descend(p: torch.Tensor, z: torch.Tensor, group: dict) -> None:
            if group["weight_decay"]:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])
            p.add_(z, alpha=-group["lr"] * projected)

        self._walk(seed, descend)
        return (plus + minus) / 2
