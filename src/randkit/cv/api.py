"""``randkit.cross_validate``: the Python entry point."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from randkit import atomic
from randkit.config import validate_config
from randkit.cv.run import CVResult, run_cv
from randkit.errors import UserError


def _dataset_section(dataset: Any, out: Path) -> dict[str, Any]:
    """A ``data:`` config section. In-memory arrays are written to ``out/data.npz`` (no
    pickle), so that every runner, worker processes and Ray included, can load them."""
    if isinstance(dataset, str):
        return {"kind": dataset}
    if isinstance(dataset, dict):
        return dict(dataset)
    if isinstance(dataset, tuple | list) and len(dataset) in (2, 3):
        x, y, *groups = (np.asarray(part) for part in dataset)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "data.npz"
        arrays = {"x": x, "y": y, **({"groups": groups[0]} if groups else {})}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic.write_bytes(path, buffer.getvalue())
        return {"kind": "npz", "path": str(path)}
    raise UserError(
        "dataset",
        "must be 'digits', a data config dict or (x, y[, groups]) "
        f"arrays, got {type(dataset).__name__}",
    )


def cross_validate(
    model_factory: str | dict[str, Any] = "cnn",
    dataset: Any = "digits",
    splitter: str | Any = "stratified_kfold",
    seed: int = 0,
    train: dict[str, Any] | None = None,
    runner: str = "sequential",
    *,
    folds: int = 5,
    repeats: int = 1,
    vary: list[str] | None = None,
    randomize: dict[str, Any] | None = None,
    cv: dict[str, Any] | None = None,
    out: str | Path | None = None,
    quiet: bool = True,
) -> CVResult:
    """Cross-validate a model and return ``.table`` (one row per trial) and ``.summary``.

    ``model_factory`` is a zoo name, ``"package.module:factory"`` or ``{"name", "args"}``;
    ``splitter`` a name (``kfold``, ``stratified_kfold``, ``group_kfold``,
    ``stratified_group_kfold``, ``shuffle_split``, ``5x2``) or any scikit-learn splitter object.

    >>> result = cross_validate("mlp", "digits", train={"epochs": 3})   # doctest: +SKIP
    >>> result.summary["mean"], result.summary["ci95"]                   # doctest: +SKIP
    """
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="randkit-cv-"))
    model = {"name": model_factory} if isinstance(model_factory, str) else dict(model_factory)
    cv_section: dict[str, Any] = {
        "folds": folds,
        "repeats": repeats,
        "runner": runner,
        **(cv or {}),
    }
    splitter_object = None
    if isinstance(splitter, str):
        cv_section["splitter"] = splitter
    else:
        if not hasattr(splitter, "split"):
            raise UserError("splitter", f"needs a split() method, got {type(splitter).__name__}")
        splitter_object = splitter
    if vary is not None:
        cv_section["vary"] = vary
    raw = {
        "seed": seed,
        "data": _dataset_section(dataset, out),
        "model": model,
        "train": dict(train or {}),
        "randomize": dict(randomize or {}),
        "cv": cv_section,
    }
    return run_cv(validate_config(raw), out, quiet=quiet, splitter=splitter_object)
