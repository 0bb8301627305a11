from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from randkit import SOURCES, Streams, deterministic, global_rng_guard
from randkit.streams import GlobalRNGChanged


def test_same_coordinates_same_stream_across_instances() -> None:
    a = Streams(11).torch("augment", fold=2, repeat=0, epoch=3, step=17)
    b = Streams(11).torch("augment", step=17, epoch=3, repeat=0, fold=2)
    assert torch.equal(torch.rand(100, generator=a), torch.rand(100, generator=b))


def test_each_coordinate_and_source_changes_the_stream() -> None:
    streams = Streams(11)
    base = streams.seed("augment", fold=2, epoch=3)
    variants = [
        streams.seed("augment", fold=3, epoch=3),
        streams.seed("augment", fold=2, epoch=4),
        streams.seed("augment", fold=2, epoch=3, step=0),
        streams.seed("noise", fold=2, epoch=3),
        Streams(12).seed("augment", fold=2, epoch=3),
        # The same numbers under other names are another stream.
        streams.seed("augment", epoch=2, fold=3),
        streams.seed("augment", fold="2", epoch=3),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


@given(root=st.integers(0, 2**63 - 1), epoch=st.integers(0, 10**6), step=st.integers(0, 10**9))
def test_seed_is_a_pure_function_of_its_inputs(root: int, epoch: int, step: int) -> None:
    first = Streams(root).seed("order", epoch=epoch, step=step)
    assert first == Streams(root).seed("order", step=step, epoch=epoch)
    assert 0 <= first < 2**63
    gen = Streams(root).numpy("order", epoch=epoch, step=step)
    again = Streams(root).numpy("order", epoch=epoch, step=step)
    assert np.array_equal(gen.integers(0, 2**32, 8), again.integers(0, 2**32, 8))


def test_unknown_source_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown random source 'augmentation'.*split, init"):
        Streams(0).torch("augmentation")
    with pytest.raises(ValueError, match="unknown random source 'bogus'"):
        Streams(0, {"bogus": 1})


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, "7", True])
def test_bad_root_seed_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="root seed must be an integer"):
        Streams(bad)  # type: ignore[arg-type]


def test_negative_or_float_coordinate_is_refused() -> None:
    with pytest.raises(ValueError, match="step=-1"):
        Streams(0).seed("order", step=-1)
    with pytest.raises(ValueError, match="must be a non-negative int or a str"):
        Streams(0).seed("order", step=1.0)  # type: ignore[arg-type]


def test_override_pins_one_source_only() -> None:
    pinned_a = Streams(1, {"order": 7})
    pinned_b = Streams(2, {"order": 7})
    assert pinned_a.seed("order", epoch=0) == pinned_b.seed("order", epoch=0)
    for source in SOURCES:
        if source != "order":
            assert pinned_a.seed(source, epoch=0) != pinned_b.seed(source, epoch=0)
    # Pinning a source to the root seed is the same as not pinning it.
    assert Streams(7).seed("order", epoch=0) == pinned_a.seed("order", epoch=0)


def test_streams_look_independent_and_uniform() -> None:
    # First draws of 2,000 neighbouring streams: uniform (KS) and uncorrelated with the next.
    streams = Streams(5)
    first = np.array([streams.numpy("noise", step=i).random() for i in range(2000)])
    assert stats.kstest(first, "uniform").pvalue > 0.001
    assert abs(np.corrcoef(first[:-1], first[1:])[0, 1]) < 0.1


def test_torch_generator_on_requested_device() -> None:
    assert Streams(0).torch("init").device.type == "cpu"
    if torch.cuda.is_available():
        assert Streams(0).torch("init", device="cuda").device.type == "cuda"


@pytest.mark.parametrize(
    "touch",
    [
        lambda: torch.rand(1),
        lambda: np.random.rand(),  # noqa: NPY002
        lambda: random.random(),
        lambda: torch.nn.Linear(2, 2),
        lambda: torch.nn.functional.dropout(torch.ones(4), 0.5, training=True),
    ],
    ids=["torch", "numpy", "python", "module-init", "dropout"],
)
def test_guard_catches_every_global_rng(touch) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GlobalRNGChanged), global_rng_guard():
        touch()


def test_fork_global_feeds_global_rng_from_stream_and_restores_it() -> None:
    streams = Streams(9)
    with global_rng_guard():
        with streams.fork_global("dropout", step=4):
            first = torch.rand(5)
        with streams.fork_global("dropout", step=4):
            again = torch.rand(5)
        with streams.fork_global("dropout", step=5):
            other = torch.rand(5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_deterministic_switch_and_restore() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled() == before
    switch = deterministic()
    try:
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        switch.__exit__(None, None, None)
    assert torch.are_deterministic_algorithms_enabled() == before


def test_cpu_generators_use_all_63_bits_of_the_seed() -> None:
    # torch's manual_seed keeps 32 bits on the CPU; streams must not collide on them.
    from randkit.streams import seeded_generator

    low = torch.rand(8, generator=seeded_generator(5))
    high = torch.rand(8, generator=seeded_generator(5 + 2**32))
    assert not torch.equal(low, high)
    assert torch.equal(low, torch.rand(8, generator=seeded_generator(5)))
    with global_rng_guard(), Streams(0).fork_global("dropout", step=1):
        inside = torch.rand(4)
    with Streams(0).fork_global("dropout", step=1):
        assert torch.equal(inside, torch.rand(4))
