"""The randomized-inference options of one request, validated against the bundle it targets.

Request ``parameters`` (KServe V2) carry ``mode``, ``samples``, ``seed``, ``sigma``,
``alpha`` and ``n0``; every value is checked here, and a bad one is a 400 naming it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from randkit.deploy.bundle import LoadedBundle
from randkit.deploy.sampling import MODES, Sampling
from randkit.randomize.modules import randomness_needs

Options = Sampling  # a request's options are deploy's Sampling: the predictor takes them as is
MAX_SAMPLES = 10_000
MAX_SEED = 2**63 - 1
# Parameters that Triton's clients add on their own (binary_data_output is read by the V2
# route; the others are accepted and ignored).
CLIENT_PARAMETERS = frozenset(
    {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end"}
)
OPTION_NAMES = frozenset({"mode", "samples", "seed", "sigma", "alpha", "n0"})
MAX_REAL = 1000.0  # sigma beyond this is no longer noise but overflow
MAX_ROWS = 65_536  # forward rows (inputs x samples) of one request
DEFAULT_WEIGHT_NOISE = 0.01  # relative std when the bundle was trained without weight noise


class RequestError(Exception):
    """A problem with one request: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages never echo a whole body."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(name: str, what: str, value: object) -> RequestError:
    return RequestError(400, f"parameters.{name}: {what}, got {shown(value)}")


def _integer(params: Mapping[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "must be an integer", value)
    if not low <= value <= high:
        raise _bad(name, f"must be in [{low}, {high}]", value)
    return value


def _real(params: Mapping[str, Any], name: str, default: float | None) -> float | None:
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, "must be a finite number", value)
    if not 0 < value <= MAX_REAL:
        raise _bad(name, f"must be in (0, {MAX_REAL:g}]", value)
    return float(value)


def parse_options(
    params: Mapping[str, Any] | None, bundle: LoadedBundle, fresh_seed: Callable[[], int]
) -> Options:
    """The request's options, or a ``RequestError`` naming the first bad parameter."""
    params = dict(params or {})
    unknown = sorted(set(params) - OPTION_NAMES - CLIENT_PARAMETERS)
    if unknown:
        known = ", ".join(sorted(OPTION_NAMES))
        raise RequestError(400, f"parameters.{unknown[0][:80]}: unknown parameter (known: {known})")
    randomized = bundle.meta.get("randomized") or {}
    ensemble = len(bundle.models) > 1
    mode = params.get("mode")
    if mode is None:
        mode = randomized.get("default_mode") or ("ensemble" if ensemble else "none")
    if mode == "none" and ensemble:
        mode = "ensemble"  # an ensemble bundle's plain prediction is its members' mean
    if mode not in MODES:
        raise _bad("mode", f"must be one of {', '.join(MODES)}", mode)
    _check_mode(mode, bundle)
    samples = _integer(params, "samples", 1, MAX_SAMPLES, int(randomized.get("samples") or 32))
    seed = params["seed"] if "seed" in params else fresh_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise _bad("seed", f"must be an integer in [0, {MAX_SEED}]", seed)
    options: dict[str, Any] = {"mode": mode, "samples": samples, "seed": seed}
    if mode == "smooth":
        sigma = _real(params, "sigma", randomized.get("sigma"))
        if sigma is None:
            raise _bad("sigma", "is required for mode smooth (the bundle records no noise)", None)
        alpha = _real(params, "alpha", 0.001)
        assert alpha is not None
        if alpha >= 0.5:
            raise _bad("alpha", "must be in (0, 0.5)", alpha)
        n0 = _integer(params, "n0", 1, MAX_SAMPLES, 100)
        options.update(sigma=sigma, alpha=alpha, n0=n0)
    elif mode == "weight_noise":
        trained = randomized.get("weight_noise") or {}
        sigma = _real(params, "sigma", trained.get("std") or DEFAULT_WEIGHT_NOISE)
        options.update(sigma=sigma, relative=bool(trained.get("relative", True)))
    else:
        for name in ("sigma", "alpha", "n0"):
            if name in params:
                raise _bad(name, f"applies to other modes, not {mode!r}", params[name])
    return Options(**options)


# A loaded model's random layers never change: walk its modules once, not per request.
_NEEDS: weakref.WeakKeyDictionary[nn.Module, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def _randomness_needs(model: nn.Module) -> tuple[bool, bool]:
    needs = _NEEDS.get(model)
    if needs is None:
        needs = _NEEDS[model] = randomness_needs(model)
    return needs


def _check_mode(mode: str, bundle: LoadedBundle) -> None:
    members = len(bundle.models)
    if mode == "ensemble" and members < 2:
        raise _bad(
            "mode", "needs a bundle of several fold models (randkit export --ensemble)", mode
        )
    if mode not in ("none", "ensemble") and members > 1:
        raise _bad(
            "mode", f"needs a single-model bundle; this one is an ensemble of {members}", mode
        )
    if mode == "mc_dropout":
        stream_layers, global_layers = _randomness_needs(bundle.models[0])
        if not stream_layers or global_layers:
            raise _bad(
                "mode",
                "needs a model whose only random layers are randkit's generator-driven ones "
                "(Dropout, GaussianDropout, StochasticDepth with p > 0)",
                mode,
            )
    if mode == "tta":
        augment = (bundle.meta.get("randomized") or {}).get("augment") or []
        if bundle.kind != "image" or not augment:
            raise _bad("mode", "needs an image model trained with randomize.augment", mode)
    if mode == "smooth" and bundle.kind == "text":
        raise _bad("mode", "needs real-valued inputs; this bundle takes token ids", mode)
