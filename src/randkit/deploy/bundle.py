"""Model bundles for serving: a folder of JSON and safetensors, never a pickle.

Layout of a bundle, ``REPOSITORY/NAME/VERSION/``:

* ``bundle.json``: what a server needs to rebuild and feed the model(s) (see ``export_bundle``);
* ``model.safetensors`` (one model) or ``models/<trial id>.safetensors`` (an ensemble of the
  fold models of a cross-validation run), each byte-for-byte the run's own file.

Exports are atomic: the bundle is written into a hidden temp folder inside ``REPOSITORY/NAME``,
checked by loading it back, then renamed into place; an existing version is never replaced.
Loading reads only JSON and safetensors and checks every member against its SHA-256.

Trust note: the architecture is rebuilt from the model section (``mlp``, ``cnn``, ``resnet``,
``text`` or ``package.module:factory``); a custom factory's module is imported, as it is when
training, so load bundles of custom models only from a source you trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

import randkit
from randkit import atomic
from randkit.config import ExperimentConfig, ModelConfig, validate_config
from randkit.errors import UserError

FORMAT = "randkit-bundle/1"
BUNDLE_FILE = "bundle.json"
SINGLE_MEMBER = "model.safetensors"
MEMBERS_DIR = "models"
DEFAULT_SAMPLES = 32
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# One component of a member's path: trial ids of long plans exceed 64 characters.
_PART_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,239}")
_TEMP_PREFIX = ".tmp-"
_DTYPES = {"float32": torch.float32, "int64": torch.int64}
_KINDS = {"image": 3, "vector": 1, "text": 1}  # input kind -> number of input dimensions


@dataclass
class LoadedBundle:
    """A bundle ready to serve: its metadata and its model(s) in eval mode on ``device``."""

    path: Path
    meta: dict[str, Any]
    models: list[nn.Module]  # one, or one per member of an ensemble (in ``members`` order)
    classes: list[str]
    input_shape: list[int]  # one example's shape, without the batch dimension
    input_dtype: torch.dtype  # torch.float32 or torch.int64 (token ids)
    device: torch.device

    @property
    def kind(self) -> str:
        return str(self.meta["input"]["kind"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.meta.get("preprocessing") or {})


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class _Source:
    """What an export copies from a run: model files and the facts bundle.json records."""

    kind: str  # "train" or "cv"
    cfg: ExperimentConfig
    files: dict[str, Path]  # member path in the bundle -> file in the run
    input: dict[str, Any]
    classes: list[str]
    preprocessing: dict[str, Any]


def check_name(value: object, field: str) -> str:
    """A bundle name or version: one safe path component (nothing can escape the repository)."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise UserError(
            field,
            "must be 1-64 characters from letters, digits, '_', '.', '-', starting with a "
            f"letter or digit, got {value!r}",
        )
    return value


def export_bundle(
    run: str | Path,
    repository: str | Path,
    name: str,
    version: str | None = None,
    ensemble: bool = False,
) -> Path:
    """Export a finished run as ``repository/name/version/`` and return that folder.

    ``run`` is either a finished ``randkit train`` run (``config.yaml`` + ``model.safetensors``)
    or a finished ``randkit cv`` run (``plan.json`` + ``trials/``). A training run exports its
    one model; ``ensemble=True`` is refused for it. A cross-validation run needs
    ``ensemble=True`` and exports the model of every trial in ``plan.json`` (all must be
    finished and saved, i.e. ``cv.save_models: true``); without it the export is refused
    rather than silently picking one fold. Text cross-validations cannot be ensembled: each
    fold learned its own vocabulary.

    ``version`` defaults to one more than the highest integer version already in
    ``repository/name`` ("1" first). An existing version is refused, never overwritten.
    """
    check_name(name, "name")
    if version is not None:
        check_name(version, "version")
    run = Path(run)
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise UserError("repository", f"{str(repository)!r} exists and is not a directory")
    family = repository / name
    if family.exists() and not family.is_dir():
        raise UserError("name", f"{str(family)!r} exists and is not a directory")
    if version is not None and (family / version).exists():
        raise UserError(
            "version", f"{version!r} of bundle {name!r} already exists in {str(repository)!r}"
        )
    # Everything that reads the run (and may fail on it) happens before anything is written.
    source = _inspect_run(run, ensemble)

    made = [p for p in (repository, family) if not p.exists()]
    family.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(family)
    if version is None:
        version = _next_version(family)
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=family))
    target = family / version
    try:
        meta = _write_members(source, temp)
        meta = {
            "format": FORMAT,
            "name": name,
            "version": version,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_run": str(run.resolve()),
            **meta,
        }
        atomic.write_json(temp / BUNDLE_FILE, meta)
        load_bundle(temp)  # the bundle must load (hashes, architecture, weights) before it exists
        if target.exists():
            raise UserError(
                "version", f"{version!r} of bundle {name!r} already exists in {str(repository)!r}"
            )
        try:
            os.rename(temp, target)
        except OSError as exc:  # another export took the version since the check
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise UserError(
                "version", f"{version!r} of bundle {name!r} already exists in {str(repository)!r}"
            ) from None
        atomic.fsync_dir(family)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        for folder in reversed(made):  # folders this call created, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return target


def _inspect_run(run: Path, ensemble: bool) -> _Source:
    is_cv = (run / "plan.json").is_file() and (run / "trials").is_dir()
    is_train = (run / "config.yaml").is_file() and (run / "model.safetensors").is_file()
    if is_cv:
        if not ensemble:
            raise UserError(
                "ensemble",
                f"{str(run)!r} is a cross-validation run with one model per trial; export them "
                "all as an ensemble with --ensemble (or export a `randkit train` run)",
            )
        return _inspect_cv(run)
    if is_train:
        if ensemble:
            raise UserError(
                "ensemble",
                f"{str(run)!r} is a training run with a single model; --ensemble needs a "
                "cross-validation run (plan.json + trials/)",
            )
        return _inspect_train(run)
    raise UserError(
        "run",
        f"{str(run)!r} is neither a finished training run (config.yaml + model.safetensors) "
        "nor a cross-validation run (plan.json + trials/)",
    )


def _input_section(
    kind: str, shape: list[int], unit_range: bool, vocab_size: int | None
) -> dict[str, Any]:
    return {
        "kind": kind,
        "shape": [int(s) for s in shape],
        "dtype": "int64" if kind == "text" else "float32",
        "value_range": [0, 1] if unit_range else None,
        "vocab_size": vocab_size,
    }


def _inspect_train(run: Path) -> _Source:
    from randkit.train.load import load_trained

    trained = load_trained(run, device="cpu")  # checks that the weights fit the config
    prepared = trained.prepared
    preprocessing = dict(prepared.preprocessing)
    saved = run / "preprocessing.json"
    if saved.is_file():
        try:
            on_disk = json.loads(saved.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError("run", f"{str(saved)!r} is not valid JSON") from None
        if on_disk != preprocessing:
            raise UserError(
                "run",
                f"{str(saved)!r} differs from the preprocessing rebuilt from the data; "
                "the data changed since training",
            )
    return _Source(
        kind="train",
        cfg=trained.cfg,
        files={SINGLE_MEMBER: run / "model.safetensors"},
        input=_input_section(
            prepared.kind, prepared.input_shape, prepared.unit_range, prepared.vocab_size
        ),
        classes=[str(c) for c in prepared.classes],
        preprocessing=preprocessing,
    )


def _inspect_cv(run: Path) -> _Source:
    from randkit.data import load_data
    from randkit.data.base import data_fingerprint

    cfg = _read_config(run / "config.yaml")
    plan_path = run / "plan.json"
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        trial_ids = [str(t["id"]) for t in plan["trials"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError("run", f"{str(plan_path)!r} is not a readable plan") from None
    if not trial_ids:
        raise UserError("run", f"{str(plan_path)!r} lists no trials")
    unfinished = [t for t in trial_ids if not (run / "trials" / t / "metrics.json").is_file()]
    if unfinished:
        raise UserError(
            "run",
            f"{len(unfinished)} of {len(trial_ids)} trials of {str(run)!r} are not finished "
            f"(first: {unfinished[0]!r}); resume the cross-validation first",
        )
    unsaved = [t for t in trial_ids if not (run / "trials" / t / "model.safetensors").is_file()]
    if unsaved:
        why = " (it ran with cv.save_models: false)" if not cfg.cv.save_models else ""
        raise UserError(
            "run", f"trial {unsaved[0]!r} of {str(run)!r} saved no model{why}; nothing to export"
        )
    data = load_data(cfg.data)
    if data_fingerprint(data) != plan.get("data_hash"):
        raise UserError(
            "run",
            f"the data of {str(run)!r} changed since the cross-validation ran "
            "(its fingerprint differs from plan.json's data_hash)",
        )
    if data.kind == "text":
        raise UserError(
            "ensemble",
            f"{str(run)!r} is a text cross-validation: every fold learned its own vocabulary, "
            "so its models take different inputs; export a `randkit train` run instead",
        )
    assert isinstance(data.inputs, torch.Tensor)
    files = {}
    for trial_id in trial_ids:
        if not _PART_PATTERN.fullmatch(trial_id):
            raise UserError("run", f"{str(plan_path)!r} lists an unsafe trial id {trial_id!r}")
        files[f"{MEMBERS_DIR}/{trial_id}.safetensors"] = (
            run / "trials" / trial_id / "model.safetensors"
        )
    return _Source(
        kind="cv",
        cfg=cfg,
        files=files,
        input=_input_section(data.kind, list(data.inputs.shape[1:]), data.unit_range, None),
        classes=[str(c) for c in data.classes],
        preprocessing={},
    )


def _read_config(path: Path) -> ExperimentConfig:
    if not path.is_file():
        raise UserError("run", f"{str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError("run", f"{str(path)!r} is not valid YAML") from None
    return validate_config(raw, origin=str(path))


def _write_members(source: _Source, folder: Path) -> dict[str, Any]:
    """Copy the model files into ``folder``; return the rest of bundle.json."""
    digests = {}
    for member, origin in source.files.items():
        data = origin.read_bytes()
        digests[member] = hashlib.sha256(data).hexdigest()
        atomic.write_bytes(folder / member, data)
    randomize = source.cfg.randomize
    noise = randomize.input_noise
    # Test-time augmentation reuses the training augmentation, minus the label-mixing kinds.
    augment = [
        spec.model_dump(mode="json")
        for spec in randomize.augment
        if spec.kind not in ("mixup", "cutmix")
    ]
    weight_noise = randomize.weight_noise.model_dump() if randomize.weight_noise else None
    return {
        "model": source.cfg.model.model_dump(mode="json"),
        "input": source.input,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "preprocessing": source.preprocessing,
        "members": list(source.files),
        "randomized": {
            "sigma": noise.level if noise is not None and noise.kind == "gaussian" else None,
            "default_mode": None,
            "samples": DEFAULT_SAMPLES,
            "augment": augment,
            "weight_noise": weight_noise,
        },
        "source_kind": source.kind,
        "randkit_version": randkit.__version__,
        "sha256": digests,
    }


def _next_version(family: Path) -> str:
    versions = [int(p.name) for p in family.iterdir() if p.name.isdigit() and p.is_dir()]
    return str(max(versions, default=0) + 1)


def _remove_dead_temps(family: Path) -> None:
    """Delete temp folders of exports whose process died (a crash leaves only these)."""
    for stale in family.glob(f"{_TEMP_PREFIX}*"):
        pid = stale.name[len(_TEMP_PREFIX) :].split("-", 1)[0]
        if stale.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# ---------------------------------------------------------------------------------------------
# Load


def _bad(message: str) -> UserError:
    return UserError("bundle", message)


def load_bundle(path: str | Path, device: str = "cpu") -> LoadedBundle:
    """Open a bundle: check bundle.json and every member's SHA-256, rebuild the architecture
    and load the weights (strictly). Only JSON and safetensors are read; nothing is unpickled.
    Global RNG states are left untouched."""
    path = Path(path)
    target = _device(device)
    meta_path = path / BUNDLE_FILE
    if not meta_path.is_file():
        raise _bad(f"{str(path)!r} is not a bundle: no {BUNDLE_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"{str(meta_path)!r} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise _bad(f"{str(meta_path)!r} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise _bad(
            f"unknown format {meta.get('format')!r} in {str(meta_path)!r}; expected {FORMAT!r}"
        )
    model_cfg = _check_model_section(meta.get("model"))
    kind, shape, dtype, vocab_size = _check_input_section(meta.get("input"))
    classes = _check_classes(meta)
    members = _check_members(meta)

    models = []
    for member in members:
        weights = _read_member(path, member, meta["sha256"].get(member))
        model = _build(model_cfg, kind, shape, vocab_size, classes)
        _load_weights(model, weights, member, model_cfg.name)
        models.append(model.to(target).eval())
    return LoadedBundle(path, meta, models, classes, shape, dtype, target)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError("device", f"not a torch device, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device", f"{name!r} asked for but no CUDA device is available")
    return device


def _check_model_section(section: object) -> ModelConfig:
    if not isinstance(section, dict):
        raise _bad(f"model section must be an object with name and args, got {section!r}")
    try:
        return ModelConfig.model_validate(section)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise _bad(f"model section: {where}: {error['msg']}, got {section!r}") from None


def _positive_ints(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def _check_input_section(section: object) -> tuple[str, list[int], torch.dtype, int | None]:
    if not isinstance(section, dict):
        raise _bad(f"input section must be an object, got {section!r}")
    shape = section.get("shape")
    if not _positive_ints(shape):
        raise _bad(f"input.shape must be a list of positive integers, got {shape!r}")
    assert isinstance(shape, list)
    kind = section.get("kind")
    if kind not in _KINDS:
        raise _bad(f"input.kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    if len(shape) != _KINDS[kind]:
        raise _bad(f"input.shape of {kind} data must have {_KINDS[kind]} dimensions, got {shape}")
    dtype = section.get("dtype")
    expected = "int64" if kind == "text" else "float32"
    if dtype != expected:
        raise _bad(f"input.dtype of {kind} data must be {expected!r}, got {dtype!r}")
    vocab_size = section.get("vocab_size")
    if kind == "text" and not _positive_ints([vocab_size]):
        raise _bad(f"input.vocab_size must be a positive integer for text, got {vocab_size!r}")
    value_range = section.get("value_range")
    if value_range is not None and not (
        isinstance(value_range, list)
        and len(value_range) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value_range)
    ):
        raise _bad(f"input.value_range must be null or [low, high], got {value_range!r}")
    return kind, list(shape), _DTYPES[dtype], vocab_size if kind == "text" else None


def _check_classes(meta: dict[str, Any]) -> list[str]:
    classes = meta.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2):
        raise _bad(f"classes must be a list of at least 2 names, got {classes!r}")
    if meta.get("num_classes") != len(classes):
        raise _bad(
            f"num_classes is {meta.get('num_classes')!r} but {len(classes)} classes are listed"
        )
    return [str(c) for c in classes]


def _check_members(meta: dict[str, Any]) -> list[str]:
    members = meta.get("members")
    if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)):
        raise _bad(f"members must be a non-empty list of file names, got {members!r}")
    if len(set(members)) != len(members):
        raise _bad(f"members lists a file twice: {members}")
    for member in members:
        parts = member.split("/")
        if not member.endswith(".safetensors") or not all(
            _PART_PATTERN.fullmatch(p) for p in parts
        ):
            raise _bad(f"member {member!r} is not a .safetensors file inside the bundle")
    digests = meta.get("sha256")
    if not isinstance(digests, dict):
        raise _bad(f"sha256 must map each member to its digest, got {digests!r}")
    for member in members:
        if not isinstance(digests.get(member), str):
            raise _bad(f"sha256 has no digest for member {member!r}")
    return members


def _read_member(path: Path, member: str, expected: str) -> dict[str, torch.Tensor]:
    file = path / member
    if not file.is_file():
        raise _bad(f"member {member!r} is missing from {str(path)!r}")
    data = file.read_bytes()  # hashed and parsed from the same bytes
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise _bad(
            f"member {member!r} fails its sha256 check (expected {expected[:16]}..., got "
            f"{actual[:16]}...): the file is corrupted or was modified"
        )
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _bad(f"member {member!r} is not a readable safetensors file: {exc}") from None


def _build(
    cfg: ModelConfig, kind: str, shape: list[int], vocab_size: int | None, classes: list[str]
) -> nn.Module:
    """The architecture, from a throwaway seed (every weight is overwritten by the member)."""
    from randkit.data import Prepared, TensorData
    from randkit.models import build_model
    from randkit.streams import Streams

    empty = TensorData(torch.empty(0), torch.empty(0, dtype=torch.long))
    stats = kind != "text"  # image and vector models standardize per channel / feature
    prepared = Prepared(
        train=empty,
        val=None,
        test=empty,
        classes=classes,
        kind=kind,  # type: ignore[arg-type]
        input_shape=list(shape),
        vocab_size=vocab_size,
        mean=torch.zeros(shape[0]) if stats else None,
        std=torch.ones(shape[0]) if stats else None,
    )
    try:
        return build_model(cfg, prepared, Streams(0))  # build_model forks the global RNG
    except UserError as exc:
        raise _bad(f"model section does not build: {exc}") from None


def _load_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], member: str, name: str
) -> None:
    expected = model.state_dict()
    problem = None
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        problem = _first_key("missing", missing)
    elif unexpected:
        problem = _first_key("unexpected", sorted(unexpected))
    else:
        for key, tensor in expected.items():
            if tuple(weights[key].shape) != tuple(tensor.shape):
                problem = (
                    f"{key!r} has shape {list(weights[key].shape)}, the model needs "
                    f"{list(tensor.shape)}"
                )
                break
    if problem is None:
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            problem = str(exc).splitlines()[0]
    if problem is not None:
        raise _bad(f"member {member!r} does not fit model {name!r}: {problem}")


def _first_key(what: str, keys: list[str]) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{what} key {keys[0]!r}{more}"


# ---------------------------------------------------------------------------------------------
# Requests


def validate_input(bundle: LoadedBundle, x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Check a batch against the bundle and return it as a tensor on the bundle's device.

    ``x`` must have shape ``(N, *input_shape)`` with N >= 1; float bundles take any floating
    dtype (converted to float32) and need finite values; text bundles take integer token ids
    in ``[0, vocab_size)``. A problem raises ``ValueError`` naming it.

    NumPy input is checked with NumPy: a server validates on its event-loop thread, where a
    torch operation on a large tensor would start a second OpenMP pool that then competes
    with the inference thread's for the cores (measured: 11 -> 19 ms per forward on 2 cores).
    """
    if isinstance(x, np.ndarray):
        if x.dtype == object or x.dtype.kind not in "biuf":
            raise ValueError(f"input dtype {x.dtype} is not numeric")
        _check_shape(bundle, list(x.shape))
        array = _checked_values(bundle, x)
        return torch.from_numpy(np.ascontiguousarray(array)).to(bundle.device)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"input must be a numpy array or a torch tensor, got {type(x).__name__}")
    tensor = x.detach()
    _check_shape(bundle, list(tensor.shape))
    if bundle.input_dtype == torch.int64:
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise ValueError(_not_integer(str(tensor.dtype).removeprefix("torch.")))
        tensor = tensor.to(torch.int64)
        _check_token_range(bundle, int(tensor.min()), int(tensor.max()))
    else:
        if not tensor.is_floating_point():
            raise ValueError(_not_float(str(tensor.dtype).removeprefix("torch.")))
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise ValueError("input holds NaN or Inf")
    return tensor.contiguous().to(bundle.device)


def _check_shape(bundle: LoadedBundle, got: list[int]) -> None:
    want = list(bundle.input_shape)
    if len(got) == len(want) and got == want:
        raise ValueError(
            f"input shape {got} has no batch dimension; expected (N, {', '.join(map(str, want))})"
        )
    if len(got) != len(want) + 1:
        raise ValueError(
            f"input shape {got} does not match the bundle's (N, {', '.join(map(str, want))})"
        )
    if got[1:] != want:
        raise ValueError(f"input shape {got[1:]} does not match the bundle's {want}")
    if got[0] == 0:
        raise ValueError("input holds no examples (N = 0)")


def _checked_values(bundle: LoadedBundle, x: np.ndarray) -> np.ndarray:
    if bundle.input_dtype == torch.int64:
        if x.dtype.kind not in "iu":
            raise ValueError(_not_integer(str(x.dtype)))
        _check_token_range(bundle, int(x.min()), int(x.max()))
        return x.astype(np.int64)
    if x.dtype.kind != "f":
        raise ValueError(_not_float(str(x.dtype)))
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
        array = x.astype(np.float32)  # a copy: the caller's array is never shared
    if not np.isfinite(array).all():
        raise ValueError("input holds NaN or Inf")
    return array


def _check_token_range(bundle: LoadedBundle, low: int, high: int) -> None:
    vocab = bundle.meta["input"]["vocab_size"]
    if low < 0 or high >= vocab:
        raise ValueError(f"input token ids must lie in [0, {vocab}), got values in [{low}, {high}]")


def _not_integer(dtype: str) -> str:
    return f"input dtype {dtype} is not an integer type; the bundle expects int64 token ids"


def _not_float(dtype: str) -> str:
    return f"input dtype {dtype} is not floating point; the bundle expects float32"
