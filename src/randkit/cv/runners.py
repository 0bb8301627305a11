"""Where trials run, behind one interface: ``make_runner(context).run(trials, on_done)``.

Every runner executes the same trial, so a trial gives the same numbers whichever ran it
(bitwise on the CPU at the same threads per trial for sequential, processes and Ray; the
vectorized runner within float tolerance, with the same data order, augmentation and init).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random  # global-rng-ok: only to give back the state Ray draws from
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from randkit.config import CVConfig, ExperimentConfig
from randkit.cv.objects import UserObjects
from randkit.cv.plan import Trial
from randkit.cv.progress import EpochHook, drain
from randkit.data import LabeledData
from randkit.data.dataset import DatasetData
from randkit.errors import RunFailure
from randkit.extras import require
from randkit.streams import Streams

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

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
    threads: int | None = None  # per trial, as recorded in the run's plan.json
    quiet: bool = False
    on_epoch: EpochHook | None = None  # the progress bar's; None when quiet
    plan_trials: list[Trial] | None = None  # every trial of the plan, finished or not

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


def default_threads(cv: CVConfig, n_trials: int) -> int:
    """Threads per trial for a new run of ``n_trials`` trials: ``cv.threads_per_trial``, else
    cores / workers for ``processes``, 1 for ``ray``, torch's current count in-process. The
    run records it, so a resume (of any number of trials, by any runner) uses the same."""
    if cv.threads_per_trial:
        return cv.threads_per_trial
    if cv.runner == "processes":
        return max(1, cpu_count() // min(cv.workers or cpu_count(), n_trials))
    return 1 if cv.runner == "ray" else torch.get_num_threads()


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
            if ctx.threads:
                torch.set_num_threads(ctx.threads)
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
        from randkit.cv.trial import run_trial_job

        cv = self.context.cfg.cv
        workers = min(cv.workers or cpu_count(), len(trials))
        jobs = [self.context.job(t, self.context.threads) for t in trials]
        spawn = multiprocessing.get_context("spawn")
        on_epoch = self.context.on_epoch
        # Workers put their epochs here; a queue reaches a worker only at its start.
        channel = spawn.Queue() if on_epoch is not None else None
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=spawn,
            initializer=_worker_start,  # the user's objects, once per worker
            initargs=(os.getpid(), *self.context.shared(), channel),
        ) as pool:
            pending = {pool.submit(run_trial_job, **job) for job in jobs}
            while pending:
                timeout = _POLL_S if channel is not None else None
                done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                drain(channel, on_epoch)
                for future in done:
                    on_done(_result(future))


def _worker_start(parent: int, *objects: Any) -> None:
    """A worker's initializer: die with the driver, then take the run's objects. A SIGKILLed
    `randkit cv` must not leave workers behind it, training and writing trial files while a
    resume trains the same trials."""
    from randkit.cv.trial import set_worker_objects

    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the driver died before prctl took effect
            os._exit(1)
    set_worker_objects(*objects)


def _result(future: Future[dict[str, Any]]) -> dict[str, Any]:
    try:
        return future.result()
    except BrokenProcessPool:  # a worker was killed (SIGKILL, the OOM killer): one line
        raise RunFailure(
            "cv.runner 'processes': a worker process died; the finished trials are saved, "
            "run the same command again to train the missing ones"
        ) from None


class RayRunner:
    """Trials as Ray tasks on an existing cluster (``cv.address``) or a fresh local one; a
    task whose worker dies is retried up to ``cv.retries`` times."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def run(self, trials: list[Trial], on_done: OnDone) -> None:
        require("ray", "cv.runner 'ray'")
        if not self.context.cfg.cv.address:
            # Read once, when Ray is imported: without it a local cluster binds to this
            # machine's network address instead of 127.0.0.1.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        from randkit.cv.trial import run_trial_job

        cfg = self.context.cfg
        threads = self.context.threads or 1
        gpus = 0.0
        if torch.cuda.is_available() and cfg.train.device != "cpu":
            gpus = 1.0 / max(1, min(len(trials), cfg.cv.workers or 4))  # fractional GPUs
        with _python_random_kept():
            started_here = _start_ray(ray, cfg.cv.address, self.context.quiet)
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


def _probe(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on: Ray would retry it for minutes, printing a
    line every few seconds."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://..." and the like: Ray's own check is quick
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RunFailure(
            f"cv.runner 'ray': could not reach the Ray cluster at {address!r}: {reason}"
        ) from None


def _start_ray(ray: Any, address: str | None, quiet: bool) -> bool:
    """Connect to ``address`` or start a local cluster; True when started here. A start that
    fails is one line (RunFailure), not Ray's traceback."""
    if ray.is_initialized():
        return False
    # Ray's own INFO lines ("Started a local Ray instance") are noise in randkit's output.
    options = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR if quiet else logging.WARNING,
    }
    if not address:
        options["num_cpus"] = cpu_count()
    try:
        if address:
            _probe(address)
        ray.init(address=address or "local", **options)
    except RunFailure:
        raise
    except Exception as exc:  # any start-up failure: ConnectionError, RuntimeError, ...
        what = f"connect to the Ray cluster at {address!r}" if address else "start Ray locally"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFailure(f"cv.runner 'ray': could not {what}: {reason}") from None
    return not address
