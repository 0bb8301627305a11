"""Training: the loop, schedules, early stopping, checkpoints and resume."""

from randkit.train.loop import Trainer, resolve_device
from randkit.train.run import RunResult, train_run

__all__ = ["RunResult", "Trainer", "resolve_device", "train_run"]
