"""Cross-validate a LightningModule with Lightning's own ``Trainer``.

>>> from randkit.integrations.lightning import LightningTrial           # doctest: +SKIP
>>> fit = LightningTrial(MyLitModule, {"hidden": 64}, batch_size=64,
...                      trainer_kwargs={"max_epochs": 3})                 # doctest: +SKIP
>>> randkit.cross_validate(data=dataset, fit=fit, folds=5, runner="ray")  # doctest: +SKIP

Each trial fits the module with ``Trainer.fit`` (``validation_step`` on ``trial.val`` when the
run holds one out) and scores it with ``Trainer.test`` on the test fold (``Trainer.validate``
without a ``test_step``): what the step logs with ``self.log`` are the trial's scores. The
module is built under the ``init`` stream; epoch ``e``'s order is drawn from ``order`` at
``epoch=e``; the global RNGs (``nn.Dropout``) are seeded from ``dropout`` at ``epoch=e``; the
trial checkpoints every epoch into ``trial.dir`` without pickle and a rerun resumes there.
Not supported: several devices per trial, persistent DataLoader workers, a DataModule's own
loaders. Details: docs/cross-validation.md, section "Lightning".
"""

from __future__ import annotations

import hashlib
import json
import random  # global-rng-ok: seeded for the user's code inside a restoring block
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from randkit.extras import require

require("lightning", "randkit.integrations.lightning")

import lightning.pytorch as pl  # noqa: E402  (after the extra check)
from lightning.pytorch.callbacks import Checkpoint  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402

from randkit import atomic  # noqa: E402
from randkit.cv.fit import Trial, seeded_global_rngs  # noqa: E402
from randkit.errors import UserError  # noqa: E402
from randkit.streams import ScopedStreams, deterministic, seeded_generator  # noqa: E402

CHECKPOINT = "checkpoint.json"
FORMAT = "randkit-lightning-checkpoint/1"
_PARTS = ("tensors", "skeleton")
_TENSOR, _TUPLE, _DICT = "$tensor", "$tuple", "$dict"
_OWNED = ("deterministic", "enable_checkpointing", "plugins", "default_root_dir")


# -- the checkpoint format: tensors in safetensors, everything else in a JSON skeleton -------
def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` and referenced by name."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, torch.Tensor):
        name = key or "tensor"
        while name in tensors:
            name += "'"
        tensors[name] = value
        return {_TENSOR: name}
    if isinstance(value, list | tuple):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return items if isinstance(value, list) else {_TUPLE: items}
    if isinstance(value, Mapping):
        prefix = f"{key}." if key else ""
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, prefix + k, tensors) for k, v in value.items()}
        for k in value:
            if not (k is None or isinstance(k, bool | int | float | str)):
                raise UserError(f"checkpoint {prefix}{k!r}", "dict keys must be str or numbers")
        return {_DICT: [[k, _encode(v, f"{prefix}{k}", tensors)] for k, v in value.items()]}
    raise UserError(
        f"checkpoint {key}",
        f"holds a {type(value).__name__} ({value!r:.40}); randkit checkpoints (safetensors + "
        "JSON, no pickle) store tensors, numbers, str, bool, None, lists, tuples and dicts",
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == _DICT:
            return {k: _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoints without pickle: ``PATH`` is a small JSON pointer naming
    ``STEM-DIGEST.safetensors`` (every tensor, keyed by its place in the checkpoint) and
    ``STEM-DIGEST.json`` (the rest, tensors referenced as ``{"$tensor": name}``), with their
    sha256. Both are written atomically before the pointer, so a checkpoint cut short by a
    crash is never read; older payloads of ``PATH`` are deleted after the pointer moves on.

    >>> trainer = lightning.Trainer(plugins=[SafetensorsCheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        pointer = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        text = json.dumps(_encode(checkpoint, "", tensors), indent=1).encode()
        plain = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
        data = safetensors_save(plain)
        digest = hashlib.sha256(data + text).hexdigest()[:16]
        files = {
            "tensors": f"{pointer.stem}-{digest}.safetensors",
            "skeleton": f"{pointer.stem}-{digest}.json",
        }
        atomic.write_bytes(pointer.parent / files["tensors"], data)
        atomic.write_bytes(pointer.parent / files["skeleton"], text)
        atomic.write_json(pointer, {"format": FORMAT, **files, "sha256": _digests(data, text)})
        self._remove_payloads(pointer, keep=set(files.values()))

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        pointer = Path(path)
        files = json.loads(pointer.read_text())
        data, text = ((pointer.parent / files[part]).read_bytes() for part in _PARTS)
        if files.get("format") != FORMAT or files["sha256"] != _digests(data, text):
            raise UserError(str(pointer), "is not a whole randkit Lightning checkpoint (sha256)")
        tensors = safetensors_load(data)
        if isinstance(map_location, str | torch.device):
            tensors = {k: t.to(map_location) for k, t in tensors.items()}
        return _decode(json.loads(text), tensors)

    def remove_checkpoint(self, path: Any) -> None:
        pointer = Path(path)
        pointer.unlink(missing_ok=True)
        self._remove_payloads(pointer, keep=set())

    @staticmethod
    def _remove_payloads(pointer: Path, keep: set[str]) -> None:
        own = re.compile(re.escape(pointer.stem) + r"-[0-9a-f]{16}\.(safetensors|json)")
        for file in pointer.parent.iterdir():
            if own.fullmatch(file.name) and file.name not in keep:
                file.unlink(missing_ok=True)


def _digests(data: bytes, text: bytes) -> dict[str, str]:
    return {
        "tensors": hashlib.sha256(data).hexdigest(),
        "skeleton": hashlib.sha256(text).hexdigest(),
    }


# -- randomness from the trial's streams -------------------------------------------------------
def seed_global_rngs(
    streams: ScopedStreams, source: str, device: torch.device, **coords: int | str
) -> None:
    """Seed torch's (and the device's CUDA), NumPy's and Python's global RNGs from one stream:
    code without ``generator=`` (``nn.Dropout``, a user's step) draws from them. The trial
    restores them when it ends."""
    sequence = streams.sequence(source, **coords)
    torch.default_generator.set_state(seeded_generator(sequence).get_state())
    if device.type == "cuda":
        cuda_seed = streams.seed(source, what="cuda", **coords)
        torch.cuda.default_generators[device.index or 0].manual_seed(cuda_seed)
    seed = streams.seed(source, what="python", **coords)
    random.seed(seed)  # global-rng-ok: the trial restores it (seeded_global_rngs)
    np.random.seed(seed % 2**32)  # noqa: NPY002  # global-rng-ok: restored by the trial


class EpochSampler(Sampler[int]):
    """Epoch ``e``'s order is ``torch.randperm(n, generator=streams.torch("order", epoch=e))``
    (the order of ``Trial.loader("train", epoch=e)``); Lightning calls ``set_epoch``."""

    def __init__(self, n: int, streams: ScopedStreams) -> None:
        self.n, self.streams, self.epoch = n, streams, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = self.streams.torch("order", epoch=self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def _seed_worker(
    streams: ScopedStreams, part: str, sampler: EpochSampler | None, worker: int
) -> None:
    """A DataLoader worker's global RNGs from ``augment`` at ``(part, epoch, worker)``."""
    epoch = sampler.epoch if sampler is not None else 0
    seed_global_rngs(streams, "augment", torch.device("cpu"), part=part, epoch=epoch, worker=worker)


class _TrialCallback(Checkpoint):
    """Seeds each epoch, reports its metrics to the trial and checkpoints it. A ``Checkpoint``,
    so Lightning runs its epoch end after the module's and the other callbacks'."""

    def __init__(self, trial: Trial, sampler: EpochSampler, path: Path) -> None:
        self.trial, self.sampler, self.path, self.next_epoch = trial, sampler, path, 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sampler.set_epoch(trainer.current_epoch)
        seed_global_rngs(self.trial.streams, "dropout", pl_module.device, epoch=self.sampler.epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k != "epoch"}
        self.trial.report(trainer.current_epoch, **_floats(metrics))
        self.next_epoch = trainer.current_epoch + 1
        trainer.save_checkpoint(self.path, weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.trial.history), "next_epoch": self.next_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning iterates a resumed epoch's loader before calling set_epoch.
        self.trial.history[:] = state_dict["history"]
        self.next_epoch = state_dict["next_epoch"]
        self.sampler.set_epoch(self.next_epoch)


def _name(raw: str) -> str:
    """A logged metric's name as an identifier: ``"test/acc"`` becomes ``"test_acc"``."""
    name = re.sub(r"\W", "_", raw)
    return name if name.isidentifier() else f"m_{name}"


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics, under identifier names."""
    out: dict[str, float] = {}
    for raw, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            continue
        name = _name(raw)
        if name in out:
            raise UserError("metrics", f"{raw!r} and another logged name both become {name!r}")
        out[name] = float(value)
    return out


# -- the trial function ----------------------------------------------------------------------
class LightningTrial:
    """A trial function that fits a LightningModule with Lightning's ``Trainer`` (see the
    module docstring). Picklable: it holds the module class, its kwargs and the settings.

    ``module``: a LightningModule class (or a factory), built as ``module(**module_kwargs)``.
    ``datamodule``: optional LightningDataModule class, built as
    ``datamodule(**datamodule_kwargs)``; after ``prepare_data()`` and ``setup("fit")`` its
    ``dataset`` (as long as the ``data`` given to ``cross_validate``) is what the folds slice.
    ``trainer_kwargs``: for ``lightning.Trainer``, with ``max_epochs`` or ``max_steps``;
    defaults ``accelerator="cpu"``, ``devices=1``, ``logger=False``, no progress bar or model
    summary; ``deterministic``, checkpointing, ``plugins`` and ``default_root_dir`` are set by
    randkit. ``metrics``: the logged test metrics to keep (default all).
    """

    def __init__(
        self,
        module: Callable[..., pl.LightningModule],
        module_kwargs: Mapping[str, Any] | None = None,
        *,
        datamodule: Callable[..., pl.LightningDataModule] | None = None,
        datamodule_kwargs: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        trainer_kwargs: Mapping[str, Any] | None = None,
        metrics: Sequence[str] | None = None,
        num_workers: int = 0,
        loader_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        for name, value in (("module", module), ("datamodule", datamodule or type)):
            if not callable(value) or isinstance(
                value, pl.LightningModule | pl.LightningDataModule
            ):
                raise UserError(name, f"must be a class (or factory), got {value!r:.60}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(name, f"must be a positive int, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise UserError("num_workers", f"must be an int >= 0, got {num_workers!r}")
        self.module, self.module_kwargs = module, dict(module_kwargs or {})
        self.datamodule, self.datamodule_kwargs = datamodule, dict(datamodule_kwargs or {})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.trainer_kwargs = _checked_trainer_kwargs(dict(trainer_kwargs or {}))
        self.metrics = [metrics] if isinstance(metrics, str) else metrics and list(metrics)
        self.num_workers, self.loader_kwargs = num_workers, dict(loader_kwargs or {})
        for key in ("sampler", "shuffle", "batch_sampler", "generator", "persistent_workers"):
            if key in self.loader_kwargs:
                raise UserError(f"loader_kwargs.{key}", "is set from the trial's streams")

    def __repr__(self) -> str:
        """The settings, by name: a cross-validation records it, so that a rerun into the
        same folder with other settings is refused instead of resuming old checkpoints."""
        from randkit.cv.objects import describe

        settings = {
            "module_kwargs": self.module_kwargs,
            "datamodule": self.datamodule and describe(self.datamodule),
            "datamodule_kwargs": self.datamodule_kwargs,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "trainer_kwargs": {k: v for k, v in self.trainer_kwargs.items() if k != "callbacks"},
            "callbacks": describe(self.trainer_kwargs.get("callbacks", [])),
            "metrics": self.metrics,
        }
        shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        return f"LightningTrial({describe(self.module)}, {shown})"

    def __call__(self, trial: Trial) -> dict[str, float]:
        with seeded_global_rngs(trial.streams), deterministic():
            return self._fit_and_score(trial)

    def _fit_and_score(self, trial: Trial) -> dict[str, float]:
        dataset = self._dataset(trial)
        with trial.streams.fork_global("init"):
            model = self.module(**self.module_kwargs)
        if not isinstance(model, pl.LightningModule):
            raise UserError("module", f"must build a LightningModule, got {type(model).__name__}")
        sampler = EpochSampler(len(trial.train_indices), trial.streams)
        train, val = self._loader(dataset, trial, "train", sampler), None
        if trial.val_indices is not None and is_overridden("validation_step", model):
            val = self._loader(dataset, trial, "val")
        pointer = trial.dir / CHECKPOINT
        trainer = self._trainer(trial, _TrialCallback(trial, sampler, pointer))
        trainer.fit(model, train, val, ckpt_path=pointer if pointer.exists() else None)
        weights = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        atomic.write_safetensors(trial.dir / "model.safetensors", weights)
        seed_global_rngs(trial.streams, "dropout", model.device, part="test")
        return self._score(trainer, model, self._loader(dataset, trial, "test"))

    def _dataset(self, trial: Trial) -> Dataset[Any]:
        if self.datamodule is None:
            return trial.dataset
        with trial.streams.fork_global("split", what="datamodule"):
            datamodule = self.datamodule(**self.datamodule_kwargs)
            datamodule.prepare_data()
            datamodule.setup("fit")
        dataset = getattr(datamodule, "dataset", None)
        name = type(datamodule).__name__
        if dataset is None or not hasattr(dataset, "__getitem__"):
            raise UserError("datamodule", f"{name} has no `dataset` attribute after setup('fit')")
        if len(dataset) != len(trial.dataset):
            raise UserError(
                "datamodule",
                f"{name}.dataset has {len(dataset)} examples, the data given to cross_validate "
                f"{len(trial.dataset)}: they must be the same examples in the same order",
            )
        return dataset

    def _loader(
        self, dataset: Dataset[Any], trial: Trial, part: str, sampler: EpochSampler | None = None
    ) -> DataLoader[Any]:
        indices = {"train": trial.train_indices, "val": trial.val_indices}.get(part)
        indices = trial.test_indices if part == "test" else indices
        seeds = partial(_seed_worker, trial.streams, part, sampler) if self.num_workers else None
        # The DataLoader draws its (unused) base seed from this, not from the global RNG.
        generator = torch.Generator().manual_seed(trial.streams.seed("order", part=part))
        return DataLoader(
            Subset(dataset, np.asarray(indices).tolist()),
            batch_size=self.batch_size if part == "train" else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            worker_init_fn=seeds,
            generator=generator,
            **self.loader_kwargs,
        )

    def _trainer(self, trial: Trial, callback: _TrialCallback) -> pl.Trainer:
        kwargs = dict(self.trainer_kwargs)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        return pl.Trainer(
            **kwargs,
            callbacks=[*callbacks, callback],
            deterministic=True,
            enable_checkpointing=True,
            plugins=[SafetensorsCheckpointIO()],
            default_root_dir=str(trial.dir),
        )

    def _score(
        self, trainer: pl.Trainer, model: pl.LightningModule, loader: DataLoader[Any]
    ) -> dict[str, float]:
        if is_overridden("test_step", model):
            rows = trainer.test(model, loader, verbose=False)
        elif is_overridden("validation_step", model):
            rows = trainer.validate(model, loader, verbose=False)
        else:
            raise UserError("module", f"{type(model).__name__} has no test_step or validation_step")
        scores = _floats(rows[0] if rows else {})
        if self.metrics is not None:
            missing = [m for m in self.metrics if _name(m) not in scores]
            if missing:
                raise UserError("metrics", f"{missing} not logged; logged: {sorted(scores)}")
            scores = {_name(m): scores[_name(m)] for m in self.metrics}
        if not scores:
            raise UserError("module", "the test step logged no metric, e.g. self.log('acc', acc)")
        return scores


def _checked_trainer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    for key in _OWNED:
        if key in kwargs:
            why = "deterministic, no-pickle checkpoints in the trial's folder"
            raise UserError(f"trainer_kwargs.{key}", f"is set by randkit ({why})")
    for key in ("devices", "num_nodes"):
        if kwargs.get(key, 1) != 1:
            why = "one device per trial; run trials in parallel with runner='processes' or 'ray'"
            raise UserError(f"trainer_kwargs.{key}", f"must be 1, got {kwargs[key]!r} ({why})")
    if kwargs.get("strategy", "auto") != "auto":
        got = kwargs["strategy"]
        raise UserError("trainer_kwargs.strategy", f"only 'auto' (one device), got {got!r}")
    if kwargs.get("max_epochs") is None and kwargs.get("max_steps", -1) == -1:
        why = "Lightning's default is 1000 epochs per trial"
        raise UserError("trainer_kwargs", f"needs max_epochs or max_steps ({why})")
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return {**defaults, "enable_model_summary": False, **kwargs}
