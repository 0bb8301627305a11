"""Cross-validation plans: which trials run, on which indices, with which stream levels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import (
    GroupKFold,
    KFold,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from randkit.config import CVConfig
from randkit.errors import UserError
from randkit.streams import Streams

TRAINING_SOURCES = ("init", "order", "augment", "noise", "dropout")
PLAN_SOURCES = ("split", *TRAINING_SOURCES)


@dataclass
class Trial:
    """One model fit: a fold of one partition, with a level per random source.

    Every training stream of the trial is keyed by ``(fold, level of that source)``, so a
    trial gives the same numbers whichever runner runs it, and two groups of a decomposition
    plan that ask for the same levels share the trial (same id).
    """

    fold: int
    repeat: int
    group: str
    levels: dict[str, int]
    train_idx: np.ndarray = field(repr=False)
    test_idx: np.ndarray = field(repr=False)
    # Nested CV (``cv.interval: nested``): the second fold held out; the trial trains
    # without folds ``fold`` and ``inner`` and is tested on both (randkit.cv.nested).
    inner: int | None = None

    @property
    def id(self) -> str:
        varied = "".join(f"-{s}{self.levels[s]}" for s in PLAN_SOURCES if self.levels[s])
        pair = "" if self.inner is None else f"x{self.inner}"
        return f"f{self.fold}{pair}{varied}"

    def scopes(self) -> dict[str, dict[str, int]]:
        """Extra stream coordinates of each source for this trial (an inner trial's streams
        also carry ``inner``, so they differ from every outer trial's)."""
        pair = {} if self.inner is None else {"inner": self.inner}
        scopes = {s: {"fold": self.fold, "level": self.levels[s], **pair} for s in TRAINING_SOURCES}
        scopes["split"] = {"fold": self.fold, "level": self.levels["split"], **pair}
        return scopes

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fold": self.fold,
            **({} if self.inner is None else {"inner": self.inner}),
            "repeat": self.repeat,
            "group": self.group,
            "levels": self.levels,
            "train_idx": self.train_idx.tolist(),
            "test_idx": self.test_idx.tolist(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Trial:
        return cls(
            raw["fold"],
            raw["repeat"],
            raw["group"],
            dict(raw["levels"]),
            np.asarray(raw["train_idx"], dtype=np.int64),
            np.asarray(raw["test_idx"], dtype=np.int64),
            raw.get("inner"),
        )


def make_splitter(cfg: CVConfig, random_state: int) -> Any:
    """A scikit-learn splitter for one repeat (any object with ``split(X, y, groups)``)."""
    seed = random_state % 2**32
    folds = 2 if cfg.splitter == "5x2" else cfg.folds
    if cfg.splitter == "kfold":
        return KFold(folds, shuffle=True, random_state=seed)
    if cfg.splitter in ("stratified_kfold", "5x2"):
        return StratifiedKFold(folds, shuffle=True, random_state=seed)
    if cfg.splitter == "group_kfold":
        return GroupKFold(folds, shuffle=True, random_state=seed)
    if cfg.splitter == "stratified_group_kfold":
        return StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return StratifiedShuffleSplit(folds, test_size=cfg.test_fraction, random_state=seed)


def _repeat_levels(cfg: CVConfig) -> list[tuple[str, int, dict[str, int]]]:
    """(group, repeat, levels) for every repeat of the plan."""
    repeats = 5 if cfg.splitter == "5x2" else cfg.repeats
    base = dict.fromkeys(PLAN_SOURCES, 0)
    if not cfg.decompose:
        return [
            ("main", r, {s: (r if s in cfg.vary else 0) for s in PLAN_SOURCES})
            for r in range(repeats)
        ]
    return [
        (f"vary:{source}", r, {**base, source: r}) for source in cfg.vary for r in range(repeats)
    ]


@dataclass
class Plan:
    """Unique trials in run order, and the cells of the design: (group, repeat, fold) -> trial
    id (a decomposition plan reuses its baseline trial in every group)."""

    trials: list[Trial]
    cells: list[dict[str, Any]]
    holdout: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to_json(self) -> dict[str, Any]:
        return {
            "trials": [t.to_json() for t in self.trials],
            "cells": self.cells,
            "holdout": self.holdout.tolist(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Plan:
        holdout = np.asarray(raw.get("holdout", []), dtype=np.int64)
        return cls([Trial.from_json(t) for t in raw["trials"]], raw["cells"], holdout)


def make_plan(
    cfg: CVConfig,
    targets: np.ndarray,
    groups: np.ndarray | None,
    streams: Streams,
    splitter: Any | None = None,
) -> Plan:
    """Every trial of the plan; with ``cfg.holdout_fraction``, a stratified held-out part
    (stream ``split``, ``part=holdout``) is cut first and the folds cover the rest."""
    if cfg.holdout_fraction == 0:
        return _make_plan(cfg, targets, groups, streams, splitter)
    from randkit.data.base import stratified_holdout

    keep, held = stratified_holdout(
        targets, cfg.holdout_fraction, streams.seed("split", part="holdout"), "cv.holdout_fraction"
    )
    plan = _make_plan(
        cfg, targets[keep], None if groups is None else groups[keep], streams, splitter
    )
    for trial in plan.trials:  # indices of the subset back to indices of the whole data set
        trial.train_idx, trial.test_idx = keep[trial.train_idx], keep[trial.test_idx]
    plan.holdout = held
    return plan


def _make_plan(
    cfg: CVConfig,
    targets: np.ndarray,
    groups: np.ndarray | None,
    streams: Streams,
    splitter: Any | None = None,
) -> Plan:
    """Every trial of the plan, in a fixed order, without duplicates.

    ``splitter`` (any scikit-learn splitter object) replaces the configured one; it is used
    as given for every repeat (set its ``random_state`` yourself).
    """
    if cfg.splitter in ("group_kfold", "stratified_group_kfold") and groups is None:
        raise UserError(
            "cv.splitter",
            f"{cfg.splitter!r} needs group labels (data.group_column for CSV, a 'groups' "
            "array in .npz)",
        )
    x_placeholder = np.zeros((len(targets), 1))
    partitions: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    trials: dict[str, Trial] = {}
    cells: list[dict[str, Any]] = []
    for group, repeat, levels in _repeat_levels(cfg):
        level = levels["split"]
        if level not in partitions:
            chosen = splitter or make_splitter(cfg, streams.seed("split", level=level))
            try:
                partitions[level] = [
                    (np.sort(a), np.sort(b))
                    for a, b in chosen.split(x_placeholder, targets, groups)
                ]
            except ValueError as exc:
                # Name the splitter that failed: the user's object when one was given.
                field, name = ("splitter", repr(splitter)) if splitter else ("cv.folds", "")
                name = name or f"{cfg.splitter}, {cfg.folds} folds"
                hint = (
                    "; give group labels (groups=)"
                    if groups is None and "group" in str(exc)
                    else ""
                )
                raise UserError(
                    field,
                    f"cannot split {len(targets)} examples ({name}): {str(exc).rstrip('.')}{hint}",
                ) from None
        for fold, (train_idx, test_idx) in enumerate(partitions[level]):
            trial = Trial(fold, repeat, group, dict(levels), train_idx, test_idx)
            trials.setdefault(trial.id, trial)
            cells.append({"group": group, "repeat": repeat, "fold": fold, "id": trial.id})
        if cfg.interval == "nested":
            for trial in _inner_trials(partitions[level], repeat, levels):
                trials.setdefault(trial.id, trial)
                cells.append({"group": "nested", "repeat": repeat, "fold": trial.fold,
                              "inner": trial.inner, "id": trial.id})  # fmt: skip
    return Plan(list(trials.values()), cells)


def _inner_trials(
    partition: list[tuple[np.ndarray, np.ndarray]], repeat: int, levels: dict[str, int]
) -> list[Trial]:
    """Nested CV's inner fits of one repeat (Bates, Hastie & Tibshirani 2024, Algorithm 1):
    one trial per pair of folds k < j, trained without both and tested on both. The fit
    without {k, j} is inner fold j of outer fold k and inner fold k of outer fold j (the same
    training items), so each pair is trained once, as in the authors' reference code."""
    tests = [test for _, test in partition]
    every = np.sort(np.concatenate(tests))
    out = []
    for k in range(len(tests)):
        for j in range(k + 1, len(tests)):
            held = np.union1d(tests[k], tests[j])
            train = np.setdiff1d(every, held, assume_unique=True)
            out.append(Trial(k, repeat, "nested", dict(levels), train, held, inner=j))
    return out
