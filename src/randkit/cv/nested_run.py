"""The nested CV interval in a cross-validation run (``cv.interval: nested``).

The plan holds, per repeat, the K outer trials and K(K-1)/2 inner trials (one per pair of
folds, ``randkit.cv.plan``); every runner but ``vectorized`` runs them through the same
trial machinery. Each trial writes the loss of every test item to
``trials/<id>/losses.safetensors`` (before ``metrics.json``, so a finished trial has it);
the summary reads them back and computes the interval (``randkit.cv.nested``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file

from randkit import atomic
from randkit.config import ExperimentConfig
from randkit.cv.nested import loss_for_metric, nested_cv_interval, to_metric_scale
from randkit.cv.objects import UserObjects
from randkit.cv.plan import Plan, Trial
from randkit.errors import UserError

POINT_LOSSES = "losses.safetensors"
METHOD = "nested"


def check_nested(cfg: ExperimentConfig, objects: UserObjects | None) -> None:
    """Refuse, before anything is written, what cannot give per-item losses."""
    from randkit.train.tasks import headline_metric

    metric = cfg.cv.metric or headline_metric(cfg.task)
    try:
        loss_for_metric(metric)
    except ValueError as exc:
        raise UserError("cv.metric", str(exc)) from None
    if objects is not None and objects.fit is not None:
        raise UserError(
            "fit",
            "the nested interval needs the loss of every test item, which the built-in "
            "trainer records and a fit= function does not; use model= or the headline interval",
        )
    if cfg.cv.runner == "vectorized":
        raise UserError(
            "cv.runner",
            "the nested interval runs on 'sequential', 'processes' or 'ray' (the vectorized "
            "runner does not record per-item losses)",
        )


def outer_plan(plan: Plan) -> Plan:
    """The plan without its inner trials: what ``results.csv`` and the usual statistics use."""
    trials = [t for t in plan.trials if t.inner is None]
    cells = [c for c in plan.cells if c["group"] != "nested"]
    return Plan(trials, cells, plan.holdout)


def point_losses(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Loss of every test item: 0-1 for classification, squared error for regression."""
    from randkit.train.tasks import _align

    if task == "classification":
        wrong = outputs.argmax(1).cpu() != targets.cpu().long()
        return wrong.double().numpy()
    out, tgt = _align(outputs.detach().double().cpu(), targets.detach().double().cpu())
    return ((out - tgt) ** 2).double().numpy().reshape(len(tgt))


def save_point_losses(
    out: Path, trial: Trial, task: str, outputs: torch.Tensor, targets: torch.Tensor
) -> None:
    """``trials/<id>/losses.safetensors``: ``index`` (the test items) and ``loss``; no pickle."""
    losses = point_losses(task, outputs, targets)
    tensors = {
        "index": torch.as_tensor(trial.test_idx, dtype=torch.int64),
        "loss": torch.as_tensor(losses, dtype=torch.float64),
    }
    atomic.write_safetensors(out / "trials" / trial.id / POINT_LOSSES, tensors, {"task": task})


def _read(out: Path, trial_id: str) -> tuple[np.ndarray, np.ndarray]:
    path = out / "trials" / trial_id / POINT_LOSSES
    if not path.is_file():
        raise UserError(
            "out",
            f"trial {trial_id} has no {POINT_LOSSES} (finished by a runner that does not "
            "record per-item losses); rerun with --restart",
        )
    arrays = load_file(str(path))
    return arrays["index"], arrays["loss"]


def loss_arrays(plan: Plan, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(R, n, K) losses and (R, n) fold ids in the layout of ``nested_cv_interval``, from the
    run's outer and inner trials."""
    main = [c for c in plan.cells if c["group"] != "nested"]
    inner = [c for c in plan.cells if c["group"] == "nested"]
    reps, folds = 1 + max(c["repeat"] for c in main), 1 + max(c["fold"] for c in main)
    items = np.sort(np.concatenate([_read(out, c["id"])[0] for c in main if c["repeat"] == 0]))
    losses = np.full((reps, len(items), folds), np.nan)
    fold_ids = np.full((reps, len(items)), -1, dtype=np.int64)
    for c in main:  # the outer fit scores its own fold: the diagonal of the layout
        index, loss = _read(out, c["id"])
        at = np.searchsorted(items, index)
        fold_ids[c["repeat"], at] = c["fold"]
        losses[c["repeat"], at, c["fold"]] = loss
    for c in inner:  # the fit without {k, j}: on fold k it is column j, on fold j column k
        index, loss = _read(out, c["id"])
        r, at = c["repeat"], np.searchsorted(items, index)
        in_k = fold_ids[r, at] == c["fold"]
        losses[r, at[in_k], c["inner"]] = loss[in_k]
        losses[r, at[~in_k], c["fold"]] = loss[~in_k]
    return losses, fold_ids


def nested_summary(
    cfg: ExperimentConfig, plan: Plan, out: Path, summary: dict[str, Any]
) -> dict[str, Any]:
    """The summary's headline replaced by the nested interval (95%), with its details under
    ``nested``: estimate, MSE estimate, bias, inflation, width ratio, trainings."""
    metric = summary["metric"]
    losses, fold_ids = loss_arrays(plan, out)
    result = nested_cv_interval(losses, fold_ids, confidence=0.95)
    shown = to_metric_scale(result, metric)
    k, reps = result["folds"], result["reps"]
    trainings = {"outer": k * reps, "inner": k * (k - 1) // 2 * reps}
    trainings["total"] = trainings["outer"] + trainings["inner"]
    if shown["ci"] is None:
        note = "nested CV: every item's loss is the same, no spread to estimate an interval from"
    else:
        note = (
            f"nested cross-validation (Bates, Hastie & Tibshirani 2024), {reps} x {k}-fold, "
            f"{trainings['total']} trainings: {result['width_ratio']:.2f}x the naive "
            f"per-item interval, centred on the bias-corrected {metric} {shown['estimate']:.4f}"
        )
    details = {
        "loss": loss_for_metric(metric),
        "estimate": shown["estimate"],
        "mse": result["mse"],
        "bias": result["bias"],
        "err_ncv": result["err_ncv"],
        "err_cv": result["err_cv"],
        "inflation": result["inflation"],
        "width_ratio": result["width_ratio"],
        "naive_per_item": shown["naive"],
        "n": result["n"],
        "trainings": trainings,
        "reference": "Bates, Hastie & Tibshirani (2024), J. Am. Stat. Assoc. 119, arXiv 2104.00673",
    }
    head = {"ci95": shown["ci"], "ci95_method": METHOD, "ci95_note": note}
    per_metric = dict(summary["per_metric"])
    per_metric[metric] = {**per_metric[metric], **head}
    return {**head, "ci95_corrected": None, "nested": details, "per_metric": per_metric}
