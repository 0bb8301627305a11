"""Randomized-smoothing certification: randkit's ``Smoothed`` against the paper's plain loop.

Trains the digits smoothing example (``examples/digits-smoothing.yaml``: randkit's digits
CNN, Gaussian input noise sigma = 0.25) with fewer epochs through randkit's API
(``validate_config`` + ``train_run``) in a temporary folder, then certifies the same test
inputs (the first ``--inputs`` of the run's test split) at sigma = 0.25 with the same n0, n,
alpha and batch size, on the CPU, in this one process:

- randkit: ``Smoothed.certify`` with all inputs in one call (noise batches hold samples of
  several inputs when n0 or n is smaller than the batch), and, to show where the difference
  comes from, the same with one input per call as ``randkit certify`` does;
- baseline: the certify loop of Cohen, Rosenfeld & Kolter (2019, ``code/core.py``) written
  here by hand: one input at a time, n0 selection samples then n estimation samples, each
  batch ``x.repeat(...)``, ``torch.randn_like(batch) * sigma`` (global RNG, seeded), the
  base classifier's argmax counted (``np.bincount`` where core.py loops in Python), the
  Clopper-Pearson lower bound and radius ``sigma * PhiInv(pA_lower)``.

Throughput is noise samples (n0 + n per input) per second of wall time, best of
``--repeats`` (the methods take turns, so that load from other processes hits all of them);
``ratio`` is randkit's (all inputs per call) over the baseline's, with a target of at least
2x.

Certification at a radius r (0.25, 0.5, 0.75), max_n = n, three schedules on the same
inputs with the same seed (so the same n0 selection draws): fixed n (``Smoothed.certify``,
certified when its radius >= r), the Bonferroni looks randkit used before issue #17
(``bonferroni_at_radius`` below: Clopper-Pearson at 100, 200, 400, ..., n with alpha split
over the looks) and ``Smoothed.certify_at_radius`` (the confidence sequence). Each is reported
by inputs certified and noise samples drawn, n0 included; ``fewer_samples`` is fixed-n samples
over the sequence's and ``fewer_than_bonferroni`` the Bonferroni schedule's over the
sequence's. Goals: ``fewer_than_bonferroni`` >= 1.5 and at least as many inputs certified as
fixed n, at every r (``goals_met``). The last line printed is a JSON record.

    python benchmarks/certify.py [--n 10000] [--n0 100] [--inputs 50] [--batch 1000]
                                 [--epochs 10] [--repeats 3] [--seed 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy.stats import beta, norm
from torch import nn

from randkit.config import validate_config
from randkit.deploy.smoothing import (
    ABSTAIN,
    Smoothed,
    certify_from_counts,
    lower_confidence_bound,
    upper_confidence_bound,
)
from randkit.streams import seeded_generator
from randkit.train import train_run
from randkit.train.load import load_trained

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits-smoothing.yaml"
SIGMA = 0.25
RADIUS = 0.25  # the acc@.25 column of the throughput table
RADII = (0.25, 0.5, 0.75)  # where the sequential schedules are compared
TARGET_RATIO = 2.0


# ------------------------------------------------------------------ the paper's certify loop


def _sample_noise(
    model: nn.Module, x: torch.Tensor, num: int, batch_size: int, sigma: float, classes: int
) -> np.ndarray:
    """Cohen et al.'s ``Smooth._sample_noise``: class counts of ``num`` noisy copies of x."""
    with torch.no_grad():
        counts = np.zeros(classes, dtype=np.int64)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, *([1] * (x.dim() - 1))))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=classes)
        return counts


def baseline_certify(
    model: nn.Module,
    x: torch.Tensor,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    sigma: float,
    classes: int,
) -> tuple[int, float]:
    """Cohen et al.'s ``Smooth.certify`` for one input ``x`` of shape ``(1, ...)``."""
    model.eval()
    selection = _sample_noise(model, x, n0, batch_size, sigma, classes)
    top = int(selection.argmax())
    estimation = _sample_noise(model, x, n, batch_size, sigma, classes)
    n_a = int(estimation[top])
    # proportion_confint(nA, n, alpha=2 * alpha, method="beta")[0]
    p_lower = float(beta.ppf(alpha, n_a, n - n_a + 1)) if n_a > 0 else 0.0
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return top, sigma * float(norm.ppf(p_lower))


# ------------------------------------------------- sequential certification at a radius


def bonferroni_at_radius(
    smoothed: Smoothed,
    x: torch.Tensor,
    radius: float,
    alpha: float,
    max_n: int,
    batch_size: int,
    generator: torch.Generator,
    n0: int = 100,
    first_look: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """randkit's ``certify_at_radius`` before issue #17 (the reference here): Clopper-Pearson
    bounds at looks first_look, 2 first_look, 4 first_look, ..., max_n, alpha split equally
    over the looks (Bonferroni). (certified, samples after selection) per input."""
    looks = [first_look * 2**k for k in range(64) if first_look * 2**k < max_n] + [max_n]
    level = alpha / len(looks)
    target = norm.cdf(radius / smoothed.sigma)
    selection = smoothed.sample_counts(x, n0, batch_size, generator).argmax(1)
    rows = np.arange(len(x))
    hits, used = np.zeros(len(x), dtype=np.int64), np.zeros(len(x), dtype=np.int64)
    open_, certified = np.ones(len(x), dtype=bool), np.zeros(len(x), dtype=bool)
    previous = 0
    for size in looks:
        if not open_.any():
            break
        pending = rows[open_]
        counts = smoothed.sample_counts(
            x[torch.as_tensor(pending)], size - previous, batch_size, generator
        )
        hits[pending] += counts[np.arange(len(pending)), selection[pending]]
        used[pending] = size
        won = lower_confidence_bound(hits[pending], size, level) >= target
        lost = upper_confidence_bound(hits[pending], size, level) < target
        certified[pending[won]] = True
        open_[pending[won | lost]] = False
        previous = size
    return certified, used


def wald_samples(p: np.ndarray, target: float, alpha: float, n: int) -> int:
    """Samples a sequential test would need if it knew each pA (p estimated from n samples):
    Wald's approximation log(1 / alpha) / KL(pA || target) (SPRT of pA against the target),
    at most n per input. Bonferroni's samples over these (``wald_ceiling``) bound what any
    level-alpha schedule could gain on these inputs."""
    p = np.clip(p, 0.5 / n, 1 - 0.5 / n)
    kl = p * np.log(p / target) + (1 - p) * np.log((1 - p) / (1 - target))
    return int(np.minimum(np.log(1 / alpha) / np.maximum(kl, 1e-300), n).sum())


def _print_row(out: dict[str, Any], key: str, seconds: float) -> None:
    certified, samples = out["certified"][key], out["samples"][key]
    cells = [f"{certified[k]:4d} / {samples[k]:9d}" for k in ("fixed", "bonferroni", "sequential")]
    ratios = [out[k][key] for k in ("fewer_samples", "fewer_than_bonferroni", "wald_ceiling")]
    print(
        f"{key:>5} {' '.join(cells)} {ratios[0]:9.2f} {ratios[1]:8.2f} {ratios[2]:7.2f} "
        f"{seconds:6.1f}"
    )


def compare_schedules(
    smoothed: Smoothed,
    x: torch.Tensor,
    labels: np.ndarray,
    n0: int,
    n: int,
    alpha: float,
    batch: int,
    seed: int = 1,
) -> dict[str, Any]:
    """Fixed n, today's Bonferroni looks and the confidence sequence at each of RADII, on the
    same inputs with the same seed (so the same n0 selection draws): inputs certified and
    noise samples drawn, n0 included. Returns the JSON fields."""
    count, generator = len(x), seeded_generator(seed)
    selection = smoothed.sample_counts(x, n0, batch, generator)  # Smoothed.certify, spelt out
    counts = smoothed.sample_counts(x, n, batch, generator)
    fixed_classes, fixed_radii = certify_from_counts(selection, counts, n, alpha, SIGMA)
    p_hat = counts[np.arange(count), selection.argmax(1)] / n
    fixed_samples = count * (n0 + n)
    names = ("certified", "samples", "fewer_samples", "fewer_than_bonferroni", "wald_ceiling")
    out: dict[str, Any] = {key: {} for key in names}
    print(
        f"\nat radius r (max_n = n = {n}, n0 {n0} counted): inputs certified / noise samples"
        f"\n{'r':>5} {'fixed n':>16} {'Bonferroni':>16} {'sequence':>16} {'fixed/seq':>9} "
        f"{'Bonf/seq':>8} {'ceiling':>7} {'seq s':>6}"
    )
    for radius in RADII:
        fixed = int(np.sum(fixed_radii >= radius))
        bonf, bonf_used = bonferroni_at_radius(
            smoothed, x, radius, alpha, n, batch, seeded_generator(seed), n0
        )
        seconds, decision = timed(
            lambda r=radius: smoothed.certify_at_radius(
                x, r, alpha, n, batch, seeded_generator(seed), n0
            )
        )
        samples = {
            "fixed": fixed_samples,
            "bonferroni": int(bonf_used.sum()) + count * n0,
            "sequential": int(decision.samples.sum()) + count * n0,
        }
        certified = {
            "fixed": fixed,
            "bonferroni": int(bonf.sum()),
            "sequential": int(decision.certified.sum()),
            "sequential_correct": int(np.sum(decision.certified & (decision.predicted == labels))),
            "fixed_correct": int(np.sum((fixed_radii >= radius) & (fixed_classes == labels))),
        }
        key = f"{radius:g}"
        out["certified"][key], out["samples"][key] = certified, samples
        out["fewer_samples"][key] = round(samples["fixed"] / samples["sequential"], 3)
        out["fewer_than_bonferroni"][key] = round(samples["bonferroni"] / samples["sequential"], 3)
        wald = wald_samples(p_hat, float(norm.cdf(radius / SIGMA)), alpha, n) + count * n0
        out["wald_ceiling"][key] = round(samples["bonferroni"] / wald, 3)
        _print_row(out, key, seconds)
    out["goals_met"] = all(
        out["fewer_than_bonferroni"][k] >= 1.5
        and out["certified"][k]["sequential"] >= out["certified"][k]["fixed"]
        for k in out["certified"]
    )
    out["radii"], out["seed"] = list(RADII), seed
    return out


# ------------------------------------------------------------------------------ the setup


def train_model(folder: Path, epochs: int) -> Any:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["train"].update(epochs=epochs, device="cpu")
    cfg = validate_config(raw, origin=str(EXAMPLE))
    started = time.perf_counter()
    result = train_run(cfg, folder / "run", quiet=True)
    print(
        f"trained {EXAMPLE.name} for {epochs} epochs in {time.perf_counter() - started:.1f} s, "
        f"test accuracy {result.metrics['test']['accuracy']:.4f}"
    )
    return load_trained(folder / "run", device="cpu")


def timed(function: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="certification samples")
    parser.add_argument("--n0", type=int, default=100, help="selection samples")
    parser.add_argument("--inputs", type=int, default=50, help="test inputs to certify")
    parser.add_argument("--batch", type=int, default=1000, help="noise samples per forward")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--repeats", type=int, default=3, help="timings: best of this many")
    parser.add_argument("--seed", type=int, default=1, help="seed of the schedule comparison")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small everything")
    args = parser.parse_args()
    if args.quick:
        args.n, args.inputs, args.epochs, args.repeats = 1000, 20, 2, 1

    with tempfile.TemporaryDirectory(prefix="randkit-bench-certify-") as tmp:
        trained = train_model(Path(tmp), args.epochs)
    model, classes = trained.model, len(trained.prepared.classes)
    x = trained.prepared.test.x[: args.inputs].contiguous()
    labels = trained.prepared.test.y[: args.inputs].numpy()
    count, n0, n, alpha, batch = len(x), args.n0, args.n, args.alpha, args.batch
    samples = count * (n0 + n)
    smoothed = Smoothed(model, classes, SIGMA, "cpu")
    print(
        f"certify {count} digits test inputs: sigma {SIGMA}, n0 {n0}, n {n}, alpha {alpha}, "
        f"batch {batch}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )

    def run_randkit() -> tuple[np.ndarray, np.ndarray]:
        return smoothed.certify(x, n0, n, alpha, batch, seeded_generator(0))

    def run_randkit_one_by_one() -> tuple[np.ndarray, np.ndarray]:
        generator = seeded_generator(0)
        results = [
            smoothed.certify(x[i : i + 1], n0, n, alpha, batch, generator) for i in range(count)
        ]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def run_baseline() -> tuple[np.ndarray, np.ndarray]:
        torch.manual_seed(0)  # the baseline draws from the global RNG, as core.py does
        results = [
            baseline_certify(model, x[i : i + 1], n0, n, alpha, batch, SIGMA, classes)
            for i in range(count)
        ]
        return np.array([r[0] for r in results]), np.array([r[1] for r in results])

    run_randkit()  # warm-up (first forward passes, allocator)
    methods = {
        "baseline (Cohen et al. loop)": run_baseline,
        "randkit, 1 input per call": run_randkit_one_by_one,
        "randkit, all inputs per call": run_randkit,
    }
    # Round robin over the methods, best time of each, so that load from other processes
    # does not favour one of them.
    best = dict.fromkeys(methods, math.inf)
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(args.repeats):
        for name, function in methods.items():
            seconds, results[name] = timed(function)
            best[name] = min(best[name], seconds)
    rows = []
    for name in methods:
        predicted, radii = results[name]
        hit = predicted == labels
        rows.append(
            (
                name,
                best[name],
                samples / best[name],
                float(np.mean(hit)),
                float(np.mean(hit & (radii >= RADIUS))),
                float(np.mean(predicted == ABSTAIN)),
            )
        )

    print(
        f"\n{'method':<30} {'time s':>8} {'samples/s':>11} {'acc@0':>6} {'acc@.25':>8} {'abst':>5}"
    )
    for name, seconds, rate, acc0, acc25, abstain in rows:
        print(f"{name:<30} {seconds:8.2f} {rate:11.0f} {acc0:6.3f} {acc25:8.3f} {abstain:5.2f}")
    base_rate, one_rate, all_rate = (row[2] for row in rows)
    ratio = all_rate / base_rate

    schedules = compare_schedules(smoothed, x, labels, n0, n, alpha, batch, args.seed)
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(
        f"throughput ratio randkit / baseline: {ratio:.2f}x (one input per call "
        f"{one_rate / base_rate:.2f}x); target >= {TARGET_RATIO:g}x {verdict}"
    )
    print(
        json.dumps(
            {
                "benchmark": "certify",
                "ratio": round(ratio, 3),
                **schedules,
                "inputs": count,
                "n0": n0,
                "n": n,
                "batch": batch,
                "alpha": alpha,
                "sigma": SIGMA,
                "epochs": args.epochs,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
