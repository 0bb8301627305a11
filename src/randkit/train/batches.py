"""Where the single-model trainer's batches come from: tensors in memory (indexed directly,
the fast path) or any map-style ``Dataset`` read through a ``DataLoader``, item by item in
the order the ``order`` stream drew, so the data never has to fit in memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from randkit.data import TensorData
from randkit.errors import UserError


class TensorBatches:
    """Batches of in-memory tensors."""

    streamed = False

    def __init__(self, data: TensorData, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

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

    def __init__(self, data: Dataset[Any], batch_size: int, num_workers: int) -> None:
        self.data, self.batch_size, self.num_workers = data, batch_size, num_workers

    def epoch(
        self, order: torch.Tensor, start: int, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.batch_size
        batches = [order[i : i + size].tolist() for i in range(start * size, len(order), size)]
        return self._read(batches, generator)

    def _read(
        self, batches: list[list[int]], generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            self.data,
            batch_sampler=batches,
            num_workers=self.num_workers,
            generator=generator,
            pin_memory=False,
        )
        for batch in loader:
            yield pair(batch)


def batch_source(
    data: TensorData | Dataset[Any], batch_size: int, num_workers: int = 0
) -> TensorBatches | DatasetBatches:
    if isinstance(data, TensorData):
        return TensorBatches(data, batch_size)
    return DatasetBatches(data, batch_size, num_workers)


def pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch as (inputs, targets); float64 becomes float32 (NumPy's default
    dtype meets the model's float32 weights)."""
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
    if y.dtype == torch.float64:
        y = y.float()
    return x, y


@torch.no_grad()
def predict(
    model: nn.Module,
    data: TensorData | Dataset[Any],
    device: torch.device,
    num_workers: int = 0,
    batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) of ``data`` in eval mode, on the CPU, in the data's order."""
    if isinstance(data, TensorData):
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (
            (data.x[i : i + batch_size], data.y[i : i + batch_size])
            for i in range(0, len(data), batch_size)
        )
    else:
        loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers)
        batches = (pair(batch) for batch in loader)
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        for xb, yb in batches:
            outputs.append(model(xb.to(device)).float().cpu())
            targets.append(yb)
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(targets)
