"""Run a cross-validation plan in a run directory and summarize it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from randkit.config import ExperimentConfig
from randkit.cv import intervals, stats
from randkit.cv.nested_run import check_nested, nested_summary, outer_plan
from randkit.cv.objects import UserObjects
from randkit.cv.plan import Plan, make_plan
from randkit.cv.progress import cv_progress
from randkit.cv.runners import RunContext, default_threads, make_runner
from randkit.cv.store import ResultTable, RunStore
from randkit.data import LabeledData, keep_cache, load_data
from randkit.data.base import TensorData, data_fingerprint
from randkit.data.dataset import DatasetData, dataset_fingerprint, targets_array
from randkit.errors import UserError
from randkit.extras import MissingExtraError
from randkit.streams import Streams

_log = logging.getLogger(__name__)


@dataclass
class CVResult:
    out: Path
    table: ResultTable  # one row per trial: table["accuracy"] is a NumPy array
    summary: dict[str, Any]
    trained: int  # trials trained by this call (the others were already done)
    report: Path | None = None  # report.html, when written


def run_cv(
    cfg: ExperimentConfig,
    out: Path,
    restart: bool = False,
    quiet: bool = False,
    splitter: Any | None = None,
    data: LabeledData | DatasetData | None = None,
    report: bool = True,
    objects: UserObjects | None = None,
) -> CVResult:
    """Plan, run the missing trials with the configured runner, then write ``results.csv``,
    ``summary.json`` and ``report.html`` (skipped, with one warning, without the ``report``
    extra). ``objects``: the user's trial function, model, loss, ... (``cross_validate``)."""
    if data is None and cfg.task != "classification":
        data, objects = _task_data(cfg), objects or UserObjects()
        objects.parts.task = cfg.task
    data = data if data is not None else load_data(cfg.data, defer_cache=True)
    streams = Streams(cfg.seed, cfg.seeds)
    targets = targets_array(data)
    plan = make_plan(cfg.cv, targets, data.groups, streams, splitter)
    if cfg.cv.interval == "nested":
        check_nested(cfg, objects)
    if objects is not None:
        objects.check_sendable(cfg.cv.runner)
    if objects is None or objects.fit is None:
        _preflight(cfg, data, plan, streams, objects)
    data_hash = (
        data_fingerprint(data) if isinstance(data, LabeledData) else dataset_fingerprint(data)
    )
    store = RunStore(out)
    threads = store.prepare(
        cfg, plan, restart, data_hash, default_threads(cfg.cv, len(plan.trials))
    )
    keep_cache(data)  # every check passed: the image cache may be written now
    records = store.finished()
    missing = [t for t in plan.trials if t.id not in records]
    config = cfg.resolved()
    # A trial function's epoch count is unknown: its bar counts trials.
    epochs = cfg.train.epochs if objects is None or objects.fit is None else None
    done = len(plan.trials) - len(missing)
    with cv_progress(quiet, len(plan.trials), done, epochs) as bar:

        def on_done(record: dict[str, Any]) -> None:
            _same_metrics(records, record)
            records[record["id"]] = record
            if bar is not None:
                bar.trial_done(record)

        if missing:
            context = RunContext(cfg, config, data, data_hash, out, objects, threads, quiet)
            context.plan_trials = plan.trials
            context.on_epoch = bar.epoch if bar is not None else None
            make_runner(context).run(missing, on_done)
    shown = outer_plan(plan)  # nested CV's inner trials feed only its interval
    summary = summarize_run(cfg, shown, records, [str(c) for c in data.classes])
    if cfg.cv.interval == "nested":
        summary.update(nested_summary(cfg, plan, out, summary))
    summary["input"] = _input_description(data)
    table = store.write_results(shown, records)  # columns of every metric the trials report
    store.write_summary(summary)
    report_path = None
    if report:
        try:
            from randkit.report import write_report
        except MissingExtraError as exc:
            _log.warning("%s; skipped report.html", exc)
        else:
            report_path = write_report(out)
    return CVResult(out, table, summary, len(missing), report_path)


def _same_metrics(records: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
    """Every trial of a run reports the same metrics (a trial function might not)."""
    if not records:
        return
    first = next(iter(records.values()))
    if set(record["test"]) != set(first["test"]):
        raise UserError(
            "fit",
            f"trial {record['id']} returned {sorted(record['test'])} but trial {first['id']} "
            f"returned {sorted(first['test'])}; every trial must return the same metrics",
        )


def _input_description(data: LabeledData | DatasetData) -> dict[str, Any]:
    """What one input looks like: what an export needs when the data cannot be reloaded."""
    if isinstance(data, DatasetData):
        kind = "image" if len(data.input_shape) == 3 else "vector"
        return {"kind": kind, "shape": list(data.input_shape), "unit_range": False}
    shape = list(data.inputs.shape[1:]) if isinstance(data.inputs, torch.Tensor) else []
    return {"kind": data.kind, "shape": shape, "unit_range": data.unit_range}


def _task_data(cfg: ExperimentConfig) -> DatasetData:
    """Regression or multilabel targets of an ``.npz`` file, kept as they are."""
    from randkit.data.arrays import npz_arrays
    from randkit.data.dataset import arrays_data

    if cfg.data.kind != "npz" or cfg.data.path is None:
        raise UserError(
            "task",
            f"{cfg.task!r} needs data.kind 'npz' (x and y arrays) in a config, or a Dataset "
            f"or arrays given to randkit.cross_validate; got data.kind {cfg.data.kind!r}",
        )
    x, y, groups = npz_arrays(cfg.data.path, multilabel=cfg.task == "multilabel")
    return arrays_data(x, y, groups, cfg.task)


def _preflight(
    cfg: ExperimentConfig,
    data: LabeledData | DatasetData,
    plan: Plan,
    streams: Streams,
    objects: UserObjects | None,
) -> None:
    """Build the first trial's model and run it once before anything is written."""
    from randkit.cv.checks import check_objects_on_sample, sample_batch
    from randkit.cv.trial import prepare_trial, trial_model
    from randkit.randomize.build import preflight
    from randkit.streams import ScopedStreams

    trial = plan.trials[0]
    scoped = ScopedStreams(streams, trial.scopes())
    prepared = prepare_trial(cfg, data, trial, scoped)
    model, randomization = trial_model(cfg, objects, prepared, data, scoped)
    names = ["loss", "accuracy", "macro_f1"]
    if objects is not None:
        names = check_objects_on_sample(cfg, objects, model, prepared, data)
    if cfg.cv.metric is not None and cfg.cv.metric not in names:
        raise UserError(
            "metric" if objects is not None else "cv.metric",
            f"{cfg.cv.metric!r} is not reported by this run's trials; choose one of "
            f"{', '.join(names)}",
        )
    outputs = preflight(model, randomization, sample_batch(prepared)[0][:2])
    if objects is None:  # the objects' checks above did this for the object API
        from randkit.train.tasks import check_output_width, num_outputs, output_width

        expected = num_outputs(cfg.task, targets_array(data))
        field = f"model.name {cfg.model.name!r}"
        check_output_width(cfg.task, output_width(outputs), expected, field)
    if cfg.cv.runner == "vectorized":
        from randkit.stacked import check_stackable

        if objects is not None and not (
            objects.parts.default_loop and isinstance(prepared.train, TensorData)
        ):
            raise UserError(
                "runner",
                "'vectorized' trains classifiers on in-memory data with the config's loss, "
                "optimizer and metrics; use 'sequential', 'processes' or 'ray' for a "
                "Dataset, another task or your own loss, optimizer, metrics or callbacks",
            )
        check_stackable(model, cfg.train.optimizer, "cv.runner")


def summarize_run(
    cfg: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]], classes: list[str]
) -> dict[str, Any]:
    """The content of ``summary.json``: the headline metric's mean and its one honest
    interval (``ci95``, how in ``ci95_method``/``ci95_note``; ``randkit.cv.intervals``), the
    naive t interval by name (``ci95_naive``), every metric alike, variance components."""
    ordered = [records[t.id] for t in plan.trials]
    metric = headline_metric(cfg, ordered)
    n_train = float(np.mean([r["train_size"] for r in ordered]))
    n_test = float(np.mean([r["test_size"] for r in ordered]))
    per_metric = {
        name: _metric_summary(name, [r["test"][name] for r in ordered], n_train, n_test)
        for name in sorted(metric_names(ordered), key=lambda n: n != metric)  # headline first
    }
    head = per_metric[metric]
    corrected = (head["ci95_method"] or "").startswith("nadeau_bengio")
    return {
        "metric": metric,
        "mean": head["mean"],
        "std": head["std"],
        "ci95": head["ci95"],
        "ci95_method": head["ci95_method"],
        "ci95_note": head["ci95_note"],
        "ci95_naive": head["ci95_naive"],
        "ci95_naive_note": intervals.NAIVE_NOTE,
        "ci95_corrected": head["ci95"] if corrected else None,  # alias of ci95, for a release
        "n_trials": len(ordered),
        "folds": 2 if cfg.cv.splitter == "5x2" else cfg.cv.folds,
        "repeats": 5 if cfg.cv.splitter == "5x2" else cfg.cv.repeats,
        "splitter": cfg.cv.splitter,
        "vary": list(cfg.cv.vary),
        "runner": cfg.cv.runner,
        "classes": classes,
        "task": cfg.task,
        "per_metric": per_metric,
        "variance_components": variance_by_source(cfg, plan, records, metric),
    }


def _metric_summary(
    name: str, scores: list[float], n_train: float, n_test: float
) -> dict[str, Any]:
    """Mean, std and the headline and naive intervals of one metric's trial scores."""
    x = np.asarray(scores, dtype=float)
    if not np.isfinite(x).all():  # e.g. a multilabel auroc of a fold with a one-class label
        bad = int((~np.isfinite(x)).sum())
        return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)) if x.size > 1 else 0.0,
                "ci95": None, "ci95_method": None, "ci95_naive": None,
                "ci95_note": f"{bad} trial(s) scored NaN or inf: no interval"}  # fmt: skip
    plain = stats.summarize(x)
    head = intervals.headline_interval(x, name, n_train, n_test)
    return {
        "mean": plain["mean"],
        "std": plain["std"],
        "ci95": head["ci"],
        "ci95_method": head["method"],
        "ci95_note": head["note"],
        "ci95_naive": head["naive"],
    }


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    """The metrics every trial reports, in the order the first one lists them."""
    names = list(records[0]["test"])
    return [n for n in names if all(n in r["test"] for r in records)]


def headline_metric(cfg: ExperimentConfig, records: list[dict[str, Any]]) -> str:
    """``cv.metric``, else the task's (accuracy, rmse, macro_f1) when the trials report it,
    else the first metric a trial function returns."""
    from randkit.train.tasks import headline_metric as task_headline

    names = metric_names(records)
    metric = cfg.cv.metric or task_headline(cfg.task)
    if metric in names:
        return metric
    if cfg.cv.metric is not None:
        raise UserError(
            "metric", f"{cfg.cv.metric!r} is not reported by every trial; they report {names}"
        )
    return names[0]


def _matrix(plan: Plan, records: dict[str, dict[str, Any]], group: str, metric: str) -> np.ndarray:
    """Scores of one group as [fold, repeat]."""
    cells = [c for c in plan.cells if c["group"] == group]
    folds = 1 + max(c["fold"] for c in cells)
    repeats = 1 + max(c["repeat"] for c in cells)
    matrix = np.full((folds, repeats), np.nan)
    for c in cells:
        matrix[c["fold"], c["repeat"]] = records[c["id"]]["test"][metric]
    return matrix


def variance_by_source(
    cfg: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]], metric: str
) -> dict[str, Any]:
    """Variance components of the metric (see README: estimator and assumptions).

    Plain plan: one-way random-effects ANOVA of [repeat, fold] scores: between repeats (the
    sources in ``vary`` together) and between folds within a repeat. Decomposition plan: for
    each source, the within-fold variance across its levels while the others stay fixed.
    """
    if cfg.cv.decompose:
        components = {}
        for source in cfg.cv.vary:
            fit = stats.variance_components(_matrix(plan, records, f"vary:{source}", metric))
            components[source] = {"variance": fit["within"]["variance"], "ci": fit["within"]["ci"]}
        method = (
            "one source at a time: for each source, one-way random-effects ANOVA over "
            "folds (groups) x levels of the source (replicates); the source's component "
            "is the within-fold variance"
        )
    else:
        matrix = _matrix(plan, records, "main", metric)
        if matrix.shape[1] < 2:
            return {}
        fit = stats.variance_components(matrix.T)
        varied = "+".join(cfg.cv.vary) or "nothing"
        components = {
            f"repeats ({varied})": {
                "variance": fit["between"]["variance"],
                "ci": fit["between"]["ci"],
            },
            "folds (data partition)": {
                "variance": fit["within"]["variance"],
                "ci": fit["within"]["ci"],
            },
        }
        method = (
            "one-way random-effects ANOVA over repeats (groups) x folds (replicates), "
            "ANOVA estimator truncated at 0"
        )
    total = sum(c["variance"] for c in components.values())
    for c in components.values():
        c["share"] = c["variance"] / total if total > 0 else 0.0
    return {"method": method, "components": components}
