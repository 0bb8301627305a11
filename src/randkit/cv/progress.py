"""The progress bar of a cross-validation: one unit per epoch of every trial.

Runners report each finished epoch as ``on_epoch(trial_id, history_row)`` (``RunContext.
on_epoch``) and each finished trial through ``on_done``. Workers in other processes or on Ray
send their epochs back through a queue (``epoch_sender``/``drain``): events are pushed as they
happen, need no shared file system (a Ray cluster may have none) and cost nothing when the
bar is off, where polling ``history.json`` files would need the trainer to write one per epoch.

Example::

    with cv_progress(quiet=False, trials=10, done=0, epochs=5) as bar:
        bar.epoch("r0-f0", {"epoch": 1, "train_loss": 0.7})
        bar.trial_done({"id": "r0-f0", "history": [...]})
"""

from __future__ import annotations

import contextlib
import math
import queue
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

EpochHook = Callable[[str, dict[str, Any]], None]  # (trial id, the epoch's history row)

# Which value of a history row the bar shows as "loss", first found first.
_LOSS_KEYS = ("train_loss", "loss", "val_loss")


def latest_loss(row: dict[str, Any]) -> float | None:
    """The training loss of one history row (a trial function may name it ``loss``)."""
    for key in _LOSS_KEYS:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


class CVProgress:
    """A rich bar over ``trials * epochs`` epoch units (``epochs`` None: a trial function's
    count is unknown, so one unit per trial), with trials done, the latest loss and the time
    left. Every update renders at once, so no epoch is skipped on a slow terminal."""

    def __init__(self, progress: Progress, trials: int, done: int, epochs: int | None) -> None:
        self.progress, self.trials, self.done = progress, trials, done
        self.per_trial = epochs or 1
        self.by_epoch = epochs is not None
        self.seen: dict[str, int] = {}  # epochs counted per running trial
        self.finished: set[str] = set()
        self.task = progress.add_task(
            "", total=trials * self.per_trial, completed=done * self.per_trial,
            trials=f"{done}/{trials}", loss="-",
        )  # fmt: skip

    def epoch(self, trial_id: str, row: dict[str, Any]) -> None:
        """One epoch of ``trial_id`` ended (late events of a finished trial are dropped)."""
        if trial_id in self.finished:
            return
        loss = latest_loss(row)
        fields: dict[str, Any] = {"loss": f"{loss:.4f}" if loss is not None else "-"}
        if self.by_epoch and self.seen.get(trial_id, 0) < self.per_trial:
            self.seen[trial_id] = self.seen.get(trial_id, 0) + 1
            fields["advance"] = 1
        self.progress.update(self.task, refresh=True, **fields)

    def trial_done(self, record: dict[str, Any]) -> None:
        """A trial finished: count it, and the epochs early stopping left out."""
        tid = str(record["id"])
        self.finished.add(tid)
        self.done += 1
        rest = self.per_trial - self.seen.pop(tid, 0) if self.by_epoch else 1
        loss = next((latest_loss(r) for r in reversed(record.get("history") or [])), None)
        fields: dict[str, Any] = {"trials": f"{self.done}/{self.trials}"}
        if loss is not None and math.isfinite(loss):
            fields["loss"] = f"{loss:.4f}"
        self.progress.update(self.task, advance=rest, refresh=True, **fields)


def _columns(by_epoch: bool) -> tuple[Any, ...]:
    unit = "epochs" if by_epoch else "trials"
    return (
        TextColumn("[bold]cv[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        # A bar of trials shows their count already.
        TextColumn(
            ("trials {task.fields[trials]}  " if by_epoch else "") + "loss {task.fields[loss]}"
        ),
        TimeElapsedColumn(),
        TextColumn("elapsed"),
        TimeRemainingColumn(),
        TextColumn("left"),
    )


@contextlib.contextmanager
def cv_progress(
    quiet: bool, trials: int, done: int, epochs: int | None, console: Console | None = None
) -> Iterator[CVProgress | None]:
    """The run's bar, or None when ``quiet`` (nothing is printed, no queue is made)."""
    if quiet:
        yield None
        return
    with Progress(*_columns(epochs is not None), console=console) as progress:
        yield CVProgress(progress, trials, done, epochs)


def epoch_sender(channel: Any) -> EpochHook | None:
    """In a worker: an ``on_epoch`` that puts events on ``channel`` (a multiprocessing or
    Ray queue), or None without one."""
    if channel is None:
        return None

    def send(trial_id: str, row: dict[str, Any]) -> None:
        channel.put((trial_id, dict(row)))

    return send


def drain(channel: Any, on_epoch: EpochHook | None) -> None:
    """In the parent: hand every event waiting on a multiprocessing queue to ``on_epoch``."""
    if channel is None or on_epoch is None:
        return
    while True:
        try:
            trial_id, row = channel.get_nowait()
        except queue.Empty:
            return
        on_epoch(trial_id, row)
