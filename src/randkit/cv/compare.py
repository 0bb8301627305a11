"""Compare two cross-validation runs of the same plan, trial by trial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from randkit.cv import stats
from randkit.errors import UserError


def _read(run: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    results, summary = run / "results.csv", run / "summary.json"
    if not results.is_file() or not summary.is_file():
        raise UserError(
            "run",
            f"{str(run)!r} is not a finished cross-validation (needs results.csv and summary.json)",
        )
    return pd.read_csv(results), json.loads(summary.read_text())


def compare_runs(
    run_a: Path, run_b: Path, metric: str | None = None, alpha: float = 0.05
) -> dict[str, Any]:
    """Paired per-trial differences A - B (B - A for loss, so positive always favours A),
    the Nadeau-Bengio corrected resampled t-test, and Dietterich's 5x2cv t-test when both
    runs are 5x2 plans."""
    table_a, summary_a = _read(run_a)
    table_b, summary_b = _read(run_b)
    metric = metric or summary_a["metric"]
    if metric not in ("accuracy", "loss", "macro_f1"):
        raise UserError("--metric", f"must be accuracy, loss or macro_f1, got {metric!r}")
    paired = table_a.merge(table_b, on="id", suffixes=("_a", "_b"))
    if len(paired) < 2 or len(paired) != len(table_a) or len(paired) != len(table_b):
        raise UserError(
            "run",
            f"the runs do not have the same trials ({len(table_a)} and "
            f"{len(table_b)} trials, {len(paired)} shared); compare needs "
            "the same cv plan",
        )
    if not (paired["seed_split_a"] == paired["seed_split_b"]).all():
        raise UserError(
            "run",
            "the runs split the data differently (seed of source 'split' "
            "differs); compare needs the same partitions",
        )
    sign = -1.0 if metric == "loss" else 1.0
    differences = sign * (paired[f"{metric}_a"] - paired[f"{metric}_b"]).to_numpy(float)
    n_train = round(paired["train_size_a"].mean())
    n_test = round(paired["test_size_a"].mean())
    corrected = stats.corrected_resampled_ttest(differences, n_train, n_test)
    names = (run_a.name, run_b.name)
    result: dict[str, Any] = {
        "metric": metric,
        "a": str(run_a),
        "b": str(run_b),
        "n_trials": len(paired),
        "mean_a": float(paired[f"{metric}_a"].mean()),
        "mean_b": float(paired[f"{metric}_b"].mean()),
        "differences": differences.tolist(),
        "corrected_t_test": corrected,
        "verdict": stats.verdict(corrected, alpha=alpha, names=names),
    }
    # Dietterich's test assumes 5 replications of 2-fold CV, each with a fresh split.
    five_by_two = all(
        s.get("splitter") == "5x2" and "split" in s.get("vary", []) and len(paired) == 10
        for s in (summary_a, summary_b)
    )
    if five_by_two:
        ordered = paired.sort_values(["repeat_a", "fold_a"])
        matrix = (sign * (ordered[f"{metric}_a"] - ordered[f"{metric}_b"])).to_numpy(float)
        result["five_by_two_t_test"] = stats.five_by_two_ttest(np.reshape(matrix, (5, 2)))
    return result
