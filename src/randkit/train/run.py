"""A training run in a directory: resolved config, checkpoints, resume, final artifacts."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import randkit
from randkit import atomic
from randkit.config import ExperimentConfig
from randkit.data import Prepared, keep_cache, load_and_prepare
from randkit.errors import UserError
from randkit.extras import MissingExtraError
from randkit.randomize.build import preflight
from randkit.streams import SOURCES, Streams
from randkit.train.checkpoint import read_checkpoint, save_checkpoint
from randkit.train.loop import LoopState, Trainer, model_and_randomization, resolve_device
from randkit.train.metrics import evaluate
from randkit.train.tasks import check_output_width, output_width

_log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
RUN_FILES = (
    "config.yaml",
    CHECKPOINT,
    "state.json",
    "model.safetensors",
    "metrics.json",
    "preprocessing.json",
    "report.html",
)


@dataclass
class RunResult:
    out: Path
    metrics: dict[str, Any]
    resumed_from_step: int | None


def _versions() -> dict[str, str]:
    return {"randkit": randkit.__version__, "torch": torch.__version__}


def _prepare_out(out: Path, fingerprint: str, restart: bool) -> Path | None:
    """Check the run directory; return the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise UserError("out", f"{str(out)!r} exists and is not a directory")
    checkpoint = out / CHECKPOINT
    if restart:
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        return None
    if not checkpoint.is_file():
        if out.is_dir() and (out / "state.json").is_file():
            raise UserError(
                "out",
                f"{str(out)!r} holds a state.json but no checkpoint; use --restart to start over",
            )
        return None
    _, state = read_checkpoint(checkpoint)
    if state.get("config_hash") != fingerprint:
        raise UserError(
            "out",
            f"{str(out)!r} holds a checkpoint of a different config "
            f"(hash {state.get('config_hash')} != {fingerprint}); "
            "use --restart or another --out",
        )
    return checkpoint


def source_seeds(streams: Streams) -> dict[str, int]:
    return {source: streams.source_seed(source) for source in SOURCES}


def train_run(
    cfg: ExperimentConfig,
    out: Path,
    restart: bool = False,
    quiet: bool = False,
    report: bool = True,
) -> RunResult:
    """Train (or resume) the experiment ``cfg`` in ``out``; with ``report`` and the
    ``report`` extra, write ``out/report.html`` (without the extra, one warning).

    Everything that can fail on the user's input (config, data, model arguments) fails
    before anything is written.
    """
    if cfg.train.early_stopping is not None and cfg.data.val_fraction == 0:
        raise UserError("train.early_stopping", "randkit train needs data.val_fraction > 0, got 0")
    streams = Streams(cfg.seed, cfg.seeds)
    prepared = load_and_prepare(cfg.data, streams, defer_cache=True)
    model, randomization = model_and_randomization(cfg, prepared, streams)
    outputs = preflight(model, randomization, prepared.train.x[:2])
    # A factory that ignores num_classes would train (and save) a head of the wrong size.
    check_output_width(
        "classification",
        output_width(outputs),
        len(prepared.classes),
        f"model.name {cfg.model.name!r}",
    )
    device = resolve_device(cfg.train.device)
    fingerprint = cfg.fingerprint()
    resume_from = _prepare_out(out, fingerprint, restart)
    keep_cache(prepared)  # every check passed: the image cache may be written now

    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out)
    atomic.write_yaml(out / "config.yaml", cfg.resolved())
    if prepared.preprocessing:
        atomic.write_json(out / "preprocessing.json", prepared.preprocessing)

    trainer = Trainer(
        model,
        prepared.train,
        prepared.val,
        len(prepared.classes),
        cfg.train,
        streams,
        device,
        randomization,
    )
    resumed_step = None
    if resume_from is not None:
        tensors, state = read_checkpoint(resume_from)
        trainer.restore(tensors, state)
        resumed_step = trainer.state.global_step
    started = time.perf_counter()

    def checkpoint(t: Trainer) -> None:
        extra, snapshot = t.snapshot()
        state = {
            "config_hash": fingerprint,
            "versions": _versions(),
            "step": t.state.global_step,
            "epoch": t.state.epoch,
            "total_steps": t.total_steps,
            "complete": False,
            **snapshot,
        }
        save_checkpoint(out / CHECKPOINT, t.model, t.optimizer, extra, state)
        atomic.write_json(
            out / "state.json",
            {k: v for k, v in state.items() if k != "loop"} | {"history": t.state.history},
        )

    with _progress(quiet, trainer) as on_step:
        trainer.fit(on_step=on_step, on_checkpoint=checkpoint)
    metrics = _finish(out, trainer, prepared, streams, fingerprint)
    metrics["fit_seconds_this_session"] = round(time.perf_counter() - started, 3)
    if report:
        _write_report(out)
    return RunResult(out, metrics, resumed_step)


def _write_report(out: Path) -> None:
    """The run's page, as ``randkit cv`` writes one (the report layer is imported late: it
    sits above training)."""
    try:
        from randkit.report import write_report
    except MissingExtraError as exc:
        _log.warning("%s; skipped report.html", exc)
    else:
        write_report(out)


def _finish(
    out: Path, trainer: Trainer, prepared: Prepared, streams: Streams, fingerprint: str
) -> dict[str, Any]:
    state: LoopState = trainer.state
    metrics: dict[str, Any] = {
        "test": evaluate(trainer.model, prepared.test, len(prepared.classes), trainer.device),
        "history": state.history,
        "epochs_run": state.epoch,
        "steps": state.global_step,
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "classes": prepared.classes,
        "sizes": {
            "train": len(prepared.train),
            "test": len(prepared.test),
            "val": len(prepared.val) if prepared.val is not None else 0,
        },
        "seeds": source_seeds(streams),
    }
    atomic.write_safetensors(
        out / "model.safetensors",
        trainer.model.state_dict(),
        {"classes": prepared.classes, "input_shape": prepared.input_shape},
    )
    atomic.write_json(out / "metrics.json", metrics)
    atomic.write_json(
        out / "state.json",
        {
            "config_hash": fingerprint,
            "versions": _versions(),
            "step": state.global_step,
            "epoch": state.epoch,
            "total_steps": trainer.total_steps,
            "complete": True,
            "history": state.history,
        },
    )
    return metrics


@contextlib.contextmanager
def _progress(quiet: bool, trainer: Trainer):  # type: ignore[no-untyped-def]
    if quiet:
        yield None
        return
    columns = (
        TextColumn("[bold]train[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(
            "", total=trainer.total_steps, completed=trainer.state.global_step, loss=float("nan")
        )

        def on_step(state: LoopState, loss: float) -> None:
            progress.update(
                task,
                completed=state.global_step,
                loss=loss,
                description=f"epoch {state.epoch + 1}/{trainer.cfg.epochs}",
            )

        yield on_step
        progress.update(
            task,
            completed=trainer.total_steps
            if not trainer.state.stopped_early
            else trainer.state.global_step,
        )
