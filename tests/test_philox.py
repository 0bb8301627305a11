"""The counter-based Gaussian kernel behind CPU input noise (``randkit.randomize.philox``).

The compiled kernel and its torch reference must give the same bits, whatever the size,
offset, thread count or mode, and the numbers must be standard normal and independent.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from randkit.randomize import InputNoise, philox
from randkit.randomize.philox import gaussian_noise, has_native_kernel, philox_normal_reference
from randkit.streams import seeded_generator

SIZES = [1, 3, 255, 256, 257, 4096, 65535, 65536 + 17, 300_001]
SEEDS = [0, 1, 12345678901234567, 2**62 - 1, 2**64 - 1]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_the_compiled_kernel_is_built() -> None:
    # `pip install -e .` builds it; without it the reference (about 35x slower) stands in.
    assert has_native_kernel(), "randkit._native._philox was not built (is a C compiler there?)"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_kernel_and_reference_give_the_same_bits(n: int, seed: int) -> None:
    kernel = gaussian_noise(None, seed, shape=(n,))
    assert torch.equal(bits(kernel), bits(philox_normal_reference(n, seed)))


@pytest.mark.parametrize("mode", ["add", "multiply"])
@pytest.mark.parametrize("clip", [False, True])
def test_fused_modes_match_the_reference_and_work_in_place(
    mode: str, clip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.rand(5, 3, 17, 19, generator=torch.Generator().manual_seed(3)) * 1.4 - 0.2
    fused = gaussian_noise(x, 99, 0.3, mode, clip=clip)
    inplace = x.clone()
    gaussian_noise(inplace, 99, 0.3, mode, clip=clip, out=inplace)
    monkeypatch.setattr(philox, "native", None)
    reference = gaussian_noise(x, 99, 0.3, mode, clip=clip)
    assert torch.equal(bits(fused), bits(reference))
    assert torch.equal(bits(inplace), bits(reference))
    z = philox_normal_reference(x.numel(), 99).view_as(x)
    by_hand = x + 0.3 * z if mode == "add" else x * (1 + 0.3 * z)
    torch.testing.assert_close(fused, by_hand.clamp(0, 1) if clip else by_hand)


def test_numbers_do_not_depend_on_the_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gaussian_noise(None, 5, shape=(1_000_003,))
        torch.set_num_threads(max(2, before))
        many = gaussian_noise(None, 5, shape=(1_000_003,))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(bits(one), bits(many))


def test_a_prefix_of_a_longer_draw_is_the_shorter_draw() -> None:
    # Number i is a function of (seed, i) only: the layout does not depend on the size.
    long = gaussian_noise(None, 8, shape=(70_000,))
    assert torch.equal(bits(gaussian_noise(None, 8, shape=(1_000,))), bits(long[:1_000]))


def test_input_noise_without_the_kernel_gives_the_same_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for kind in ("gaussian", "speckle"):
        noise = InputNoise(kind, 0.2)
        params = noise.draw(x.shape, seeded_generator(4))
        with_kernel = noise.apply(x, params)
        with monkeypatch.context() as patched:
            patched.setattr(philox, "native", None)
            assert torch.equal(bits(noise.apply(x, params)), bits(with_kernel))


def test_non_float32_input_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="float32"):
        gaussian_noise(torch.zeros(4, dtype=torch.float64), 0, 0.1, "add")


# --- the numbers are standard normal and independent -------------------------------------------

N = 1_000_000


def test_normal_by_kolmogorov_smirnov_and_moments() -> None:
    z = gaussian_noise(None, 2024, shape=(N,)).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    se = 1 / math.sqrt(N)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    # The 24-bit uniforms bound the tails at sqrt(-2 log 2^-24), about 5.77.
    assert np.abs(z).max() <= math.sqrt(-2 * math.log(2**-24)) + 1e-5


def test_the_test_rejects_a_wrong_distribution() -> None:
    # Power check: the same KS test on uniforms scaled to variance 1 fails.
    wrong = torch.rand(N, generator=torch.Generator().manual_seed(0)).double().numpy() - 0.5
    assert stats.kstest(wrong * math.sqrt(12), "norm").pvalue < 1e-6


def test_neighbours_pairs_and_seeds_are_uncorrelated() -> None:
    z = gaussian_noise(None, 77, shape=(N,)).double().numpy()
    bound = 5 / math.sqrt(N)
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < bound
    blocks = z[: N // 256 * 256].reshape(-1, 4, 64)
    # The cosine and sine of one Box-Muller pair, and the two pairs of one Philox call.
    assert abs(np.corrcoef(blocks[:, 0].ravel(), blocks[:, 1].ravel())[0, 1]) < 2 * bound
    assert abs(np.corrcoef(blocks[:, 0].ravel(), blocks[:, 2].ravel())[0, 1]) < 2 * bound
    # Squares too: Box-Muller partners share a radius, which a bad angle would betray.
    squares = blocks**2
    assert abs(np.corrcoef(squares[:, 0].ravel(), squares[:, 1].ravel())[0, 1]) < 2 * bound
    other = gaussian_noise(None, 78, shape=(N,)).double().numpy()
    assert abs(np.corrcoef(z, other)[0, 1]) < bound


# --- keep_freed_memory --------------------------------------------------------------------------

_FAULTS = """
import resource, sys, torch
from randkit.memory import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def churn():
    for _ in range(20):
        a = torch.ones(10_000_000)  # 40 MB: above glibc's largest dynamic mmap threshold
        del a
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_large_tensors() -> None:
    def faults(setting: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS, setting],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return int(run.stdout.strip())

    # 20 fresh 40 MB tensors fault about 20 x 10,000 pages by default.
    assert faults("default") > 50_000
    assert faults("keep") < 1_000
