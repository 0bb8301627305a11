"""Checks of the user's objects on a few training examples, before any training: the model's
forward pass and output width, the loss, the metrics and the early-stopping metric. A wrong
object fails here in one line that names it, not in a worker an hour later."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch.utils.data import DataLoader

from randkit.config import ExperimentConfig
from randkit.cv.fit import RESERVED_COLUMNS
from randkit.cv.objects import UserObjects, describe
from randkit.data import Prepared, TensorData
from randkit.data.dataset import targets_array
from randkit.errors import UserError
from randkit.streams import isolated_global_rngs
from randkit.train.batches import pair
from randkit.train.loop import training_loss
from randkit.train.parts import UserParts
from randkit.train.tasks import (
    check_output_width,
    metric_targets,
    num_outputs,
    output_width,
    task_metrics,
    user_metrics,
)

SAMPLE = 8  # examples: enough for every metric to be defined, cheap for any model


def sample_batch(prepared: Prepared, task: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    train = prepared.train
    if isinstance(train, TensorData):
        return train.x[:SAMPLE], train.y[:SAMPLE]
    loader = DataLoader(train, batch_size=SAMPLE, generator=torch.Generator())
    with isolated_global_rngs(0):  # the Dataset's transforms leave the caller's RNGs alone
        return pair(next(iter(loader)), task)


def check_objects_on_sample(
    cfg: ExperimentConfig,
    objects: UserObjects,
    model: torch.nn.Module,
    prepared: Prepared,
    data: Any,
) -> list[str]:
    """The checks; returns the names of the metrics every trial will report."""
    x, y = sample_batch(prepared, cfg.task)
    outputs = _forward(model, x)
    targets = targets_array(data)
    expected = num_outputs(cfg.task, targets)
    check_output_width(cfg.task, output_width(outputs), expected, "model")
    _check_loss(
        objects.parts.loss or training_loss(cfg.task, cfg.train.label_smoothing), outputs, y
    )
    _check_optimization(objects.parts, model)
    names = _check_metrics(cfg, objects, outputs, y)
    rule = cfg.train.early_stopping
    if rule is not None and rule.metric not in names:
        raise UserError(
            "train.early_stopping.metric",
            f"{rule.metric!r} is not a metric of this run; choose one of {', '.join(names)}",
        )
    return names


def _check_loss(loss: Any, outputs: torch.Tensor, y: torch.Tensor) -> None:
    try:
        value = loss(outputs, y)
    except UserError:
        raise
    except Exception as exc:  # the user's loss may fail in any way
        raise UserError(
            "loss",
            f"{describe(loss)} fails on outputs {list(outputs.shape)} and targets "
            f"{list(y.shape)} ({y.dtype}): {type(exc).__name__}: {str(exc).splitlines()[0]}",
        ) from None
    scalar = isinstance(value, torch.Tensor) and value.numel() == 1
    if not scalar or not value.dtype.is_floating_point:
        raise UserError(
            "loss", f"{describe(loss)} must return a scalar float tensor, got {value!r:.80}"
        )


def _check_optimization(parts: UserParts, model: torch.nn.Module) -> None:
    """Build the optimizer and scheduler once on a copy of the model: wrong arguments fail
    here, not after the run folder is written."""
    if parts.optimizer is None and parts.scheduler is None:
        return
    copy = deepcopy(model)
    if parts.optimizer is not None:
        optimizer = parts.make_optimizer(copy)
    else:
        optimizer = torch.optim.SGD(copy.parameters(), lr=0.1)
    parts.make_scheduler(optimizer)


def _check_metrics(
    cfg: ExperimentConfig, objects: UserObjects, outputs: torch.Tensor, y: torch.Tensor
) -> list[str]:
    """Run every metric once; a user metric may not take a built-in metric's or a results
    column's name (it would silently replace it)."""
    builtin = task_metrics(cfg.task, outputs, y)
    user = user_metrics(objects.parts.metrics, outputs, metric_targets(cfg.task, y))
    for name in user:
        if name in builtin or name in RESERVED_COLUMNS:
            raise UserError(
                f"metrics.{name}",
                f"is already a column of the results ({', '.join(builtin)} and the trial "
                "columns); give the metric another name",
            )
    return [*builtin, *user]


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(x)
    except Exception as exc:  # the user's forward may fail in any way
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError("model", f"forward pass fails on input {list(x.shape)}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(outputs, torch.Tensor):
        raise UserError(
            "model", f"forward must return a tensor of outputs, got {type(outputs).__name__}"
        )
    return outputs.float()
