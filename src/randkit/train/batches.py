"""Where the single-model trainer's batches come from: tensors in memory (indexed directly,
the fast path) or any map-style ``Dataset`` read through a ``DataLoader``, item by item in
the order the ``order`` stream drew, so the data never has to fit in memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from randkit.data import TensorData
from randkit.errors import UserError
from randkit.streams import isolated_global_rngs


class TensorBatches:
    """Batches of in-memory tensors."""

    streamed = False

    def __init__(self, data: TensorData, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size  # targets already of the task's dtype

    def epoch(
        self, order: torch.Tensor, start: int, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.batch_size
        for batch in range(start, -(-len(order) // size)):
            index = order[batch * size : (batch + 1) * size]
            yield self.data.x[index], self.data.y[index]


class DatasetBatches:
    """Batches of a ``Dataset`` through a ``DataLoader`` whose batch sampler is the epoch's
    permutation: the same batches as in memory, read by ``num_workers`` processes. A fresh
    loader per epoch seeds its workers from ``generator`` (random transforms inside the
    Dataset), so an epoch gives the same items and seeds in every run and after a resume."""

    streamed = True

    def __init__(self, data: Dataset[Any], batch_size: int, num_workers: int, task: str) -> None:
        self.data, self.batch_size, self.num_workers = data, batch_size, num_workers
        self.task = task

    def epoch(
        self, order: torch.Tensor, start: int, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.batch_size
        batches = [order[i : i + size].tolist() for i in range(start * size, len(order), size)]
        generator = generator if generator is not None else torch.Generator()
        if self.num_workers == 0:
            return self._read_here(batches, start, generator.initial_seed())
        return self._read_by_workers(batches, generator)

    def _read_here(
        self, batches: list[list[int]], start: int, base_seed: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Items read in this process, each batch with the global RNGs seeded from the
        epoch's seed and the batch number (random transforms inside the Dataset draw from
        them), so a resumed epoch reads the same items the same way."""
        for number, index in enumerate(batches, start=start):
            seed = int(np.random.SeedSequence([base_seed, number]).generate_state(2, np.uint64)[0])
            with isolated_global_rngs(seed % 2**63):
                items = [self.data[i] for i in index]
            yield pair(default_collate(items), self.task)

    def _read_by_workers(
        self, batches: list[list[int]], generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A fresh loader per epoch: its workers are seeded from ``generator`` (torch seeds
        # their torch, NumPy and Python RNGs from it).
        loader = DataLoader(
            self.data,
            batch_sampler=batches,
            num_workers=self.num_workers,
            generator=generator,
            pin_memory=False,
        )
        for batch in loader:
            yield pair(batch, self.task)


def batch_source(
    data: TensorData | Dataset[Any], batch_size: int, num_workers: int = 0, task: str = ""
) -> TensorBatches | DatasetBatches:
    if isinstance(data, TensorData):
        return TensorBatches(data, batch_size)
    return DatasetBatches(data, batch_size, num_workers, task)


def pair(batch: Any, task: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch as (inputs, targets); float64 becomes float32 (NumPy's default
    dtype meets the model's float32 weights), class labels become int64 (integer-valued
    floats are accepted as labels) and other tasks' targets float32."""
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise UserError(
            "data",
            f"items must be (input, target) pairs, got batches of {type(batch).__name__}",
        )
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError(
            "data",
            "items must collate to tensors (input, target), got "
            f"({type(x).__name__}, {type(y).__name__})",
        )
    if x.dtype == torch.float64:
        x = x.float()
    if task == "classification" and y.is_floating_point():
        y = y.long()
    elif task in ("regression", "multilabel") and y.dtype != torch.float32:
        y = y.float()
    elif y.dtype == torch.float64:
        y = y.float()
    return x, y


@torch.no_grad()
def predict(
    model: nn.Module,
    data: TensorData | Dataset[Any],
    device: torch.device,
    num_workers: int = 0,
    batch_size: int = 512,
    task: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) of ``data`` in eval mode, on the CPU, in the data's order."""
    if isinstance(data, TensorData):
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (
            (data.x[i : i + batch_size], data.y[i : i + batch_size])
            for i in range(0, len(data), batch_size)
        )
    else:
        loader = DataLoader(
            data, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator()
        )
        batches = (pair(batch, task) for batch in loader)
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        with isolated_global_rngs(0):  # a Dataset's random transforms, the same every time
            for xb, yb in batches:
                outputs.append(model(xb.to(device)).float().cpu())
                targets.append(yb)
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(targets)
