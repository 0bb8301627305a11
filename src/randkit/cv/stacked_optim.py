"""Optimizers for K models stacked along dimension 0, each with its own step count, learning
rate and an "active" flag (a trial whose epoch has ended, or that stopped early, does not
move). Written by hand because ``torch.optim`` keeps one step count per tensor; the update
formulas follow ``torch.optim.SGD``, ``Adam`` and ``AdamW`` exactly."""

from __future__ import annotations

import torch

from randkit.config import TrainConfig

BETAS = (0.9, 0.999)
EPS = 1e-8


class StackedOptimizer:
    def __init__(self, params: dict[str, torch.Tensor], cfg: TrainConfig, trials: int) -> None:
        self.params = params
        self.cfg = cfg
        self.steps = torch.zeros(trials, dtype=torch.float64)
        self.state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in params}

    @staticmethod
    def _per_trial(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, lrs: torch.Tensor, active: torch.Tensor) -> None:
        """One update with learning rate ``lrs[k]`` for every trial ``k`` with ``active[k]``."""
        cfg = self.cfg
        self.steps += active.double()
        for name, p in self.params.items():
            if p.grad is None:
                continue
            mask = self._per_trial(active.float(), p) > 0
            lr = self._per_trial(lrs, p)
            g = p.grad
            state = self.state[name]
            if cfg.optimizer == "sgd":
                new = self._sgd(p, g, lr, state, mask)
            else:
                new = self._adam(p, g, lr, state, mask)
            p.copy_(torch.where(mask, new, p))

    def _sgd(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        lr: torch.Tensor,
        state: dict[str, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.weight_decay:
            g = g + cfg.weight_decay * p
        if cfg.momentum:
            if "momentum" not in state:
                state["momentum"] = g.clone()  # torch starts the buffer at the first gradient
                state["started"] = mask.clone()
                buf = state["momentum"]
            else:
                fresh = mask & ~state["started"]
                updated = torch.where(fresh, g, state["momentum"] * cfg.momentum + g)
                state["momentum"] = torch.where(mask, updated, state["momentum"])
                state["started"] = state["started"] | mask
                buf = state["momentum"]
            g = g + cfg.momentum * buf if cfg.nesterov else buf
        return p - lr * g

    def _adam(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        lr: torch.Tensor,
        state: dict[str, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        beta1, beta2 = BETAS
        if cfg.optimizer == "adamw":
            p = p * (1 - lr * cfg.weight_decay)
        elif cfg.weight_decay:
            g = g + cfg.weight_decay * p
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
        state["exp_avg"] = torch.where(mask, m.lerp(g, 1 - beta1), m)
        state["exp_avg_sq"] = torch.where(mask, v * beta2 + (1 - beta2) * g * g, v)
        steps = self._per_trial(self.steps, p).clamp(min=1)
        bias1 = 1 - beta1**steps
        bias2 = 1 - beta2**steps
        denom = state["exp_avg_sq"].sqrt() / bias2.sqrt() + EPS
        return p - (lr / bias1) * state["exp_avg"] / denom
