"""``randkit.cross_validate``: the Python entry point, for the user's own objects.

Two ways in, with the same plans, runners, run store, resume, statistics and report:

* the built-in trainer: ``model`` is an ``nn.Module`` subclass, a factory, an instance, a zoo
  name or ``"module:factory"``; ``loss``, ``optimizer``, ``scheduler``, ``metrics`` and
  ``callbacks`` replace the config's choices;
* the user's own loop: ``fit=fit_and_score`` is called with a ``randkit.Trial`` per trial.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from randkit import atomic
from randkit.config import validate_config
from randkit.cv.objects import UserObjects, check_model_object, describe
from randkit.cv.run import CVResult, run_cv
from randkit.data.arrays import checked_arrays
from randkit.data.dataset import DatasetData, arrays_data, dataset_data
from randkit.errors import UserError
from randkit.models.user_code import source_file_of
from randkit.train.parts import UserParts, check_callbacks, class_and_kwargs

RUNNERS = ("sequential", "vectorized", "processes", "ray")


def cross_validate(
    model: Any = None,
    data: Any = "digits",
    *,
    fit: Any = None,
    task: str | None = None,
    labels: Any = None,
    groups: Any = None,
    splitter: str | Any | None = None,
    folds: int = 5,
    repeats: int = 1,
    vary: list[str] | None = None,
    seed: int = 0,
    loss: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    metrics: Any = None,
    metric: str | None = None,
    interval: str = "headline",
    train: dict[str, Any] | None = None,
    randomize: dict[str, Any] | None = None,
    callbacks: Any = None,
    num_workers: int = 0,
    runner: str = "sequential",
    workers: int | None = None,
    cv: dict[str, Any] | None = None,
    out: str | Path | None = None,
    quiet: bool = True,
) -> CVResult:
    """Cross-validate a model (or a trial function) and return ``.table`` (one row per trial)
    and ``.summary`` (headline mean, intervals, variance by random source).

    ``data``: a map-style ``torch.utils.data.Dataset``, ``(x, y[, groups])`` arrays, ``"digits"``
    or a data config dict. ``task``: ``classification``, ``regression`` or ``multilabel``
    (inferred from the targets when unambiguous). ``splitter``: a name (``kfold``,
    ``stratified_kfold``, ``group_kfold``, ``stratified_group_kfold``, ``shuffle_split``,
    ``5x2``) or any scikit-learn splitter object. ``interval``: ``headline`` (corrected
    resampled t) or ``nested`` (nested CV, Bates et al. 2024: ``folds`` x ``repeats`` outer
    plus folds (folds - 1) / 2 x ``repeats`` inner trainings). See docs/cross-validation.md.

    >>> result = cross_validate(MyNet, my_dataset, train={"epochs": 3})     # doctest: +SKIP
    >>> result.summary["mean"], result.summary["ci95"]                     # doctest: +SKIP
    """
    created = out is None or not Path(out).exists()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="randkit-cv-"))
    with _nothing_left_on_refusal(out, created):
        _check_entry(model, fit, runner)
        own = {"runner", "workers", "folds", "repeats", "metric", "splitter", "vary"}
        own = (own | {"interval"}) & set(cv or {})
        if own:
            name = sorted(own)[0]
            raise UserError(f"cv.{name}", f"has its own argument: pass {name}= instead")
        if isinstance(optimizer, str):  # a config name: sgd, adam, adamw, zo-sgd
            train, optimizer = {**(train or {}), "optimizer": optimizer}, None
        objects = UserObjects(fit=fit)
        objects.parts = _parts(task, loss, optimizer, scheduler, metrics, callbacks, num_workers)
        model_section = _model_section(model, objects, fit)
        uses_objects = fit is not None or objects.model is not None
        loaded, data_section = _data(data, labels, groups, task, out, uses_objects)
        if loaded is not None:
            objects.dataset = loaded.dataset
            objects.parts.task = loaded.task
        elif fit is not None:
            raise UserError("data", "a fit= function needs a Dataset or (x, y) arrays")
        given = {"folds": folds, "repeats": repeats, "runner": runner, "workers": workers,
                 "interval": interval}  # fmt: skip
        cv_section = _cv_section(given, metric, objects.parts.task, cv, splitter, vary)
        cfg = validate_config(
            {
                "seed": seed,
                "objects": objects.names(),
                "task": objects.parts.task,
                "data": data_section,
                "model": model_section,
                "train": dict(train or {}),
                "randomize": dict(randomize or {}),
                "cv": cv_section,
            }
        )
        plain = not uses_objects and loaded is None and objects.parts.default_loop
        return run_cv(
            cfg,
            out,
            quiet=quiet,
            splitter=_splitter_object(splitter),
            data=loaded,
            objects=None if plain else objects,
        )


def _cv_section(
    given: dict[str, Any],
    metric: str | None,
    task: str,
    cv: dict[str, Any] | None,
    splitter: Any,
    vary: list[str] | None,
) -> dict[str, Any]:
    return {
        **given,
        "metric": metric,
        # Stratified folds need class labels.
        "splitter": "stratified_kfold" if task == "classification" else "kfold",
        **(cv or {}),
        **({"splitter": splitter} if isinstance(splitter, str) else {}),
        **({"vary": vary} if vary is not None else {}),
    }


@contextlib.contextmanager
def _nothing_left_on_refusal(out: Path, created: bool) -> Iterator[None]:
    """A call refused before its run starts leaves nothing behind: not the arrays file
    (``data.npz``) written for the runners, nor the folder when this call made it."""
    before = set(out.iterdir()) if out.is_dir() else set()
    try:
        yield
    except UserError:
        new = (set(out.iterdir()) if out.is_dir() else set()) - before
        if new <= {out / "data.npz"}:  # anything more: the run started, keep it to resume
            for path in new:
                path.unlink()
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise


def _check_entry(model: Any, fit: Any, runner: str) -> None:
    if runner not in RUNNERS:
        raise UserError("runner", f"must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if fit is None:
        return
    if model is not None:
        raise UserError("fit", "give either model= (built-in trainer) or fit= (your loop)")
    if not callable(fit):
        raise UserError("fit", f"must be a function of a randkit.Trial, got {type(fit).__name__}")
    if runner == "vectorized":
        raise UserError(
            "runner",
            "'vectorized' runs the built-in trainer; a fit= function "
            "runs with 'sequential', 'processes' or 'ray'",
        )


def _splitter_object(splitter: Any) -> Any:
    """A scikit-learn splitter object given instead of a name (used as given)."""
    if splitter is None or isinstance(splitter, str):
        return None
    if not hasattr(splitter, "split"):
        raise UserError("splitter", f"needs a split() method, got {type(splitter).__name__}")
    return splitter


def _parts(
    task: str | None,
    loss: Any,
    optimizer: Any,
    scheduler: Any,
    metrics: Any,
    callbacks: Any,
    num_workers: int,
) -> UserParts:
    if loss is not None and not callable(loss):
        raise UserError(
            "loss", f"must be a callable (outputs, targets) -> tensor, got {loss!r:.60}"
        )
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError("num_workers", f"must be an integer >= 0, got {num_workers!r}")
    return UserParts(
        task=task or "classification",
        loss=loss,
        optimizer=None
        if optimizer is None  # a config name was moved into train.optimizer
        else class_and_kwargs(optimizer, "optimizer", torch.optim.Optimizer),  # type: ignore[arg-type]
        scheduler=None if scheduler is None else class_and_kwargs(scheduler, "scheduler", object),
        metrics=metrics,
        callbacks=check_callbacks(callbacks),
        num_workers=num_workers,
    )


def _model_section(model: Any, objects: UserObjects, fit: Any) -> dict[str, Any]:
    """The config's model section; a Python model object goes to ``objects.model`` and the
    section records it by reference (``module:qualname``, importable again for an export)."""
    if fit is not None:
        return {"name": describe(fit)}
    if model is None:
        model = "cnn"
    if isinstance(model, str):
        return {"name": model}
    if isinstance(model, dict):
        return dict(model)
    check_model_object(model)
    objects.model = model
    return _model_reference(model)


def _model_reference(model: Any) -> dict[str, Any]:
    """``{"name": "module:qualname", "args": ..., "code_dir": ...}`` for a class, a function
    or a keyword ``functools.partial`` of one, so that ``randkit export`` can build the model
    again (its folder is where the bundle's code is found); an instance is only named."""
    target, args = model, {}
    if isinstance(model, functools.partial) and not model.args:
        target, args = model.func, dict(model.keywords)
    if not (inspect.isclass(target) or inspect.isfunction(target)) or "<" in target.__qualname__:
        return {"name": describe(model)}
    section: dict[str, Any] = {"name": describe(target), "args": args}
    source = source_file_of(target)
    if source is not None and "site-packages" not in source.parts:
        section["code_dir"] = str(source.parent)
    try:
        json.dumps(args)
    except TypeError:
        return {"name": describe(model)}
    return section


def _is_arrays(data: Any) -> bool:
    """``(x, y)`` or ``(x, y, groups)`` of array-likes (NumPy, torch, pandas, lists), not a
    Dataset of two or three items."""
    if not isinstance(data, tuple | list) or len(data) not in (2, 3):
        return False
    return all(
        isinstance(part, np.ndarray | torch.Tensor | list) or hasattr(part, "__array__")
        for part in data
    )


def _array(part: Any) -> np.ndarray:
    if isinstance(part, torch.Tensor):
        return part.detach().cpu().numpy()
    return np.asarray(part.to_numpy() if hasattr(part, "to_numpy") else part)


def _data(
    data: Any, labels: Any, groups: Any, task: str | None, out: Path, uses_objects: bool
) -> tuple[DatasetData | None, dict[str, Any]]:
    """The user's data as a ``DatasetData`` when it is a Python object (None for data the
    config can load), and the config's data section."""
    if isinstance(data, str):
        return None, {"kind": data}
    if isinstance(data, dict):
        return None, dict(data)
    if _is_arrays(data):
        if labels is not None:
            raise UserError("labels", "is for a Dataset; (x, y) arrays bring their labels in y")
        x, y, *rest = (_array(part) for part in data)
        if len(x) != len(y) or (rest and len(rest[0]) != len(y)):
            lengths = ", ".join(str(len(part)) for part in (x, y, *rest))
            raise UserError("data", f"(x, y[, groups]) must have one length, got {lengths}")
        groups = rest[0] if groups is None and rest else groups
        if not uses_objects and _plain_classes(y, task):
            # Checked here, not when read back: an error names the arrays, not data.npz.
            checked_arrays(x, y, None if groups is None else np.asarray(groups), "data", "")
            return None, _npz_section(x, y, groups, out)  # today's path: standardized inputs
        return arrays_data(x, y, groups, task), {"kind": "object", "object": "(x, y) arrays"}
    if isinstance(data, torch.utils.data.DataLoader):
        data = data.dataset  # randkit makes each trial's loaders; the data set is what counts
    loaded = dataset_data(data, labels, groups, task)
    return loaded, {"kind": "object", "object": describe(data)}


def _plain_classes(y: np.ndarray, task: str | None) -> bool:
    """Class labels the config path takes (1-D; continuous values are refused there)."""
    from randkit.train.tasks import infer_task

    return y.ndim == 1 and infer_task(y, task, "task") == "classification"


def _npz_section(x: np.ndarray, y: np.ndarray, groups: Any, out: Path) -> dict[str, Any]:
    """In-memory arrays are written to ``out/data.npz`` (no pickle), so that every runner,
    worker processes and Ray included, can load them."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data.npz"
    arrays = {"x": x, "y": y, **({"groups": np.asarray(groups)} if groups is not None else {})}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic.write_bytes(path, buffer.getvalue())
    return {"kind": "npz", "path": str(path)}
