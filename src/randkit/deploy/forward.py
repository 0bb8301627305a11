"""Forward passes whose rows do not interact, shared by every randomized-inference path.

Two rules make a row's logits the same bits in whichever batch it runs, so that a request's
outputs never depend on its batch companions, on ``batch_size`` or on the server's settings:

* every pass has at least ``MIN_FORWARD_ROWS`` rows (zero rows are appended): MKL's matrix
  products round a row differently in a batch of very few rows;
* on the CPU a convolutional model always runs on a channels-last copy (the faster layout for
  convolutions there), so the layout is the same in every pass; the caller's model is never
  changed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from randkit.randomize.modules import GLOBAL_RNG_LAYERS, STREAM_LAYERS

MIN_FORWARD_ROWS = 16


def repeat_rows(x: torch.Tensor, times: int) -> torch.Tensor:
    """``times`` copies of the batch, sample-major: rows s*N .. (s+1)*N are sample s."""
    return x.repeat(times, *([1] * (x.dim() - 1)))


def pad_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` with zero rows appended up to ``MIN_FORWARD_ROWS``."""
    missing = MIN_FORWARD_ROWS - len(rows)
    if missing <= 0:
        return rows
    return torch.cat([rows, rows.new_zeros((missing, *rows.shape[1:]))])


@contextlib.contextmanager
def layer_modes(model: nn.Module, stochastic: bool) -> Iterator[None]:
    """Eval mode inside the block, except the dropout-like layers when ``stochastic``; every
    module gets its own mode back afterwards."""
    previous = [(m, m.training) for m in model.modules()]
    model.eval()
    if stochastic:
        for module in model.modules():
            if isinstance(module, STREAM_LAYERS + GLOBAL_RNG_LAYERS):
                module.train()
    try:
        yield
    finally:
        for module, mode in previous:
            module.training = mode


class RowForward:
    """``model`` run on rows by the rules above: ``RowForward(model, "cpu")(rows, 512)``.

    ``net`` is what runs: the model itself, or its channels-last copy (taken once, here).
    """

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        self.model = model
        self.channels_last = torch.device(device).type == "cpu" and any(
            isinstance(m, nn.Conv2d) for m in model.modules()
        )
        self.net = model
        if self.channels_last:
            self.net = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def once(self, rows: torch.Tensor) -> torch.Tensor:
        """The logits of ``rows`` in one pass (a stochastic pass must not be split)."""
        padded = pad_rows(rows)
        if self.channels_last and padded.dim() == 4:
            padded = padded.contiguous(memory_format=torch.channels_last)
        return self.net(padded)[: len(rows)]

    def __call__(self, rows: torch.Tensor, max_rows: int) -> torch.Tensor:
        """The logits of ``rows``, in passes of at most ``max_rows`` rows."""
        return torch.cat([self.once(chunk) for chunk in rows.split(max(1, max_rows))])
