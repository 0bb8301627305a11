"""Trial functions: cross-validate the user's own training loop.

``randkit.cross_validate(data=..., fit=fit_and_score)`` calls ``fit_and_score(trial)`` once
per trial of the plan, with a ``Trial``: the fold's indices and ``Subset`` views, the trial's
named random streams, its own folder and ``report`` for learning curves. The returned
``{name: number}`` becomes the trial's row of ``results.csv``; plans, runners, the run store,
resume, statistics, ``compare`` and the report are the same as for the built-in trainer.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from randkit import atomic
from randkit.cv.plan import PLAN_SOURCES
from randkit.cv.plan import Trial as PlanTrial
from randkit.errors import UserError
from randkit.streams import ScopedStreams, isolated_global_rngs

TrialFunction = Callable[["Trial"], Mapping[str, Any]]

# Columns of results.csv that a metric may not take.
RESERVED_COLUMNS = frozenset(
    {"id", "fold", "repeat", "group", "train_size", "test_size", "fit_seconds"}
    | {f"seed_{source}" for source in PLAN_SOURCES}
)


@dataclass
class Trial:
    """What a trial function gets: one fold of one repeat of the plan.

    ``streams`` are the trial's named streams with its level of every source already applied:
    ``trial.streams.torch("order", epoch=e)`` is the generator of epoch ``e``'s batch order,
    the same in every runner and on every rerun. ``dir`` is the trial's own folder (for its
    checkpoints); it survives a crash, so a resumed run can pick up where it stopped.
    """

    id: str
    fold: int
    repeat: int
    group: str
    levels: dict[str, int]
    train_indices: np.ndarray
    test_indices: np.ndarray
    dataset: Dataset[Any]
    streams: ScopedStreams
    dir: Path
    val_indices: np.ndarray | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    # The run's progress bar hears of each reported epoch; not part of the trial's data.
    on_report: Callable[[dict[str, float]], None] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def train(self) -> Subset[Any]:
        """The training part (without ``val`` when the run holds one out)."""
        return Subset(self.dataset, self.train_indices.tolist())

    @property
    def test(self) -> Subset[Any]:
        return Subset(self.dataset, self.test_indices.tolist())

    @property
    def val(self) -> Subset[Any] | None:
        """The validation part cut from the training fold (``cv.inner_val_fraction``)."""
        if self.val_indices is None:
            return None
        return Subset(self.dataset, self.val_indices.tolist())

    def seed(self, source: str, **coords: int | str) -> int:
        """A 63-bit seed of ``source`` at ``coords`` (for libraries that take an int)."""
        return self.streams.seed(source, **coords)

    def generator(
        self, source: str, *, device: str | torch.device = "cpu", **coords: int | str
    ) -> torch.Generator:
        """A fresh torch generator of ``source`` at ``coords`` (same as ``streams.torch``)."""
        return self.streams.torch(source, device=device, **coords)

    def loader(
        self, part: str = "train", *, batch_size: int, epoch: int = 0, **options: Any
    ) -> DataLoader[Any]:
        """A ``DataLoader`` over ``part``; the training part is shuffled by the ``order``
        stream of ``epoch`` (make one loader per epoch), the others keep their order."""
        subset = {"train": self.train, "val": self.val, "test": self.test}.get(part)
        if subset is None:
            raise UserError("part", f"must be 'train', 'test' or a held-out 'val', got {part!r}")
        if part == "train":
            options.setdefault("shuffle", True)
            options.setdefault("generator", self.generator("order", epoch=epoch))
        return DataLoader(subset, batch_size=batch_size, **options)

    def report(self, epoch: int, **metrics: float) -> None:
        """Record one epoch of learning curves (``history`` of the trial's record); written
        to ``dir/history.json`` at once, so a long trial can be watched."""
        row: dict[str, float] = {"epoch": int(epoch)}
        for name, value in metrics.items():
            row[name] = _number(value, f"report.{name}")
        self.history.append(row)
        atomic.write_json(self.dir / "history.json", self.history)
        if self.on_report is not None:
            self.on_report(row)


def _number(value: Any, field_name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(field_name, f"must be a number, got {type(value).__name__} {value!r:.60}")
    return float(value)


def scores_of(returned: Any) -> dict[str, float]:
    """The trial function's result as ``{name: float}``: refused in one line otherwise."""
    if not isinstance(returned, Mapping) or not returned:
        raise UserError(
            "fit",
            "must return a non-empty dict of metric names to numbers, e.g. {'accuracy': 0.9}, "
            f"got {type(returned).__name__} {returned!r:.60}",
        )
    scores = {}
    for name, value in returned.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise UserError("fit", f"metric names must be identifiers, got {name!r}")
        if name in RESERVED_COLUMNS:
            raise UserError("fit", f"returned {name!r}, a column of results.csv; rename it")
        scores[name] = _number(value, f"fit result {name!r}")
        if not math.isfinite(scores[name]):
            raise UserError("fit", f"returned {name}={scores[name]} (not finite)")
    return scores


def seeded_global_rngs(streams: ScopedStreams) -> contextlib.AbstractContextManager[None]:
    """Seed torch's, NumPy's and Python's global RNGs from the trial's ``init`` stream for the
    duration of a trial function and restore them afterwards: user code that draws from them
    (``nn.Dropout``, default initialization, a shuffling ``DataLoader`` without generator)
    then gives the same numbers in every runner and process."""
    return isolated_global_rngs(streams.seed("init", what="global"))


def record_head(
    plan_trial: PlanTrial, streams: ScopedStreams, train_size: int, test_size: int
) -> dict[str, Any]:
    """What every trial record starts with: where the trial sits in the plan, the seed of
    each source and the sizes of its parts."""
    return {
        "id": plan_trial.id,
        "fold": plan_trial.fold,
        "repeat": plan_trial.repeat,
        "group": plan_trial.group,
        "levels": dict(plan_trial.levels),
        "seeds": {source: streams.seed(source) for source in PLAN_SOURCES},
        "train_size": train_size,
        "test_size": test_size,
    }


def run_fit_trial(
    fit: TrialFunction,
    dataset: Dataset[Any],
    plan_trial: PlanTrial,
    streams: ScopedStreams,
    out: Path,
    val_indices: tuple[np.ndarray, np.ndarray] | None = None,
    on_report: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run ``fit`` on one trial and return its record (``trials/<id>/metrics.json``).
    ``val_indices``: (train, val) when the run cuts a validation part from the fold;
    ``on_report``: told of every epoch the trial reports (the progress bar)."""
    train_idx, val_idx = val_indices if val_indices is not None else (plan_trial.train_idx, None)
    folder = out / "trials" / plan_trial.id
    folder.mkdir(parents=True, exist_ok=True)
    trial = Trial(
        id=plan_trial.id,
        fold=plan_trial.fold,
        repeat=plan_trial.repeat,
        group=plan_trial.group,
        levels=dict(plan_trial.levels),
        train_indices=train_idx,
        test_indices=plan_trial.test_idx,
        dataset=dataset,
        streams=streams,
        dir=folder,
        val_indices=val_idx,
        on_report=on_report,
    )
    started = time.perf_counter()
    with seeded_global_rngs(streams):
        returned = fit(trial)
    fit_seconds = time.perf_counter() - started
    return {
        **record_head(plan_trial, streams, len(train_idx), len(trial.test_indices)),
        "test": scores_of(returned),
        "history": trial.history,
        "fit_seconds": round(fit_seconds, 4),
    }
