"""Optimizers for K models stacked along dimension 0, each with its own step count, learning
rate and an "active" flag (a model whose epoch has ended, or that stopped early, does not
move). Written by hand because ``torch.optim`` keeps one step count per tensor; the update
formulas follow ``torch.optim.SGD``, ``Adam`` and ``AdamW`` exactly."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from randkit.config import TrainConfig

BETAS = (0.9, 0.999)
EPS = 1e-8


class StackedOptimizer:
    def __init__(self, params: dict[str, torch.Tensor], cfg: TrainConfig, models: int) -> None:
        self.params = params
        self.cfg = cfg
        self.steps = [0] * models  # Python numbers: the lockstep check reads no tensor
        self.state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in params}

    @staticmethod
    def _per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(
        self, lrs: Sequence[float] | torch.Tensor, active: Sequence[bool] | torch.Tensor
    ) -> None:
        """One update with learning rate ``lrs[k]`` for every model ``k`` with ``active[k]``."""
        cfg = self.cfg
        lrs = lrs.tolist() if isinstance(lrs, torch.Tensor) else list(lrs)
        active = active.tolist() if isinstance(active, torch.Tensor) else list(active)
        self.steps = [n + bool(a) for n, a in zip(self.steps, active, strict=True)]
        if cfg.optimizer != "sgd" and self._in_lockstep(lrs, active):
            self._adam_all(float(lrs[0]), float(self.steps[0]))
            return
        active_t = torch.tensor(active, dtype=torch.float32)
        lrs_t = torch.tensor(lrs, dtype=torch.float64)
        for name, p in self.params.items():
            if p.grad is None:
                continue
            mask = self._per_model(active_t, p) > 0
            lr = self._per_model(lrs_t, p)
            g = p.grad
            state = self.state[name]
            if cfg.optimizer == "sgd":
                new = self._sgd(p, g, lr, state, mask)
            else:
                new = self._adam(p, g, lr, state, mask)
            p.copy_(torch.where(mask, new, p))

    def _in_lockstep(self, lrs: list[float], active: list[bool]) -> bool:
        """Every model active, same learning rate and step count: one scalar update fits all."""
        return all(active) and len(set(lrs)) == 1 and len(set(self.steps)) == 1

    def _adam_all(self, lr: float, step: float) -> None:
        """Adam/AdamW for all models at once, no masks: torch's fused CPU/CUDA kernel (one
        pass per tensor, as ``torch.optim.Adam(fused=True)``), else in-place foreach ops."""
        cfg = self.cfg
        beta1, beta2 = BETAS
        named = [(n, p) for n, p in self.params.items() if p.grad is not None]
        params = [p for _, p in named]
        grads = [p.grad for p in params]
        states = [self.state[n] for n, _ in named]
        for state, p in zip(states, params, strict=True):
            if "exp_avg" not in state:  # not setdefault: it would allocate on every step
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]
        adamw = cfg.optimizer == "adamw"
        # The fused op is what torch.optim.Adam(fused=True) calls; being private, it is looked
        # up by name and the foreach update below stands in where a release lacks it.
        fused = getattr(torch, "_fused_adamw_" if adamw else "_fused_adam_", None)
        if fused is not None and params and params[0].dtype in (torch.float32, torch.float64):
            steps = [torch.tensor(step, dtype=torch.float32, device=params[0].device)]
            fused(
                params,
                grads,
                exp_avg,
                exp_avg_sq,
                [],
                steps * len(params),  # the kernel only reads the (shared) step count
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=cfg.weight_decay,
                eps=EPS,
                amsgrad=False,
                maximize=False,
            )
            return
        if adamw and cfg.weight_decay:
            torch._foreach_mul_(params, 1 - lr * cfg.weight_decay)
        elif cfg.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias2**0.5)
        torch._foreach_add_(denom, EPS)
        torch._foreach_addcdiv_(params, exp_avg, denom, -lr / bias1)

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
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["exp_avg"] = torch.where(mask, m.lerp(g, 1 - beta1), m)
        state["exp_avg_sq"] = torch.where(mask, v * beta2 + (1 - beta2) * g * g, v)
        steps = self._per_model(torch.tensor(self.steps, dtype=torch.float64), p).clamp(min=1)
        bias1 = 1 - beta1**steps
        bias2 = 1 - beta2**steps
        denom = state["exp_avg_sq"].sqrt() / bias2.sqrt() + EPS
        return p - (lr / bias1) * state["exp_avg"] / denom
