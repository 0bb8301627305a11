"""The experiment schema (pydantic) and YAML loading with one-line errors.

An error names the dotted path and the value: ``train.lr: must be > 0, got -1``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from randkit.config_errors import format_error
from randkit.errors import UserError
from randkit.streams import SOURCES

# Where files are, not what the experiment is: never part of a fingerprint.
LOCATION_FIELDS = ("model.code_dir",)


class _Strict(BaseModel):
    # No inf or nan in any number field: `lr: .inf` would train to NaN and exit 0.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    """Where the examples come from and how the held-out test part is cut."""

    # "object": a Python object given to randkit.cross_validate (a Dataset, arrays), named
    # by ``object``; it cannot be loaded from the config.
    kind: Literal["digits", "image_folder", "csv_text", "npz", "object"] = "digits"
    object: str | None = None
    path: Path | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    # image folders
    image_size: tuple[int, int] = (32, 32)
    grayscale: bool = False
    cache_dir: Path | None = None
    # CSV text
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None
    max_length: int = Field(64, gt=0)
    max_vocab: int = Field(20000, gt=2)
    min_freq: int = Field(1, gt=0)

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 1:
            raise ValueError(f"must be two positive integers, got {list(size)}")
        return size

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.kind not in ("digits", "object") and self.path is None:
            raise ValueError(f"data.path: required when data.kind is {self.kind!r}")
        return self


class ModelConfig(_Strict):
    """A model from the registry (``mlp``, ``cnn``, ``resnet``, ``text``) or
    ``package.module:factory``; ``args`` are its keyword arguments.

    ``code_dir`` is where a ``module:factory`` that is not importable is looked for (then
    the working directory). ``load_config`` sets it to the config file's folder, so a run's
    resolved config still finds the module; it is not part of the fingerprint.
    """

    name: str = "cnn"
    args: dict[str, Any] = Field(default_factory=dict)
    code_dir: Path | None = None

    @field_validator("args")
    @classmethod
    def _finite_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """The factory's arguments are free-form, so ``allow_inf_nan`` cannot see them."""
        for path, value in _numbers(args, "model.args"):
            if not math.isfinite(value):
                raise ValueError(f"{path}: must be a finite number, got {value!r}")
        return args


def _numbers(value: Any, path: str) -> Iterator[tuple[str, float]]:
    """Every float inside nested mappings and lists, with its dotted path."""
    if isinstance(value, float):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}.{index}")


MetricName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Task = Literal["classification", "regression", "multilabel"]


_DEFAULT_HEADLINE = {"classification": "accuracy", "regression": "rmse", "multilabel": "macro_f1"}


class EarlyStoppingConfig(_Strict):
    """Stop when the validation ``metric`` (any metric the run computes: ``loss``,
    ``accuracy``, ``rmse``, a user metric's name, ...) has not improved for ``patience``
    epochs; losses and errors improve downwards, the others upwards."""

    metric: MetricName = "loss"
    # Which way is better; null: lower for losses and errors (loss, mse, rmse, mae, *_loss,
    # *error*), higher for the rest.
    mode: Literal["min", "max"] | None = None
    patience: int = Field(5, gt=0)
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(_Strict):
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(64, gt=0)
    optimizer: Literal["sgd", "adam", "adamw", "zo-sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    zo_eps: float = Field(1e-3, gt=0)
    schedule: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    step_epochs: int = Field(10, gt=0)
    step_gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint_every: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs: must be < train.epochs ({self.epochs}), "
                f"got {self.warmup_epochs}"
            )
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise ValueError("train.nesterov: needs train.momentum > 0, got momentum 0")
        return self


Probability = Annotated[float, Field(ge=0, le=1)]
Pair = tuple[float, float]


class CropSpec(_Strict):
    kind: Literal["crop"]
    padding: int = Field(4, ge=0)
    padding_mode: Literal["zeros", "reflect"] = "zeros"
    p: Probability = 1.0


class FlipSpec(_Strict):
    kind: Literal["hflip", "vflip"]
    p: Probability = 0.5


class ResizedCropSpec(_Strict):
    kind: Literal["resized_crop"]
    scale: Pair = (0.08, 1.0)
    ratio: Pair = (3 / 4, 4 / 3)
    p: Probability = 1.0


class AffineSpec(_Strict):
    kind: Literal["affine"]
    degrees: float = Field(0.0, ge=0, le=180)
    translate: Pair = (0.0, 0.0)
    scale: Pair = (1.0, 1.0)
    p: Probability = 1.0


class ColorSpec(_Strict):
    kind: Literal["color"]
    brightness: Probability = 0.0
    contrast: Probability = 0.0
    p: Probability = 1.0


class ErasingSpec(_Strict):
    kind: Literal["erasing"]
    scale: Pair = (0.02, 0.33)
    ratio: Pair = (0.3, 3.3)
    value: float | Literal["random"] = 0.0
    p: Probability = 0.5


class MixSpec(_Strict):
    kind: Literal["mixup", "cutmix"]
    alpha: float = Field(1.0, gt=0)
    p: Probability = 1.0


TransformSpec = Annotated[
    CropSpec | FlipSpec | ResizedCropSpec | AffineSpec | ColorSpec | ErasingSpec | MixSpec,
    Field(discriminator="kind"),
]


class NoiseSpec(_Strict):
    """Input noise; ``level`` is the std (gaussian, speckle), half-width (uniform), pixel
    fraction (salt_pepper) or intensity per photon (poisson)."""

    kind: Literal["gaussian", "uniform", "salt_pepper", "speckle", "poisson"] = "gaussian"
    level: float = Field(0.1, ge=0)
    p: Probability = 1.0
    clip: bool | None = None  # null: clip to [0, 1] when the data lies there (digits, images)


class WeightNoiseSpec(_Strict):
    std: float = Field(gt=0)
    relative: bool = False


class GradNoiseSpec(_Strict):
    eta: float = Field(0.01, gt=0)
    gamma: float = Field(0.55, ge=0)


Initializer = Literal[
    "kaiming_normal",
    "kaiming_uniform",
    "xavier_normal",
    "xavier_uniform",
    "orthogonal",
    "trunc_normal",
]


class RandomizeConfig(_Strict):
    """Training-time randomization; each part draws from its own stream per (epoch, step)."""

    augment: list[TransformSpec] = Field(default_factory=list)
    input_noise: NoiseSpec | None = None
    init: Initializer | None = None
    weight_noise: WeightNoiseSpec | None = None
    drop_connect: float = Field(0.0, ge=0, lt=1)
    grad_noise: GradNoiseSpec | None = None


SourceName = Literal["split", "init", "order", "augment", "noise", "dropout"]


class CVConfig(_Strict):
    """A cross-validation plan: ``folds`` x ``repeats`` trials. The sources in ``vary``
    change between repeats, the others stay at their first setting. ``decompose`` runs one
    group of repeats per source in ``vary`` (only that source changes), so the spread can be
    split by source."""

    splitter: Literal[
        "kfold",
        "stratified_kfold",
        "group_kfold",
        "stratified_group_kfold",
        "shuffle_split",
        "5x2",
    ] = "stratified_kfold"
    folds: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    vary: list[SourceName] = Field(
        default_factory=lambda: ["split", "init", "order", "augment", "noise", "dropout"]
    )
    decompose: bool = False
    test_fraction: float = Field(0.2, gt=0, lt=1)
    inner_val_fraction: float = Field(0.0, ge=0, lt=1)
    holdout_fraction: float = Field(0.0, ge=0, lt=1)
    # The headline metric; None: the task's (accuracy, rmse, macro_f1) or, for a trial
    # function, the first key it returns.
    metric: MetricName | None = None
    runner: Literal["sequential", "vectorized", "processes", "ray"] = "sequential"
    workers: int | None = Field(None, ge=1)
    threads_per_trial: int | None = Field(None, ge=1)
    address: str | None = None
    retries: int = Field(2, ge=0)
    save_models: bool = True
    # The headline interval: ``headline`` (corrected resampled t, randkit.cv.intervals) or
    # ``nested`` (nested CV, Bates, Hastie & Tibshirani 2024: more trainings, randkit.cv.nested).
    interval: Literal["headline", "nested"] = "headline"

    @model_validator(mode="after")
    def _five_by_two(self) -> CVConfig:
        if self.interval == "nested":
            _check_nested_plan(self)
        if self.splitter == "5x2" and (self.folds, self.repeats) not in ((2, 5), (5, 1)):
            raise ValueError(
                f"cv.splitter: '5x2' means 2 folds x 5 repeats; leave cv.folds and cv.repeats "
                f"unset, got folds={self.folds}, repeats={self.repeats}"
            )
        if self.decompose and self.repeats < 2:
            raise ValueError(f"cv.decompose: needs cv.repeats >= 2, got {self.repeats}")
        if len(set(self.vary)) != len(self.vary):
            raise ValueError(f"cv.vary: lists a source twice, got {self.vary}")
        return self


def _check_nested_plan(cv: CVConfig) -> None:
    """Nested CV needs partitions of at least 3 folds (an inner (K-1)-fold CV per outer fold)."""
    if cv.splitter in ("shuffle_split", "5x2"):
        raise ValueError(
            f"cv.interval: 'nested' needs a k-fold splitter (kfold, stratified_kfold, "
            f"group_kfold, stratified_group_kfold), got cv.splitter {cv.splitter!r}"
        )
    if cv.folds < 3:
        raise ValueError(f"cv.interval: 'nested' needs cv.folds >= 3, got {cv.folds}")
    if cv.decompose:
        raise ValueError("cv.interval: 'nested' cannot be combined with cv.decompose")


class DeployConfig(_Strict):
    """Placeholder: randomized deployment settings arrive with issue #5."""


class ExperimentConfig(_Strict):
    seed: int = Field(0, ge=0, lt=2**63)
    task: Task = "classification"
    # What the Python objects given to randkit.cross_validate were, by name (loss,
    # optimizer with its arguments, metrics, ...): a resumed run must have the same.
    objects: dict[str, str] = Field(default_factory=dict)
    seeds: dict[str, StrictInt] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    randomize: RandomizeConfig = Field(default_factory=RandomizeConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @field_validator("seeds")
    @classmethod
    def _known_sources(cls, seeds: dict[str, int]) -> dict[str, int]:
        for source, seed in seeds.items():
            if source not in SOURCES:
                raise ValueError(
                    f"seeds.{source}: unknown random source; expected one of {', '.join(SOURCES)}"
                )
            if isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise ValueError(f"seeds.{source}: must be an integer in [0, 2**63), got {seed}")
        return seeds

    @model_validator(mode="after")
    def _splitter_fits_task(self) -> ExperimentConfig:
        """Stratified splitters need class labels: another task defaults to ``kfold``."""
        stratified = ("stratified_kfold", "stratified_group_kfold", "5x2", "shuffle_split")
        if self.task == "classification" or self.cv.splitter not in stratified:
            return self
        if "splitter" not in self.cv.model_fields_set:
            self.cv.splitter = "kfold"
            return self
        raise ValueError(
            f"cv.splitter: {self.cv.splitter!r} stratifies class labels; task {self.task!r} "
            "needs 'kfold' or 'group_kfold'"
        )

    @model_validator(mode="after")
    def _early_stopping_needs_val(self) -> ExperimentConfig:
        has_val = self.data.val_fraction > 0 or self.cv.inner_val_fraction > 0
        if self.train.early_stopping is not None and not has_val:
            raise ValueError(
                "train.early_stopping: needs a validation part: data.val_fraction > 0 (train) "
                "or cv.inner_val_fraction > 0 (cv), got 0"
            )
        if self.data.kind == "csv_text" and (self.randomize.augment or self.randomize.input_noise):
            raise ValueError(
                "randomize: image augmentation and input noise need image or vector "
                "data, got data.kind 'csv_text'"
            )
        return self

    def resolved(self) -> dict[str, Any]:
        """The full config with every default filled in, as plain JSON-able data."""
        return self.model_dump(mode="json")

    def fingerprint(self, ignore: tuple[str, ...] = ()) -> str:
        """A hash of the resolved config (minus the dotted fields in ``ignore``): a checkpoint
        or a cross-validation resumes only under the same one."""
        resolved = self.resolved()
        # Written as before these fields existed, so that older runs keep their fingerprint.
        if resolved["task"] == "classification":
            del resolved["task"]
        if not resolved["objects"]:
            del resolved["objects"]
        if resolved["data"]["object"] is None:
            del resolved["data"]["object"]
        if resolved["cv"]["metric"] is None:
            resolved["cv"]["metric"] = _DEFAULT_HEADLINE[self.task]
        if resolved["cv"]["interval"] == "headline":
            del resolved["cv"]["interval"]
        for dotted in (*ignore, *LOCATION_FIELDS):
            section, _, name = dotted.partition(".")
            resolved.get(section, {}).pop(name, None)
        canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def validate_config(raw: Any, origin: str = "config") -> ExperimentConfig:
    """Validate plain data (as loaded from YAML) into an ``ExperimentConfig``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(origin, f"must be a YAML mapping, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError("", format_error(exc.errors()[0])) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment, apply dotted ``overrides`` (``{"train.epochs": 3}``), validate."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config", f"file not found: {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError("config", f"{str(path)!r} is not valid YAML{line}") from None
    if raw is None:
        # An empty file would run every default (a 20-epoch cnn on digits): surely a mistake.
        raise UserError("config", f"{str(path)!r} is empty (no settings, only comments or null)")
    if not isinstance(raw, dict):
        raise UserError("config", f"{str(path)!r} must hold a YAML mapping")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(dotted, f"cannot set inside a non-mapping, got {node!r}")
        node[leaf] = value
    cfg = validate_config(raw, origin=str(path))
    if ":" in cfg.model.name:
        # A user module is looked for next to the config, whatever the working directory.
        folder = path.resolve().parent
        given = cfg.model.code_dir
        cfg.model.code_dir = folder if given is None else (folder / given).resolve()
    return cfg
