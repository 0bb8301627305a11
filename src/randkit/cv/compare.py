"""Compare two cross-validation runs of the same plan, trial by trial."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from randkit.cv import bayes, stats
from randkit.cv.intervals import metric_range
from randkit.errors import UserError
from randkit.train.tasks import metric_direction

_NEEDED = ("id", "fold", "repeat", "seed_split", "train_size", "test_size")


def _read(run: Path) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """The rows of ``results.csv`` by trial id (fields as written) and ``summary.json``."""
    results, summary = run / "results.csv", run / "summary.json"
    if not results.is_file() or not summary.is_file():
        raise UserError(
            "run",
            f"{str(run)!r} is not a finished cross-validation (needs results.csv and summary.json)",
        )
    with open(results, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        lacking = [c for c in _NEEDED if c not in (reader.fieldnames or [])]
        if lacking:
            raise UserError("run", f"{str(results)!r} has no column {lacking[0]!r}")
        rows = {row["id"]: row for row in reader}
    return rows, json.loads(summary.read_text())


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    """One numeric column of the paired rows (an empty field is NaN, as pandas reads it)."""
    if rows and name not in rows[0]:
        metrics = [c for c in rows[0] if c not in (*_NEEDED, "group", "fit_seconds")]
        metrics = [c for c in metrics if not c.startswith("seed_")]
        raise UserError(
            "--metric", f"the runs' results.csv has no column {name!r}; it has {metrics}"
        )
    return np.array([float(row[name] or "nan") for row in rows])


def compare_runs(
    run_a: Path,
    run_b: Path,
    metric: str | None = None,
    alpha: float = 0.05,
    rope: float | None = None,
) -> dict[str, Any]:
    """Paired per-trial differences A - B (B - A for losses and errors, so positive always
    favours A), on any metric both runs report,
    the Nadeau-Bengio corrected resampled t-test, Dietterich's 5x2cv t-test when both
    runs are 5x2 plans, and the Bayesian correlated t-test with a region of practical
    equivalence ``[-rope, rope]`` (default: ``bayes.default_rope``)."""
    if rope is not None and (not math.isfinite(rope) or rope < 0):
        raise UserError("--rope", f"must be a non-negative number, got {rope!r}")
    table_a, summary_a = _read(run_a)
    table_b, summary_b = _read(run_b)
    metric = metric or summary_a["metric"]
    shared = [tid for tid in table_a if tid in table_b]
    paired_a, paired_b = [table_a[t] for t in shared], [table_b[t] for t in shared]
    if len(shared) < 2 or len(shared) != len(table_a) or len(shared) != len(table_b):
        raise UserError(
            "run",
            f"the runs do not have the same trials ({len(table_a)} and "
            f"{len(table_b)} trials, {len(shared)} shared); compare needs "
            "the same cv plan",
        )
    if any(a["seed_split"] != b["seed_split"] for a, b in zip(paired_a, paired_b, strict=True)):
        raise UserError(
            "run",
            "the runs split the data differently (seed of source 'split' "
            "differs); compare needs the same partitions",
        )
    # Losses and errors (rmse, mae, ...) improve downwards.
    sign = -1.0 if metric_direction(metric) == "min" else 1.0
    scores_a, scores_b = _column(paired_a, metric), _column(paired_b, metric)
    differences = sign * (scores_a - scores_b)
    n_train = round(_column(paired_a, "train_size").mean())
    n_test = round(_column(paired_a, "test_size").mean())
    corrected = stats.corrected_resampled_ttest(differences, n_train, n_test)
    names = (run_a.name, run_b.name)
    result: dict[str, Any] = {
        "metric": metric,
        "a": str(run_a),
        "b": str(run_b),
        "n_trials": len(shared),
        "mean_a": float(scores_a.mean()),
        "mean_b": float(scores_b.mean()),
        "differences": differences.tolist(),
        "corrected_t_test": corrected,
        "verdict": stats.verdict(corrected, alpha=alpha, names=names),
    }
    result["bayesian_correlated_t_test"] = _bayesian(
        metric, differences, (scores_a, scores_b), (n_train, n_test), rope
    )
    result["bayesian_verdict"] = bayes.bayesian_verdict(
        result["bayesian_correlated_t_test"], names=names
    )
    # Dietterich's test assumes 5 replications of 2-fold CV, each with a fresh split.
    five_by_two = all(
        s.get("splitter") == "5x2" and "split" in s.get("vary", []) and len(shared) == 10
        for s in (summary_a, summary_b)
    )
    if five_by_two:
        order = sorted(range(len(shared)), key=lambda i: _repeat_fold(paired_a[i]))
        matrix = differences[order]
        result["five_by_two_t_test"] = stats.five_by_two_ttest(np.reshape(matrix, (5, 2)))
    return result


def _bayesian(
    metric: str,
    differences: np.ndarray,
    scores: tuple[np.ndarray, np.ndarray],
    sizes: tuple[float, float],
    rope: float | None,
) -> dict[str, Any]:
    """The Bayesian correlated t-test, with the default ROPE of the metric when none given."""
    mean_a, mean_b = float(scores[0].mean()), float(scores[1].mean())
    bounded = metric_range(metric, np.concatenate(scores)) is not None
    chosen = "given (--rope)"
    if rope is None:
        rope, chosen = bayes.default_rope(bounded, mean_a, mean_b)
    result = bayes.bayesian_correlated_ttest(differences, sizes[0], sizes[1], rope)
    result["rope_chosen"] = chosen
    return result


def _repeat_fold(row: dict[str, str]) -> tuple[int, int]:
    return int(row["repeat"]), int(row["fold"])
