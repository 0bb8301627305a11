"""The stacked trainer's batches and dropout numbers: each model's rows from its own order
and streams, padded to one (K, width, ...) tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

from randkit.randomize import Randomization
from randkit.randomize.modules import draw_numbers
from randkit.train import rules

NEUTRAL = {"uniform": 1.0, "normal": 0.0}  # a padded row keeps its activation unchanged
Calls = list[tuple[str, tuple[int, ...], torch.dtype]]


def pad(t: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    if len(t) == rows:
        return t
    filler = torch.full((rows - len(t), *t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, filler])


class Recorder:
    """Records what the stochastic layers ask for (kind, shape, dtype), answering neutrally."""

    def __init__(self) -> None:
        self.calls: Calls = []

    def draw(
        self, kind: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        self.calls.append((kind, shape, dtype))
        return (torch.ones if kind == "uniform" else torch.zeros)(shape, device=device, dtype=dtype)


class PreDrawn:
    """Hands out numbers drawn before ``vmap``, one tensor per layer call, in order."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)

    def draw(
        self, kind: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        return self.tensors.pop(0)


def dropout_draws(
    runs: Sequence[Any], rows: list[int], keys: list[dict[str, int]], calls: Calls, device: Any
) -> list[torch.Tensor]:
    """Per layer call, the K models' numbers from their own dropout streams (the same numbers
    the layer would draw in the single-model trainer), padded neutrally; one (K, width, ...)
    tensor per call."""
    if not calls:
        return []
    per_call: list[list[torch.Tensor]] = [[] for _ in calls]
    for run, r, key in zip(runs, rows, keys, strict=True):
        generator = rules.dropout_generator(run.member.streams, key, device) if r else None
        for i, (kind, shape, dtype) in enumerate(calls):
            if generator is None:
                values = torch.empty((0, *shape[1:]), device=device, dtype=dtype)
            else:
                own = (r, *shape[1:])
                values = draw_numbers(kind, own, generator, device, dtype)
            per_call[i].append(pad(values, shape[0], NEUTRAL[kind]))
    return [torch.stack(parts) for parts in per_call]


def per_model_batch(
    runs: Sequence[Any],
    rows: list[int],
    keys: list[dict[str, int]],
    batch: int,
    plan: Randomization,
    num_classes: int,
    device: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, target, label) of one step, each model's rows gathered, augmented and noised from
    its own streams; ``label`` -1 marks a padded row."""
    xs, targets, labels = [], [], []
    for run, r, key in zip(runs, rows, keys, strict=True):
        size = run.batch_size
        index = run.order[batch * size : batch * size + r]
        x, y = run.x[index.to(run.x.device)], run.y[index.to(run.y.device)]
        t = rules.randomize_inputs(plan, run.member.streams, x, y, key, device) if r else (x, y)
        xs.append(t[0])
        targets.append(t[1])
        labels.append(y)
    width = max(rows)
    if any(t.dim() == 2 for t in targets):  # mixed labels somewhere: all as probabilities
        targets = [t if t.dim() == 2 else F.one_hot(t, num_classes).float() for t in targets]
    x = torch.stack([pad(t, width) for t in xs])
    target = torch.stack([pad(t, width) for t in targets])
    label = torch.stack([pad(t, width, -1) for t in labels])
    return x, target, label


class SharedPool:
    """Every model's training examples in one tensor, plus a zero row labelled -1 for
    padding: when batches need no per-model randomization, one index op per step gathers
    all K batches instead of K gathers, pads and stacks."""

    def __init__(self, runs: Sequence[Any], device: Any) -> None:
        xs = [run.x for run in runs]
        pad_x = torch.zeros((1, *xs[0].shape[1:]), dtype=xs[0].dtype, device=device)
        pad_y = torch.full((1,), -1, dtype=runs[0].y.dtype, device=device)
        self.offsets = [0]
        for x in xs:
            self.offsets.append(self.offsets[-1] + len(x))
        self.x = torch.cat([*(x.to(device) for x in xs), pad_x])
        self.y = torch.cat([*(run.y.to(device) for run in runs), pad_y])
        self.device = device
        self.index: torch.Tensor | None = None

    @staticmethod
    def usable(runs: Sequence[Any], plan: Randomization) -> bool:
        if plan.augment is not None or plan.input_noise is not None:
            return False
        first = runs[0].x
        return all(r.x.shape[1:] == first.shape[1:] and r.x.dtype == first.dtype for r in runs)

    def start_epoch(self, runs: Sequence[Any], steps: int, size: int) -> None:
        """(K, steps * size): this epoch's example indices into the pool, in each model's
        order; the padding row's index where a model has no example."""
        index = torch.full((len(runs), steps * size), len(self.y) - 1, dtype=torch.long)
        for k, run in enumerate(runs):
            if run.running:
                index[k, : len(run.order)] = run.order + self.offsets[k]
        self.index = index.to(self.device)

    def batch(
        self, batch: int, size: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, target, label) of step ``batch``, ``width`` rows per model."""
        assert self.index is not None
        index = self.index[:, batch * size : batch * size + width]
        flat = index.reshape(-1)
        label = self.y.index_select(0, flat).view(index.shape)
        x = self.x.index_select(0, flat).view(*index.shape, *self.x.shape[1:])
        return x, label.clamp(min=0), label
