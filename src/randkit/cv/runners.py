"""Where trials run, behind one interface: ``make_runner(context).run(trials, on_done)``.

Every runner executes the same trial, so a trial gives the same numbers whichever ran it
(bitwise on the CPU at the same threads per trial for sequential, processes and Ray; the
vectorized runner within float tolerance, with the same data order, augmentation and init).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random  # global-rng-ok: only to give back the state Ray draws from
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from randkit.config import ExperimentConfig
from randkit.cv.objects import UserObjects
from randkit.cv.plan import Trial
from randkit.cv.progress import EpochHook, drain
from randkit.data import LabeledData
from randkit.data.dataset import DatasetData
from randkit.extras import require
from randkit.streams import Streams

# How often the parent looks for workers' epochs while it waits for trials (seconds).
_POLL_S = 0.2

Job = dict[str, Any]  # {"config": dict, "trial": dict, "out": str, "threads": int | None}
OnDone = Callable[[dict[str, Any]], None]


@dataclass
class RunContext:
    """What every runner needs: the validated config (and its plain-JSON form for other
    processes), the data already loaded, its fingerprint and the run folder."""

    cfg: ExperimentConfig
    config: dict[str, Any]
    data: LabeledData | DatasetData
    data_hash: str
    out: Path
    objects: UserObjects | None = None
    on_epoch: EpochHook | None = None  # the progress bar's; None when quiet

    def shared(self) -> tuple[UserObjects | None, DatasetData | None]:
        """What workers cannot load from the config: the user's objects and Dataset."""
        return self.objects, self.data if isinstance(self.data, DatasetData) else None

    def streams(self) -> Streams:
        return Streams(self.cfg.seed, self.cfg.seeds)

    def job(self, trial: Trial, threads: int | None) -> Job:
        return {
            "config": self.config,
            "trial": trial.to_json(),
            "out": str(self.out),
            "threads": threads,
            "data_hash": self.data_hash,
        }


class Runner(Protocol):
    def run(self, trials: list[Trial], on_done: OnDone) -> None:
        """Run ``trials`` and call ``on_done(record)`` as each one finishes."""
        ...


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (macOS)
        return os.cpu_count() or 1


def make_runner(context: RunContext) -> Runner:
    """The runner ``cfg.cv.runner`` names."""
    name = context.cfg.cv.runner
    if name == "vectorized":
        from randkit.cv.vectorized import VectorizedRunner

        return VectorizedRunner(context)
    runners: dict[str, Callable[[RunContext], Runner]] = {
        "sequential": SequentialRunner,
        "processes": ProcessRunner,
        "ray": RayRunner,
    }
    return runners[name](context)


class SequentialRunner:
    """One trial after another in this process, on the data already loaded."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def run(self, trials: list[Trial], on_done: OnDone) -> None:
        from randkit.cv.trial import run_trial
        from randkit.train.loop import resolve_device

        ctx = self.context
        previous = torch.get_num_threads()
        try:
            if ctx.cfg.cv.threads_per_trial:
                torch.set_num_threads(ctx.cfg.cv.threads_per_trial)
            streams, device = ctx.streams(), resolve_device(ctx.cfg.train.device)
            for trial in trials:
                on_done(
                    run_trial(
                        ctx.cfg, ctx.data, trial, streams, device, ctx.out, ctx.objects,
                        ctx.on_epoch,
                    )
                )  # fmt: skip
        finally:
            torch.set_num_threads(previous)


class ProcessRunner:
    """Local worker processes (spawned, so no forked OpenMP or CUDA state)."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def run(self, trials: list[Trial], on_done: OnDone) -> None:
        from randkit.cv.trial import run_trial_job, set_worker_objects

        cv = self.context.cfg.cv
        workers = min(cv.workers or cpu_count(), len(trials))
        threads = cv.threads_per_trial or max(1, cpu_count() // workers)
        jobs = [self.context.job(t, threads) for t in trials]
        spawn = multiprocessing.get_context("spawn")
        on_epoch = self.context.on_epoch
        # Workers put their epochs here; a queue reaches a worker only at its start.
        channel = spawn.Queue() if on_epoch is not None else None
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=spawn,
            initializer=set_worker_objects,  # the user's objects, once per worker
            initargs=(*self.context.shared(), channel),
        ) as pool:
            pending = {pool.submit(run_trial_job, **job) for job in jobs}
            while pending:
                timeout = _POLL_S if channel is not None else None
                done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                drain(channel, on_epoch)
                for future in done:
                    on_done(future.result())


class RayRunner:
    """Trials as Ray tasks on an existing cluster (``cv.address``) or a fresh local one; a
    task whose worker dies is retried up to ``cv.retries`` times."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def run(self, trials: list[Trial], on_done: OnDone) -> None:
        require("ray", "cv.runner 'ray'")
        import ray

        from randkit.cv.trial import run_trial_job

        cfg = self.context.cfg
        threads = cfg.cv.threads_per_trial or 1
        gpus = 0.0
        if torch.cuda.is_available() and cfg.train.device != "cpu":
            gpus = 1.0 / max(1, min(len(trials), cfg.cv.workers or 4))  # fractional GPUs
        with _python_random_kept():
            started_here = _start_ray(ray, cfg.cv.address)
        try:
            task = ray.remote(run_trial_job).options(
                num_cpus=float(threads),
                num_gpus=gpus,
                max_retries=cfg.cv.retries,
                retry_exceptions=False,
            )
            shared = ray.put(self.context.shared())  # one copy per node, not per task
            on_epoch = self.context.on_epoch
            channel = _ray_queue() if on_epoch is not None else None
            pending = [
                task.remote(**self.context.job(t, threads), shared=shared, progress=channel)
                for t in trials
            ]
            while pending:
                timeout = _POLL_S if channel is not None else None
                done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
                drain(channel, on_epoch)
                for ref in done:
                    on_done(ray.get(ref))
        finally:
            if started_here:
                with _python_random_kept():
                    ray.shutdown()


def _ray_queue() -> Any:
    """A Ray queue for the workers' epochs; its actor takes no CPU from the trials."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


@contextlib.contextmanager
def _python_random_kept() -> Iterator[None]:
    """Ray's start and shutdown draw from Python's global ``random``; give the caller's state
    back. Not reseeded (as ``isolated_global_rngs`` would): Ray may use the draws for names
    that must differ between clusters."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)  # global-rng-ok: the caller's own state, restored


def _start_ray(ray: Any, address: str | None) -> bool:
    """Connect to ``address`` or start a local cluster; True when started here."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return False
    # Keeps every process of a local cluster on 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=cpu_count(), include_dashboard=False, log_to_driver=False)
    return True
