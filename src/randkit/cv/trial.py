"""One cross-validation trial, the unit every runner executes."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from randkit import atomic
from randkit.config import ExperimentConfig, validate_config
from randkit.cv.plan import PLAN_SOURCES, Trial
from randkit.data import LabeledData, featurize, load_data
from randkit.data.base import Prepared, data_fingerprint, stratified_holdout
from randkit.errors import UserError
from randkit.streams import ScopedStreams, Streams
from randkit.train.loop import Trainer, model_and_randomization, resolve_device
from randkit.train.metrics import classification_metrics, predict_logits


def prepare_trial(
    cfg: ExperimentConfig, data: LabeledData, trial: Trial, streams: ScopedStreams
) -> Prepared:
    """Featurize the trial's split; anything learned from data sees the training part only."""
    train_idx, val_idx = trial.train_idx, None
    # The validation part of each training fold: cv.inner_val_fraction, else data.val_fraction.
    fraction = cfg.cv.inner_val_fraction or cfg.data.val_fraction
    if fraction > 0:
        keep, held = stratified_holdout(
            data.targets.numpy()[train_idx],
            fraction,
            streams.seed("split", part="val"),
            "cv.inner_val_fraction",
        )
        train_idx, val_idx = train_idx[keep], train_idx[held]
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
    logits: torch.Tensor,
    history: list[dict[str, float]],
    fit_seconds: float,
) -> dict[str, Any]:
    """The JSON record of a finished trial (``trials/<id>/metrics.json``)."""
    k = len(prepared.classes)
    y, predicted = prepared.test.y.numpy(), logits.argmax(1).numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predicted, labels=list(range(k)), zero_division=0
    )
    return {
        "id": trial.id,
        "fold": trial.fold,
        "repeat": trial.repeat,
        "group": trial.group,
        "levels": trial.levels,
        "seeds": {source: streams.seed(source) for source in PLAN_SOURCES},
        "train_size": len(prepared.train),
        "test_size": len(prepared.test),
        "test": classification_metrics(logits, prepared.test.y, k, per_class_f1=f1),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        },
        "confusion_matrix": confusion_matrix(y, predicted, labels=list(range(k))).tolist(),
        "history": history,
        "fit_seconds": round(fit_seconds, 4),
    }


def save_trial(out: Path, record: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
    """Model first, metrics last: a trial counts as finished once its metrics.json exists."""
    folder = out / "trials" / record["id"]
    if weights is not None:
        atomic.write_safetensors(folder / "model.safetensors", weights, {"trial": record["id"]})
    atomic.write_json(folder / "metrics.json", record)


def run_trial(
    cfg: ExperimentConfig,
    data: LabeledData,
    trial: Trial,
    streams: Streams,
    device: torch.device,
    out: Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate one trial; with ``out``, save it under ``out/trials/<id>/``."""
    scoped = ScopedStreams(streams, trial.scopes())
    prepared = prepare_trial(cfg, data, trial, scoped)
    model, randomization = model_and_randomization(cfg, prepared, scoped)
    trainer = Trainer(
        model,
        prepared.train,
        prepared.val,
        len(prepared.classes),
        cfg.train,
        scoped,
        device,
        randomization,
    )
    started = time.perf_counter()
    trainer.fit()
    _maybe_die(trial.id)
    fit_seconds = time.perf_counter() - started
    logits = predict_logits(trainer.model, prepared.test.x, device)
    record = trial_record(trial, scoped, prepared, logits, trainer.state.history, fit_seconds)
    if out is not None:
        save_trial(out, record, trainer.model.state_dict() if cfg.cv.save_models else None)
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


def run_trial_job(
    config: dict[str, Any],
    trial: dict[str, Any],
    out: str,
    threads: int | None = None,
    data_hash: str = "",
) -> dict[str, Any]:
    """A trial from plain JSON data: what worker processes and Ray tasks execute. The data
    set is loaded once per process."""
    if threads:
        torch.set_num_threads(threads)
    cfg = validate_config(config)
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
    )


def fold_scores(records: list[dict[str, Any]], metric: str) -> np.ndarray:
    return np.array([r["test"][metric] for r in records], dtype=float)
