"""HTML report of a cross-validation run: one self-contained file, figures inlined as PNG.

Example::

    from randkit.report import write_report
    path = write_report(Path("runs/digits-cv"))   # runs/digits-cv/report.html

The run directory holds ``results.csv`` and ``summary.json`` (required), and optionally
``config.yaml``, ``trials/<id>/metrics.json`` and ``robustness.json``; a missing optional part
leaves its section out of the report.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from randkit import atomic
from randkit.errors import UserError
from randkit.extras import require

require("report", "randkit.report")  # one line naming the extra instead of a traceback

import jinja2  # noqa: E402

from randkit.cv.intervals import NAIVE_NOTE, read_headline  # noqa: E402
from randkit.report import figures  # noqa: E402
from randkit.report.template import TEMPLATE  # noqa: E402

__all__ = ["write_report"]

REPORT_NAME = "report.html"
_REQUIRED = ("results.csv", "summary.json")
_INTEGER = re.compile(r"[+-]?\d+")

_ENV = jinja2.Environment(
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def write_report(run_dir: str | Path, *, date: datetime.date | None = None) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    ``date`` is the date shown under the title (default: today). Raises ``UserError`` when
    ``run_dir`` lacks ``results.csv`` or ``summary.json``, or holds a file it cannot read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("run", f"{run_dir} is not a directory")
    missing = [name for name in _REQUIRED if not (run_dir / name).is_file()]
    if missing:
        raise UserError(
            "run",
            f"{run_dir} has no {' and no '.join(missing)}; not a finished cross-validation run",
        )
    html = _render(run_dir, date or datetime.date.today())
    path = run_dir / REPORT_NAME
    atomic.write_text(path, html)
    return path


def _render(run_dir: Path, date: datetime.date) -> str:
    summary = _read_json(run_dir / "summary.json")
    columns, rows = _read_results(run_dir / "results.csv")
    metric = str(summary.get("metric", "accuracy"))
    trials = _read_trials(run_dir, _column(columns, rows, "id"))
    classes = _class_names(summary, trials)

    scores, groups, strip_by = _strip_data(columns, rows, metric)
    strip = None
    if scores:
        strip = figures.strip_plot(
            scores,
            groups,
            metric,
            mean=_float(summary.get("mean")),
            ci=_pair(read_headline(summary)["ci"]),  # the headline interval only
            group_label=strip_by,
        )
    histories = {tid: t["history"] for tid, t in trials.items() if t.get("history")}
    curves = figures.learning_curves(histories) if histories else None

    components = _components(summary)
    variance_png = figures.variance_bars(components["raw"]) if components["raw"] else None

    confusion, confusion_trials = _confusion(run_dir, trials, classes)
    confusion_png = figures.confusion_heatmap(confusion, classes) if confusion_trials else None
    per_class, per_class_trials = _per_class(trials, classes)

    noise = _robustness(run_dir)
    robust_metric = metric if any(metric in p for ps in noise.values() for p in ps) else "accuracy"
    robust_png = figures.robustness_curves(noise, robust_metric) if noise else None

    config_path = run_dir / "config.yaml"
    config = (
        config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else ""
    )
    return _ENV.from_string(TEMPLATE).render(
        name=run_dir.resolve().name,
        date=date.isoformat(),
        headline=_headline(summary, metric, len(rows)),
        per_metric=_per_metric(summary),
        config=config,
        columns=columns,
        rows=[[_cell(text) for text in row] for row in rows],
        strip_by=strip_by,
        figures={
            "strip": _uri(strip),
            "curves": _uri(curves),
            "variance": _uri(variance_png),
            "confusion": _uri(confusion_png),
            "robustness": _uri(robust_png),
        },
        variance=components,
        confusion_trials=confusion_trials,
        per_class=per_class,
        per_class_trials=per_class_trials,
    )


# -- reading -------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError("run", f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError("run", f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError("run", f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_results(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``results.csv`` as written (seeds stay exact: no float parsing)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            table = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError("run", f"{path}: cannot read ({exc})") from exc
    if not table or not table[0]:
        raise UserError("run", f"{path}: empty, expected a header row and one row per trial")
    header, rows = table[0], [row for row in table[1:] if row]
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise UserError(
                "run", f"{path}: line {number} has {len(row)} fields, header has {len(header)}"
            )
    return header, rows


def _column(columns: list[str], rows: list[list[str]], name: str) -> list[str]:
    if name not in columns:
        return []
    index = columns.index(name)
    return [row[index] for row in rows]


def _read_trials(run_dir: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    trials = {}
    for tid in dict.fromkeys(ids):
        path = run_dir / "trials" / tid / "metrics.json"
        if tid and path.is_file():
            trials[tid] = _read_json(path)
    return trials


def _robustness(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    path = run_dir / "robustness.json"
    if not path.is_file():
        return {}
    noise = _read_json(path).get("noise")
    if not isinstance(noise, dict):
        return {}
    return {str(k): [p for p in v if isinstance(p, dict)] for k, v in noise.items() if v}


# -- formatting ----------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _pair(value: Any) -> tuple[float, float] | None:
    if isinstance(value, Sequence) and len(value) == 2:
        low, high = _float(value[0]), _float(value[1])
        if low is not None and high is not None:
            return low, high
    return None


def _num(value: Any) -> str:
    number = _float(value)
    if number is None:
        return "n/a" if value is None else str(value)
    return f"{number:.4f}" if math.isfinite(number) else str(number)


def _interval(value: Any) -> str:
    pair = _pair(value)
    return f"[{_num(pair[0])}, {_num(pair[1])}]" if pair else ""


def _cell(text: str) -> dict[str, Any]:
    stripped = text.strip()
    if _INTEGER.fullmatch(stripped):
        return {"text": stripped, "numeric": True}
    try:
        number = float(stripped)
    except ValueError:
        return {"text": text, "numeric": False}
    return {"text": _num(number), "numeric": True}


def _uri(png: bytes | None) -> str:
    return figures.data_uri(png) if png else ""


def _headline(summary: dict[str, Any], metric: str, rows: int) -> dict[str, str]:
    folds, repeats = summary.get("folds"), summary.get("repeats")
    design = ""
    if folds is not None and repeats is not None:
        design = f"{folds} folds \u00d7 {repeats} repeats"
    std = summary.get("std")
    head = read_headline(summary)
    return {
        "metric": metric,
        "mean": _num(summary.get("mean")),
        "std": _num(std) if std is not None else "",
        "ci95": _interval(head["ci"]),
        "ci95_note": str(head["note"]),
        "ci95_naive": _interval(head["naive"]),
        "naive_note": NAIVE_NOTE,
        "n_trials": str(summary.get("n_trials", rows)),
        "design": design,
        "runner": str(summary.get("runner") or ""),
    }


def _per_metric(summary: dict[str, Any]) -> list[dict[str, str]]:
    per_metric = summary.get("per_metric")
    if not isinstance(per_metric, dict):
        return []
    return [
        {
            "metric": str(name),
            "mean": _num(stats.get("mean")),
            "std": _num(stats.get("std")),
            "ci95": _metric_interval(stats),
        }
        for name, stats in per_metric.items()
        if isinstance(stats, dict)
    ]


def _metric_interval(stats: dict[str, Any]) -> str:
    """A metric's headline interval; an old run's entry holds only the naive one, so named."""
    head = read_headline(stats)
    if head["ci"] is not None:
        return _interval(head["ci"])
    return f"{_interval(head['naive'])} naive" if _pair(head["naive"]) else "none"


def _components(summary: dict[str, Any]) -> dict[str, Any]:
    block = summary.get("variance_components")
    raw = block.get("components") if isinstance(block, dict) else None
    raw = (
        {str(k): v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}
    )
    rows = []
    for name, stats in raw.items():
        share = _float(stats.get("share"))
        rows.append(
            {
                "name": name,
                "variance": _num(stats.get("variance")),
                "ci": _interval(stats.get("ci")),
                "share": f"{100 * share:.1f}%" if share is not None else "",
            }
        )
    method = str(block.get("method") or "") if isinstance(block, dict) else ""
    return {"raw": raw, "rows": rows, "method": method}


# -- aggregation ---------------------------------------------------------------------------


def _strip_data(
    columns: list[str], rows: list[list[str]], metric: str
) -> tuple[list[float], list[str], str]:
    """Scores of ``metric`` per trial and their column: by group when trials differ in group,
    else by repeat."""
    values = _column(columns, rows, metric)
    groups = _column(columns, rows, "group")
    by = "group"
    if len(set(groups)) <= 1:
        repeats = _column(columns, rows, "repeat")
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


def _class_names(summary: dict[str, Any], trials: dict[str, dict[str, Any]]) -> list[str]:
    classes = summary.get("classes")
    if isinstance(classes, list) and classes:
        return [str(c) for c in classes]
    for trial in trials.values():
        matrix = trial.get("confusion_matrix")
        if isinstance(matrix, list) and matrix:
            return [str(i) for i in range(len(matrix))]
    return []


def _confusion(
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


def _per_class(
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
        for key, rows in scores.items():
            rows.append([float(v) for v in block[key]])
        if isinstance(block.get("support"), list) and len(block["support"]) == k:
            support += np.asarray(block["support"], dtype=np.int64)
        count += 1
    if not count:
        return [], 0
    means = {key: np.mean(np.asarray(rows), axis=0) for key, rows in scores.items()}
    table = [
        {
            "name": name,
            "precision": _num(means["precision"][i]),
            "recall": _num(means["recall"][i]),
            "f1": _num(means["f1"][i]),
            "support": str(int(support[i])),
        }
        for i, name in enumerate(classes)
    ]
    return table, count
