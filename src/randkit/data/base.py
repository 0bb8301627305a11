"""Labelled data in memory, the stratified held-out split, and train-only preprocessing."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from randkit.errors import UserError
from randkit.streams import Streams

Kind = Literal["image", "vector", "text"]


@dataclass
class LabeledData:
    """A whole data set before any split.

    ``inputs`` is a float32 tensor for images ``(N, C, H, W)`` (values in [0, 1]) and vectors
    ``(N, D)``, or a list of raw strings for text (tokenized only after the split, so the
    vocabulary never sees test data).
    """

    inputs: torch.Tensor | list[str]
    targets: torch.Tensor
    classes: list[str]
    kind: Kind
    groups: np.ndarray | None = None  # one group label per example, for group splitters
    unit_range: bool = False  # values known to lie in [0, 1] (digits, image folders)
    # A loader's cache write held back until the run has passed every check (keep_cache),
    # so that a refused input leaves no file behind.
    pending_cache: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise UserError("data", f"{len(self.inputs)} inputs but {len(self.targets)} labels")
        present = torch.unique(self.targets).numel() if len(self.targets) else 0
        if present < 2:
            raise UserError("data", f"needs at least 2 classes, got {present} ({self.classes})")

    def __len__(self) -> int:
        return len(self.targets)


def data_fingerprint(data: LabeledData) -> str:
    """A hash of the examples, labels and groups: a run built on other data is refused."""
    digest = hashlib.sha256()
    digest.update(data.targets.numpy().tobytes())
    if isinstance(data.inputs, torch.Tensor):
        digest.update(data.inputs.contiguous().numpy().tobytes())
    else:
        for text in data.inputs:
            digest.update(text.encode("utf-8") + b"\0")
    if data.groups is not None:
        digest.update(np.asarray(data.groups).astype(str).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class TensorData:
    """Model-ready tensors of one part (train, val or test)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Prepared:
    """The parts of one split plus what a model needs to know about its input."""

    train: TensorData
    val: TensorData | None
    test: TensorData
    classes: list[str]
    kind: Kind
    input_shape: list[int]
    vocab_size: int | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    unit_range: bool = False
    preprocessing: dict[str, Any] = field(default_factory=dict)
    pending_cache: Callable[[], None] | None = field(default=None, repr=False, compare=False)


def keep_cache(holder: LabeledData | Prepared | Any) -> None:
    """Write the cache a loader held back (``load_data(..., defer_cache=True)``): called by a
    run once its input has passed every check, just before the run writes its own files."""
    write = getattr(holder, "pending_cache", None)
    if write is not None:
        holder.pending_cache = None
        write()


def stratified_holdout(
    targets: np.ndarray, fraction: float, seed: int, field_name: str, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out), stratified by class (a plain random cut of regression or
    multilabel targets with ``stratify=False``). Errors name the fraction's field."""
    indices = np.arange(len(targets))
    if stratify:
        labels, counts = np.unique(targets, return_counts=True)
        if counts.min() < 2:  # scikit-learn would list every such class, however many
            lone = labels[counts < 2]
            raise UserError(
                field_name,
                f"{fraction} is held out stratified, which needs at least 2 examples per "
                f"class; {len(lone)} class(es) of the data have one (label "
                f"{lone[0].item()!r}{', ...' if len(lone) > 1 else ''})",
            )
    try:
        keep, held = train_test_split(
            indices,
            test_size=fraction,
            stratify=targets if stratify else None,
            random_state=seed % 2**32,
        )
    except ValueError as exc:
        raise UserError(field_name, f"cannot hold out {fraction} stratified: {exc}") from None
    return np.sort(keep), np.sort(held)


def feature_stats(x: torch.Tensor, kind: Kind) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (images) or per-feature (vectors) mean and std of the training part."""
    dims = [0, 2, 3] if kind == "image" else [0]
    mean = x.mean(dim=dims)
    std = x.std(dim=dims)
    # A constant feature (a border pixel of digits) would divide by zero; leave it unscaled.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean, std


def prepare(
    data: LabeledData,
    test_fraction: float,
    val_fraction: float,
    streams: Streams,
    text_options: dict[str, Any] | None = None,
) -> Prepared:
    """Cut test (and optional validation) parts from stream ``split``; fit preprocessing on
    the training part only."""
    targets = data.targets.numpy()
    rest, test_idx = stratified_holdout(
        targets, test_fraction, streams.seed("split", part="test"), "data.test_fraction"
    )
    pending = data.pending_cache
    val_idx = None
    train_idx = rest
    if val_fraction > 0:
        keep, held = stratified_holdout(
            targets[rest], val_fraction, streams.seed("split", part="val"), "data.val_fraction"
        )
        train_idx, val_idx = rest[keep], rest[held]
    prepared = featurize(data, train_idx, val_idx, test_idx, text_options or {})
    prepared.pending_cache = pending
    return prepared


def featurize(
    data: LabeledData,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    test_idx: np.ndarray,
    text_options: dict[str, Any],
) -> Prepared:
    """Turn index sets into tensors; anything learned from data is learned from ``train_idx``."""
    y = data.targets

    def part(x: torch.Tensor, idx: np.ndarray | None) -> TensorData | None:
        if idx is None:
            return None
        index = torch.as_tensor(idx, dtype=torch.long)
        return TensorData(x[index], y[index])

    if data.kind == "text":
        from randkit.data.text import Vocabulary

        texts = data.inputs
        assert isinstance(texts, list)
        vocab = Vocabulary.fit([texts[i] for i in train_idx], **text_options)
        x = vocab.encode(texts)
        return Prepared(
            train=part(x, train_idx),
            val=part(x, val_idx),
            test=part(x, test_idx),
            classes=data.classes,
            kind="text",
            input_shape=list(x.shape[1:]),
            vocab_size=len(vocab),
            preprocessing={"vocabulary": vocab.to_json()},
        )
    x = data.inputs
    assert isinstance(x, torch.Tensor)
    train = part(x, train_idx)
    mean, std = feature_stats(train.x, data.kind)
    return Prepared(
        train=train,
        val=part(x, val_idx),
        test=part(x, test_idx),
        classes=data.classes,
        kind=data.kind,
        unit_range=data.unit_range,
        input_shape=list(x.shape[1:]),
        mean=mean,
        std=std,
    )
