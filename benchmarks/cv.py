"""Cross-validation wall time: randkit's runners against skorch + scikit-learn.

Both sides run stratified cross-validation on scikit-learn's digits (1,797 8x8 images,
pixels scaled to [0, 1]) in this one process, on the same machine, for two networks:

- ``cnn``: randkit's digits CNN (conv 32, conv 64, each with 3x3 kernels, ReLU and 2x2 max
  pooling, then Linear 128 and Linear 10);
- ``mlp``: Linear 256, Linear 128, Linear 10 with ReLUs.

Training is the same on both sides: Adam at lr 1e-3 without a schedule, batch 64, plain
cross-entropy, shuffled batches, no augmentation or noise, no validation split, and the
same five folds (``StratifiedKFold(5, shuffle=True, random_state=0)``, handed to randkit as
its splitter). Two plans:

- ``5fold``: the five folds once, 10 epochs (targets: CNN and MLP >= 2.5x);
- ``100``: the five folds x 20 repeats varying ``init`` and ``order`` (100 trials), 5
  epochs (targets: MLP >= 5x, CNN >= 3x). randkit: ``cv.repeats: 20, cv.vary: [init,
  order]`` (the split is not varied, so every repeat uses the same five folds). skorch: one
  ``cross_validate`` over the five folds per repeat, torch seed = repeat.

- randkit: ``run_cv`` with each chosen runner (``sequential``, ``vectorized``: all trials
  trained at once with ``torch.func``, ``processes``: 2 workers with 1 thread each; ``ray``
  with ``--ray``), writing its run folder (results, models) to a temporary directory; the
  fastest runner counts. The model standardizes its inputs with the training fold's mean and
  std (per channel, so one pair for all 64 pixels; the baseline's ``StandardScaler`` has one
  pair per pixel).
- baseline (``_cv_baseline.py``): a scikit-learn ``Pipeline`` of ``StandardScaler`` and
  skorch's ``NeuralNetClassifier`` around the same network built by hand, under
  ``cross_validate``, with ``n_jobs=1`` and ``n_jobs=2`` (1 torch thread per worker; for the
  100-trial plan the 20 repeats are spread over the 2 workers); the faster one counts.

Also timed for ``5fold``, as a reference point and not a baseline: a plain PyTorch loop.
With ``--device cuda`` (or plan ``gpu``) the 100-trial plan also runs on the GPU with
randkit's vectorized runner against its own sequential runner (goal: >= 30x throughput);
without CUDA that part is skipped with a printed line.

Times are wall-clock for the whole cross-validation (data loading included), best of
``--repeats``, interleaved. Like the ``randkit`` commands, the script first calls
``randkit.memory.keep_freed_memory()`` (process-wide, so every side runs under it). The
last line printed is a JSON record.

    python benchmarks/cv.py [--plans 5fold,100] [--device cpu|cuda] [--repeats 1]
                            [--epochs 10] [--epochs-100 5] [--cv-repeats 20] [--folds 5]
                            [--runners sequential,vectorized,processes]
                            [--runners-100 vectorized,processes] [--ray] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _cv_baseline import (
    BATCH_SIZE,
    LR,
    SEED,
    build_network,
    run_baseline,
    run_baseline_repeated,
    run_plain_loop,
    warm_up,
)
from sklearn.model_selection import StratifiedKFold

from randkit.config import ExperimentConfig
from randkit.cv import run_cv
from randkit.memory import keep_freed_memory
from randkit.models import zoo

TARGETS = {"5fold": {"cnn": 2.5, "mlp": 2.5}, "100": {"cnn": 3.0, "mlp": 5.0}}
GPU_TARGET = 30.0  # vectorized / sequential throughput on the GPU, at least
ACCURACY_TOLERANCE = 0.5  # points of mean accuracy
MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"name": "cnn", "args": {"widths": [32, 64], "hidden": 128}},
    "mlp": {"name": "mlp", "args": {"hidden": [256, 128]}},
}
RUNNERS = ("sequential", "vectorized", "processes", "ray")
PLANS = ("5fold", "100", "gpu")
PLAIN = "plain PyTorch loop (reference)"
BASELINES = ("skorch cross_validate n_jobs=1", "skorch cross_validate n_jobs=2")


@dataclass
class Plan:
    """One cross-validation plan: ``folds`` x ``cv_repeats`` trials of ``epochs`` each."""

    name: str
    epochs: int
    folds: int
    cv_repeats: int
    runners: list[str]
    device: str = "cpu"

    @property
    def trials(self) -> int:
        return self.folds * self.cv_repeats


# -- randkit ---------------------------------------------------------------------------------


def randkit_config(model: str, runner: str, plan: Plan) -> dict[str, Any]:
    cv: dict[str, Any] = {"splitter": "stratified_kfold", "folds": plan.folds, "runner": runner}
    if plan.cv_repeats > 1:  # the split stays: every repeat uses the same folds
        cv.update(repeats=plan.cv_repeats, vary=["init", "order"])
    if runner in ("processes", "ray"):
        cv.update(workers=2, threads_per_trial=1)
    return {
        "seed": SEED,
        "data": {"kind": "digits"},
        "model": MODELS[model],
        "train": {
            "epochs": plan.epochs,
            "batch_size": BATCH_SIZE,
            "optimizer": "adam",
            "lr": LR,
            "schedule": "constant",
            "device": plan.device,
        },
        "cv": cv,
    }


def run_randkit(model: str, runner: str, plan: Plan) -> tuple[float, float]:
    """(seconds, mean accuracy) of one whole randkit cross-validation."""
    splitter = StratifiedKFold(plan.folds, shuffle=True, random_state=SEED)
    with tempfile.TemporaryDirectory(prefix="randkit-bench-") as tmp:
        start = time.perf_counter()
        cfg = ExperimentConfig.model_validate(randkit_config(model, runner, plan))
        result = run_cv(cfg, Path(tmp) / "run", quiet=True, report=False, splitter=splitter)
        if plan.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if len(result.table) != plan.trials:
        raise SystemExit(f"randkit ran {len(result.table)} trials, expected {plan.trials}")
    return seconds, float(result.table["accuracy"].mean())


# -- harness ----------------------------------------------------------------------------------


def systems_of(plan: Plan) -> dict[str, Callable[[str], tuple[float, float]]]:
    """Each timed system of ``plan``: a function of the model giving (seconds, accuracy)."""
    systems: dict[str, Callable[[str], tuple[float, float]]] = {
        f"randkit {r}": (lambda m, r=r: run_randkit(m, r, plan)) for r in plan.runners
    }
    if plan.device != "cpu":
        return systems
    for system in BASELINES:
        n_jobs = int(system.rsplit("=", 1)[1])
        if plan.cv_repeats == 1:
            systems[system] = lambda m, j=n_jobs: run_baseline(m, j, plan.epochs, plan.folds)
        else:
            systems[system] = lambda m, j=n_jobs: run_baseline_repeated(
                m, j, plan.epochs, plan.folds, plan.cv_repeats
            )
    if plan.cv_repeats == 1:
        systems[PLAIN] = lambda m: run_plain_loop(m, plan.epochs, plan.folds)
    return systems


def time_plan(plan: Plan, repeats: int) -> dict[str, dict[str, tuple[float, float]]]:
    """model -> system -> (best seconds, accuracy); interleaved so drift hits all alike."""
    systems = systems_of(plan)
    results: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in MODELS}
    for _ in range(repeats):
        for model in MODELS:
            for system, run in systems.items():
                seconds, acc = run(model)
                best = results[model].get(system, (math.inf, acc))[0]
                # accuracy is deterministic per system, up to thread scheduling
                results[model][system] = (min(best, seconds), acc)
    return results


def fastest(timed: dict[str, tuple[float, float]], prefix: str) -> str:
    return min((s for s in timed if s.startswith(prefix)), key=lambda s: timed[s][0])


def compare(plan: Plan, timed: dict[str, tuple[float, float]], model: str) -> dict[str, Any]:
    """randkit's fastest runner against the faster baseline, for one model: print the
    verdict, return the JSON keys."""
    ours, base = fastest(timed, "randkit"), fastest(timed, "skorch")
    ratio = timed[base][0] / timed[ours][0]
    gap = 100 * (timed[ours][1] - timed[base][1])
    target = TARGETS[plan.name][model]
    ratio_met, gap_met = ratio >= target, abs(gap) <= ACCURACY_TOLERANCE + 1e-9
    print(
        f"{model} [{plan.name}]: baseline / randkit time = {ratio:.2f}x "
        f"(target >= {target:g}x: {'met' if ratio_met else 'MISSED'}); "
        f"accuracy gap randkit - baseline = {gap:+.2f} points "
        f"(target within {ACCURACY_TOLERANCE:g}: {'met' if gap_met else 'MISSED'})"
    )
    sfx = "" if plan.name == "5fold" else "_100"
    return {
        f"ratio_{model}{sfx}": round(ratio, 3),
        f"accuracy_gap_{model}{sfx}": round(gap, 3),
        f"ratio_met_{model}{sfx}": ratio_met,
        f"accuracy_met_{model}{sfx}": gap_met,
        f"randkit_runner_{model}{sfx}": ours.split()[1],
        f"baseline_n_jobs_{model}{sfx}": int(base.rsplit("=", 1)[1]),
        f"acc_randkit_{model}{sfx}": round(timed[ours][1], 4),
        f"acc_baseline_{model}{sfx}": round(timed[base][1], 4),
        f"time_randkit_{model}{sfx}": round(timed[ours][0], 3),
        f"time_baseline_{model}{sfx}": round(timed[base][0], 3),
    }


def print_plan(plan: Plan, results: dict[str, dict[str, tuple[float, float]]]) -> None:
    print(
        f"plan {plan.name}: {plan.folds}-fold stratified CV x {plan.cv_repeats} repeat(s) "
        f"({plan.trials} trials) on digits, {plan.epochs} epochs, batch {BATCH_SIZE}, "
        f"Adam lr {LR:g}, device {plan.device}"
    )
    print(f"{'model':<5}  {'system':<34} {'time (s)':>9} {'accuracy':>9}")
    for model, timed in results.items():
        marked = {fastest(timed, "randkit")}
        if BASELINES[0] in timed:
            marked.add(fastest(timed, "skorch"))
        for system, (seconds, acc) in timed.items():
            mark = " *" if system in marked else ""
            print(f"{model:<5}  {system:<34} {seconds:9.2f} {100 * acc:8.2f}%{mark}")
    print("(* fastest of its side; the plain loop is a reference, not a baseline)")


def report_plan(plan: Plan, results: dict[str, dict[str, tuple[float, float]]]) -> dict[str, Any]:
    """Print the plan's table and verdicts; return its JSON keys."""
    print_plan(plan, results)
    keys: dict[str, Any] = {}
    for model, timed in results.items():
        if PLAIN in timed:
            loop = timed[PLAIN][0]
            base, ours = timed[fastest(timed, "skorch")][0], timed[fastest(timed, "randkit")][0]
            print(
                f"{model}: plain PyTorch loop: baseline / loop = {base / loop:.2f}x, "
                f"loop / randkit = {loop / ours:.2f}x"
            )
            keys[f"time_plain_loop_{model}"] = round(loop, 3)
        keys |= compare(plan, timed, model)
    sfx = "" if plan.name == "5fold" else "_100"
    jobs = {m: keys[f"baseline_n_jobs_{m}{sfx}"] for m in MODELS}
    if len(set(jobs.values())) == 1:
        layout = f"n_jobs={jobs['cnn']}"
    else:  # say which model used which
        layout = ", ".join(f"{m}: n_jobs={n}" for m, n in jobs.items())
    keys[f"baseline{sfx}"] = f"skorch+cross_validate ({layout})"
    keys[f"epochs{sfx}"] = plan.epochs
    keys[f"trials{sfx}"] = plan.trials
    print()
    return keys


def report_gpu(plan: Plan, results: dict[str, dict[str, tuple[float, float]]]) -> dict[str, Any]:
    """Vectorized against sequential on the GPU: throughput ratio and accuracy gap."""
    print_plan(plan, results)
    keys: dict[str, Any] = {"gpu": torch.cuda.get_device_name()}
    for model, timed in results.items():
        (seq, seq_acc), (vec, vec_acc) = timed["randkit sequential"], timed["randkit vectorized"]
        speedup = seq / vec
        met = "met" if speedup >= GPU_TARGET else "MISSED"
        print(
            f"{model} [gpu]: vectorized throughput / sequential = {speedup:.1f}x "
            f"(goal >= {GPU_TARGET:g}x: {met}); {plan.trials / vec:.1f} trials/s vectorized; "
            f"accuracy vectorized - sequential = {100 * (vec_acc - seq_acc):+.2f} points"
        )
        keys |= {
            f"gpu_speedup_{model}_100": round(speedup, 2),
            f"gpu_time_vectorized_{model}_100": round(vec, 3),
            f"gpu_time_sequential_{model}_100": round(seq, 3),
            f"gpu_accuracy_gap_{model}_100": round(100 * (vec_acc - seq_acc), 3),
        }
    print()
    return keys


def check_same_architecture() -> None:
    """The hand-built networks have the parameter shapes of randkit's zoo models."""
    for kind in MODELS:
        factory = getattr(zoo, kind)
        ours = factory(in_shape=[1, 8, 8], num_classes=10, **MODELS[kind]["args"])
        theirs = build_network(kind)
        shapes = [tuple(p.shape) for p in ours.parameters()]
        if shapes != [tuple(p.shape) for p in theirs.parameters()]:
            raise SystemExit(f"baseline {kind} does not match randkit's: {shapes}")


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model or platform.processor(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "cpus": cpus,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def runner_list(parser: argparse.ArgumentParser, flag: str, value: str, ray: bool) -> list[str]:
    runners = [r.strip() for r in value.split(",") if r.strip()]
    if ray and "ray" not in runners:
        runners.append("ray")
    unknown = [r for r in runners if r not in RUNNERS]
    if unknown or not runners:
        parser.error(f"{flag}: expected some of {', '.join(RUNNERS)}, got {value!r}")
    return runners


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--plans", default="5fold,100", help=f"comma-separated, some of {', '.join(PLANS)}")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: add plan gpu")
    add("--repeats", type=int, default=1, help="best of this many runs of each system")
    add("--epochs", type=int, default=10, help="epochs of plan 5fold")
    add("--epochs-100", type=int, default=5, help="epochs of plan 100 (and gpu)")
    add("--cv-repeats", type=int, default=20, help="repeats of plan 100 (and gpu)")
    add("--folds", type=int, default=5)
    add("--runners", default="sequential,vectorized,processes", help="plan 5fold")
    add("--runners-100", default="vectorized,processes", help="plan 100")
    add("--ray", action="store_true", help="also time the ray runner")
    add("--quick", action="store_true", help="a smoke run: 2 / 1 epochs, 2 repeats in plan 100")
    args = parser.parse_args()
    args.plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    if args.device == "cuda" and "gpu" not in args.plans:
        args.plans.append("gpu")
    if not args.plans or any(p not in PLANS for p in args.plans):
        parser.error(f"--plans: expected some of {', '.join(PLANS)}, got {args.plans}")
    args.runners = runner_list(parser, "--runners", args.runners, args.ray)
    args.runners_100 = runner_list(parser, "--runners-100", args.runners_100, args.ray)
    if args.quick:
        args.epochs, args.epochs_100, args.cv_repeats = 2, 1, 2
    return args


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    check_same_architecture()
    warm_up()
    info = machine_info()
    print(
        f"{info['cpu_model']}; {info['cpus']} CPUs, torch {info['torch']} "
        f"({info['threads']} threads); best of {args.repeats}\n"
    )
    record: dict[str, Any] = {"benchmark": "cv"}
    for key in ("ratio", "accuracy_gap"):  # always present; null where a plan did not run
        record |= {f"{key}_{m}{s}": None for s in ("", "_100") for m in MODELS}
    plans = {
        "5fold": Plan("5fold", args.epochs, args.folds, 1, args.runners),
        "100": Plan("100", args.epochs_100, args.folds, args.cv_repeats, args.runners_100),
    }
    for name in ("5fold", "100"):
        if name in args.plans:
            record |= report_plan(plans[name], time_plan(plans[name], args.repeats))
    if "gpu" in args.plans:
        if torch.cuda.is_available():
            warm_up("cuda")
            gpu = Plan(
                "gpu",
                args.epochs_100,
                args.folds,
                args.cv_repeats,
                ["sequential", "vectorized"],
                device="cuda",
            )
            record |= report_gpu(gpu, time_plan(gpu, args.repeats))
        else:
            print("plan gpu: skipped, CUDA is not available on this machine\n")
    record |= {
        "folds": args.folds,
        "cv_repeats_100": args.cv_repeats,
        "repeats": args.repeats,
        **info,
        "keep_freed_memory": True,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
