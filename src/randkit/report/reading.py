"""Reading a run directory and formatting its numbers for the report pages."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from randkit.errors import UserError
from randkit.report import figures

_INTEGER = re.compile(r"[+-]?\d+")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError("run", f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError("run", f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError("run", f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_results(path: Path) -> tuple[list[str], list[list[str]]]:
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


def column(columns: list[str], rows: list[list[str]], name: str) -> list[str]:
    if name not in columns:
        return []
    index = columns.index(name)
    return [row[index] for row in rows]


def read_trials(run_dir: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    trials = {}
    for tid in dict.fromkeys(ids):
        path = run_dir / "trials" / tid / "metrics.json"
        if tid and path.is_file():
            trials[tid] = read_json(path)
    return trials


def read_robustness(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    path = run_dir / "robustness.json"
    if not path.is_file():
        return {}
    noise = read_json(path).get("noise")
    if not isinstance(noise, dict):
        return {}
    return {str(k): [p for p in v if isinstance(p, dict)] for k, v in noise.items() if v}


def read_config(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


# -- formatting ----------------------------------------------------------------------------


def to_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def pair(value: Any) -> tuple[float, float] | None:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        low, high = to_float(value[0]), to_float(value[1])
        if low is not None and high is not None:
            return low, high
    return None


def num(value: Any) -> str:
    number = to_float(value)
    if number is None:
        return "n/a" if value is None else str(value)
    return f"{number:.4f}" if math.isfinite(number) else str(number)


def interval(value: Any) -> str:
    ends = pair(value)
    return f"[{num(ends[0])}, {num(ends[1])}]" if ends else ""


def cell(text: str) -> dict[str, Any]:
    stripped = text.strip()
    if _INTEGER.fullmatch(stripped):
        return {"text": stripped, "numeric": True}
    try:
        number = float(stripped)
    except ValueError:
        return {"text": text, "numeric": False}
    return {"text": num(number), "numeric": True}


def uri(png: bytes | None) -> str:
    return figures.data_uri(png) if png else ""


def histories(trials: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each trial's per-epoch history, for the learning curves."""
    return {
        tid: [row for row in t["history"] if isinstance(row, dict)]
        for tid, t in trials.items()
        if isinstance(t.get("history"), list) and t["history"]
    }
