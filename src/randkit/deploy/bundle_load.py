"""Reading model bundles: ``load_bundle`` checks and rebuilds one, ``validate_input`` checks
a request's inputs against it. Only JSON and safetensors are read; nothing is unpickled. A
custom model's code carried by the bundle (``code/<module>.py``, SHA-256 checked) is
imported, which runs it: see the trust note in ``randkit.deploy.bundle``.
(Writing them is ``randkit.deploy.bundle.export_bundle``.)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from randkit.config import ModelConfig
from randkit.deploy.bundle_code import bundled_factory
from randkit.errors import UserError

FORMAT = "randkit-bundle/1"
BUNDLE_FILE = "bundle.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# One component of a member's path: trial ids of long plans exceed 64 characters.
PART_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,239}")
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
    factory = bundled_factory(path, meta, model_cfg)

    models = []
    for member in members:
        weights = _read_member(path, member, meta["sha256"].get(member))
        standardized = "standardize.mean" in weights  # not so for a Python Dataset's run
        model = _build(model_cfg, kind, shape, vocab_size, classes, factory, standardized)
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
    unknown = sorted(set(section) - {"name", "args"})
    if unknown:
        raise _bad(f"model section: unknown field {unknown[0]!r}, got {section!r}")
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
        if not member.endswith(".safetensors") or not all(PART_PATTERN.fullmatch(p) for p in parts):
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
    cfg: ModelConfig,
    kind: str,
    shape: list[int],
    vocab_size: int | None,
    classes: list[str],
    factory: Callable[..., nn.Module] | None = None,
    standardized: bool = True,
) -> nn.Module:
    """The architecture, from a throwaway seed (every weight is overwritten by the member);
    ``standardized``: behind the input standardization that config runs train with."""
    from randkit.data import Prepared, TensorData
    from randkit.models import build_model
    from randkit.streams import Streams

    empty = TensorData(torch.empty(0), torch.empty(0, dtype=torch.long))
    # Config runs' image and vector models standardize per channel / feature.
    stats = kind != "text" and standardized
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
        # build_model forks the global RNG
        return build_model(cfg, prepared, Streams(0), factory=factory)
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
    with the inference thread's for the cores and slow every forward pass down.
    """
    if isinstance(x, np.ndarray):
        if x.dtype == object or x.dtype.kind not in "biuf":
            raise ValueError(f"input dtype {x.dtype} is not numeric")
        _check_shape(bundle, list(x.shape))
        array = _checked_values(bundle, x)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        # .to() costs more than a small request's parsing even when it has nothing to do.
        return tensor if bundle.device.type == "cpu" else tensor.to(bundle.device)
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
