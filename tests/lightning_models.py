"""A tiny LightningModule and a one-trial driver for tests/test_lightning.py.

Module level, so trial functions holding these classes pickle by reference (worker
processes, Ray, the subprocess of the kill test import this file).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from randkit.cv.fit import run_fit_trial
from randkit.cv.plan import PLAN_SOURCES
from randkit.cv.plan import Trial as PlanTrial
from randkit.integrations.lightning import LightningTrial
from randkit.streams import ScopedStreams, Streams


class MarkedSGD(torch.optim.SGD):
    """An optimizer only this module chooses: the test sees it was used."""


class TinyClassifier(pl.LightningModule):
    """8 features -> 2 classes; dropout, batch norm, Adam or MarkedSGD, a step schedule."""

    def __init__(self, hidden: int = 16, lr: float = 0.05, optimizer: str = "adam") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(hidden, 2),
        )  # fmt: skip
        self.training_steps = 0
        self.stepped_marked_sgd = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        self.stepped_marked_sgd = isinstance(self.optimizers().optimizer, MarkedSGD)
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self.net(x).argmax(1) == y).float().mean())
        self.log("training_steps", float(self.training_steps))
        self.log("marked_sgd", float(self.stepped_marked_sgd))

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "marked_sgd":
            optimizer = MarkedSGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class KillOnce(pl.Callback):
    """SIGKILL this process after ``batch`` batches of epoch ``epoch`` (0-based), once."""

    def __init__(self, marker: Path, epoch: int = 2, batch: int = 2) -> None:
        self.marker, self.epoch, self.batch = marker, epoch, batch

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch == self.epoch and args[-1] + 1 == self.batch:
            if not self.marker.exists():
                self.marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)


class TinyData(pl.LightningDataModule):
    """Builds ``dataset()`` in ``setup``, as a DataModule reading files would."""

    def __init__(self, n: int = 200) -> None:
        super().__init__()
        self.n = n

    def setup(self, stage: str) -> None:
        self.dataset = dataset(self.n)


def dataset(n: int = 200) -> TensorDataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def lightning_trial(**options: Any) -> LightningTrial:
    module_kwargs = options.pop("module_kwargs", {})
    options["trainer_kwargs"] = {"max_epochs": 4, **options.get("trainer_kwargs", {})}
    options.setdefault("batch_size", 32)
    return LightningTrial(TinyClassifier, module_kwargs, **options)


def run_trial(out: Path, fit: Any, levels: dict[str, int] | None = None) -> dict[str, Any]:
    """One trial (fold 0 of 4, seed 7) of ``fit`` on ``dataset()``, through run_fit_trial."""
    data = dataset()
    indices = np.arange(len(data))
    test = indices[::4]
    plan_trial = PlanTrial(
        0, 0, "main", {s: 0 for s in PLAN_SOURCES} | (levels or {}), np.setdiff1d(indices, test),
        test,
    )  # fmt: skip
    streams = ScopedStreams(Streams(7), plan_trial.scopes())
    return run_fit_trial(fit, data, plan_trial, streams, out)
