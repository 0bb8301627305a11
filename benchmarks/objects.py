"""Object-first ``randkit.cross_validate``: what the object path costs against the config
path, and what streaming a Dataset from disk costs against tensors in memory.

1. ``object_vs_config``: the same model (``make_model`` below: a per-channel BatchNorm
   without parameters, then a small CNN for 1x8x8 images) on the same data (scikit-learn's
   digits, pixels / 16), 5-fold stratified CV, sequential runner, ``cv.threads_per_trial =
   1``, Adam 1e-3, batch 64, 5 epochs:

   - config path: ``cross_validate({"name": "objects:make_model", ...}, "digits", ...)``
     (the model by reference, resolved like a config's ``model.name``; the data loaded by
     the config's digits loader; randkit standardizes the inputs with the training fold's
     mean and std);
   - object path: ``cross_validate(make_model, (x, y), ...)`` with the same pixels as
     arrays (a ``TensorDataset`` indexed directly, not standardized; building the arrays
     is inside the clock).

   The input BatchNorm makes the two paths train alike (standardized or not, it sees the
   same normalized inputs up to its epsilon), so they do the same work and their reports
   draw nearly the same curves (the report's figures take longer for some curves than for
   others). ``ratio_object_config`` = object-path wall time / config-path wall time (whole
   ``cross_validate`` call: checks, training, test predictions, run folder, report), best
   of ``--repeats`` (7), the paths taking turns and the first of each round alternating;
   target <= 1.05. Also printed: the median of the rounds' ratios (each round's object
   time / its config time, robust to a slow phase of a shared machine) and the ratio of
   the trainers' ``fit()`` seconds.

2. ``streamed_vs_memory``: the image example (``examples/own_model_png_dataset.py``: its
   ``make_vehicles`` writes 32x32 PNGs of three classes, ``PngFolder`` reads one PNG per
   item with Pillow, ``SmallCNN`` classifies them). The PNGs are written to a temporary
   folder, then the example's plan (5 folds, batch 32, Adam 2e-3, random horizontal flips
   from the augment stream; 2 epochs here) is cross-validated on

   - streamed: ``PngFolder`` read by a ``DataLoader`` with ``num_workers=2``;
   - in memory: the same images decoded once (before the clock starts) into a
     ``TensorDataset``.

   Training throughput = training examples seen (sum over folds of train size x epochs) /
   the trials' ``fit_seconds`` (the trainer's ``fit()``: every DataLoader start, the
   reading, every step). ``ratio_streamed_memory`` = streamed / in-memory throughput with
   torch's default threads (as the example runs), best of ``--png-repeats`` (3) each, turns
   alternating; target >= 0.80. The same is measured with one trainer thread
   (``cv.threads_per_trial = 1``, ``--threads``) as a reference: the workers then have a
   core of their own. The whole-call wall ratio is printed too, and a bound from CPU
   arithmetic: training keeps T cores busy at the in-memory rate R and each image costs d
   seconds of one core to decode (timed once in this process), so C cores allow at most
   min(1, C / (T + d R)). Both sides give the same batches in the same order, so their
   accuracies must be equal (checked). ``--control`` adds a third side: the decoded images
   served item by item by a plain Dataset through the same DataLoader workers, so nothing
   is decoded and what remains is the cost of the worker processes themselves.

Load of a shared machine changes the figures: the load average is printed before and after.

    python benchmarks/objects.py [--parts object,streamed] [--repeats 7] [--epochs 5]
                                 [--png-repeats 3] [--per-class 700] [--png-epochs 2]
                                 [--threads 0,1] [--workers 2] [--control] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import randkit
from randkit.memory import keep_freed_memory

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "own_model_png_dataset.py"
OBJECT_TARGET = 1.05  # object-path wall time / config-path wall time, at most
STREAM_TARGET = 0.80  # streamed / in-memory training throughput, at least
CONTROL = "control"  # --control: decoded images streamed through the same workers
SEED = 0
PARTS = ("object", "streamed")
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- 1. object path against config path ------------------------------------------------------


def make_model(num_classes: int, in_shape: list[int]) -> nn.Module:
    """A small CNN for 1x8x8 digits: BatchNorm of the input (no parameters), conv 16 and
    conv 32 (3x3, ReLU, 2x2 max pooling), Linear 64, Linear ``num_classes``. The config path
    names it ``objects:make_model``."""
    channels, height, width = in_shape
    return nn.Sequential(
        nn.BatchNorm2d(channels, affine=False),
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The pixels the config's digits loader uses: (N, 1, 8, 8) float32 / 16, int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images[:, None].astype(np.float32) / np.float32(16.0)
    return x, bunch.target.astype(np.int64)


def fit_seconds(out: Path) -> float:
    """The trainer's ``fit()`` seconds summed over a run's trials."""
    records = [json.loads(p.read_text()) for p in out.glob("trials/*/metrics.json")]
    return sum(r["fit_seconds"] for r in records)


def run_object_vs_config(path: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Wall seconds, fit seconds and mean accuracy of one whole cross_validate call on one
    path (the object path's clock includes reading the digits arrays)."""
    common: dict[str, Any] = {
        "folds": args.folds,
        "seed": SEED,
        "train": {"epochs": args.epochs, "batch_size": 64, "optimizer": "adam", "lr": 1e-3},
        "cv": {"threads_per_trial": 1},
        "out": out,
        "quiet": True,
    }
    if path == "config":
        model = {"name": "objects:make_model", "code_dir": str(HERE)}
        start = time.perf_counter()
        result = randkit.cross_validate(model, "digits", **common)
    else:
        start = time.perf_counter()
        result = randkit.cross_validate(make_model, digits_arrays(), **common)
    wall = time.perf_counter() - start
    accuracy = float(result.table["accuracy"].mean())
    return {"wall": wall, "fit": fit_seconds(out), "accuracy": accuracy}


def object_vs_config(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    paths = ("config", "object")
    runs: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
    warm = argparse.Namespace(**{**vars(args), "epochs": 1})
    for path in paths:  # imports, first allocations
        run_object_vs_config(path, warm, tmp / f"warm-{path}")
    for round_ in range(args.repeats):
        for path in paths if round_ % 2 == 0 else paths[::-1]:
            runs[path].append(run_object_vs_config(path, args, tmp / f"{path}{round_}"))
    wall = {path: min(r["wall"] for r in got) for path, got in runs.items()}
    fit = {path: min(r["fit"] for r in got) for path, got in runs.items()}
    accuracy = {path: got[0]["accuracy"] for path, got in runs.items()}
    ratio, fit_ratio = wall["object"] / wall["config"], fit["object"] / fit["config"]
    paired = statistics.median(
        o["wall"] / c["wall"] for o, c in zip(runs["object"], runs["config"], strict=True)
    )
    met = ratio <= OBJECT_TARGET
    print(
        f"1. object path vs config path: digits, {args.folds}-fold CV, {args.epochs} epochs, "
        f"batch 64, sequential runner, 1 thread; best of {args.repeats}"
    )
    print(f"   {'path':<8} {'wall (s)':>9} {'fit (s)':>8} {'accuracy':>9}")
    for path in paths:
        print(f"   {path:<8} {wall[path]:9.3f} {fit[path]:8.3f} {100 * accuracy[path]:8.2f}%")
    print(
        f"   ratio object / config wall time: {ratio:.3f} "
        f"(target <= {OBJECT_TARGET:g}: {'met' if met else 'MISSED'}); "
        f"median of the rounds' ratios: {paired:.3f}; training (fit) time alone: "
        f"{fit_ratio:.3f}\n"
    )
    return {
        "ratio_object_config": round(ratio, 4),
        "object_config_met": met,
        "ratio_object_config_median": round(paired, 4),
        "ratio_object_config_fit": round(fit_ratio, 4),
        "time_config": round(wall["config"], 3),
        "time_object": round(wall["object"], 3),
        "fit_config": round(fit["config"], 3),
        "fit_object": round(fit["object"], 3),
        "acc_config": round(accuracy["config"], 4),
        "acc_object": round(accuracy["object"], 4),
        "epochs": args.epochs,
    }


# -- 2. a Dataset streamed from disk against tensors in memory --------------------------------


def load_example() -> ModuleType:
    """examples/own_model_png_dataset.py as a module (registered, so its classes pickle)."""
    name = "own_model_png_dataset"
    if name in sys.modules:
        return sys.modules[name]
    if not EXAMPLE.is_file():
        raise SystemExit(f"{EXAMPLE} not found: the streamed part needs the image example")
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def decoded(dataset: Any) -> tuple[TensorDataset, float]:
    """Every item of ``dataset`` decoded once, as a TensorDataset of (images, labels), and
    the seconds per item that decoding took in this one process."""
    start = time.perf_counter()
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    seconds = (time.perf_counter() - start) / len(dataset)
    return TensorDataset(images, torch.as_tensor(dataset.targets, dtype=torch.long)), seconds


class DecodedItems(Dataset):
    """The decoded images served one item at a time (a map-style Dataset, so randkit streams
    it through the DataLoader like ``PngFolder``), with nothing left to decode: the
    ``--control`` side, what the DataLoader's workers cost by themselves."""

    def __init__(self, data: TensorDataset) -> None:
        self.images, labels = data.tensors
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def run_png(
    example: ModuleType,
    data: Any,
    workers: int,
    threads: int | None,
    args: argparse.Namespace,
    out: Path,
) -> dict[str, float]:
    """One whole cross_validate call of the image example: wall and fit seconds, training
    examples per fit second, mean accuracy."""
    start = time.perf_counter()
    result = randkit.cross_validate(
        example.SmallCNN,
        data,
        folds=args.folds,
        seed=SEED,
        train={"epochs": args.png_epochs, "batch_size": 32, "lr": 2e-3},
        randomize={"augment": [{"kind": "hflip"}]},
        num_workers=workers,
        cv={"threads_per_trial": threads} if threads else None,
        out=out,
        quiet=True,
    )
    wall = time.perf_counter() - start
    records = [json.loads(p.read_text()) for p in out.glob("trials/*/metrics.json")]
    fit = sum(r["fit_seconds"] for r in records)
    examples = sum(r["train_size"] for r in records) * args.png_epochs
    return {
        "wall": wall,
        "fit": fit,
        "rate": examples / fit,
        "accuracy": float(result.table["accuracy"].mean()),
    }


def compare_png(
    name: str, runs: dict[str, list[dict[str, float]]], threads: int, decode: float, headline: bool
) -> dict[str, Any]:
    """Print one thread setting's table and ratio; return its JSON keys."""
    best = {side: max(got, key=lambda r: r["rate"]) for side, got in runs.items()}
    wall = {side: min(r["wall"] for r in got) for side, got in runs.items()}
    ratio = best["streamed"]["rate"] / best["in memory"]["rate"]
    wall_ratio = wall["in memory"] / wall["streamed"]
    if len({r["accuracy"] for got in runs.values() for r in got}) != 1:
        raise SystemExit(f"{name}: the streamed and in-memory paths gave different accuracies")
    # The CPU arithmetic: training keeps `threads` cores busy at the in-memory rate and every
    # image costs `decode` seconds of one core on top; this machine has CPUS cores.
    bound = min(1.0, CPUS / (threads + decode * best["in memory"]["rate"]))
    print(f"   trainer threads: {name}")
    for side, got in best.items():
        label = {"streamed": "PngFolder", "in memory": "TensorDataset"}.get(side, "DecodedItems")
        if side != "in memory":
            label += f", {got['workers']:.0f} workers"
        print(
            f"   {side + ' (' + label + ')':<34} {got['rate']:10.0f} {got['fit']:8.2f} "
            f"{wall[side]:9.2f} {100 * got['accuracy']:8.2f}%"
        )
    verdict = f"target >= {STREAM_TARGET:g}: {'met' if ratio >= STREAM_TARGET else 'MISSED'}"
    print(
        f"   ratio streamed / in memory, training throughput: {ratio:.3f} "
        f"({verdict if headline else 'reference'}); whole call (wall): {wall_ratio:.3f}; "
        f"CPU bound on {CPUS} cores: {bound:.2f}" + ("" if CONTROL in best else "\n")
    )
    sfx = "" if headline else f"_{threads}thread"
    keys: dict[str, Any] = {
        f"ratio_streamed_memory{sfx}": round(ratio, 4),
        f"ratio_streamed_memory_wall{sfx}": round(wall_ratio, 4),
        f"cpu_bound{sfx}": round(bound, 3),
        f"rate_streamed{sfx}": round(best["streamed"]["rate"]),
        f"rate_memory{sfx}": round(best["in memory"]["rate"]),
        f"time_streamed{sfx}": round(wall["streamed"], 3),
        f"time_memory{sfx}": round(wall["in memory"], 3),
        f"fit_streamed{sfx}": round(best["streamed"]["fit"], 3),
        f"fit_memory{sfx}": round(best["in memory"]["fit"], 3),
        f"acc_png{sfx}": round(best["streamed"]["accuracy"], 4),
    }
    if CONTROL in best:
        control = best[CONTROL]["rate"] / best["in memory"]["rate"]
        print(f"   control (nothing to decode) / in memory: {control:.3f}\n")
        keys |= {
            f"ratio_control_memory{sfx}": round(control, 4),
            f"rate_control{sfx}": round(best[CONTROL]["rate"]),
        }
    if headline:
        keys |= {"streamed_memory_met": ratio >= STREAM_TARGET, "threads_png": threads}
    return keys


def streamed_vs_memory(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    example = load_example()
    folder = example.make_vehicles(tmp / "vehicles", args.per_class, SEED)
    streamed = example.PngFolder(folder)
    memory, decode = decoded(streamed)
    sources = {"streamed": (streamed, args.workers), "in memory": (memory, 0)}
    if args.control:
        sources[CONTROL] = (DecodedItems(memory), args.workers)
    settings = {  # the first is the headline: torch's default threads, as the example runs
        "default" if t == 0 else f"{t} (cv threads_per_trial)": t for t in args.threads
    }
    warm = argparse.Namespace(**{**vars(args), "png_epochs": 1})
    run_png(example, memory, 0, None, warm, tmp / "png-warm")
    runs = {name: {side: [] for side in sources} for name in settings}
    count = 0
    for round_ in range(args.png_repeats):
        for name, threads in settings.items():
            for side in list(sources) if round_ % 2 == 0 else list(sources)[::-1]:
                data, workers = sources[side]
                count += 1
                got = run_png(example, data, workers, threads or None, args, tmp / f"png{count}")
                runs[name][side].append({**got, "workers": workers})
    print(
        f"2. streamed from disk vs in memory: {len(streamed)} PNGs (32x32, 3 classes), "
        f"SmallCNN, {args.folds}-fold CV, {args.png_epochs} epochs, batch 32, hflip; "
        f"decoding {1e6 * decode:.0f} us/image in one process; best of {args.png_repeats}"
    )
    print(f"   {'data':<34} {'train ex/s':>10} {'fit (s)':>8} {'wall (s)':>9} {'accuracy':>9}")
    keys: dict[str, Any] = {}
    for i, (name, threads) in enumerate(settings.items()):
        used = threads or torch.get_num_threads()
        keys |= compare_png(name, runs[name], used, decode, headline=i == 0)
    return {
        **keys,
        "decode_us_per_image": round(1e6 * decode, 1),
        "images": len(streamed),
        "png_epochs": args.png_epochs,
        "num_workers": args.workers,
        "thread_settings": args.threads,
        "control": args.control,
    }


# -- harness -----------------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        return platform.processor()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--parts", default="object,streamed", help=f"comma-separated, some of {', '.join(PARTS)}")
    add("--repeats", type=int, default=7, help="part 1: best of this many runs of each path")
    add("--png-repeats", type=int, default=3, help="part 2: best of this many runs of each side")
    add("--folds", type=int, default=5)
    add("--epochs", type=int, default=5, help="epochs of part 1 (digits)")
    add("--per-class", type=int, default=700, help="PNGs per class in part 2 (3 classes)")
    add("--png-epochs", type=int, default=2, help="epochs of part 2")
    add("--workers", type=int, default=2, help="DataLoader workers of the streamed side")
    add(
        "--threads",
        default="0,1",
        help="trainer threads of part 2, comma-separated; 0 = torch's default (the headline, "
        "first); others set cv.threads_per_trial (a reference)",
    )
    add(
        "--control",
        action="store_true",
        help="part 2: add a side streaming the decoded images through the same workers",
    )
    add("--quick", action="store_true", help="a smoke run: tiny sizes, one round")
    args = parser.parse_args()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or any(p not in PARTS for p in args.parts):
        parser.error(f"--parts: expected some of {', '.join(PARTS)}, got {args.parts}")
    try:
        args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads: expected integers, got {args.threads!r}")
    if not args.threads or min(args.threads) < 0:
        parser.error(f"--threads: expected integers >= 0, got {args.threads}")
    if args.quick:
        args.repeats, args.png_repeats, args.epochs, args.folds = 1, 1, 1, 3
        args.per_class, args.png_epochs = 40, 1
    return args


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    load_before = loadavg()
    print(
        f"{cpu_model()}; {CPUS} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); load average {load_before}\n"
    )
    record: dict[str, Any] = {
        "benchmark": "objects",
        "ratio_object_config": None,
        "ratio_streamed_memory": None,
    }
    with tempfile.TemporaryDirectory(prefix="randkit-bench-objects-") as tmp:
        if "object" in args.parts:
            record |= object_vs_config(args, Path(tmp))
        if "streamed" in args.parts:
            record |= streamed_vs_memory(args, Path(tmp))
    record |= {
        "folds": args.folds,
        "repeats": args.repeats,
        "png_repeats": args.png_repeats,
        "target_object_config": OBJECT_TARGET,
        "target_streamed_memory": STREAM_TARGET,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cpus": CPUS,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "keep_freed_memory": True,
    }
    print(f"load average after: {record['loadavg_after']}")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
