"""Named, counter-based random streams.

Every random draw in randkit comes from a stream named by ``(root seed, source, coordinates)``,
e.g. ``streams.torch("augment", fold=2, repeat=0, epoch=3, step=17)``. The stream's seed is a
pure hash of those values (NumPy ``SeedSequence`` entropy + spawn key), so a stream needs no
saved state: knowing the coordinates is enough to replay it.

This module imports nothing else of randkit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random  # global-rng-ok: read by global_rng_guard; seeded and restored around user code
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
import torch

SOURCES: tuple[str, ...] = (
    "split",
    "init",
    "order",
    "augment",
    "noise",
    "dropout",
    "deploy",
    "traffic",
)

_SEED_MAX = 2**63 - 1


@functools.lru_cache(maxsize=4096)  # a few names, asked for once per stream (per request)
def _name_code(name: str) -> int:
    """A stable 32-bit code for a name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest(), "big")


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown random source {source!r}; expected one of {', '.join(SOURCES)}")
    return source


def check_seed(seed: object, what: str = "seed") -> int:
    integer = isinstance(seed, int | np.integer) and not isinstance(seed, bool)
    if not integer or not 0 <= seed <= _SEED_MAX:
        raise ValueError(f"{what} must be an integer in [0, 2**63 - 1], got {seed!r}")
    return int(seed)


# torch's CPU generator (mt19937) keeps only the low 32 bits of ``manual_seed``: distinct
# 63-bit stream seeds would collide after about 2**16 streams. CPU generators therefore get
# their whole 624-word state from the seed. Layout of ``Generator.get_state()`` on the CPU
# (CPUGeneratorImplState): initial seed (u64), left (i32), seeded (i32), next (u64), then the
# 624 state words stored as u64.
_MT_WORDS = 624
_MT_STATE_OFFSET = 24
_MT_STATE_BYTES = 5056


def seeded_generator(
    seed: int | np.random.SeedSequence, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` that uses all the entropy of ``seed``.

    CUDA generators (Philox) take the 64-bit seed as it is. CPU generators get their full
    mt19937 state from PCG64 output of ``seed``, so seeds that agree in their low 32 bits
    still give unrelated streams.
    """
    device = torch.device(device)
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    words = sequence.generate_state(2, dtype=np.uint32)
    seed63 = int((int(words[0]) << 32 | int(words[1])) & _SEED_MAX)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed63)
    if device.type != "cpu":
        return generator
    state = generator.get_state()
    if state.numel() != _MT_STATE_BYTES or sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("unexpected torch CPU generator state layout; cannot seed it fully")
    mt_words = np.random.PCG64(sequence).random_raw(_MT_WORDS // 2).view(np.uint32)
    raw = state.numpy().copy()
    end = _MT_STATE_OFFSET + 8 * _MT_WORDS
    raw[_MT_STATE_OFFSET:end] = mt_words.astype(np.uint64).view(np.uint8)
    generator.set_state(torch.from_numpy(raw))
    return generator


def _coordinate_key(coords: Mapping[str, int | str]) -> list[int]:
    key: list[int] = []
    for name in sorted(coords):
        value = coords[name]
        if isinstance(value, bool) or not isinstance(value, int | str | np.integer):
            raise ValueError(f"coordinate {name}={value!r} must be a non-negative int or a str")
        if isinstance(value, str):
            # Strings and ints live in separate code ranges so "3" never collides with 3.
            key += [_name_code(name), 1, _name_code(value)]
        else:
            if value < 0:
                raise ValueError(f"coordinate {name}={value} must be >= 0")
            key += [_name_code(name), 0, int(value)]
    return key


@dataclass(frozen=True)
class Streams:
    """A family of named random streams derived from one root seed.

    ``overrides`` pins one source's seed (``{"order": 7}``): that source then ignores the root
    seed, while the others follow it.

    >>> s = Streams(42)
    >>> g = s.torch("order", epoch=0)
    >>> torch.randperm(5, generator=g).tolist() == torch.randperm(
    ...     5, generator=Streams(42).torch("order", epoch=0)).tolist()
    True
    """

    root_seed: int
    overrides: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_seed(self.root_seed, "root seed")
        for source, seed in self.overrides.items():
            check_source(source)
            check_seed(seed, f"seed of source {source!r}")
        object.__setattr__(self, "overrides", dict(self.overrides))

    def source_seed(self, source: str) -> int:
        """The seed a source derives its streams from: its override, else the root seed."""
        check_source(source)
        return self.overrides.get(source, self.root_seed)

    def sequence(self, source: str, **coords: int | str) -> np.random.SeedSequence:
        """The ``SeedSequence`` of one stream (entropy = source seed, spawn key = names)."""
        spawn_key = [SOURCES.index(check_source(source)), *_coordinate_key(coords)]
        return np.random.SeedSequence(entropy=self.source_seed(source), spawn_key=spawn_key)

    def seed(self, source: str, **coords: int | str) -> int:
        """A 63-bit integer seed for the stream, e.g. for ``random_state=`` arguments."""
        words = self.sequence(source, **coords).generate_state(2, dtype=np.uint32)
        return int((int(words[0]) << 32 | int(words[1])) & _SEED_MAX)

    def torch(
        self, source: str, *, device: str | torch.device = "cpu", **coords: int | str
    ) -> torch.Generator:
        """A fresh ``torch.Generator`` on ``device`` seeded for the stream."""
        return seeded_generator(self.sequence(source, **coords), device)

    def numpy(self, source: str, **coords: int | str) -> np.random.Generator:
        """A fresh NumPy ``Generator`` (PCG64) for the stream."""
        return np.random.Generator(np.random.PCG64(self.sequence(source, **coords)))

    @contextlib.contextmanager
    def fork_global(
        self, source: str, *, device: str | torch.device = "cpu", **coords: int | str
    ) -> Iterator[None]:
        """Seed torch's global RNG from a stream, for code that offers no ``generator=``
        (``nn.Dropout``, a user model's ``reset_parameters``), and restore it afterwards."""
        device = torch.device(device)
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            sequence = self.sequence(source, **coords)
            torch.default_generator.set_state(seeded_generator(sequence).get_state())
            if cuda:
                cuda_generator = torch.cuda.default_generators[device.index or 0]
                cuda_generator.manual_seed(self.seed(source, **coords))
            yield


@contextlib.contextmanager
def isolated_global_rngs(seed: int = 0) -> Iterator[None]:
    """Run code that draws from torch's, NumPy's or Python's global RNG (a user's Dataset
    transforms, default initialization, ``nn.Dropout``) with all three seeded from ``seed``,
    and restore the caller's states afterwards: the code gives the same numbers wherever it
    runs, and the caller's global RNGs are as they were."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()  # noqa: NPY002  (saving the caller's legacy state)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # global-rng-ok: seeded for user code, restored below
        random.seed(seed)  # global-rng-ok: restored below
        np.random.seed(seed % 2**32)  # noqa: NPY002  # global-rng-ok: restored below
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)  # noqa: NPY002


class GlobalRNGChanged(AssertionError):
    """Raised by ``global_rng_guard`` when code touched a global RNG."""


def _global_states() -> dict[str, object]:
    states: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002  (reading the legacy state is the point)
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@contextlib.contextmanager
def global_rng_guard() -> Iterator[None]:
    """Fail if torch's, NumPy's or Python's global RNG state changed inside the block.

    >>> with global_rng_guard():
    ...     _ = Streams(0).torch("init").seed()
    """
    before = _global_states()
    yield
    after = _global_states()
    changed = [name for name in before if not _same(before[name], after.get(name))]
    if changed:
        raise GlobalRNGChanged(f"global RNG state changed inside the guard: {', '.join(changed)}")


class deterministic:
    """Switch PyTorch to deterministic algorithms.

    Calling ``deterministic()`` switches them on; used as ``with deterministic(): ...`` the
    previous settings come back at the end of the block.
    """

    def __init__(self, enabled: bool = True) -> None:
        self._previous = (
            torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        )
        if enabled:
            # cuBLAS needs a fixed workspace to be deterministic on CUDA >= 10.2.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(enabled)
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cudnn.benchmark = not enabled and self._previous[2]

    def __enter__(self) -> deterministic:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        algorithms, cudnn_deterministic, cudnn_benchmark, workspace = self._previous
        torch.use_deterministic_algorithms(algorithms)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


class ScopedStreams:
    """Streams with extra coordinates per source, e.g. a cross-validation trial's
    ``{"init": {"fold": 2, "level": 1}, ...}``. Same interface as ``Streams``."""

    def __init__(self, streams: Streams, scopes: Mapping[str, Mapping[str, int | str]]) -> None:
        for source in scopes:
            check_source(source)
        self.streams = streams
        self.scopes = {source: dict(coords) for source, coords in scopes.items()}

    def _coords(self, source: str, coords: dict[str, int | str]) -> dict[str, int | str]:
        scope = self.scopes.get(check_source(source), {})
        clash = set(scope) & set(coords)
        if clash:
            raise ValueError(f"coordinates {sorted(clash)} are already set by the scope")
        return {**scope, **coords}

    def source_seed(self, source: str) -> int:
        return self.streams.source_seed(source)

    def sequence(self, source: str, **coords: int | str) -> np.random.SeedSequence:
        return self.streams.sequence(source, **self._coords(source, coords))

    def seed(self, source: str, **coords: int | str) -> int:
        return self.streams.seed(source, **self._coords(source, coords))

    def torch(
        self, source: str, *, device: str | torch.device = "cpu", **coords: int | str
    ) -> torch.Generator:
        return self.streams.torch(source, device=device, **self._coords(source, coords))

    def numpy(self, source: str, **coords: int | str) -> np.random.Generator:
        return self.streams.numpy(source, **self._coords(source, coords))

    def fork_global(
        self, source: str, *, device: str | torch.device = "cpu", **coords: int | str
    ) -> contextlib.AbstractContextManager[None]:
        return self.streams.fork_global(source, device=device, **self._coords(source, coords))
