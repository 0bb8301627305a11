"""Where trials run. Every runner executes the same trial function, so a trial gives the
same numbers whichever ran it (bitwise on the CPU at the same threads per trial)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from randkit.errors import UserError

Job = dict[str, Any]  # {"config": dict, "trial": dict, "out": str, "threads": int | None}
OnDone = Callable[[dict[str, Any]], None]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (macOS)
        return os.cpu_count() or 1


def run_processes(jobs: list[Job], on_done: OnDone, workers: int) -> None:
    """Local worker processes (spawned, so no forked OpenMP or CUDA state)."""
    from randkit.cv.trial import run_trial_job

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = {pool.submit(run_trial_job, **job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(future.result())


def run_ray(
    jobs: list[Job],
    on_done: OnDone,
    address: str | None,
    retries: int,
    cpus_per_trial: float,
    gpus_per_trial: float,
) -> None:
    """Trials as Ray tasks on an existing cluster (``address``) or a fresh local one; a task
    whose worker dies is retried up to ``retries`` times."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "cv.runner", "'ray' needs the ray extra: pip install 'randkit[ray]'"
        ) from None
    from randkit.cv.trial import run_trial_job

    started_here = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            # Keeps every process of a local cluster on 127.0.0.1.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(
                address="local", num_cpus=cpu_count(), include_dashboard=False, log_to_driver=False
            )
            started_here = True
    try:
        task = ray.remote(run_trial_job).options(
            num_cpus=cpus_per_trial,
            num_gpus=gpus_per_trial,
            max_retries=retries,
            retry_exceptions=False,
        )
        pending = [task.remote(**job) for job in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                on_done(ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()
