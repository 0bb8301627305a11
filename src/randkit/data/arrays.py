"""Built-in digits and ``.npz`` arrays."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from randkit.data.base import LabeledData
from randkit.errors import UserError


def load_digits_data() -> LabeledData:
    """scikit-learn's digits: 1,797 8x8 grey images, 10 classes, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.tensor(bunch.target, dtype=torch.long)
    return LabeledData(
        images, targets, [str(c) for c in bunch.target_names], "image", unit_range=True
    )


def npz_arrays(
    path: Path, multilabel: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``x`` (float32), ``y`` and the optional ``groups`` of an ``.npz`` file, checked:
    ``x`` is ``(N, D)`` vectors, ``(N, H, W)`` or ``(N, C, H, W)`` images; ``y`` is ``(N,)``
    (``(N, L)`` 0/1 labels when ``multilabel``)."""
    if not path.is_file():
        raise UserError("data.path", f"npz file not found: {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise UserError(
                    "data.path",
                    f"{str(path)!r} lacks array {missing[0]!r} "
                    f"(has: {', '.join(archive.files) or 'none'})",
                )
            x, y = archive["x"], archive["y"]
            groups = archive["groups"] if "groups" in archive.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError("data.path", f"cannot read npz {str(path)!r}: {exc}") from None
    return checked_arrays(x, y, groups, "data.path", f" in {str(path)!r}", multilabel)


def checked_arrays(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None,
    field: str,
    where: str,
    multilabel: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``x`` as float32 (``(N, H, W)`` images given a channel), checked with ``y`` and
    ``groups``; errors name ``field`` and say ``where`` the arrays are (`` in 'x.npz'``, or
    nothing for the arrays given to ``randkit.cross_validate``)."""
    if x.dtype.kind not in "fiub":
        raise UserError(field, f"x{where} must be numeric, got dtype {x.dtype}")
    y_dims = 2 if multilabel else 1
    if x.ndim not in (2, 3, 4) or y.ndim != y_dims or len(x) != len(y):
        raise UserError(
            field,
            f"x must be (N, D), (N, H, W) or (N, C, H, W) and y "
            f"{'(N, L)' if multilabel else '(N,)'}; got x {x.shape} and y {y.shape}",
        )
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UserError(field, f"x{where} holds NaN or Inf (first at row {row})")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise UserError(field, f"y{where} holds NaN or Inf")
    if x.ndim == 3:
        x = x[:, None]
    if groups is not None and groups.shape != y.shape[:1]:
        raise UserError(
            field, f"groups{where} must be (N,) like y {y.shape[:1]}, got {groups.shape}"
        )
    return x, y, groups


def load_npz(path: Path) -> LabeledData:
    """The classes of an ``.npz`` file (see ``npz_arrays``). Values are used as they are
    (not rescaled to [0, 1]); the model standardizes them."""
    x, y, groups = npz_arrays(path)
    from randkit.train.tasks import infer_task

    # Continuous targets never become classes silently: a config run is a classification
    # unless it names another task.
    infer_task(y, None, "task")
    classes, targets = np.unique(y, return_inverse=True)
    kind = "vector" if x.ndim == 2 else "image"
    return LabeledData(
        torch.from_numpy(x),
        torch.from_numpy(targets.astype(np.int64)),
        [str(c) for c in classes],
        kind,
        groups=groups,
    )
