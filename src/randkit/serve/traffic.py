"""Randomized traffic split between the versions of one model.

A model ``NAME`` has versions (folders ``REPOSITORY/NAME/1``, ``.../2``) and an optional
``REPOSITORY/NAME/policy.yaml``::

    labels: {stable: "1", canary: "2"}   # label -> version
    weights: {stable: 90, canary: 10}    # keys are versions or labels
    sticky: false                        # true: route by a hash of the request key
    baseline: stable                     # what the experiment compares the others with
    alpha: 0.05                          # level of the experiment's test
    min_samples: 100                     # labelled requests per version before a verdict
    test: sequential                     # anytime-valid verdict; "fixed": one-look z-test

Routing is a pure function of ``(seed, model, request number)`` (or of ``(seed, model, key)``
when sticky), so a split is replayable and does not depend on thread timing.

>>> policy = TrafficPolicy(labels={"stable": "1", "canary": "2"},
...                        weights={"stable": 90, "canary": 10})
>>> router = Router(policy, "digits", seed=0)
>>> router.route(17, None, ["1", "2"]) in ("1", "2")
True
>>> Router(TrafficPolicy(), "digits", seed=0).route(0, None, ["9", "10"])
'10'
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from randkit.errors import UserError
from randkit.streams import Streams

POLICY_FILE = "policy.yaml"
_FIELD = "policy.yaml"
SAFE_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"

SafeName = Annotated[str, StringConstraints(pattern=SAFE_NAME_PATTERN)]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def _name(value: Any) -> Any:
    # YAML reads `1: 90` with an int key; version folders are strings, so accept ints as names.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TrafficPolicy(BaseModel):
    """How one model's traffic is split between its versions (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: dict[SafeName, SafeName] = Field(default_factory=dict)
    weights: dict[SafeName, Weight] = Field(default_factory=dict)
    sticky: StrictBool = False
    baseline: SafeName | None = None
    alpha: float = Field(0.05, gt=0, lt=1)
    min_samples: int = Field(100, ge=1)
    test: Literal["sequential", "fixed"] = "sequential"

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, labels: Any) -> Any:
        if isinstance(labels, Mapping):
            return {_name(k): _name(v) for k, v in labels.items()}
        return labels

    @field_validator("weights", mode="before")
    @classmethod
    def _weight_values(cls, weights: Any) -> Any:
        if not isinstance(weights, Mapping):
            return weights
        for key, value in weights.items():
            # A bool or a quoted number is almost surely a typo; pydantic would coerce it.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"weights.{key}: must be a number, got {value!r}")
        return {_name(k): v for k, v in weights.items()}

    @field_validator("baseline", mode="before")
    @classmethod
    def _baseline_name(cls, baseline: Any) -> Any:
        return _name(baseline)

    @model_validator(mode="after")
    def _some_weight(self) -> TrafficPolicy:
        if self.weights and not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"weights: at least one must be > 0, got {self.weights}")
        return self


def version_key(versions: Iterable[str]) -> Any:
    """Sort key for versions: numeric when all are digits ("10" after "9"), else string."""
    numeric = all(v.isdigit() for v in versions)
    return (lambda v: (int(v), v)) if numeric else (lambda v: v)


def sorted_versions(versions: Iterable[str]) -> list[str]:
    """Versions in order, oldest first (numeric order when all are digits)."""
    versions = list(versions)
    return sorted(versions, key=version_key(versions))


def latest_version(versions: Iterable[str]) -> str | None:
    """The highest version, or None when there is none."""
    ordered = sorted_versions(versions)
    return ordered[-1] if ordered else None


def resolve_version(policy: TrafficPolicy, versions: Sequence[str], requested: str) -> str | None:
    """A version or a label -> the version it names, or None if it names none of ``versions``."""
    if requested in versions:
        return requested
    target = policy.labels.get(requested)
    return target if target in versions else None


def policy_weights(policy: TrafficPolicy) -> dict[str, float]:
    """The policy's weights keyed by version (labels resolved; a version named twice sums)."""
    out: dict[str, float] = {}
    for key, weight in policy.weights.items():
        version = policy.labels.get(key, key)
        out[version] = out.get(version, 0.0) + weight
    return out


def effective_weights(policy: TrafficPolicy, available: Iterable[str]) -> dict[str, float]:
    """The weights a router uses over ``available`` versions, only those > 0.

    Without weights (or none > 0 among ``available``) the latest available version takes all.
    """
    available = list(dict.fromkeys(available))
    weights = policy_weights(policy)
    chosen = {v: weights[v] for v in sorted_versions(available) if weights.get(v, 0.0) > 0}
    if chosen:
        return chosen
    latest = latest_version(available)
    return {} if latest is None else {latest: 1.0}


def _error_message(error: Mapping[str, Any]) -> tuple[str, str]:
    loc = [str(part) for part in error["loc"]]
    if "[key]" in loc:  # a bad key: name the mapping, the key is the value
        loc = loc[: loc.index("[key]") - 1]
    value = error.get("input")
    kind = error["type"]
    if kind == "value_error":
        # Our validators write "field: what is wrong, got value" themselves.
        text = str(error["ctx"]["error"])
        field, _, message = text.partition(": ")
        return field, message
    if kind == "extra_forbidden":
        return ".".join(loc), f"unknown field, got {value!r}"
    if kind == "string_pattern_mismatch":
        message = "must be 1-64 letters, digits, '_', '.' or '-'"
    else:
        message = str(error["msg"]).replace("Input should be", "must be")
    if "[key]" in error["loc"]:
        message = f"key {message}"
    return ".".join(loc), f"{message}, got {value!r}"


def _check_against(policy: TrafficPolicy, versions: Sequence[str]) -> None:
    known = set(versions)
    for label, version in policy.labels.items():
        if label in known:
            raise UserError(f"{_FIELD}: labels.{label}", f"label is also a version, got {label!r}")
        if version not in known:
            raise UserError(
                f"{_FIELD}: labels.{label}",
                f"not a version of this model ({', '.join(sorted_versions(known)) or 'none'}), "
                f"got {version!r}",
            )
    for key in policy.weights:
        if key not in known and key not in policy.labels:
            raise UserError(f"{_FIELD}: weights.{key}", f"not a version or a label, got {key!r}")
    if policy.baseline is not None and resolve_version(policy, versions, policy.baseline) is None:
        raise UserError(f"{_FIELD}: baseline", f"not a version or a label, got {policy.baseline!r}")


def load_policy(path: Path, versions: list[str]) -> TrafficPolicy:
    """Read and check ``policy.yaml`` against the model's ``versions``; default if missing.

    Raises ``UserError("policy.yaml: FIELD", "what is wrong, got VALUE")`` on any mistake.
    """
    path = Path(path)
    if not path.is_file():
        return TrafficPolicy()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(_FIELD, f"not valid YAML{where}, got {str(path)!r}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(_FIELD, f"must be a YAML mapping, got {type(raw).__name__}")
    try:
        policy = TrafficPolicy.model_validate(raw)
    except ValidationError as exc:
        field, message = _error_message(exc.errors()[0])
        raise UserError(f"{_FIELD}: {field}", message) from None
    _check_against(policy, versions)
    return policy


_UNIT = 2.0**-53  # 53 random bits times this: a float in [0, 1), never rounded up to 1


class Router:
    """Picks the version that serves a request, by the policy's weights.

    Non-sticky: request ``n`` draws ``u`` from the ``traffic`` stream at
    ``(model=model_name, request=n)``. Sticky with a key: ``u`` is a hash of
    ``(seed, model_name, key)``, so a key keeps its version while the policy and the
    available versions stay the same. ``u`` picks a version by the cumulative weights over
    the versions in order.
    """

    def __init__(self, policy: TrafficPolicy, model_name: str, seed: int) -> None:
        self.policy = policy
        self.model_name = model_name
        self.seed = seed
        self._streams = Streams(seed)
        self._sticky_prefix = f"{seed}\0{model_name}\0".encode()
        # available versions -> (versions, cumulative weights); few distinct sets ever occur.
        self._tables: dict[tuple[str, ...], tuple[list[str], list[float]]] = {}

    def _table(self, available: Sequence[str]) -> tuple[list[str], list[float]]:
        key = tuple(available)
        table = self._tables.get(key)
        if table is None:
            weights = effective_weights(self.policy, available)
            cumulative, total = [], 0.0
            for weight in weights.values():
                total += weight
                cumulative.append(total)
            table = (list(weights), [c / total for c in cumulative] if weights else [])
            if len(self._tables) > 256:  # availability churn must not grow memory
                self._tables.clear()
            self._tables[key] = table
        return table

    def uniform(self, request_number: int, key: str | None = None) -> float:
        """The number in [0, 1) that routes this request."""
        if self.policy.sticky and key is not None:
            digest = hashlib.blake2b(self._sticky_prefix + key.encode(), digest_size=8).digest()
            return (int.from_bytes(digest, "big") >> 11) * _UNIT
        # The stream's 63-bit seed is itself a uniform draw, cheaper than building a Generator.
        bits = self._streams.seed("traffic", model=self.model_name, request=request_number)
        return (bits >> 10) * _UNIT

    def route(self, request_number: int, key: str | None, available: Sequence[str]) -> str | None:
        """The version for request ``request_number`` among ``available``, None if none."""
        versions, cumulative = self._table(available)
        if len(versions) <= 1:
            return versions[0] if versions else None
        u = self.uniform(request_number, key)
        index = bisect.bisect_right(cumulative, u)
        return versions[min(index, len(versions) - 1)]  # cumulative[-1] is 1.0 and u < 1
