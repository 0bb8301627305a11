"""One cross-validation trial, the unit every runner executes."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from randkit import atomic
from randkit.config import ExperimentConfig, validate_config
from randkit.cv.fit import record_head, run_fit_trial
from randkit.cv.objects import UserObjects, build_user_model
from randkit.cv.plan import Trial
from randkit.cv.progress import EpochHook, epoch_sender
from randkit.data import LabeledData, featurize, load_data
from randkit.data.base import Prepared, TensorData, data_fingerprint, stratified_holdout
from randkit.data.dataset import DatasetData, dataset_parts, targets_array
from randkit.errors import UserError
from randkit.models import Classifier, build_model
from randkit.randomize import Randomization, build_randomization
from randkit.streams import ScopedStreams, Streams
from randkit.train.batches import predict
from randkit.train.loop import Trainer, model_and_randomization, resolve_device
from randkit.train.metrics import classification_metrics, predict_logits
from randkit.train.tasks import metric_targets, num_outputs, task_metrics, user_metrics


def split_validation(
    cfg: ExperimentConfig, targets: np.ndarray, trial: Trial, streams: ScopedStreams
) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, val) indices of the trial's training fold. The validation part is
    ``cv.inner_val_fraction`` (else ``data.val_fraction``), stratified for classification."""
    train_idx = trial.train_idx
    fraction = cfg.cv.inner_val_fraction or cfg.data.val_fraction
    if fraction == 0:
        return train_idx, None
    keep, held = stratified_holdout(
        targets[train_idx],
        fraction,
        streams.seed("split", part="val"),
        "cv.inner_val_fraction",
        stratify=cfg.task == "classification",
    )
    return train_idx[keep], train_idx[held]


def prepare_trial(
    cfg: ExperimentConfig, data: LabeledData | DatasetData, trial: Trial, streams: ScopedStreams
) -> Prepared:
    """Featurize the trial's split; anything learned from data sees the training part only."""
    targets = targets_array(data)
    train_idx, val_idx = split_validation(cfg, targets, trial, streams)
    if isinstance(data, DatasetData):
        return dataset_parts(data, train_idx, val_idx, trial.test_idx)
    text = {
        "max_length": cfg.data.max_length,
        "max_vocab": cfg.data.max_vocab,
        "min_freq": cfg.data.min_freq,
    }
    return featurize(data, train_idx, val_idx, trial.test_idx, text)


def trial_record(
    trial: Trial,
    streams: ScopedStreams,
    prepared: Prepared,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    history: list[dict[str, float]],
    fit_seconds: float,
    task: str = "classification",
    extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON record of a finished trial (``trials/<id>/metrics.json``): the task's test
    metrics and ``extra`` (the user's), per-class tables (classification) or per-label
    scores (multilabel), the learning curves."""
    record = record_head(trial, streams, len(prepared.train), len(prepared.test))
    if task == "classification":
        record.update(class_tables(outputs, targets, len(prepared.classes)))
    else:
        record["test"] = task_metrics(task, outputs, targets)
        if task == "multilabel":
            record["per_label"] = per_label_scores(outputs, targets)
    record["test"].update(extra or {})
    record["history"] = history
    record["fit_seconds"] = round(fit_seconds, 4)
    return record


def class_tables(outputs: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, Any]:
    """Test metrics, per-class precision/recall/F1/support and the confusion matrix."""
    y, predicted = targets.numpy(), outputs.argmax(1).numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predicted, labels=list(range(k)), zero_division=0
    )
    return {
        "test": classification_metrics(outputs, targets, k, per_class_f1=f1),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        },
        "confusion_matrix": confusion_matrix(y, predicted, labels=list(range(k))).tolist(),
    }


def per_label_scores(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, list[Any]]:
    """F1 (logits thresholded at 0) and ROC AUC of each label; AUC is None for a label
    whose test part holds one class only."""
    y, scores = targets.numpy().astype(int), outputs.numpy()
    f1 = f1_score(y, scores > 0, average=None, zero_division=0)
    auroc = [
        float(roc_auc_score(y[:, j], scores[:, j])) if len(np.unique(y[:, j])) == 2 else None
        for j in range(y.shape[1])
    ]
    return {"f1": np.atleast_1d(f1).tolist(), "auroc": auroc, "support": y.sum(0).tolist()}


def save_trial(out: Path, record: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
    """Model first, metrics last: a trial counts as finished once its metrics.json exists."""
    folder = out / "trials" / record["id"]
    if weights is not None:
        atomic.write_safetensors(folder / "model.safetensors", weights, {"trial": record["id"]})
    atomic.write_json(folder / "metrics.json", record)


def trial_model(
    cfg: ExperimentConfig,
    objects: UserObjects | None,
    prepared: Prepared,
    data: LabeledData | DatasetData,
    streams: ScopedStreams,
) -> tuple[Classifier, Randomization]:
    """The trial's fresh model (the config's or the user's object) and randomization."""
    if cfg.task == "classification" and (objects is None or objects.model is None):
        return model_and_randomization(cfg, prepared, streams)
    randomization = build_randomization(
        cfg.randomize, len(prepared.classes), prepared.input_shape, prepared.unit_range
    )
    outputs = num_outputs(cfg.task, targets_array(data))
    if objects is None or objects.model is None:
        model = build_model(
            cfg.model, prepared, streams, init=cfg.randomize.init, num_outputs=outputs
        )
    else:
        model = build_user_model(objects.model, prepared, outputs, streams, cfg.randomize.init)
    return model, randomization


def run_trial(
    cfg: ExperimentConfig,
    data: LabeledData | DatasetData,
    trial: Trial,
    streams: Streams,
    device: torch.device,
    out: Path | None = None,
    objects: UserObjects | None = None,
    on_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Train and evaluate one trial; with ``out``, save it under ``out/trials/<id>/``.
    ``on_epoch(trial_id, history_row)`` after each epoch (the progress bar)."""
    scoped = ScopedStreams(streams, trial.scopes())
    hook = functools.partial(on_epoch, trial.id) if on_epoch is not None else None
    if objects is not None and objects.fit is not None:
        return _run_function_trial(cfg, data, trial, scoped, objects, out, hook)
    prepared = prepare_trial(cfg, data, trial, scoped)
    model, randomization = trial_model(cfg, objects, prepared, data, scoped)
    # Each trial gets its own copies of callbacks and metric objects, under every runner.
    parts = objects.parts.for_trial() if objects is not None else None
    trainer = Trainer(
        model,
        prepared.train,
        prepared.val,
        len(prepared.classes),
        cfg.train,
        scoped,
        device,
        randomization,
        parts,
    )
    started = time.perf_counter()
    trainer.fit(on_epoch=hook)
    _maybe_die(trial.id)
    fit_seconds = time.perf_counter() - started
    if parts is None or (parts.default_loop and isinstance(prepared.test, TensorData)):
        outputs, targets = predict_logits(trainer.model, prepared.test.x, device), prepared.test.y
        extra = None
    else:
        outputs, targets = predict(
            trainer.model, prepared.test, device, parts.num_workers, task=cfg.task
        )
        extra = user_metrics(parts.metrics, outputs, metric_targets(cfg.task, targets))
    history = trainer.state.history
    record = trial_record(
        trial, scoped, prepared, outputs, targets, history, fit_seconds, cfg.task, extra
    )
    if out is not None and cfg.cv.interval == "nested":  # per-item losses, before metrics.json
        from randkit.cv.nested_run import save_point_losses

        save_point_losses(out, trial, cfg.task, outputs, targets)
    if out is not None:
        save_trial(out, record, trainer.model.state_dict() if cfg.cv.save_models else None)
    return record


def _run_function_trial(
    cfg: ExperimentConfig,
    data: LabeledData | DatasetData,
    trial: Trial,
    streams: ScopedStreams,
    objects: UserObjects,
    out: Path | None,
    on_report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    assert objects.fit is not None and isinstance(data, DatasetData) and out is not None
    split = split_validation(cfg, data.targets, trial, streams)
    record = run_fit_trial(objects.fit, data.dataset, trial, streams, out, split, on_report)
    _maybe_die(trial.id)
    save_trial(out, record, None)
    return record


def _maybe_die(trial_id: str) -> None:
    """Fault injection for the worker-failure test: ``RANDKIT_KILL_TRIAL_ONCE=ID:MARKER``
    makes the process running trial ID SIGKILL itself mid-trial, once (MARKER records it)."""
    spec = os.environ.get("RANDKIT_KILL_TRIAL_ONCE")
    if not spec:
        return
    target, _, marker = spec.partition(":")
    if target == trial_id and not Path(marker).exists():
        Path(marker).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)


@functools.lru_cache(maxsize=2)
def _load_data_cached(data_json: str, data_hash: str) -> LabeledData:
    """The data set, loaded once per process and checked against the driver's fingerprint
    (``data_hash`` is part of the cache key, so changed data is never served stale)."""
    from randkit.config import DataConfig

    data = load_data(DataConfig.model_validate(json.loads(data_json)))
    if data_fingerprint(data) != data_hash:
        raise UserError("data", "changed on disk while the cross-validation was running")
    return data


# The run's user objects in a worker process: set once per process (ProcessPoolExecutor's
# initializer), or passed with each Ray task (Ray keeps one copy per node in its object store).
_worker_objects: dict[str, Any] = {}


def set_worker_objects(
    objects: UserObjects | None, data: DatasetData | None, progress: Any = None
) -> None:
    """``progress``: the queue on which the worker sends its epochs to the parent's bar."""
    _worker_objects.update(objects=objects, data=data, progress=progress)


def run_trial_job(
    config: dict[str, Any],
    trial: dict[str, Any],
    out: str,
    threads: int | None = None,
    data_hash: str = "",
    shared: tuple[UserObjects | None, DatasetData | None] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """A trial from plain JSON data: what worker processes and Ray tasks execute. The data
    set is loaded once per process (or comes with the run's objects). Epochs go to the
    ``progress`` queue (a Ray task's) or the worker's (``set_worker_objects``)."""
    if threads:
        torch.set_num_threads(threads)
    cfg = validate_config(config)
    objects, data = (
        shared
        if shared is not None
        else (_worker_objects.get("objects"), _worker_objects.get("data"))
    )
    if data is None:
        data = _load_data_cached(
            json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True), data_hash
        )
    return run_trial(
        cfg,
        data,
        Trial.from_json(trial),
        Streams(cfg.seed, cfg.seeds),
        resolve_device(cfg.train.device),
        Path(out),
        objects,
        epoch_sender(progress if progress is not None else _worker_objects.get("progress")),
    )


def fold_scores(records: list[dict[str, Any]], metric: str) -> np.ndarray:
    return np.array([r["test"][metric] for r in records], dtype=float)
