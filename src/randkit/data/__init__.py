"""Data sets: built-in digits, image folders, CSV text, ``.npz`` arrays."""

from __future__ import annotations

from randkit.config import DataConfig
from randkit.data.arrays import load_digits_data, load_npz
from randkit.data.base import (
    LabeledData,
    Prepared,
    TensorData,
    featurize,
    keep_cache,
    prepare,
)
from randkit.data.images import load_image_folder
from randkit.data.text import Vocabulary, load_csv_text
from randkit.errors import UserError
from randkit.streams import Streams

__all__ = [
    "LabeledData",
    "Prepared",
    "TensorData",
    "Vocabulary",
    "featurize",
    "keep_cache",
    "load_and_prepare",
    "load_data",
    "prepare",
]


def load_data(cfg: DataConfig, defer_cache: bool = False) -> LabeledData:
    """Load the whole data set the config names (no split yet). ``defer_cache``: a cache the
    loader would write (decoded images) waits for ``keep_cache``, once the run's checks pass."""
    if cfg.kind == "digits":
        return load_digits_data()
    if cfg.kind == "object":
        raise UserError(
            "data.kind",
            f"'object' data ({cfg.object}) was a Python object given to "
            "randkit.cross_validate; it cannot be loaded from a config",
        )
    assert cfg.path is not None
    if cfg.kind == "npz":
        return load_npz(cfg.path)
    if cfg.kind == "image_folder":
        return load_image_folder(
            cfg.path, cfg.image_size, cfg.grayscale, cfg.cache_dir, defer_cache
        )
    return load_csv_text(cfg.path, cfg.text_column, cfg.label_column, cfg.group_column)


def load_and_prepare(cfg: DataConfig, streams: Streams, defer_cache: bool = False) -> Prepared:
    """Load, split off test (and validation) from stream ``split``, fit preprocessing."""
    text_options = {
        "max_length": cfg.max_length,
        "max_vocab": cfg.max_vocab,
        "min_freq": cfg.min_freq,
    }
    data = load_data(cfg, defer_cache)
    return prepare(data, cfg.test_fraction, cfg.val_fraction, streams, text_options)
