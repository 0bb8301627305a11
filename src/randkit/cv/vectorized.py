"""The vectorized runner: every trial of one architecture trained at once in one process.

Written by hand because no library trains K differently-seeded models in lockstep with
per-model data order, augmentation and dropout: the models' weights are stacked with
``torch.func.stack_module_state`` and one pass computes all K forward passes per step: the
stacked forward of ``stacked.py`` for plain ``nn.Sequential`` networks, else ``vmap`` of
``functional_call``. Each trial keeps its own streams: its batch order, augmentation and
input noise are drawn outside ``vmap`` from its own generators exactly as the sequential
runner draws them, and its dropout numbers are drawn beforehand from its own dropout stream
and handed to the layers inside ``vmap``. Unequal fold sizes are padded with zero-weight rows;
a trial whose epoch has fewer batches simply does not move on the extra step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import stack_module_state

from randkit.config import ExperimentConfig
from randkit.cv.lockstep import Lockstep
from randkit.cv.plan import Trial
from randkit.cv.trial import prepare_trial, save_trial, trial_record
from randkit.data import LabeledData
from randkit.errors import UserError
from randkit.models import build_model
from randkit.randomize import build_randomization
from randkit.randomize.modules import GLOBAL_RNG_LAYERS
from randkit.streams import ScopedStreams, Streams
from randkit.train.loop import resolve_device
from randkit.train.optim import make_optimizer, make_scheduler


def check_vectorizable(model: nn.Module, cfg: ExperimentConfig) -> None:
    """Refuse, naming the layer or setting, what cannot be trained under ``vmap``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UserError(
                "cv.runner",
                f"the vectorized runner cannot train layer {name!r} "
                f"({type(module).__name__}: batch statistics are shared state); use "
                "GroupNorm (resnet norm: group) or another runner",
            )
        if isinstance(module, GLOBAL_RNG_LAYERS):
            raise UserError(
                "cv.runner",
                f"the vectorized runner cannot train layer {name!r} "
                f"({type(module).__name__} draws from torch's global RNG); use "
                "randkit.randomize.Dropout or another runner",
            )
    if cfg.train.optimizer == "zo-sgd":
        raise UserError(
            "cv.runner",
            "the vectorized runner does not support train.optimizer 'zo-sgd'; use another runner",
        )


class _Recorder:
    """Records what the stochastic layers ask for (kind and shape), answering neutrally."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def draw(
        self, kind: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        self.calls.append((kind, shape))
        return (torch.ones if kind == "uniform" else torch.zeros)(shape, device=device, dtype=dtype)


class _PreDrawn:
    """Hands out numbers drawn before ``vmap``, one tensor per layer call, in order."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = list(tensors)

    def draw(
        self, kind: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        return self.tensors.pop(0)


class _TrialState:
    def __init__(
        self,
        trial: Trial,
        streams: ScopedStreams,
        prepared: Any,
        cfg: ExperimentConfig,
        device: torch.device,
    ) -> None:
        self.trial, self.streams, self.prepared = trial, streams, prepared
        self.x = prepared.train.x.to(device)
        self.y = prepared.train.y.to(device)
        self.steps_per_epoch = math.ceil(len(self.y) / cfg.train.batch_size)
        # The same scheduler as the sequential runner, on a stand-in parameter: same lrs.
        stand_in = nn.Linear(1, 1)
        self.lr_optimizer = make_optimizer(stand_in, cfg.train)
        self.scheduler = make_scheduler(self.lr_optimizer, cfg.train, self.steps_per_epoch)
        self.history: list[dict[str, float]] = []
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.best_value: float | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.bad_epochs, self.stopped, self.order = 0, False, torch.empty(0, dtype=torch.long)

    @property
    def lr(self) -> float:
        return float(self.lr_optimizer.param_groups[0]["lr"])


def run_vectorized(
    cfg: ExperimentConfig,
    data: LabeledData,
    trials: list[Trial],
    streams: Streams,
    out: Any,
    on_done: Callable[[dict[str, Any]], None],
) -> None:
    device = resolve_device(cfg.train.device)
    states, models = [], []
    for trial in trials:
        scoped = ScopedStreams(streams, trial.scopes())
        prepared = prepare_trial(cfg, data, trial, scoped)
        models.append(build_model(cfg.model, prepared, scoped, init=cfg.randomize.init).to(device))
        states.append(_TrialState(trial, scoped, prepared, cfg, device))
    check_vectorizable(models[0], cfg)
    plan = build_randomization(
        cfg.randomize,
        len(states[0].prepared.classes),
        states[0].prepared.input_shape,
        states[0].prepared.unit_range,
    )
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0])
    trainer = Lockstep(cfg, base, params, buffers, states, plan, device, _Recorder, _PreDrawn)
    started = time.perf_counter()
    trainer.fit()
    seconds = (time.perf_counter() - started) / len(states)
    test_logits = trainer.test_logits([state.prepared.test.x for state in states])
    for k, state in enumerate(states):
        weights = trainer.weights(k)
        logits = test_logits[k]
        record = trial_record(
            state.trial, state.streams, state.prepared, logits, state.history, seconds
        )
        save_trial(out, record, weights if cfg.cv.save_models else None)
        on_done(record)
