"""What kind of prediction a run makes: classification, regression or multilabel.

Object-first cross-validation takes a user's model, data, loss and metrics. Everything that
depends on the *kind* of target lives here as pure functions, so the trainer and the
cross-validation driver share one set of rules: which task the targets imply, the default
loss, the evaluation metrics, the user's own metrics, and the output width the model needs.
Nothing here draws random numbers or trains anything.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score
from torch.nn import functional as F

from randkit.errors import UserError
from randkit.train.metrics import classification_metrics

TASKS = ("classification", "regression", "multilabel")

# Integer-valued float targets with at most this many distinct values are taken as classes
# when no task is given (labels saved as floats by pandas or a CSV reader are common).
MAX_INFERRED_CLASSES = 50

_HEADLINE = {"classification": "accuracy", "regression": "rmse", "multilabel": "macro_f1"}
_MIN_NAMES = {"loss", "mse", "rmse", "mae", "msle", "rmsle", "nll", "perplexity"}
_KINDS = {"U": "str", "S": "str", "b": "bool", "i": "int", "u": "int", "f": "float"}


def _check_task(task: str, field: str = "task") -> str:
    if task not in TASKS:
        raise UserError(field, f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return task


def _examples(values: np.ndarray, count: int = 2) -> str:
    """The first few distinct values in order of appearance, for messages."""
    _, first = np.unique(values, return_index=True)
    picked = values[np.sort(first)[:count]]
    return ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in picked)


def _as_array(targets: Any, field: str) -> tuple[np.ndarray, str]:
    """Targets as an array and their kind: "bool", "int", "float" or "str".

    Object arrays (a pandas column, a list of mixed Python objects) become strings when every
    element is one, numbers when they all convert, and are refused otherwise.
    """
    array = np.asarray(targets)
    if array.size == 0:
        raise UserError(field, f"targets are empty (shape {array.shape}); nothing to learn from")
    kind = array.dtype.kind
    if kind == "O":
        if all(isinstance(v, str) for v in array.flat):
            return array.astype(str), "str"
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError):
            types = sorted({type(v).__name__ for v in array.flat})
            raise UserError(
                field, f"targets mix value types ({', '.join(types)}); use numbers or strings"
            ) from None
        kind = "f"
    if kind not in _KINDS:
        raise UserError(field, f"targets of dtype {array.dtype} are not supported; use numbers")
    bad = ~np.isfinite(array) if kind == "f" else None
    if bad is not None and bad.any():
        where = int(np.flatnonzero(bad.ravel())[0])
        raise UserError(
            field,
            f"targets hold {int(bad.sum())} non-finite values (NaN or inf), e.g. "
            f"{array.ravel()[where]} at flat index {where}; every task needs finite "
            "targets: drop or fill them",
        )
    return array, _KINDS[kind]


def _is_binary(array: np.ndarray, kind: str) -> bool:
    return kind == "bool" or (kind != "str" and bool(np.isin(array, (0, 1)).all()))


def _integer_valued(array: np.ndarray, kind: str) -> bool:
    return kind in ("bool", "int") or (kind == "float" and bool((array == np.round(array)).all()))


def _indices(array: np.ndarray, kind: str) -> bool:
    """Whether labels can serve as class indices as they are (non-negative integers)."""
    return _integer_valued(array, kind) and bool((array >= 0).all())


def infer_task(targets: np.ndarray, task: str | None, field: str = "task") -> str:
    """The task for ``targets``: ``task`` checked against them, or inferred when it is None.

    Inference only takes the unambiguous cases; continuous-looking targets are refused rather
    than turned into hundreds of classes, which would train and report nonsense silently.
    Every error is raised under ``field`` (the caller's name for the task setting).
    """
    if task is not None:
        _check_task(task, field)
    array, kind = _as_array(targets, field)
    if task is None:
        return _infer(array, kind, field)
    if task == "classification":
        if array.ndim != 1:
            hint = "; use task='multilabel'" if array.ndim == 2 and _is_binary(array, kind) else ""
            raise UserError(
                field, f"'classification' needs 1-D class labels, got shape {array.shape}{hint}"
            )
        if not _integer_valued(array, kind) and kind != "str":
            odd = array[array != np.round(array)]
            raise UserError(
                field,
                f"'classification' needs integer class labels, got float targets with "
                f"{len(np.unique(odd))} distinct non-integer values such as {_examples(odd, 1)}; "
                "use task='regression'",
            )
    elif task == "regression":
        if kind == "str":
            raise UserError(
                field,
                f"'regression' needs numeric targets, got strings such as {_examples(array)}; "
                "use task='classification'",
            )
        if array.ndim not in (1, 2):
            raise UserError(
                field, f"'regression' needs 1-D or 2-D (multi-output) targets, got {array.shape}"
            )
    elif array.ndim != 2 or not _is_binary(array, kind):
        if array.ndim != 2 or kind == "str":
            found = f"{kind} targets of shape {array.shape}"
        else:
            found = f"values such as {_examples(array[~np.isin(array, (0, 1))])}"
        raise UserError(
            field, f"'multilabel' needs a 2-D array of 0/1 (one column per label), got {found}"
        )
    return task


def _infer(array: np.ndarray, kind: str, field: str) -> str:
    if array.ndim == 2 and _is_binary(array, kind):
        return "multilabel"
    if array.ndim != 1:
        raise UserError(
            field,
            f"not given, and targets of shape {array.shape} are not 2-D 0/1 labels; pass "
            "task='regression' for multi-output regression (or task='multilabel' with 0/1)",
        )
    if kind in ("bool", "int", "str"):
        return "classification"
    distinct = len(np.unique(array))
    if _integer_valued(array, kind) and distinct <= MAX_INFERRED_CLASSES:
        return "classification"
    raise UserError(
        field,
        f"not given, and the targets are float values with {distinct} distinct values "
        f"(e.g. {_examples(array)}) that look continuous; pass task='regression' "
        "(or task='classification' with integer labels)",
    )


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from logits; targets are class indices, or (N, C) probabilities (mixup)."""
    if targets.is_floating_point() and targets.shape == outputs.shape:
        return F.cross_entropy(outputs, targets.to(outputs.dtype))
    return F.cross_entropy(outputs, targets.long())


def _align(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression outputs and targets of one shape: an (N, 1) output against (N,) targets
    would otherwise broadcast to (N, N) and give a plausible-looking but wrong loss."""
    targets = targets.to(outputs.dtype)
    if outputs.shape == targets.shape:
        return outputs, targets
    if outputs.dim() == 2 and outputs.shape[1] == 1 and targets.dim() == 1:
        return outputs[:, 0], targets
    if targets.dim() == 2 and targets.shape[1] == 1 and outputs.dim() == 1:
        return outputs, targets[:, 0]
    raise UserError(
        "model",
        f"outputs of shape {tuple(outputs.shape)} do not match targets of shape "
        f"{tuple(targets.shape)}; regression needs one output per target column",
    )


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every output, with (N, 1) vs (N,) aligned, never broadcast."""
    return F.mse_loss(*_align(outputs, targets))


def multilabel_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy from logits, one independent decision per label."""
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))


_LOSSES = {
    "classification": classification_loss,
    "regression": regression_loss,
    "multilabel": multilabel_loss,
}


def default_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss used when the user gives none: a module-level function, so it pickles to
    worker processes (a lambda or a closure would not)."""
    return _LOSSES[_check_task(task)]


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    # Under two examples scikit-learn warns and returns NaN; apply its force_finite rule
    # for a constant target instead (1.0 for a perfect prediction, else 0.0).
    if len(y) < 2:
        return 1.0 if np.array_equal(y, p) else 0.0
    return float(r2_score(y, p, force_finite=True))


def _multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    y = targets.numpy().astype(bool)
    s = scores.numpy()
    pred = s > 0
    # F1 from counts, equal to scikit-learn's (zero_division=0) but with one label column
    # treated like many (scikit-learn would read an (N, 1) array as binary, not multilabel).
    tp = (pred & y).sum(0)
    wrong = (pred != y).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_label = np.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong), 0.0)
    total = 2 * tp.sum() + wrong.sum()
    both = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    auroc = [roc_auc_score(y[:, j], s[:, j]) for j in both]
    return {
        "loss": float(multilabel_loss(scores, targets)),
        "subset_accuracy": float((pred == y).all(1).mean()),
        "macro_f1": float(per_label.mean()),
        "micro_f1": float(2 * tp.sum() / total) if total else 0.0,
        "auroc": float(np.mean(auroc)) if auroc else math.nan,
    }


@torch.no_grad()
def task_metrics(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Evaluation metrics from raw model outputs (logits or predictions), on the CPU.

    Classification reuses ``train.metrics.classification_metrics`` so that the config-driven
    and object-first paths report the same numbers. The multilabel ``auroc`` is NaN when no
    label has both classes among the targets (it is undefined there, not zero).
    """
    _check_task(task)
    outputs = outputs.detach().float().cpu()
    targets = targets.detach().cpu()
    if task == "classification":
        return classification_metrics(outputs, targets.long(), outputs.shape[1])
    if task == "multilabel":
        return _multilabel_metrics(outputs, targets.float())
    out, tgt = _align(outputs, targets)
    y, p = tgt.double().numpy(), out.double().numpy()
    mse = float(mean_squared_error(y, p))
    return {
        "loss": float(F.mse_loss(out, tgt)),
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(mean_absolute_error(y, p)),
        "r2": _r2(y, p),
    }


def headline_metric(task: str) -> str:
    """The one metric summaries and comparisons lead with for ``task``."""
    return _HEADLINE[_check_task(task)]


def metric_direction(name: str) -> str:
    """Whether lower ("min": losses, errors) or higher ("max": the rest) is better, so that
    early stopping and model comparison know which way to look."""
    lowered = name.lower()
    last = lowered.rsplit("_", 1)[-1]
    if lowered in _MIN_NAMES or last in _MIN_NAMES or "error" in lowered:
        return "min"
    return "max"


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _is_stateful(metric: Any) -> bool:
    """A torchmetrics-style ``Metric``, recognised by shape so torchmetrics stays optional."""
    return all(callable(getattr(metric, a, None)) for a in ("update", "compute", "reset"))


def _metric_name(metric: Any, field: str) -> str:
    target = metric.func if isinstance(metric, functools.partial) else metric
    name = getattr(target, "__name__", None) if not _is_stateful(target) else None
    if name == "<lambda>":
        raise UserError(field, "a lambda has no name; pass metrics as a dict {'name': metric}")
    return name if isinstance(name, str) and name else _snake(type(target).__name__)


def _named(metrics: Any, field: str) -> dict[str, Any]:
    if isinstance(metrics, dict):
        pairs = list(metrics.items())
    elif isinstance(metrics, list | tuple):
        pairs = [(_metric_name(m, field), m) for m in metrics]
    elif callable(metrics) or _is_stateful(metrics):
        pairs = [(_metric_name(metrics, field), metrics)]
    else:
        raise UserError(
            field,
            f"expected None, a dict name->metric or a list of metrics, got "
            f"{type(metrics).__name__}",
        )
    named: dict[str, Any] = {}
    for name, metric in pairs:
        if not isinstance(name, str) or not name:
            raise UserError(field, f"metric names must be non-empty strings, got {name!r}")
        if name in named:
            raise UserError(field, f"two metrics are named {name!r}; pass a dict to name them")
        if not (callable(metric) or _is_stateful(metric)):
            raise UserError(
                f"{field}.{name}", f"is a {type(metric).__name__}, not a callable or a Metric"
            )
        named[name] = metric
    return named


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"raised {type(error).__name__}: {text}" if text else f"raised {type(error).__name__}"


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy() if value.dim() == 0 else None
    if isinstance(value, np.ndarray):
        value = value[()] if value.ndim == 0 else None
    if isinstance(value, int | float | np.number | np.bool_):
        return float(value)
    return None


@torch.no_grad()
def user_metrics(
    metrics: Any, outputs: torch.Tensor, targets: torch.Tensor, field: str = "metrics"
) -> dict[str, float]:
    """The user's metrics on raw outputs (logits or predictions) and targets, as floats.

    A metric is a callable ``(outputs, targets) -> number`` or a stateful torchmetrics-style
    object (reset, update once with everything, compute). A failing metric is the user's to
    fix, so it becomes a one-line ``UserError`` under ``<field>.<name>``, not a traceback;
    a NaN or infinite value is refused too, since it would poison the cross-validation mean.
    """
    if metrics is None:
        return {}
    outputs, targets = outputs.detach(), targets.detach()
    results: dict[str, float] = {}
    for name, metric in _named(metrics, field).items():
        where = f"{field}.{name}"
        try:
            if _is_stateful(metric):
                if isinstance(metric, torch.nn.Module):
                    metric.to(outputs.device)
                metric.reset()
                metric.update(outputs, targets)
                value = metric.compute()
                metric.reset()
            else:
                value = metric(outputs, targets)
        except Exception as error:
            raise UserError(where, _one_line(error)) from error
        number = _scalar(value)
        if number is None:
            shape = getattr(value, "shape", None)
            found = type(value).__name__ + (f" of shape {tuple(shape)}" if shape else "")
            raise UserError(where, f"returned {found}; a metric must return one number")
        if not math.isfinite(number):
            raise UserError(where, f"returned {number}; a metric must return a finite number")
        results[name] = number
    return results


def output_width(outputs: torch.Tensor) -> int | None:
    """Values per example of a batch of model outputs; None for a 1-D output."""
    return int(outputs.shape[1]) if outputs.dim() > 1 else None


def check_output_width(task: str, width: int | None, expected: int, field: str = "model") -> None:
    """Refuse, before any training, a model whose last layer has the wrong number of outputs.

    ``width`` is the model's values per example (``output.shape[1]``), or None for a 1-D
    output, which only single-target regression accepts.
    """
    _check_task(task)
    if task == "regression" and expected == 1 and width in (None, 1):
        return
    if width == expected:
        return
    many, one = {
        "classification": ("classes", "class"),
        "multilabel": ("labels", "label"),
        "regression": ("target columns", "column"),
    }[task]
    got = "one value per example (a 1-D output)" if width is None else f"{width} values per example"
    raise UserError(
        field,
        f"outputs {got} but the data has {expected} {many}; make its last layer output "
        f"{expected} values (one per {one})",
    )


def num_outputs(task: str, targets: np.ndarray) -> int:
    """Values per example the model must output.

    Classification: ``int(max) + 1`` when labels are non-negative integers (randkit's own
    encoding is 0..K-1, and a class missing from a subset still keeps its slot), else the
    number of distinct labels, the same encoding ``targets_tensor`` applies. Call both on the
    full target array, not a fold, so that every fold agrees. Multilabel: labels (columns).
    Regression: 1 for 1-D targets, else the number of columns.
    """
    _check_task(task)
    array, kind = _as_array(targets, "targets")
    if task == "classification":
        return int(array.max()) + 1 if _indices(array, kind) else len(np.unique(array))
    return 1 if array.ndim == 1 else int(array.shape[1])


def targets_tensor(task: str, targets: np.ndarray) -> torch.Tensor:
    """Targets as the loss expects them: long class indices for classification (strings or
    negative labels become their index among the sorted distinct labels), else float32."""
    _check_task(task)
    array, kind = _as_array(targets, "targets")
    if task == "classification":
        if not _indices(array, kind):
            array = np.unique(array, return_inverse=True)[1].reshape(array.shape)
        return torch.tensor(array.astype(np.int64))
    return torch.tensor(array.astype(np.float32))


def metric_targets(task: str, targets: torch.Tensor) -> torch.Tensor:
    """Targets as metrics expect them: multilabel 0/1 labels as integers (torchmetrics'
    ``Multilabel*`` refuse float targets), the others as they are."""
    return targets.long() if task == "multilabel" else targets
