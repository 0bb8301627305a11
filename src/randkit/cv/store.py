"""The run directory of a cross-validation: plan, finished trials, results table, summary.

Layout: ``config.yaml``, ``plan.json``, ``trials/<id>/{metrics.json, model.safetensors}``,
``results.csv``, ``summary.json``, ``report.html``. A trial is finished when its
``metrics.json`` exists (written last, atomically); a rerun skips finished trials.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from randkit import atomic
from randkit.config import ExperimentConfig
from randkit.cv.plan import PLAN_SOURCES, Plan
from randkit.errors import UserError

_log = logging.getLogger(__name__)

# Where trials run does not change what they compute: a run may be resumed with another runner.
RUNNER_FIELDS = ("cv.runner", "cv.workers", "cv.address", "cv.retries", "cv.threads_per_trial")

ID_COLUMNS = [
    "id",
    "fold",
    "repeat",
    "group",
    *[f"seed_{s}" for s in PLAN_SOURCES],
    "train_size",
    "test_size",
]


class ResultTable:
    """One row per trial, in plan order; ``table["accuracy"]`` is that column as a NumPy array.

    A light table so that the core install needs no pandas; ``to_pandas()`` gives a DataFrame
    when pandas is installed.

    >>> table = ResultTable(["id", "accuracy"], [{"id": "f0r0", "accuracy": 0.75}])
    >>> len(table), float(table["accuracy"].mean()), table["id"].tolist()
    (1, 0.75, ['f0r0'])
    """

    def __init__(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        self.columns = list(columns)
        # A value a record lacks is NaN, as in a DataFrame built from the same rows.
        self.rows = [{c: row.get(c, math.nan) for c in self.columns} for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __contains__(self, column: object) -> bool:
        return column in self.columns

    def __getitem__(self, column: str) -> np.ndarray:
        if column not in self.columns:
            raise KeyError(f"no column {column!r}; columns are {self.columns}")
        return np.array([row[column] for row in self.rows])

    def __repr__(self) -> str:
        return f"ResultTable({len(self)} rows, columns {self.columns})"

    def to_csv(self) -> str:
        """CSV text with a header row; NaN is an empty field."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if _is_nan(row[c]) else row[c] for c in self.columns])
        return buffer.getvalue()

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (needs pandas installed)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("ResultTable.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.rows, columns=self.columns)


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _recorded_threads(
    cfg: ExperimentConfig, recorded: int | None, default: int, plan_path: Path
) -> int:
    """The threads per trial of a run: fixed when the run starts and kept in ``plan.json``,
    because a trial's float sums (hence its weights' bits) depend on the thread count."""
    if recorded is None:  # a new run, or one started before the value was recorded
        return default
    asked = cfg.cv.threads_per_trial
    if asked is not None and asked != recorded:
        _log.warning(
            "cv.threads_per_trial %d ignored: this run was started with %d threads per trial "
            "(recorded in %s), kept so that resumed trials give the same bits; --restart to "
            "change it",
            asked,
            recorded,
            plan_path,
        )
    return int(recorded)


class RunStore:
    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def prepare(
        self, cfg: ExperimentConfig, plan: Plan, restart: bool, data_hash: str, threads: int
    ) -> int:
        """Create or reopen the run; a run of another config is refused. Returns the threads
        per trial: ``threads`` for a new run, the recorded value for a reopened one."""
        if self.out.exists() and not self.out.is_dir():
            raise UserError("out", f"{str(self.out)!r} exists and is not a directory")
        plan_path = self.out / "plan.json"
        previous: dict[str, Any] = {}
        if restart and self.out.is_dir():
            self._clear()
        elif plan_path.is_file():
            try:
                previous = json.loads(plan_path.read_text())
            except json.JSONDecodeError:
                raise UserError("out", f"{str(plan_path)!r} is unreadable; use --restart") from None
            if previous.get("config_hash") != cfg.fingerprint(ignore=RUNNER_FIELDS):
                raise UserError(
                    "out",
                    f"{str(self.out)!r} holds a cross-validation of a different config; "
                    "use --restart or another --out",
                )
            same_trials = previous.get("trials") == [t.to_json() for t in plan.trials]
            same_holdout = previous.get("holdout", []) == plan.holdout.tolist()
            if previous.get("data_hash") != data_hash or not (same_trials and same_holdout):
                raise UserError(
                    "out",
                    f"{str(self.out)!r} holds a cross-validation of other data or another "
                    "split (the examples or the trials' indices differ); use --restart or "
                    "another --out",
                )
        threads = _recorded_threads(cfg, previous.get("threads_per_trial"), threads, plan_path)
        self.out.mkdir(parents=True, exist_ok=True)
        for folder in (self.out, *(self.out / "trials").glob("*/")):
            atomic.remove_stale_temps(folder)  # a process killed mid-write left them
        atomic.write_yaml(self.out / "config.yaml", cfg.resolved())
        atomic.write_json(
            plan_path,
            {
                "config_hash": cfg.fingerprint(ignore=RUNNER_FIELDS),
                "data_hash": data_hash,
                "threads_per_trial": threads,
                **plan.to_json(),
            },
            compact=True,  # thousands of indices
        )
        return threads

    def _clear(self) -> None:
        """``--restart``: the run's own files go, anything else in the folder stays."""
        for name in (
            "trials",
            "plan.json",
            "results.csv",
            "summary.json",
            "report.html",
            "config.yaml",
        ):
            target = self.out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def finished(self) -> dict[str, dict[str, Any]]:
        """Records of the trials already done (a damaged record counts as not done)."""
        done = {}
        for path in sorted((self.out / "trials").glob("*/metrics.json")):
            try:
                record = json.loads(path.read_text())
                done[record["id"]] = record
            except (json.JSONDecodeError, KeyError):
                continue
        return done

    def write_results(self, plan: Plan, records: dict[str, dict[str, Any]]) -> ResultTable:
        """``results.csv``: one row per trial in plan order."""
        rows = []
        for trial in plan.trials:
            record = records[trial.id]
            rows.append(
                {
                    "id": trial.id,
                    "fold": trial.fold,
                    "repeat": trial.repeat,
                    "group": trial.group,
                    **{f"seed_{s}": record["seeds"][s] for s in PLAN_SOURCES},
                    "train_size": record["train_size"],
                    "test_size": record["test_size"],
                    **record["test"],
                    "fit_seconds": record["fit_seconds"],
                }
            )
        metrics = [m for m in records[plan.trials[0].id]["test"] if m not in ID_COLUMNS]
        table = ResultTable([*ID_COLUMNS, *metrics, "fit_seconds"], rows)
        atomic.write_text(self.out / "results.csv", table.to_csv())
        return table

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_json(self.out / "summary.json", summary)
