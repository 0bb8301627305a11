"""Cross-validation wall time: randkit's runners against skorch + scikit-learn.

Both run 5-fold stratified cross-validation on scikit-learn's digits (1,797 8x8 images,
pixels scaled to [0, 1]) in this one process, on the same machine, for two networks:

- ``cnn``: randkit's digits CNN (conv 32, conv 64, each with 3x3 kernels, ReLU and 2x2 max
  pooling, then Linear 128 and Linear 10);
- ``mlp``: Linear 256, Linear 128, Linear 10 with ReLUs.

Training is the same on both sides: Adam at lr 1e-3 without a schedule, batch 64, plain
cross-entropy, shuffled batches, no augmentation or noise, no validation split, and the
same five folds (``StratifiedKFold(5, shuffle=True, random_state=0)``, handed to randkit as
its splitter).

- randkit: ``run_cv`` with each CPU runner (``sequential``, ``vectorized``: all folds
  trained at once with ``torch.func.vmap``, ``processes``: 2 workers with 1 thread each;
  ``ray`` with ``--ray``), writing its run folder (results, models) to a temporary
  directory; the fastest runner counts. The model standardizes its inputs with the
  training fold's mean and std (per channel, so one pair for all 64 pixels; the baseline's
  ``StandardScaler`` has one pair per pixel).
- baseline: what a user would otherwise write, a scikit-learn ``Pipeline`` of
  ``StandardScaler`` (on the flattened pixels) and skorch's ``NeuralNetClassifier`` around
  the same network built here by hand, under ``cross_validate(..., n_jobs=1)`` and
  ``n_jobs=2`` (1 torch thread per worker); the faster one counts.

Also timed, as a reference point and not a baseline: a plain PyTorch loop (no framework,
no run folder, the folds one after another with the same network, optimizer and batches),
which shows how close each side comes to what PyTorch's kernels allow on this machine.

Times are wall-clock for the whole cross-validation (data loading included), best of
``--repeats``. Like the ``randkit`` commands, the script first calls
``randkit.memory.keep_freed_memory()`` (process-wide, so every side runs under it; without it
glibc page-faults each new batch-sized tensor). The last line printed is a JSON record.

    python benchmarks/cv.py [--epochs 10] [--folds 5] [--repeats 1]
                            [--runners sequential,vectorized,processes] [--ray] [--quick]
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
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback
from torch import nn

from randkit.config import ExperimentConfig
from randkit.cv import run_cv
from randkit.memory import keep_freed_memory
from randkit.models import zoo

TARGETS = {"cnn": 3.0, "mlp": 5.0}  # baseline time / randkit time, at least
ACCURACY_TOLERANCE = 0.5  # points of mean accuracy
MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"name": "cnn", "args": {"widths": [32, 64], "hidden": 128}},
    "mlp": {"name": "mlp", "args": {"hidden": [256, 128]}},
}
RUNNERS = ("sequential", "vectorized", "processes", "ray")
PLAIN = "plain PyTorch loop (reference)"
SEED = 0
BATCH_SIZE = 64
LR = 1e-3


# -- randkit ---------------------------------------------------------------------------------


def randkit_config(model: str, runner: str, epochs: int, folds: int) -> dict[str, Any]:
    cv: dict[str, Any] = {"splitter": "stratified_kfold", "folds": folds, "runner": runner}
    if runner in ("processes", "ray"):
        cv.update(workers=2, threads_per_trial=1)
    return {
        "seed": SEED,
        "data": {"kind": "digits"},
        "model": MODELS[model],
        "train": {
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "optimizer": "adam",
            "lr": LR,
            "schedule": "constant",
            "device": "cpu",
        },
        "cv": cv,
    }


def run_randkit(model: str, runner: str, epochs: int, folds: int) -> tuple[float, float]:
    """(seconds, mean accuracy) of one whole randkit cross-validation."""
    splitter = StratifiedKFold(folds, shuffle=True, random_state=SEED)
    with tempfile.TemporaryDirectory(prefix="randkit-bench-") as tmp:
        start = time.perf_counter()
        cfg = ExperimentConfig.model_validate(randkit_config(model, runner, epochs, folds))
        result = run_cv(cfg, Path(tmp) / "run", quiet=True, report=False, splitter=splitter)
        seconds = time.perf_counter() - start
    return seconds, float(result.table["accuracy"].mean())


# -- baseline: skorch + scikit-learn ----------------------------------------------------------


def build_network(kind: str) -> nn.Sequential:
    """The same layers as randkit's zoo ``cnn`` / ``mlp``, on flattened 64-pixel inputs."""
    if kind == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class DigitsNet(nn.Module):
    """skorch instantiates the module class itself (per fold, after the seed is set)."""

    def __init__(self, kind: str = "cnn") -> None:
        super().__init__()
        self.net = build_network(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TorchSetup(Callback):
    """Seeds torch's global RNG (weights and batch order) and sets the thread count before
    each fit, in whichever process the fit runs."""

    def __init__(self, seed: int = SEED, threads: int | None = None) -> None:
        self.seed = seed
        self.threads = threads

    def initialize(self) -> TorchSetup:  # runs before skorch builds the module
        if self.threads:
            torch.set_num_threads(self.threads)
        torch.manual_seed(self.seed)
        return self


def baseline_estimator(model: str, epochs: int, threads: int | None) -> Any:
    net = NeuralNetClassifier(
        DigitsNet,
        module__kind=model,
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=LR,
        max_epochs=epochs,
        batch_size=BATCH_SIZE,
        iterator_train__shuffle=True,
        train_split=None,
        callbacks=[("setup", TorchSetup(SEED, threads))],
        device="cpu",
        verbose=0,
    )
    return make_pipeline(StandardScaler(), net)


def run_baseline(model: str, n_jobs: int, epochs: int, folds: int) -> tuple[float, float]:
    """(seconds, mean accuracy) of one whole skorch + ``cross_validate`` run."""
    start = time.perf_counter()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # StandardScaler keeps float32
    y = digits.target.astype(np.int64)
    scores = cross_validate(
        baseline_estimator(model, epochs, threads=1 if n_jobs > 1 else None),
        x,
        y,
        cv=StratifiedKFold(folds, shuffle=True, random_state=SEED),
        scoring="accuracy",
        n_jobs=n_jobs,
    )
    seconds = time.perf_counter() - start
    if n_jobs > 1:  # no warm workers left over for the next run
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    return seconds, float(np.mean(scores["test_score"]))


# -- reference: a plain PyTorch loop ---------------------------------------------------------


def run_plain_loop(model: str, epochs: int, folds: int) -> tuple[float, float]:
    """(seconds, mean accuracy) of the same training written as a bare loop per fold."""
    start = time.perf_counter()
    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32))
    y = torch.from_numpy(digits.target.astype(np.int64))
    generator = torch.Generator().manual_seed(SEED)
    scores = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=SEED).split(x, y):
        train_x, train_y = x[train], y[train]
        mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
        net = build_network(model)
        optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(epochs):
            order = torch.randperm(len(train_y), generator=generator)
            for i in range(0, len(order), BATCH_SIZE):
                batch = order[i : i + BATCH_SIZE]
                loss = nn.functional.cross_entropy(
                    net((train_x[batch] - mean) / std), train_y[batch]
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            predicted = net((x[test] - mean) / std).argmax(1)
        scores.append(float((predicted == y[test]).float().mean()))
    return time.perf_counter() - start, float(np.mean(scores))


# -- harness ----------------------------------------------------------------------------------


def check_same_architecture() -> None:
    """The hand-built networks have the parameter shapes of randkit's zoo models."""
    for kind in MODELS:
        factory = getattr(zoo, kind)
        ours = factory(in_shape=[1, 8, 8], num_classes=10, **MODELS[kind]["args"])
        theirs = build_network(kind)
        shapes = [tuple(p.shape) for p in ours.parameters()]
        if shapes != [tuple(p.shape) for p in theirs.parameters()]:
            raise SystemExit(f"baseline {kind} does not match randkit's: {shapes}")


def warm_up() -> None:
    """Pay one-time kernel and allocator set-up before any timed run."""
    x = torch.rand(BATCH_SIZE, 64)
    y = torch.randint(0, 10, (BATCH_SIZE,))
    for kind in MODELS:
        net = build_network(kind)
        optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(3):
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    parser.add_argument(
        "--runners",
        default="sequential,vectorized,processes",
        help="randkit runners, comma-separated",
    )
    parser.add_argument("--ray", action="store_true", help="also time the ray runner")
    parser.add_argument("--quick", action="store_true", help="2 epochs: a smoke run")
    args = parser.parse_args()
    args.runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    if args.ray and "ray" not in args.runners:
        args.runners.append("ray")
    unknown = [r for r in args.runners if r not in RUNNERS]
    if unknown or not args.runners:
        parser.error(f"--runners: expected some of {', '.join(RUNNERS)}, got {unknown}")
    if args.quick:
        args.epochs = 2
    return args


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    check_same_architecture()
    warm_up()
    systems = [f"randkit {r}" for r in args.runners] + [
        "skorch cross_validate n_jobs=1",
        "skorch cross_validate n_jobs=2",
        PLAIN,
    ]
    times: dict[tuple[str, str], float] = {}
    accuracy: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):  # interleaved, best of N, so drift hits all alike
        for model in MODELS:
            for system in systems:
                if system.startswith("randkit"):
                    runner = system.split()[1]
                    seconds, acc = run_randkit(model, runner, args.epochs, args.folds)
                elif system == PLAIN:
                    seconds, acc = run_plain_loop(model, args.epochs, args.folds)
                else:
                    n_jobs = int(system.rsplit("=", 1)[1])
                    seconds, acc = run_baseline(model, n_jobs, args.epochs, args.folds)
                key = (model, system)
                times[key] = min(times.get(key, math.inf), seconds)
                accuracy[key] = acc  # deterministic per system, up to thread scheduling

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{args.folds}-fold stratified CV on digits, {args.epochs} epochs, batch {BATCH_SIZE}, "
        f"Adam lr {LR:g}; best of {args.repeats}; {cpus} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    print()
    print(f"{'model':<5}  {'system':<34} {'time (s)':>9} {'accuracy':>9}")
    best: dict[str, dict[str, str]] = {}
    for model in MODELS:
        ours = min((s for s in systems if s.startswith("randkit")), key=lambda s: times[model, s])
        base = min((s for s in systems if s.startswith("skorch")), key=lambda s: times[model, s])
        best[model] = {"randkit": ours, "baseline": base}
        for system in systems:
            mark = " *" if system in (ours, base) else ""
            print(
                f"{model:<5}  {system:<34} {times[model, system]:9.2f} "
                f"{100 * accuracy[model, system]:8.2f}%{mark}"
            )
    print("(* fastest of its side; the plain loop is a reference, not a baseline)")
    print()
    summary: dict[str, Any] = {}
    for model in MODELS:
        ours, base = best[model]["randkit"], best[model]["baseline"]
        ratio = times[model, base] / times[model, ours]
        gap = 100 * (accuracy[model, ours] - accuracy[model, base])
        ratio_ok = "met" if ratio >= TARGETS[model] else "MISSED"
        gap_ok = "met" if abs(gap) <= ACCURACY_TOLERANCE + 1e-9 else "MISSED"
        loop = times[model, PLAIN]
        print(
            f"{model}: plain PyTorch loop: baseline / loop = {times[model, base] / loop:.2f}x, "
            f"loop / randkit = {loop / times[model, ours]:.2f}x"
        )
        print(
            f"{model}: baseline / randkit time = {ratio:.2f}x "
            f"(target >= {TARGETS[model]:g}x: {ratio_ok}); "
            f"accuracy gap randkit - baseline = {gap:+.2f} points "
            f"(target within {ACCURACY_TOLERANCE:g}: {gap_ok})"
        )
        summary[model] = {"ratio": ratio, "ours": ours, "base": base}
    jobs = {m: best[m]["baseline"].rsplit("=", 1)[1] for m in MODELS}
    if len(set(jobs.values())) == 1:
        baseline = f"n_jobs={jobs['cnn']}"
    else:  # say which model used which
        baseline = ", ".join(f"{m}: n_jobs={n}" for m, n in jobs.items())
    print(
        json.dumps(
            {
                "benchmark": "cv",
                "ratio_cnn": round(summary["cnn"]["ratio"], 3),
                "ratio_mlp": round(summary["mlp"]["ratio"], 3),
                "randkit_runner_cnn": best["cnn"]["randkit"].split()[1],
                "randkit_runner_mlp": best["mlp"]["randkit"].split()[1],
                "acc_randkit_cnn": round(accuracy["cnn", best["cnn"]["randkit"]], 4),
                "acc_baseline_cnn": round(accuracy["cnn", best["cnn"]["baseline"]], 4),
                "acc_randkit_mlp": round(accuracy["mlp", best["mlp"]["randkit"]], 4),
                "acc_baseline_mlp": round(accuracy["mlp", best["mlp"]["baseline"]], 4),
                "baseline": f"skorch+cross_validate ({baseline})",
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "cpus": cpus,
                "epochs": args.epochs,
                "folds": args.folds,
                "time_randkit_cnn": round(times["cnn", best["cnn"]["randkit"]], 3),
                "time_baseline_cnn": round(times["cnn", best["cnn"]["baseline"]], 3),
                "time_randkit_mlp": round(times["mlp", best["mlp"]["randkit"]], 3),
                "time_baseline_mlp": round(times["mlp", best["mlp"]["baseline"]], 3),
                "time_plain_loop_cnn": round(times["cnn", PLAIN], 3),
                "time_plain_loop_mlp": round(times["mlp", PLAIN], 3),
                "keep_freed_memory": True,
            }
        )
    )


if __name__ == "__main__":
    main()
