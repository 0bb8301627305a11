"""The training rules, written once for both trainers: the single-model ``Trainer``
(``train/loop.py``) and the ``StackedTrainer`` (``stacked/trainer.py``), which trains K models
at once.

Here and only here: which stream and coordinates every random draw of a step comes from
(batch order, augmentation, input noise, dropout, weight noise, gradient noise), how
gradients are noised and clipped, the learning-rate schedule, what an epoch records and when
training stops early. A new randomization is added here and both trainers get it; the
equality tests of the runners (tests/test_cv.py, tests/test_cv_stacked.py) keep them in step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from randkit.config import EarlyStoppingConfig, TrainConfig
from randkit.errors import UserError
from randkit.randomize import Randomization, use_generator
from randkit.randomize.weights import apply_perturbation as apply_perturbation
from randkit.randomize.weights import perturbation_parts
from randkit.streams import ScopedStreams, Streams
from randkit.train.optim import make_optimizer, make_scheduler
from randkit.train.tasks import metric_direction

AnyStreams = Streams | ScopedStreams


@dataclass
class LoopState:
    """Where one model's training is and what it has seen: plain JSON, restored on resume."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # batches of the current epoch already done
    global_step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- where each draw comes from ---------------------------------------------------------------


def step_keys(epoch: int, step: int, coords: dict[str, int]) -> dict[str, int]:
    """The stream coordinates of every draw of one optimizer step (``step`` counts from the
    start of training, so a resumed run draws the same numbers)."""
    return {"epoch": epoch, "step": step, **coords}


def batch_order(
    streams: AnyStreams, examples: int, epoch: int, coords: dict[str, int]
) -> torch.Tensor:
    """The permutation of the training examples for ``epoch``, from stream ``order``."""
    generator = streams.torch("order", epoch=epoch, **coords)
    return torch.randperm(examples, generator=generator)


def randomize_inputs(
    plan: Randomization,
    streams: AnyStreams,
    x: torch.Tensor,
    y: torch.Tensor,
    keys: dict[str, int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmentation (stream ``augment``) then input noise (``noise``, what=input) for one
    batch at stream coordinates ``keys``; the targets become probabilities when the
    augmentation mixes labels."""
    targets = y
    if plan.augment is not None:
        generator = streams.torch("augment", device=device, **keys)
        params = plan.augment.draw(x.shape, generator, device)
        x = plan.augment.apply(x, params)
        if plan.augment.mixes_labels:
            targets = plan.augment.apply_targets(y, params)
    if plan.input_noise is not None:
        generator = streams.torch("noise", device=device, what="input", **keys)
        x = plan.input_noise(x, generator)
    return x, targets


def dropout_generator(
    streams: AnyStreams, keys: dict[str, int], device: torch.device
) -> torch.Generator:
    """What randkit's stochastic layers draw from in the step at ``keys``."""
    return streams.torch("dropout", device=device, **keys)


def zeroth_order_seed(streams: AnyStreams, keys: dict[str, int]) -> int:
    """The seed of the step's zeroth-order perturbation (``noise``, what=zeroth_order)."""
    return streams.seed("noise", what="zeroth_order", **keys)


@contextlib.contextmanager
def stochastic_layers(
    streams: AnyStreams,
    keys: dict[str, int],
    device: torch.device,
    needs: tuple[bool, bool],
) -> Iterator[None]:
    """Inside the block, randkit's layers draw from the step's ``dropout`` stream and
    ``nn.Dropout`` (and other global-RNG layers) from torch's global RNG seeded from the same
    source at another coordinate, restored afterwards. ``needs`` = (stream layers,
    global-RNG layers) of the model: seeding is skipped for what the model cannot use."""
    stream, global_rng = needs
    with contextlib.ExitStack() as stack:
        if global_rng:
            stack.enter_context(streams.fork_global("dropout", device=device, rng="global", **keys))
        if stream:
            stack.enter_context(use_generator(dropout_generator(streams, keys, device)))
        yield


def weight_noise_generator(
    streams: AnyStreams, keys: dict[str, int], device: torch.device
) -> torch.Generator:
    """Weight noise and DropConnect masks of the step at ``keys`` (``noise``, what=weights)."""
    return streams.torch("noise", device=device, what="weights", **keys)


def perturbed_weights(
    named: Sequence[tuple[str, torch.Tensor]], plan: Randomization, generator: torch.Generator
) -> dict[str, dict[str, torch.Tensor]]:
    """For each weight (>= 2 dims) of one model, in order, its DropConnect ``factor`` and
    additive ``noise`` (either may be missing); use ``apply_perturbation``."""
    std, relative, drop = plan.weight_noise_std, plan.weight_noise_relative, plan.drop_connect
    return perturbation_parts(list(named), generator, std, relative, drop)


# -- gradients ----------------------------------------------------------------------------


@torch.no_grad()
def add_gradient_noise(
    plan: Randomization,
    grads: Sequence[torch.Tensor],
    streams: AnyStreams,
    keys: dict[str, int],
    device: torch.device,
) -> None:
    """Annealed gradient noise for one model's gradients, in place (``noise``,
    what=gradient), when the plan has it."""
    if plan.grad_noise is None:
        return
    generator = streams.torch("noise", device=device, what="gradient", **keys)
    plan.grad_noise.add_to_(grads, keys["step"], generator)


@torch.no_grad()
def clip_gradients(grads: Sequence[torch.Tensor], max_norm: float) -> None:
    """Scale each model's gradients so that their joint 2-norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does; every tensor's dimension 0 indexes the models
    (one model: add that dimension with ``unsqueeze(0)``)."""
    per_tensor = [torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in grads]
    norms = torch.linalg.vector_norm(torch.stack(per_tensor, dim=1), dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))


# -- schedules, epochs, early stopping ------------------------------------------------------


def learning_rate_schedule(
    cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer | None, Any]:
    """An optimizer on a stand-in parameter and its scheduler, for a trainer that updates
    the weights itself: the same learning rates as the single-model trainer, step by step.
    (None, None) for a constant rate: then ``cfg.lr`` is the rate of every step."""
    if cfg.schedule == "constant" and not cfg.warmup_epochs:
        return None, None
    stand_in = nn.Module()
    stand_in.weight = nn.Parameter(torch.zeros(1))  # drawn from no generator
    optimizer = make_optimizer(stand_in, cfg)
    return optimizer, make_scheduler(optimizer, cfg, steps_per_epoch)


def record_step(state: LoopState, loss_sum: float, correct: int, rows: int) -> None:
    state.loss_sum += loss_sum
    state.correct += correct
    state.seen += rows


def finish_epoch(
    state: LoopState,
    lr: float,
    val_scores: dict[str, float] | None,
    rule: EarlyStoppingConfig | None,
    train_accuracy: bool = True,
) -> bool:
    """Record the epoch in ``state.history``, apply early stopping and start the next epoch.
    True when this epoch's weights are the best so far (the caller keeps them)."""
    record: dict[str, float] = {
        "epoch": state.epoch + 1,
        "lr": lr,
        "train_loss": state.loss_sum / max(1, state.seen),
    }
    if train_accuracy:  # classification only
        record["train_accuracy"] = state.correct / max(1, state.seen)
    improved = False
    if val_scores is not None:
        record.update({f"val_{k}": v for k, v in val_scores.items()})
        if rule is not None:
            improved = _early_stopping(state, val_scores, rule)
    state.history.append(record)
    state.epoch += 1
    state.step_in_epoch = 0
    state.loss_sum, state.correct, state.seen = 0.0, 0, 0
    return improved


def _early_stopping(state: LoopState, scores: dict[str, float], rule: EarlyStoppingConfig) -> bool:
    # Losses and errors improve downwards, accuracy and F1 upwards: one signed scale.
    if rule.metric not in scores:
        raise UserError(
            "train.early_stopping.metric",
            f"{rule.metric!r} is not a validation metric of this run: {', '.join(scores)}",
        )
    sign = 1 if (rule.mode or metric_direction(rule.metric)) == "max" else -1
    value = sign * scores[rule.metric]
    if state.best_value is None or value > state.best_value + rule.min_delta:
        state.best_value, state.best_epoch, state.bad_epochs = value, state.epoch + 1, 0
        return True
    state.bad_epochs += 1
    state.stopped_early = state.bad_epochs >= rule.patience
    return False


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)
