"""The other side of ``benchmarks/cv.py``: what a user would otherwise write (skorch +
scikit-learn ``cross_validate``), and a plain PyTorch loop as a reference point.

The networks are built here by hand with the layers of randkit's zoo ``cnn`` and ``mlp``
(``cv.py`` checks the parameter shapes match). Training: Adam at lr 1e-3, batch 64, plain
cross-entropy, shuffled batches, no validation split; a ``StandardScaler`` on the flattened
pixels in front of the network. Each fit seeds torch's global RNG (weights and batch order)
through a skorch callback, in whichever process the fit runs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback
from torch import nn

SEED = 0
BATCH_SIZE = 64
LR = 1e-3


def build_network(kind: str) -> nn.Sequential:
    """The same layers as randkit's zoo ``cnn`` / ``mlp``, on flattened 64-pixel inputs."""
    if kind == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class DigitsNet(nn.Module):
    """skorch instantiates the module class itself (per fit, after the seed is set)."""

    def __init__(self, kind: str = "cnn") -> None:
        super().__init__()
        self.net = build_network(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TorchSetup(Callback):
    """Seeds torch's global RNG (weights and batch order) and sets the thread count before
    each fit, in whichever process the fit runs."""

    def __init__(self, seed: int = SEED, threads: int | None = None) -> None:
        self.seed = seed
        self.threads = threads

    def initialize(self) -> TorchSetup:  # runs before skorch builds the module
        if self.threads:
            torch.set_num_threads(self.threads)
        torch.manual_seed(self.seed)
        return self


def baseline_estimator(model: str, epochs: int, threads: int | None, seed: int = SEED) -> Any:
    net = NeuralNetClassifier(
        DigitsNet,
        module__kind=model,
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=LR,
        max_epochs=epochs,
        batch_size=BATCH_SIZE,
        iterator_train__shuffle=True,
        train_split=None,
        callbacks=[("setup", TorchSetup(seed, threads))],
        device="cpu",
        verbose=0,
    )
    return make_pipeline(StandardScaler(), net)


def load_xy() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # StandardScaler keeps float32
    return x, digits.target.astype(np.int64)


def shutdown_workers() -> None:
    """No warm joblib workers left over for the next run."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def run_baseline(model: str, n_jobs: int, epochs: int, folds: int) -> tuple[float, float]:
    """(seconds, mean accuracy) of one whole skorch + ``cross_validate`` run."""
    start = time.perf_counter()
    x, y = load_xy()
    scores = cross_validate(
        baseline_estimator(model, epochs, threads=1 if n_jobs > 1 else None),
        x,
        y,
        cv=StratifiedKFold(folds, shuffle=True, random_state=SEED),
        scoring="accuracy",
        n_jobs=n_jobs,
    )
    seconds = time.perf_counter() - start
    if n_jobs > 1:
        shutdown_workers()
    return seconds, float(np.mean(scores["test_score"]))


def run_baseline_repeated(
    model: str, n_jobs: int, epochs: int, folds: int, repeats: int
) -> tuple[float, float]:
    """(seconds, mean accuracy) of ``repeats`` x ``folds`` skorch fits: one
    ``cross_validate`` per repeat over the same folds, torch seed ``SEED + repeat`` (init and
    batch order). With ``n_jobs`` > 1 the repeats run in parallel (1 torch thread each),
    which keeps every worker busy (per-repeat ``n_jobs`` over 5 folds would leave one idle
    while the fifth fold runs alone)."""
    start = time.perf_counter()
    x, y = load_xy()
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=SEED).split(x, y))
    threads = 1 if n_jobs > 1 else None
    calls = (
        delayed(cross_validate)(
            baseline_estimator(model, epochs, threads, seed=SEED + repeat),
            x,
            y,
            cv=splits,
            scoring="accuracy",
            n_jobs=1,
        )
        for repeat in range(repeats)
    )
    results = Parallel(n_jobs=n_jobs)(calls)
    seconds = time.perf_counter() - start
    if n_jobs > 1:
        shutdown_workers()
    return seconds, float(np.mean([r["test_score"] for r in results]))


def run_plain_loop(model: str, epochs: int, folds: int) -> tuple[float, float]:
    """(seconds, mean accuracy) of the same training written as a bare loop per fold."""
    start = time.perf_counter()
    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32))
    y = torch.from_numpy(digits.target.astype(np.int64))
    generator = torch.Generator().manual_seed(SEED)
    scores = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=SEED).split(x, y):
        train_x, train_y = x[train], y[train]
        mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
        net = build_network(model)
        optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(epochs):
            order = torch.randperm(len(train_y), generator=generator)
            for i in range(0, len(order), BATCH_SIZE):
                batch = order[i : i + BATCH_SIZE]
                loss = nn.functional.cross_entropy(
                    net((train_x[batch] - mean) / std), train_y[batch]
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            predicted = net((x[test] - mean) / std).argmax(1)
        scores.append(float((predicted == y[test]).float().mean()))
    return time.perf_counter() - start, float(np.mean(scores))


def warm_up(device: str = "cpu") -> None:
    """Pay one-time kernel and allocator set-up (on a GPU: CUDA's context and libraries)
    before any timed run."""
    x = torch.rand(BATCH_SIZE, 64, device=device)
    y = torch.randint(0, 10, (BATCH_SIZE,), device=device)
    for kind in ("cnn", "mlp"):
        net = build_network(kind).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(3):
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
