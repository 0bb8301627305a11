"""The bundle the serving benchmarks serve, and randkit's in-process inference on it.

A real ``randkit train`` run (``train_run``, a few epochs at most: the weights do not matter
for throughput) exported with ``export_bundle``, as ``randkit export`` does; nothing is
downloaded. ``resnet``: randkit's ResNet-20 on generated 3x32x32 images; ``cnn``: the digits
CNN of ``examples/digits.yaml`` on scikit-learn's 1x8x8 digits.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from randkit.config import validate_config
from randkit.deploy.bundle import export_bundle
from randkit.deploy.mc import MonteCarlo
from randkit.serve.engine import Engine, Job
from randkit.serve.options import Options
from randkit.train import train_run

NAME = "bench"
SEED = 0
RESNET_IMAGES = 640
REQUEST_INPUTS = 64  # distinct request bodies, cycled through
MAX_CALIBRATION_CALL_S = 0.25

MODELS: dict[str, dict[str, Any]] = {
    "resnet": {
        "name": "resnet",
        "args": {"depth": 20, "width": 16, "norm": "batch", "drop_path": 0.1},
    },
    "cnn": {"name": "cnn", "args": {"widths": [32, 64], "hidden": 128, "dropout": 0.3}},
}
MODEL_LABELS = {
    "resnet": "ResNet-20 (w16, stochastic depth 0.1), 3x32x32",
    "cnn": "digits CNN (32, 64, 128, dropout 0.3), 1x8x8",
}

# ------------------------------------------------------------------------------- the bundle


def write_images(path: Path, count: int) -> np.ndarray:
    """``count`` 3x32x32 images in [0, 1] of 10 classes (a tint per class plus noise)."""
    rng = np.random.default_rng(SEED)
    labels = np.arange(count) % 10
    tints = rng.uniform(0.2, 0.8, size=(10, 3, 1, 1))
    noise = rng.uniform(-0.2, 0.2, size=(count, 3, 32, 32))
    x = np.clip(tints[labels] + noise, 0.0, 1.0)
    x = (np.round(x * 255) / 255).astype(np.float32)  # 8-bit pixels, as images come
    np.savez(path, x=x, y=labels)
    return x


def build_bundle(folder: Path, model: str, epochs: int) -> tuple[Path, np.ndarray]:
    """(repository, request inputs): a trained run of ``model`` exported as NAME/1."""
    if model == "resnet":
        x = write_images(folder / "images.npz", RESNET_IMAGES)
        data: dict[str, Any] = {"kind": "npz", "path": str(folder / "images.npz")}
    else:
        from sklearn.datasets import load_digits

        x = (load_digits().images[:, None] / 16.0).astype(np.float32)
        data = {"kind": "digits"}
    raw = {
        "seed": SEED,
        "data": {**data, "test_fraction": 0.2},
        "model": MODELS[model],
        "train": {"epochs": epochs, "batch_size": 64, "lr": 1e-3, "device": "cpu"},
    }
    started = time.perf_counter()
    result = train_run(validate_config(raw), folder / "run", quiet=True)
    repo = folder / "repo"
    bundle = export_bundle(folder / "run", repo, NAME)
    print(
        f"trained {MODEL_LABELS[model]} for {epochs} epoch(s) in "
        f"{time.perf_counter() - started:.1f} s (test accuracy "
        f"{result.metrics['test']['accuracy']:.3f}), exported {bundle.relative_to(folder)}"
    )
    return repo, x[:REQUEST_INPUTS]


# ------------------------------------------------------------------------------ in-process


def _jobs(inputs: torch.Tensor, samples: int, first: int, count: int) -> list[Job]:
    return [
        Job(inputs[i % len(inputs)][None], Options("mc_dropout", samples, i))
        for i in range(first, first + count)
    ]


def inprocess_engine(
    engine: Engine, inputs: torch.Tensor, samples: int, count: int, per_call: int, seconds: float
) -> float:
    """Inputs per second of ``Engine.run`` on ``per_call`` one-input jobs per call."""
    done, started = 0, time.perf_counter()
    while done < count and time.perf_counter() - started < seconds:
        size = min(per_call, count - done)
        outputs = engine.run(_jobs(inputs, samples, done, size))
        assert len(outputs) == size and outputs[0]["probabilities"].shape[0] == 1
        done += size
    return done / (time.perf_counter() - started)


def inprocess_montecarlo(
    mc: MonteCarlo, inputs: torch.Tensor, count: int, per_call: int, seconds: float
) -> float:
    """Inputs per second of ``MonteCarlo.predict`` on ``per_call`` inputs per call."""
    repeat = math.ceil(per_call / len(inputs))
    pool = inputs.repeat(repeat, *([1] * (inputs.dim() - 1)))
    done, calls, started = 0, 0, time.perf_counter()
    while done < count and time.perf_counter() - started < seconds:
        size = min(per_call, count - done)
        result = mc.predict(pool[:size], seed=calls)
        assert result.probs.shape[0] == size
        done, calls = done + size, calls + 1
    return done / (time.perf_counter() - started)


def calibrate(bundle: Any, inputs: torch.Tensor, samples: int, limit: int) -> dict[int, float]:
    """Inputs per second of ``Engine.run`` by rows per forward pass (whole requests, doubling
    from one request's samples up to ``limit``, the fastest of at least 3 calls each; stops
    after a size whose forward pass takes more than ``MAX_CALIBRATION_CALL_S``): the forward
    size at which this model runs fastest on this machine."""
    rates: dict[int, float] = {}
    rows = samples
    while rows <= limit:
        engine = Engine(bundle, max_rows=rows)
        per_call = rows // samples
        jobs = _jobs(inputs, samples, 0, per_call)
        engine.run(jobs)  # warm-up: allocator, kernels
        fastest, calls, started = math.inf, 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - started < 0.5:
            begun = time.perf_counter()
            engine.run(jobs)
            fastest, calls = min(fastest, time.perf_counter() - begun), calls + 1
        rates[rows] = per_call / fastest
        if fastest > MAX_CALIBRATION_CALL_S:
            break  # forward passes this long gain nothing more from size
        rows *= 2
    return rates
