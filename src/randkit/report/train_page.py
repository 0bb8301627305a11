"""The page of a plain training run (``randkit train``): test scores, curves, config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from randkit.cv.intervals import headline_interval
from randkit.report import figures
from randkit.report import reading as rd

# The metric the headline shows, first found first.
_HEADLINE = ("accuracy", "rmse", "macro_f1", "loss")


def is_train_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and not (run_dir / "summary.json").is_file()


def train_context(run_dir: Path) -> dict[str, Any]:
    """Everything the training-run template shows."""
    metrics = rd.read_json(run_dir / "metrics.json")
    test = {str(k): v for k, v in (metrics.get("test") or {}).items() if rd.to_float(v) is not None}
    sizes = metrics.get("sizes") if isinstance(metrics.get("sizes"), dict) else {}
    metric = next((m for m in _HEADLINE if m in test), next(iter(test), ""))
    history = [r for r in metrics.get("history") or [] if isinstance(r, dict)]
    curves = figures.learning_curves({"run": history}) if history else None
    noise = rd.read_robustness(run_dir)
    classes = [str(c) for c in metrics.get("classes") or []]
    matrix = metrics.get("confusion_matrix") or _test_confusion(metrics)
    confusion = None
    if matrix is not None and classes and np.asarray(matrix).shape == (len(classes),) * 2:
        confusion = figures.confusion_heatmap(np.asarray(matrix), classes)
    seeds = metrics.get("seeds") if isinstance(metrics.get("seeds"), dict) else {}
    return {
        "kind": "training run",
        "name": run_dir.resolve().name,
        "headline": _headline(test, metric, sizes),
        "scores": [{"metric": k, "value": rd.num(v)} for k, v in test.items()],
        "facts": _facts(metrics, sizes),
        "seeds": [{"source": str(k), "seed": str(v)} for k, v in seeds.items()],
        "config": rd.read_config(run_dir),
        "figures": {
            "curves": rd.uri(curves),
            "confusion": rd.uri(confusion),
            "robustness": rd.uri(figures.robustness_curves(noise) if noise else None),
        },
    }


def _test_confusion(metrics: dict[str, Any]) -> Any:
    test = metrics.get("test")
    return test.get("confusion_matrix") if isinstance(test, dict) else None


def _headline(test: dict[str, Any], metric: str, sizes: dict[str, Any]) -> dict[str, str]:
    """The test score with its exact interval when it is a proportion of the test items."""
    if not metric:
        return {"metric": "", "value": "n/a", "ci": "", "note": "no test scores"}
    n_test, n_train = rd.to_float(sizes.get("test")), rd.to_float(sizes.get("train"))
    ci, note = None, ""
    if n_test and n_train:
        head = headline_interval([float(test[metric])], metric, n_train, n_test)
        ci, note = head["ci"], str(head["note"])
    return {"metric": metric, "value": rd.num(test[metric]), "ci": rd.interval(ci), "note": note}


def _facts(metrics: dict[str, Any], sizes: dict[str, Any]) -> list[dict[str, str]]:
    facts = [
        ("epochs run", metrics.get("epochs_run")),
        ("optimizer steps", metrics.get("steps")),
        ("stopped early", metrics.get("stopped_early")),
        ("best epoch", metrics.get("best_epoch")),
        ("training examples", sizes.get("train")),
        ("validation examples", sizes.get("val")),
        ("test examples", sizes.get("test")),
        ("classes", len(metrics.get("classes") or []) or None),
    ]
    return [{"name": name, "value": str(value)} for name, value in facts if value is not None]
