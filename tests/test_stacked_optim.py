"""The vectorized runner's optimizers for K stacked models follow torch.optim model by model,
in lockstep (torch's fused Adam kernel) and with trials that skip steps (masked updates)."""

from __future__ import annotations

import pytest
import torch

from randkit.config import TrainConfig
from randkit.stacked import StackedOptimizer
from randkit.train.optim import make_optimizer

K, STEPS = 4, 30
SETTINGS = {
    "adam": dict(optimizer="adam", lr=1e-3, weight_decay=0.01),
    "adamw": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01),
    "sgd-momentum": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("skipping", [False, True])
def test_each_stacked_model_follows_torch_optim(name: str, skipping: bool) -> None:
    cfg = TrainConfig(**SETTINGS[name])
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(K, 5, 3, generator=g), "b": torch.randn(K, 3, generator=g)}
    stacked = {n: t.clone() for n, t in start.items()}
    optimizer = StackedOptimizer(stacked, cfg, K)
    models = [{n: torch.nn.Parameter(t[k].clone()) for n, t in start.items()} for k in range(K)]
    # What the sequential runner uses, one model at a time.
    references = [make_optimizer(torch.nn.ParameterDict(m), cfg) for m in models]
    for step in range(STEPS):
        grads = {n: torch.randn(t.shape, generator=g) for n, t in start.items()}
        # With skipping, trial k sits out every (k + 2)-th step, as a trial whose epoch has
        # ended does; otherwise all move together (the fused lockstep path).
        active = torch.tensor([not (skipping and step % (k + 2) == 0) for k in range(K)])
        for n, p in stacked.items():
            p.grad = grads[n].clone()
        optimizer.step(torch.full((K,), cfg.lr, dtype=torch.float64), active)
        for k in range(K):
            if active[k]:
                for n, p in models[k].items():
                    p.grad = grads[n][k].clone()
                references[k].step()
    for k in range(K):
        for n, p in models[k].items():
            torch.testing.assert_close(stacked[n][k], p.detach(), rtol=1e-6, atol=1e-7)
