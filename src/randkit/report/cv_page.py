"""The page of a cross-validation run: headline, trials, figures, variance components."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from randkit.cv.intervals import NAIVE_NOTE, metric_range, read_headline
from randkit.errors import UserError
from randkit.report import figures
from randkit.report import reading as rd

# Columns of results.csv that say where a trial sits; the rest before the seeds are scores.
_PLACE = ("id", "fold", "repeat", "group")
_SIZES = ("train_size", "test_size", "fit_seconds")


def cv_context(run_dir: Path) -> dict[str, Any]:
    """Everything the cross-validation template shows."""
    summary = rd.read_json(run_dir / "summary.json")
    columns, rows = rd.read_results(run_dir / "results.csv")
    metric = str(summary.get("metric", "accuracy"))
    trials = rd.read_trials(run_dir, rd.column(columns, rows, "id"))
    classes = class_names(summary, trials)
    scores, groups, strip_by = strip_data(columns, rows, metric)
    strip = None
    if scores:
        strip = figures.strip_plot(
            scores, groups, metric, mean=rd.to_float(summary.get("mean")),
            ci=rd.pair(read_headline(summary)["ci"]), group_label=strip_by,
        )  # fmt: skip
    histories = rd.histories(trials)
    components = sd_components(summary, metric, metric_range(metric, scores) is not None)
    confusion, confusion_trials = confusion_sum(run_dir, trials, classes)
    per_class, per_class_trials = per_class_means(trials, classes)
    noise = rd.read_robustness(run_dir)
    robust_metric = metric if any(metric in p for ps in noise.values() for p in ps) else "accuracy"
    return {
        "kind": "cross-validation",
        "name": run_dir.resolve().name,
        "headline": headline(summary, metric, len(rows)),
        "per_metric": per_metric(summary),
        "config": rd.read_config(run_dir),
        "trials": trial_table(columns, rows, metric),
        "strip_by": strip_by,
        "figures": {
            "strip": rd.uri(strip),
            "curves": rd.uri(figures.learning_curves(histories) if histories else None),
            "variance": rd.uri(
                figures.sd_bars(components["rows"], components["unit"])
                if components["rows"]
                else None
            ),
            "confusion": rd.uri(
                figures.confusion_heatmap(confusion, classes) if confusion_trials else None
            ),
            "robustness": rd.uri(
                figures.robustness_curves(noise, robust_metric) if noise else None
            ),
        },
        "variance": components,
        "confusion_trials": confusion_trials,
        "per_class": per_class,
        "per_class_trials": per_class_trials,
    }


def trial_table(columns: list[str], rows: list[list[str]], metric: str) -> dict[str, Any]:
    """The per-trial table with the scores first (the headline metric leading), then the
    trial's place and sizes; the seeds (19-digit numbers nobody reads first) go to a table
    of their own, folded away."""
    seeds = [c for c in columns if c.startswith("seed_")]
    scores = [c for c in columns if c not in (*_PLACE, *_SIZES, *seeds)]
    scores.sort(key=lambda c: c != metric)
    main = scores + [c for c in (*_PLACE, *_SIZES) if c in columns]
    seed_columns = [c for c in ("id",) if c in columns] + seeds

    def pick(names: list[str]) -> list[list[dict[str, Any]]]:
        index = [columns.index(n) for n in names]
        return [[rd.cell(row[i]) for i in index] for row in rows]

    return {
        "columns": main,
        "rows": pick(main),
        "seed_columns": seed_columns if seeds else [],
        "seed_rows": pick(seed_columns) if seeds else [],
    }


def headline(summary: dict[str, Any], metric: str, rows: int) -> dict[str, str]:
    folds, repeats = summary.get("folds"), summary.get("repeats")
    design = ""
    if folds is not None and repeats is not None:
        design = f"{folds} folds \u00d7 {repeats} repeats"
    std = summary.get("std")
    head = read_headline(summary)
    return {
        "metric": metric,
        "mean": rd.num(summary.get("mean")),
        "std": rd.num(std) if std is not None else "",
        "ci95": rd.interval(head["ci"]),
        "ci95_note": str(head["note"]),
        "ci95_naive": rd.interval(head["naive"]),
        "naive_note": NAIVE_NOTE,
        "n_trials": str(summary.get("n_trials", rows)),
        "design": design,
        "runner": str(summary.get("runner") or ""),
    }


def per_metric(summary: dict[str, Any]) -> list[dict[str, str]]:
    block = summary.get("per_metric")
    if not isinstance(block, dict):
        return []
    return [
        {
            "metric": str(name),
            "mean": rd.num(stats.get("mean")),
            "std": rd.num(stats.get("std")),
            "ci95": _metric_interval(stats),
        }
        for name, stats in block.items()
        if isinstance(stats, dict)
    ]


def _metric_interval(stats: dict[str, Any]) -> str:
    """A metric's headline interval; an old run's entry holds only the naive one, so named."""
    head = read_headline(stats)
    if head["ci"] is not None:
        return rd.interval(head["ci"])
    return f"{rd.interval(head['naive'])} naive" if rd.pair(head["naive"]) else "none"


def sd_components(summary: dict[str, Any], metric: str, bounded: bool) -> dict[str, Any]:
    """Variance components as standard deviations in the metric's units (points for a
    [0, 1] metric: a variance of 4e-5 reads as "SD 0.63 pts"); an interval's ends are the
    square roots of the variance interval's ends (a monotone map keeps its coverage)."""
    block = summary.get("variance_components")
    raw = block.get("components") if isinstance(block, dict) else None
    raw = (
        {str(k): v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}
    )
    scale, unit = (100.0, "pts") if bounded else (1.0, "")
    rows = []
    for name, stats in raw.items():
        variance, share = rd.to_float(stats.get("variance")), rd.to_float(stats.get("share"))
        if variance is None or not math.isfinite(variance):
            continue
        ends = rd.pair(stats.get("ci"))
        sd_ci = tuple(scale * math.sqrt(max(0.0, v)) for v in ends) if ends else None
        rows.append({
            "name": name,
            "sd": scale * math.sqrt(max(0.0, variance)),
            "ci": sd_ci,
            "share": share,
            "sd_text": _amount(scale * math.sqrt(max(0.0, variance)), unit),
            "ci_text": f"[{_amount(sd_ci[0], unit, False)}, {_amount(sd_ci[1], unit)}]"
            if sd_ci else "",
            "share_text": f"{100 * share:.0f}% of the total" if share is not None else "",
            "variance_text": f"{variance:.3g}",
        })  # fmt: skip
    method = str(block.get("method") or "") if isinstance(block, dict) else ""
    unit_name = f"points of {metric} (1 pt = 0.01)" if bounded else f"units of {metric}"
    return {"rows": rows, "method": method, "unit": unit, "unit_name": unit_name}


def _amount(value: float, unit: str, named: bool = True) -> str:
    text = f"{value:.2f}" if unit == "pts" else f"{value:.4g}"
    return f"{text} {unit}".strip() if named else text


def strip_data(
    columns: list[str], rows: list[list[str]], metric: str
) -> tuple[list[float], list[str], str]:
    """Scores of ``metric`` per trial and their column: by group when trials differ in group,
    else by repeat."""
    values = rd.column(columns, rows, metric)
    groups = rd.column(columns, rows, "group")
    by = "group"
    if len(set(groups)) <= 1:
        repeats = rd.column(columns, rows, "repeat")
        groups, by = ([f"repeat {r}" for r in repeats], "repeat") if repeats else ([], "all")
    groups = groups or ["all"] * len(rows)
    scores, labels = [], []
    for text, group in zip(values, groups, strict=True):
        try:
            number = float(text)
        except ValueError:
            continue
        if math.isfinite(number):
            scores.append(number)
            labels.append(group or "(none)")
    return scores, labels, by


def class_names(summary: dict[str, Any], trials: dict[str, dict[str, Any]]) -> list[str]:
    classes = summary.get("classes")
    if isinstance(classes, list) and classes:
        return [str(c) for c in classes]
    for trial in trials.values():
        matrix = trial.get("confusion_matrix")
        if isinstance(matrix, list) and matrix:
            return [str(i) for i in range(len(matrix))]
    return []


def confusion_sum(
    run_dir: Path, trials: dict[str, dict[str, Any]], classes: list[str]
) -> tuple[np.ndarray, int]:
    k = len(classes)
    total = np.zeros((k, k), dtype=np.int64)
    count = 0
    for tid, trial in trials.items():
        matrix = trial.get("confusion_matrix")
        if matrix is None:
            continue
        array = np.asarray(matrix)
        if array.shape != (k, k):
            raise UserError(
                "run",
                f"{run_dir / 'trials' / tid / 'metrics.json'}: confusion_matrix has shape "
                f"{array.shape}, expected ({k}, {k}) for the {k} classes in summary.json",
            )
        total += array.astype(np.int64)
        count += 1
    return total, count


def per_class_means(
    trials: dict[str, dict[str, Any]], classes: list[str]
) -> tuple[list[dict[str, str]], int]:
    k = len(classes)
    scores: dict[str, list[list[float]]] = {"precision": [], "recall": [], "f1": []}
    support = np.zeros(k, dtype=np.int64)
    count = 0
    for trial in trials.values():
        block = trial.get("per_class")
        if not isinstance(block, dict) or not all(
            isinstance(block.get(key), list) and len(block[key]) == k for key in scores
        ):
            continue
        for key, values in scores.items():
            values.append([float(v) for v in block[key]])
        if isinstance(block.get("support"), list) and len(block["support"]) == k:
            support += np.asarray(block["support"], dtype=np.int64)
        count += 1
    if not count:
        return [], 0
    means = {key: np.mean(np.asarray(values), axis=0) for key, values in scores.items()}
    table = [
        {
            "name": name,
            "precision": rd.num(means["precision"][i]),
            "recall": rd.num(means["recall"][i]),
            "f1": rd.num(means["f1"][i]),
            "support": str(int(support[i])),
        }
        for i, name in enumerate(classes)
    ]
    return table, count
