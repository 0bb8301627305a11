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
2x. The sequential mode, ``Smoothed.certify_at_radius`` at radius 0.25 with max_n = n, is
reported by its mean number of samples per input (after selection) against the fixed n
(``sample_saving`` = 1 - mean / n), and by its agreement with fixed-n certification (radius
>= 0.25) on the inputs where fixed n is decisive (its radius at least 0.1 away from 0.25,
abstentions included). The last line printed is a JSON record.

    python benchmarks/certify.py [--n 10000] [--n0 100] [--inputs 50] [--batch 1000]
                                 [--epochs 10] [--repeats 3] [--quick]
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
from randkit.deploy.smoothing import ABSTAIN, Smoothed
from randkit.streams import seeded_generator
from randkit.train import train_run
from randkit.train.load import load_trained

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits-smoothing.yaml"
SIGMA = 0.25
RADIUS = 0.25
DECISIVE_MARGIN = 0.1
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

    # Sequential certification at RADIUS against fixed-n certification (randkit's own).
    fixed_classes, fixed_radii = results["randkit, all inputs per call"]
    first_look = min(100, n)
    seconds_seq, decision = timed(
        lambda: smoothed.certify_at_radius(
            x, RADIUS, alpha, n, batch, seeded_generator(1), n0=n0, first_look=first_look
        )
    )
    fixed = fixed_radii >= RADIUS
    decisive = (fixed_radii >= RADIUS + DECISIVE_MARGIN) | (fixed_radii < RADIUS - DECISIVE_MARGIN)
    agreement = float(np.mean(decision.certified[decisive] == fixed[decisive]))
    mean_samples = float(decision.samples.mean())
    saving = 1 - mean_samples / n
    seq_acc = float(np.mean(decision.certified & (decision.predicted == labels)))
    print(
        f"\nsequential certify_at_radius(r={RADIUS}, max_n={n}, first look {first_look}): "
        f"mean samples {mean_samples:.0f} vs fixed n {n} (saving {saving:.1%}, "
        f"{n / mean_samples:.1f}x fewer), {seconds_seq:.2f} s; certified correct "
        f"{seq_acc:.3f} vs fixed-n {float(np.mean(fixed & (fixed_classes == labels))):.3f}; "
        f"agreement with fixed n on {int(decisive.sum())}/{count} decisive inputs "
        f"{agreement:.3f}"
    )
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
                "sample_saving": round(saving, 4),
                "target_ratio": TARGET_RATIO,
                "target_met": ratio >= TARGET_RATIO,
                "samples_per_s": {
                    "randkit": round(all_rate),
                    "randkit_one_per_call": round(one_rate),
                    "baseline": round(base_rate),
                },
                "mean_samples_sequential": round(mean_samples, 1),
                "agreement_decisive": round(agreement, 4),
                "decisive_inputs": int(decisive.sum()),
                "inputs": count,
                "n0": n0,
                "n": n,
                "batch": batch,
                "alpha": alpha,
                "sigma": SIGMA,
                "radius": RADIUS,
                "epochs": args.epochs,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
