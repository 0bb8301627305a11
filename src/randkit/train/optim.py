"""Optimizers and per-step learning-rate schedules from the ``train`` config."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import lr_scheduler

from randkit.config import TrainConfig
from randkit.randomize.zo import ZerothOrderSGD


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "zo-sgd":
        return ZerothOrderSGD(params, lr=cfg.lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> lr_scheduler.LRScheduler | None:
    """A scheduler stepped once per optimizer step. Warm-up is linear from lr/100."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        # One-cycle has its own warm-up phase; warmup_epochs sets its length when given.
        pct = warmup / total if warmup else 0.3
        # Momentum (Adam's beta1) stays fixed: only the learning rate follows the cycle, in
        # every trainer (the stacked optimizer takes a learning rate per step, nothing else).
        return lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=pct, cycle_momentum=False
        )
    main: lr_scheduler.LRScheduler | None = None
    if cfg.schedule == "step":
        main = lr_scheduler.StepLR(
            optimizer, step_size=cfg.step_epochs * steps_per_epoch, gamma=cfg.step_gamma
        )
    elif cfg.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    if main is None:
        return ramp
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
