"""Model registry: zoo names or ``package.module:factory``; weights from stream ``init``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randkit.config import ModelConfig
from randkit.data import Prepared
from randkit.errors import UserError
from randkit.models import zoo
from randkit.models.user_code import import_reference
from randkit.randomize.weights import initialize
from randkit.streams import Streams

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": zoo.mlp,
    "cnn": zoo.cnn,
    "resnet": zoo.resnet,
    "text": zoo.text,
}


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training part's statistics kept as buffers, so a saved
    model carries its own preprocessing."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, kind: str) -> None:
        super().__init__()
        shape = (1, -1, 1, 1) if kind == "image" else (1, -1)
        self.register_buffer("mean", mean.reshape(shape).clone())
        self.register_buffer("std", std.reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """The network behind its input standardization."""

    def __init__(self, net: nn.Module, standardize: nn.Module | None = None) -> None:
        super().__init__()
        self.standardize = standardize if standardize is not None else nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))


def resolve_factory(name: str, search: Sequence[Path] = ()) -> Callable[..., nn.Module]:
    """A zoo name or ``module:factory``. A module that is not importable is looked for as a
    ``.py`` file in each folder of ``search`` (the config's ``model.code_dir``), then in the
    working directory."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise UserError(
            "model.name",
            f"unknown model {name!r}; expected one of "
            f"{', '.join(REGISTRY)} or 'package.module:factory'",
        )
    factory = import_reference(name, "model.name", search)
    if not callable(factory):
        raise UserError("model.name", f"{name!r} is not callable")
    return factory


def code_folders(cfg: ModelConfig) -> tuple[Path, ...]:
    """Where ``cfg``'s module is looked for when it is not importable (before the cwd)."""
    return (cfg.code_dir,) if cfg.code_dir is not None else ()


def _call_factory(
    cfg: ModelConfig, spec: dict[str, Any], factory: Callable[..., nn.Module] | None = None
) -> nn.Module:
    if factory is None:
        factory = resolve_factory(cfg.name, code_folders(cfg))
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        raise UserError("model.name", f"{cfg.name!r} has no inspectable signature") from None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in cfg.args.items():
        if key in spec:
            raise UserError(f"model.args.{key}", f"is set from the data, got {value!r}")
        if key not in params and not takes_any:
            raise UserError(
                f"model.args.{key}", f"unknown argument of model {cfg.name!r} (value {value!r})"
            )
    given = {k: v for k, v in spec.items() if k in params or takes_any}
    try:
        model = factory(**given, **cfg.args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError("model.args", f"model {cfg.name!r} rejected {cfg.args}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(
            "model.name", f"{cfg.name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def build_model(
    cfg: ModelConfig,
    prepared: Prepared,
    streams: Streams,
    init: str | None = None,
    factory: Callable[..., nn.Module] | None = None,
    num_outputs: int | None = None,
    **coords: int | str,
) -> Classifier:
    """Build the model; every initial weight comes from stream ``init`` at ``coords``.

    Modules initialize themselves from torch's global RNG (``reset_parameters``), so the
    construction runs with that RNG seeded from the stream and restored afterwards. A named
    ``init`` scheme (``kaiming_normal``, ...) then re-draws Linear/Conv weights from the
    stream through a generator. ``factory`` replaces the one ``cfg.name`` resolves to (a
    bundle passes the factory of the code it carries).
    """
    spec: dict[str, Any] = {
        # A regression or multilabel model's outputs take the place of the classes.
        "num_classes": len(prepared.classes) if num_outputs is None else num_outputs,
        "in_shape": list(prepared.input_shape),
    }
    if prepared.vocab_size is not None:
        spec["vocab_size"] = prepared.vocab_size
    with streams.fork_global("init", **coords):
        net = _call_factory(cfg, spec, factory)
    if init is not None:
        initialize(net, init, streams.torch("init", scheme=init, **coords))
    standardize = None
    if prepared.mean is not None and prepared.std is not None:
        standardize = Standardize(prepared.mean, prepared.std, prepared.kind)
    return Classifier(net, standardize)
