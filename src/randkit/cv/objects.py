"""The Python objects of a cross-validation that a config cannot name: the user's trial
function, model, Dataset, loss, optimizer, metrics and callbacks.

They travel to worker processes and Ray tasks with the run (pickled in transit, by reference
for module-level functions and classes, never written to disk); the run's ``config.yaml``
records what they are by name, so a resumed run checks it is the same experiment.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from randkit.data import Prepared
from randkit.errors import UserError
from randkit.models import Classifier, Standardize
from randkit.randomize.weights import initialize
from randkit.streams import ScopedStreams, Streams
from randkit.train.parts import UserParts


@dataclass
class UserObjects:
    """``fit``: a trial function (then the built-in trainer is not used); ``model``: an
    ``nn.Module`` subclass, a factory or an instance; ``dataset``: a map-style Dataset."""

    fit: Callable[..., Any] | None = None
    model: Any = None
    dataset: Dataset[Any] | None = None
    parts: UserParts = field(default_factory=UserParts)

    def names(self) -> dict[str, str]:
        """What each object is, by name, for ``config.yaml`` and the resume check."""
        parts = self.parts
        named = {
            "fit": self.fit,
            "model": self.model,
            "dataset": self.dataset,
            "loss": parts.loss,
            "metrics": parts.metrics,
            "callbacks": parts.callbacks or None,
        }
        names = {key: describe(value) for key, value in named.items() if value is not None}
        for key, spec in (("optimizer", parts.optimizer), ("scheduler", parts.scheduler)):
            if spec is not None:
                names[key] = f"{describe(spec[0])}({_arguments(spec[1])})" + "".join(
                    f", {extra}" for extra in spec[2:]
                )
        return names

    def check_sendable(self, runner: str) -> None:
        """Refuse, before anything runs, an object a worker process or Ray task cannot get."""
        if runner not in ("processes", "ray"):
            return
        dumps = pickle.dumps
        if runner == "ray":
            from randkit.extras import require

            require("ray", "runner 'ray'")
            from ray import cloudpickle  # Ray sends objects with cloudpickle

            dumps = cloudpickle.dumps
        items = {
            "fit": self.fit,
            "model": self.model,
            "data": self.dataset,
            "loss": self.parts.loss,
            "optimizer": self.parts.optimizer,
            "scheduler": self.parts.scheduler,
            "metrics": self.parts.metrics,
            "callbacks": self.parts.callbacks,
        }
        for name, value in items.items():
            if value is None:
                continue
            try:
                dumps(value)
            except Exception as exc:  # pickling fails with many exception types
                raise UserError(
                    name,
                    f"{describe(value)} cannot be sent to {runner} workers "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0]:.120}); define it "
                    "at module level (def or class, not a lambda or a local function) or "
                    "use runner='sequential'",
                ) from None


def _arguments(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))


def describe(value: Any) -> str:
    """``module:qualname`` of a function or class, ``instance of module:qualname`` else."""
    if isinstance(value, tuple | list):
        return ", ".join(describe(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={describe(v)}" for k, v in value.items())
    if isinstance(value, functools.partial):
        arguments = [repr(a) for a in value.args] + [_arguments(value.keywords)]
        return f"partial({describe(value.func)}, {', '.join(a for a in arguments if a)})"
    named = inspect.isclass(value) or inspect.isroutine(value)
    if not named and type(value).__repr__ is not object.__repr__:
        if not isinstance(value, nn.Module | Dataset) and " at 0x" not in repr(value):
            return repr(value)  # an object that says what it is (its settings)
    target = value if named else type(value)
    name = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', '?')}"
    return name if target is value else f"instance of {name}{_settings(value)}"


def _settings(value: Any) -> str:
    """What tells two instances of one class apart in a record: their plain public
    attributes (a loss's ``label_smoothing``, a callback's ``patience``) and, for a module,
    a hash of its layers as ``repr`` prints them (the architecture, not the weights)."""
    plain = (bool, int, float, str, type(None))
    attributes = {
        k: v
        for k, v in sorted(getattr(value, "__dict__", {}).items())
        if not k.startswith("_") and k != "training" and isinstance(v, plain)
    }
    shown = ", ".join(f"{k}={v!r}" for k, v in attributes.items())
    if isinstance(value, nn.Module):
        digest = hashlib.sha256(repr(value).encode()).hexdigest()[:12]
        shown = ", ".join(part for part in (shown, f"layers#{digest}") if part)
    return f"({shown})" if shown else ""


def model_spec(prepared: Prepared, outputs: int) -> dict[str, Any]:
    """What a model factory may ask for by keyword: ``num_classes`` (or ``num_outputs``),
    ``in_shape`` and, for text, ``vocab_size``."""
    spec: dict[str, Any] = {
        "num_classes": outputs,
        "num_outputs": outputs,
        "in_shape": list(prepared.input_shape),
    }
    if prepared.vocab_size is not None:
        spec["vocab_size"] = prepared.vocab_size
    return spec


def build_user_model(
    model: Any,
    prepared: Prepared,
    outputs: int,
    streams: Streams | ScopedStreams,
    init: str | None = None,
) -> Classifier:
    """A fresh model for one trial. A class or factory is called (with the keywords of
    ``model_spec`` its signature names) and an instance is copied with every layer's
    ``reset_parameters()`` run; either way with torch's global RNG seeded from stream
    ``init``, so the initial weights depend on the trial's init level and nothing else."""
    with streams.fork_global("init"):
        if isinstance(model, nn.Module):
            net = copy.deepcopy(model)
            for module in net.modules():
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
        else:
            net = _call_user_factory(model, model_spec(prepared, outputs))
    if init is not None:
        initialize(net, init, streams.torch("init", scheme=init))
    standardize = None
    if prepared.mean is not None and prepared.std is not None:
        standardize = Standardize(prepared.mean, prepared.std, prepared.kind)
    return Classifier(net, standardize)


def _call_user_factory(factory: Callable[..., Any], spec: dict[str, Any]) -> nn.Module:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in spec.items() if k in params and not takes_any}
    try:
        net = factory(**given)
    except TypeError as exc:
        raise UserError(
            "model",
            f"{describe(factory)}({', '.join(given)}) failed: {exc}; a model class or factory "
            "may take num_classes, in_shape, vocab_size; bind other arguments with "
            "functools.partial",
        ) from None
    if not isinstance(net, nn.Module):
        raise UserError(
            "model", f"{describe(factory)} returned {type(net).__name__}, not an nn.Module"
        )
    return net


def check_model_object(model: Any) -> None:
    """A model must be an ``nn.Module`` (class or instance) or a callable that makes one."""
    if isinstance(model, nn.Module) or callable(model):
        if _is_lightning(model):
            raise UserError(
                "model",
                f"{describe(model)} is a LightningModule: cross-validate it with Lightning's "
                "own loop, fit=randkit.integrations.lightning.LightningTrial(...)",
            )
        return
    raise UserError(
        "model",
        "must be an nn.Module subclass, a factory function, an nn.Module instance, a zoo "
        f"name or 'module:factory', got {type(model).__name__} {model!r:.60}",
    )


def _is_lightning(model: Any) -> bool:
    target = model if inspect.isclass(model) else type(model)
    return any(
        base.__name__ == "LightningModule"
        and base.__module__.startswith(("lightning", "pytorch_lightning"))
        for base in getattr(target, "__mro__", ())
    )
