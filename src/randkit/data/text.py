"""CSV text classification: reading, a word tokenizer and a train-only vocabulary."""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from randkit.data.base import LabeledData
from randkit.errors import UserError

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


@dataclass
class Vocabulary:
    """Token to id; id 0 pads, id 1 stands for unknown words."""

    tokens: list[str]
    max_length: int

    @classmethod
    def fit(
        cls, texts: list[str], max_length: int = 64, max_vocab: int = 20000, min_freq: int = 1
    ) -> Vocabulary:
        counts = Counter(token for text in texts for token in tokenize(text))
        # Ties broken by the token itself, so the vocabulary does not depend on row order.
        kept = (t for t, c in counts.items() if c >= min_freq)
        ranked = sorted(kept, key=lambda t: (-counts[t], t))
        return cls([PAD, UNK, *ranked[: max_vocab - 2]], max_length)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``(N, max_length)`` int64 ids, truncated and padded with 0."""
        index = {token: i for i, token in enumerate(self.tokens)}
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = [index.get(t, 1) for t in tokenize(text)[: self.max_length]]
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        return ids

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "max_length": self.max_length}


def load_csv_text(
    path: Path, text_column: str, label_column: str, group_column: str | None = None
) -> LabeledData:
    if not path.is_file():
        raise UserError("data.path", f"CSV file not found: {str(path)!r}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            wanted = [(text_column, "data.text_column"), (label_column, "data.label_column")]
            if group_column is not None:
                wanted.append((group_column, "data.group_column"))
            for column, field in wanted:
                if column not in columns:
                    raise UserError(
                        field,
                        f"column {column!r} not in {str(path)!r} "
                        f"(columns: {', '.join(columns) or 'none'})",
                    )
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError("data.path", f"cannot read CSV {str(path)!r}: {exc}") from None
    texts, labels = [], []
    for line, row in enumerate(rows, start=2):
        label = (row.get(label_column) or "").strip()
        if not label:
            raise UserError("data.label_column", f"empty label on line {line} of {str(path)!r}")
        texts.append(row.get(text_column) or "")
        labels.append(label)
    if not rows:
        raise UserError("data.path", f"no rows in {str(path)!r}")
    _check_texts(texts, path, text_column)
    _check_labels(labels, path, label_column)
    classes = sorted(set(labels))
    lookup = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([lookup[label] for label in labels], dtype=torch.long)
    groups = np.array([row[group_column] for row in rows]) if group_column else None
    return LabeledData(texts, targets, classes, "text", groups=groups)


def _check_texts(texts: list[str], path: Path, column: str) -> None:
    """Texts without a single word make every input the same: a constant model, silently."""
    if not any(tokenize(text) for text in texts):
        raise UserError(
            "data.text_column",
            f"column {column!r} of {str(path)!r} holds no words in any of its {len(texts)} rows",
        )


def _check_labels(labels: list[str], path: Path, column: str) -> None:
    """Continuous numbers are not classes: each would be a class of one example."""
    try:
        numbers = np.array([float(label) for label in labels])
    except ValueError:
        return  # names, or a mix: class labels
    fractional = np.isfinite(numbers) & (numbers != np.round(numbers))
    if fractional.any():
        example = labels[int(np.argmax(fractional))]
        raise UserError(
            "data.label_column",
            f"column {column!r} of {str(path)!r} holds continuous numbers "
            f"({len(np.unique(numbers))} distinct, e.g. {example!r}), not class labels; "
            "CSV text data is for classification",
        )
