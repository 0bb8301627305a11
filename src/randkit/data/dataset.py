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
from randkit.streams import isolated_global_rngs as quiet_global_rngs


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


def targets_array(data: Any) -> np.ndarray:
    """The targets of a ``DatasetData`` or a ``LabeledData`` as a NumPy array (the plan's
    labels: class indices, regression values or 0/1 label rows)."""
    if isinstance(data, DatasetData):
        return data.targets
    return data.targets.numpy()


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
    # Its own generator: a DataLoader without one draws its seed from torch's global RNG.
    loader = DataLoader(dataset, batch_size=256, shuffle=False, generator=torch.Generator())
    parts = []
    with quiet_global_rngs():
        batches = list(loader)
    for batch in batches:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise UserError(
                "data",
                "items must be (input, target) pairs to find the labels, got "
                f"{type(batch).__name__}; pass labels= for another layout",
            )
        parts.append(_as_array(batch[1]))
    return np.concatenate(parts) if parts else np.zeros(0)


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
    labels do not fit the task, disagree with its items or its items are not
    (input, target) pairs."""
    from randkit.train.tasks import infer_task

    targets = read_labels(dataset, labels)
    task = infer_task(targets, task, "task")
    classes: list[str] = []
    if task == "classification":
        classes = _class_names(dataset, _check_class_indices(targets))
    _check_items_agree(dataset, targets, "labels" if labels is not None else "data")
    encoded = targets.astype(np.int64 if task == "classification" else np.float32)
    return DatasetData(
        dataset, encoded, classes, task, _input_shape(dataset), _groups(groups, len(targets))
    )


def arrays_data(x: np.ndarray, y: np.ndarray, groups: Any, task: str | None) -> DatasetData:
    """``(x, y)`` arrays as an in-memory data set: any class labels (encoded as indices of
    the sorted unique values, as ``.npz`` files are), float32 inputs."""
    from randkit.train.tasks import infer_task

    if len(x) != len(y):
        raise UserError("data", f"x has {len(x)} rows but y has {len(y)}")
    if x.dtype.kind not in "fiub":
        raise UserError("data", f"x must be numeric, got dtype {x.dtype}")
    task = infer_task(y, task, "task")
    if task == "classification":
        names, encoded = np.unique(y, return_inverse=True)
        targets, classes = encoded.astype(np.int64), [str(c) for c in names]
    else:
        targets, classes = y.astype(np.float32), []
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    dataset = TensorDataset(inputs, torch.from_numpy(targets))
    shape = list(x.shape[1:])
    return DatasetData(dataset, targets, classes, task, shape, _groups(groups, len(y)))


def _groups(groups: Any, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    array = np.asarray(groups)
    if array.shape != (n,):
        raise UserError("groups", f"must have one label per item ({n}), got shape {array.shape}")
    return array


def _check_class_indices(targets: np.ndarray) -> int:
    """The number of classes of a Dataset's labels, which must be the indices 0..K-1 (what
    ``nn.CrossEntropyLoss`` expects), each present: a missing index would be a class no
    example has, which distorts macro averages."""
    ok = targets.dtype.kind in "biu" or (
        targets.dtype.kind == "f" and bool(np.all(targets == np.round(targets)))
    )
    if not ok or targets.min() < 0:
        raise UserError(
            "data",
            "class labels of a Dataset must be the integers 0..K-1 (what nn.CrossEntropyLoss "
            f"expects), got {targets.dtype} labels such as {targets[:3].tolist()}; encode "
            "them in the Dataset or pass (x, y) arrays",
        )
    present = np.unique(targets.astype(np.int64))
    count = int(present[-1]) + 1
    if len(present) != count:
        missing = sorted(set(range(count)) - set(present.tolist()))
        raise UserError(
            "data",
            f"class labels must be 0..K-1 with every class present; {missing[:5]} of "
            f"0..{count - 1} never occur: encode the labels without gaps",
        )
    return count


def _class_names(dataset: Any, count: int) -> list[str]:
    """The data set's own class names (torchvision's ``classes``) when it has them."""
    names = getattr(dataset, "classes", None)
    if isinstance(names, list | tuple) and len(names) == count:
        return [str(n) for n in names]
    return [str(c) for c in range(count)]


def _check_items_agree(dataset: Any, targets: np.ndarray, field: str) -> None:
    """The labels the plan stratifies on must be those the items give the trainer (a
    ``target_transform`` or wrong ``labels=`` would silently train on other targets)."""
    n = len(targets)
    for index in sorted({int(i) for i in np.linspace(0, n - 1, min(n, 8))}):
        with quiet_global_rngs():
            item = _item(dataset, index)
        label = item[1] if isinstance(item, list | tuple) and len(item) >= 2 else None
        value = _as_array(label) if label is not None else None
        expected = targets[index]
        agree = (
            value is not None
            and value.dtype.kind in "biuf"
            and value.shape == np.shape(expected)
            and np.allclose(value.astype(np.float64), np.asarray(expected, dtype=np.float64))
        )
        if not agree:
            raise UserError(
                field,
                f"item {index}'s target is {label!r:.40} but the labels say "
                f"{np.asarray(expected).tolist()!r:.40}; the labels must be the items' targets",
            )


def _item(dataset: Any, index: int) -> Any:
    try:
        return dataset[index]
    except Exception as exc:  # the user's __getitem__ may fail in any way
        message = f"reading item {index} failed: {type(exc).__name__}: {exc}"
        raise UserError("data", message) from None


def _input_shape(dataset: Any) -> list[int]:
    if isinstance(dataset, TensorDataset):
        return list(dataset.tensors[0].shape[1:])
    with quiet_global_rngs():
        item = _item(dataset, 0)
    first = item[0] if isinstance(item, list | tuple) else item
    shape = getattr(first, "shape", None)
    if shape is None:
        raise UserError(
            "data",
            "items must be (input, target) with a tensor or array input, got "
            f"{type(first).__name__}",
        )
    return list(shape)
