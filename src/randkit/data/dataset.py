"""The user's own ``torch.utils.data.Dataset`` as cross-validation data.

A map-style data set is never decoded into memory: the plan needs only its labels (for
stratification) and groups, and each trial reads its items through ``Subset`` views, batch
by batch. Labels come from ``labels=``, the data set's ``targets`` attribute (torchvision's
``ImageFolder``, ``MNIST``, ...), the label tensor of a ``TensorDataset``, or one pass over the
items (the second element of each).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from randkit.data.base import Prepared, TensorData
from randkit.errors import UserError


@dataclass
class DatasetData:
    """A whole map-style data set before any split, with its labels read once."""

    dataset: Dataset[Any]
    targets: np.ndarray  # class indices, regression targets or (N, L) 0/1 labels
    classes: list[str]
    task: str
    input_shape: list[int]  # of one item's input, read from the first item
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_memory(self) -> bool:
        """A ``TensorDataset`` of (inputs, targets): trials index its tensors directly."""
        return isinstance(self.dataset, TensorDataset) and len(self.dataset.tensors) >= 2


def dataset_length(dataset: Any, field: str = "data") -> int:
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise UserError(
            field,
            f"must be a map-style torch Dataset (with __len__ and __getitem__), "
            f"(x, y[, groups]) arrays or a data config, got {type(dataset).__name__}",
        )
    try:
        return len(dataset)
    except TypeError as exc:
        raise UserError(field, f"{type(dataset).__name__} has no length: {exc}") from None


def read_labels(dataset: Any, labels: Any, field: str = "labels") -> np.ndarray:
    """The label of every item: given, from ``targets``, a ``TensorDataset``'s second tensor,
    or one pass over the data set (through a ``DataLoader``, so its collation applies)."""
    n = dataset_length(dataset, "data")
    if labels is not None:
        found, source = _as_array(labels), field
    elif hasattr(dataset, "targets"):
        found, source = _as_array(dataset.targets), "data.targets"
    elif isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        found, source = _as_array(dataset.tensors[1]), "the TensorDataset's second tensor"
    else:
        found, source = _labels_by_pass(dataset), "the items' second elements"
    if len(found) != n:
        raise UserError(field, f"{source} has {len(found)} labels for {n} items")
    return found


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _labels_by_pass(dataset: Any) -> np.ndarray:
    loader = DataLoader(dataset, batch_size=256, shuffle=False)
    parts = []
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise UserError(
                "data",
                "items must be (input, target) pairs to find the labels, got "
                f"{type(batch).__name__}; pass labels= for another layout",
            )
        parts.append(_as_array(batch[1]))
    return np.concatenate(parts) if parts else np.zeros(0)


def encode_targets(targets: np.ndarray, task: str) -> tuple[np.ndarray, list[str]]:
    """Class labels as indices 0..K-1 and the class names; other tasks' targets as float32."""
    if task != "classification":
        return targets.astype(np.float32), []
    if targets.dtype.kind in "iu" and targets.size and targets.min() >= 0:
        count = int(targets.max()) + 1  # labels already indices: keep them (the model's order)
        return targets.astype(np.int64), [str(c) for c in range(count)]
    classes, encoded = np.unique(targets, return_inverse=True)
    return encoded.astype(np.int64), [str(c) for c in classes]


def dataset_fingerprint(data: DatasetData) -> str:
    """A hash of the data set's type, length, labels and groups. Items are not read (that
    would be a full pass over the data): a run resumed on changed items with the same labels
    is not detected."""
    digest = hashlib.sha256()
    digest.update(f"{type(data.dataset).__module__}.{type(data.dataset).__qualname__}".encode())
    digest.update(str(len(data)).encode())
    digest.update(np.ascontiguousarray(data.targets).tobytes())
    if data.in_memory:
        assert isinstance(data.dataset, TensorDataset)
        digest.update(data.dataset.tensors[0].contiguous().numpy().tobytes())
    if data.groups is not None:
        digest.update(np.asarray(data.groups).astype(str).tobytes())
    return digest.hexdigest()[:16]


def dataset_parts(
    data: DatasetData,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    test_idx: np.ndarray,
) -> Prepared:
    """One trial's parts: tensors indexed directly for a ``TensorDataset`` (the fast path),
    ``Subset`` views read item by item otherwise. Nothing is learned from the data here (no
    standardization): a Dataset brings its own transforms."""
    if data.in_memory:
        assert isinstance(data.dataset, TensorDataset)
        x, y = data.dataset.tensors[0], torch.as_tensor(targets_of(data))

        def part(idx: np.ndarray | None) -> Any:
            if idx is None:
                return None
            index = torch.as_tensor(idx, dtype=torch.long)
            return TensorData(_float32(x[index]), y[index])

    else:

        def part(idx: np.ndarray | None) -> Any:
            return None if idx is None else Subset(data.dataset, idx.tolist())

    train = part(train_idx)
    return Prepared(
        train=train,
        val=part(val_idx),
        test=part(test_idx),
        classes=data.classes,
        kind="image" if len(data.input_shape) == 3 else "vector",
        input_shape=data.input_shape,
    )


def targets_of(data: DatasetData) -> np.ndarray:
    """The targets as the trainer needs them: class indices, or float32 values."""
    if data.task == "classification":
        return data.targets.astype(np.int64)
    return data.targets.astype(np.float32)


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype == torch.float64 else x


def dataset_data(
    dataset: Any, labels: Any = None, groups: Any = None, task: str | None = None
) -> DatasetData:
    """Check a user's Dataset and read what the plan needs; refused in one line when its
    labels do not fit the task or its items are not (input, target) pairs."""
    from randkit.train.tasks import infer_task

    targets = read_labels(dataset, labels)
    task = infer_task(targets, task, "task")
    in_memory = isinstance(dataset, TensorDataset) and labels is None
    if task == "classification" and not in_memory and not _class_indices(targets):
        raise UserError(
            "data",
            "class labels of a Dataset must be integers 0..K-1 (what nn.CrossEntropyLoss "
            f"expects), got {targets.dtype} labels such as {targets[:3].tolist()}; encode "
            "them in the Dataset or pass (x, y) arrays",
        )
    encoded, classes = encode_targets(targets, task)
    group_array = None
    if groups is not None:
        group_array = np.asarray(groups)
        if group_array.shape != (len(targets),):
            raise UserError(
                "groups",
                f"must have one label per item ({len(targets)}), got shape {group_array.shape}",
            )
    return DatasetData(dataset, encoded, classes, task, _input_shape(dataset), group_array)


def _class_indices(targets: np.ndarray) -> bool:
    if targets.dtype.kind in "b":
        return True
    if targets.dtype.kind in "iu":
        return bool(targets.min() >= 0)
    if targets.dtype.kind == "f":
        return bool(np.all(targets == np.round(targets)) and targets.min() >= 0)
    return False


def _input_shape(dataset: Any) -> list[int]:
    if isinstance(dataset, TensorDataset):
        return list(dataset.tensors[0].shape[1:])
    try:
        item = dataset[0]
    except Exception as exc:  # the user's __getitem__ may fail in any way
        raise UserError("data", f"reading item 0 failed: {type(exc).__name__}: {exc}") from None
    first = item[0] if isinstance(item, list | tuple) else item
    shape = getattr(first, "shape", None)
    if shape is None:
        raise UserError(
            "data",
            "items must be (input, target) with a tensor or array input, got "
            f"{type(first).__name__}",
        )
    return list(shape)
