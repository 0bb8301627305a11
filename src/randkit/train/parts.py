"""The user's own parts of the built-in training loop: task, loss, optimizer, learning-rate
scheduler, metrics, callbacks and DataLoader workers.

They replace what the ``train`` config names (cross-entropy, four optimizers, three metrics)
and travel with a cross-validation's jobs to worker processes and Ray tasks, so each must be
picklable there: module-level functions and classes, ``functools.partial`` of them, or objects
of such classes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from randkit.errors import UserError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class UserParts:
    """What replaces the config's choices. ``optimizer`` and ``scheduler`` are ``(class,
    kwargs)`` pairs (``torch.optim.RMSprop``, ``{"lr": 1e-3}``); a scheduler steps once per
    epoch, or once per optimizer step with ``(class, kwargs, "step")``. ``callbacks`` get
    ``on_train_start(trainer)``, ``on_step_end(trainer, step, loss)`` and
    ``on_epoch_end(trainer, record)``; one of them stops training early with
    ``trainer.stop()``. Each trial gets its own deep copy of every callback and metric."""

    task: str = "classification"
    loss: Loss | None = None
    optimizer: tuple[Any, dict[str, Any]] | None = None
    scheduler: tuple[Any, ...] | None = None
    metrics: Any = None
    callbacks: Sequence[Any] = field(default_factory=tuple)
    num_workers: int = 0

    @property
    def default_loop(self) -> bool:
        """Nothing replaced: the config's loss, optimizer and metrics."""
        return (
            self.task == "classification"
            and self.loss is None
            and self.optimizer is None
            and self.scheduler is None
            and self.metrics is None
            and not self.callbacks
        )

    def for_trial(self) -> UserParts:
        """A copy with fresh copies of the callbacks and metric objects: one trial's state
        never reaches another, whichever runner (sequential, processes, Ray) runs them."""
        return dataclasses.replace(
            self,
            callbacks=copy.deepcopy(tuple(self.callbacks)),
            metrics=copy.deepcopy(self.metrics),
        )

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        assert self.optimizer is not None
        kind, kwargs = self.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            optimizer = kind(params, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError("optimizer", f"{_name(kind)}(**{kwargs}) failed: {exc}") from None
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError("optimizer", f"{_name(kind)} made a {type(optimizer).__name__}")
        return optimizer

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, bool] | None:
        """The scheduler and whether it steps per optimizer step (else per epoch)."""
        if self.scheduler is None:
            return None
        kind, kwargs, *when = self.scheduler
        try:
            scheduler = kind(optimizer, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError("scheduler", f"{_name(kind)}(**{kwargs}) failed: {exc}") from None
        return scheduler, when == ["step"]


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", type(obj).__name__)


def class_and_kwargs(value: Any, field_name: str, base: type) -> tuple[Any, dict[str, Any]]:
    """``Class``, ``(Class, kwargs)`` or ``(Class, kwargs, "step")`` checked: the class must
    be a subclass of ``base`` (or a callable that makes one) and kwargs a dict."""
    parts = value if isinstance(value, tuple | list) else (value, {})
    if not 2 <= len(parts) <= 3 or not isinstance(parts[1], dict):
        raise UserError(
            field_name, f"must be a class or (class, kwargs), got {type(value).__name__}"
        )
    kind = parts[0]
    if inspect.isclass(kind) and not issubclass(kind, base):
        raise UserError(field_name, f"{_name(kind)} is not a {base.__module__}.{base.__name__}")
    if not callable(kind):
        raise UserError(field_name, f"must be a class or (class, kwargs), got {kind!r:.60}")
    if len(parts) == 3 and parts[2] not in ("step", "epoch"):
        raise UserError(field_name, f"third item must be 'step' or 'epoch', got {parts[2]!r}")
    return (kind, dict(parts[1]), *parts[2:])  # type: ignore[return-value]


def check_callbacks(callbacks: Any) -> tuple[Any, ...]:
    if callbacks is None:
        return ()
    items = tuple(callbacks) if isinstance(callbacks, list | tuple) else (callbacks,)
    hooks = ("on_epoch_end", "on_step_end", "on_train_start")
    for i, callback in enumerate(items):
        if not any(hasattr(callback, hook) for hook in hooks):
            raise UserError(
                f"callbacks[{i}]",
                f"{type(callback).__name__} has none of {', '.join(hooks)}",
            )
        try:
            copy.deepcopy(callback)
        except Exception as exc:  # deepcopy fails with many exception types
            raise UserError(
                f"callbacks[{i}]",
                f"{type(callback).__name__} cannot be copied for each trial "
                f"({type(exc).__name__}: {exc}); open files or connections in on_train_start",
            ) from None
    return items


class EarlyStopping:
    """A callback: stop when ``monitor`` (a key of the epoch record, e.g. ``val_rmse``) has
    not improved by ``min_delta`` for ``patience`` epochs; ``mode`` is ``min`` or ``max``
    (default: ``min`` for losses and errors). The weights stay those of the last epoch; use
    ``train.early_stopping`` to keep the best epoch's weights."""

    def __init__(
        self, monitor: str, patience: int = 5, mode: str | None = None, min_delta: float = 0.0
    ) -> None:
        from randkit.train.tasks import metric_direction

        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode = mode or metric_direction(monitor.removeprefix("val_"))
        self.best: float | None = None
        self.bad_epochs = 0

    def on_train_start(self, trainer: Any) -> None:
        """Each trial starts afresh (one callback object serves every trial of a run)."""
        self.best, self.bad_epochs = None, 0

    def on_epoch_end(self, trainer: Any, record: dict[str, float]) -> None:
        if self.monitor not in record:
            raise UserError(
                "EarlyStopping.monitor", f"{self.monitor!r} is not one of {sorted(record)}"
            )
        value = record[self.monitor] * (1 if self.mode == "max" else -1)
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            trainer.stop()
