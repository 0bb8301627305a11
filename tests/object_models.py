"""Module-level models, data sets, losses and trial functions for tests/test_objects.py: a
user's objects as a user writes them (importable, so worker processes and Ray get them)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset


class DigitsNet(nn.Module):
    """A user's classifier that takes the number of classes from randkit."""

    def __init__(self, num_classes: int = 10, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def plain_net(num_classes: int) -> nn.Module:
    """A factory of a stackable model (no global-RNG layers), for the vectorized runner."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


def make_net(hidden: int = 16) -> nn.Module:
    """A factory without num_classes: always 10 outputs."""
    return DigitsNet(10, hidden)


def digits_arrays(n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return (bunch.data[:n] / 16.0).astype(np.float32), bunch.target[:n]


class DigitsItems(Dataset):
    """A map-style data set that builds each item on access (as a file-backed one would)."""

    def __init__(self, n: int = 600, with_targets_attribute: bool = False) -> None:
        self.x, self.y = digits_arrays(n)
        if with_targets_attribute:
            self.targets = self.y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.x[index].copy()), int(self.y[index])


class StringLabels(DigitsItems):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:  # type: ignore[override]
        return torch.from_numpy(self.x[index].copy()), f"digit{self.y[index]}"

    @property
    def targets(self) -> list[str]:
        return [f"digit{v}" for v in self.y]


def smooth_l1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A custom regression loss."""
    return nn.functional.smooth_l1_loss(outputs.squeeze(-1), targets)


def broken_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs @ targets  # shapes never fit


def top2_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    top = outputs.topk(2, dim=1).indices
    return float((top == targets[:, None]).any(dim=1).float().mean())


class RecordOptimizer:
    """A callback that records which optimizer class trained each epoch, in a list shared by
    its copies (each trial gets its own copy of a callback)."""

    SEEN: ClassVar[list[str]] = []

    def on_epoch_end(self, trainer, record) -> None:  # type: ignore[no-untyped-def]
        self.SEEN.append(type(trainer.optimizer).__name__)


class ParityItems(DigitsItems):
    """Items whose targets (even/odd) disagree with the ``targets`` attribute (0..9)."""

    def __init__(self) -> None:
        super().__init__(200, with_targets_attribute=True)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.x[index].copy()), int(self.y[index] % 2)


class GappedLabels(DigitsItems):
    """Labels 0, 2, 4, ...: classes 1, 3, ... never occur."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.x[index].copy()), int(self.y[index] * 2)


class FloatLabels(DigitsItems):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:  # type: ignore[override]
        return torch.from_numpy(self.x[index].copy()), float(self.y[index])


class NoisyItems(DigitsItems):
    """Random augmentation inside __getitem__, from torch's global RNG."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.x[index].copy())
        return x + 0.3 * torch.randn(x.shape), int(self.y[index])


def fit_returns_fold(trial) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {"accuracy": 0.5, "fold": 3.0}


def fit_changes_keys(trial) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {"accuracy": 0.5} if trial.fold == 0 else {"acc": 0.5}


def fit_with_global_rng(trial) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """A user's own loop that leans on torch's global RNG (default init, nn.Dropout) and a
    loader shuffled by the trial's order stream."""
    model = DigitsNet(10, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        model.train()
        for xb, yb in trial.loader(batch_size=32, epoch=epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        trial.report(epoch, train_loss=0.0)
    model.eval()
    x, y = next(iter(trial.loader("test", batch_size=100_000)))
    with torch.no_grad():
        logits = model(x)
    return {
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "loss": float(nn.functional.cross_entropy(logits, y)),
        "first_weight": float(model.body[1].weight[0, 0].detach()),
    }


def fit_returns_list(trial) -> list[float]:  # type: ignore[no-untyped-def]
    return [0.5]


def fit_reads_targets(trial) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Checks what a trial function's loader yields: the labels, as class indices."""
    x, y = next(iter(trial.loader("train", batch_size=100_000)))
    assert y.dtype == torch.long and x.dtype == torch.float32, (x.dtype, y.dtype)
    expected = trial.dataset.tensors[1][torch.as_tensor(trial.train_indices)]
    return {
        "label_sum": float(y.sum()),
        "same": float(torch.equal(y.sort().values, expected.sort().values)),
    }
