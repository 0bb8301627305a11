"""``randkit serve --workers N``: N server processes behind one port.

One process serves everything through one interpreter lock: HTTP parsing, the answers, the
inference's own Python and the ledger thread take turns, so a small model leaves cores idle.
With ``--workers N`` uvicorn's supervisor binds the port once and runs N worker processes
that share it (the kernel hands each connection to one of them; a worker that dies is
replaced). Each worker is a whole server: its own batchers and its own copy of the models.
What must not differ between them is shared through files:

* the experiment ledger (SQLite or PostgreSQL), as for replicas;
* the Prometheus metrics, in ``prometheus_client``'s multi-process mode (``/metrics`` of any
  worker reports the sum of all of them);
* the Triton statistics, each worker's counts in a JSON file that the others add to theirs;
* the gRPC port, bound by every worker (gRPC sets ``SO_REUSEPORT``), so each channel talks
  to one worker.

A worker claims a slot ``0 .. N-1`` by locking a file (a replacement takes the dead worker's
slot); request ``n`` of slot ``s`` is numbered ``s + N n``, so seeds and traffic draws, which
derive from the request number, never repeat between workers.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from randkit.serve.server import ServerSettings

RUN_DIR_ENV = "RANDKIT_SERVE_RUN_DIR"  # the supervisor's folder, inherited by its workers
SETTINGS_FILE = "settings.json"  # in the run folder (mode 0700: the token is in it)
METRICS_DIR = "metrics"


@dataclass(frozen=True)
class WorkerSlot:
    """Where a worker stands among its siblings."""

    index: int  # 0 .. count-1
    count: int
    run_dir: Path

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / METRICS_DIR

    def stats_file(self, index: int) -> Path:
        return self.run_dir / f"stats-{index}.json"


def serve_workers(settings: ServerSettings, log_level: str, access_log: bool, grace: int) -> None:
    """Run ``settings.workers`` worker processes under uvicorn's supervisor until a signal."""
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="randkit-serve-") as folder:
        run_dir = Path(folder)
        (run_dir / METRICS_DIR).mkdir()
        fields = dataclasses.asdict(settings) | {"repository": str(settings.repository)}
        with os.fdopen(os.open(run_dir / SETTINGS_FILE, os.O_CREAT | os.O_WRONLY, 0o600), "w") as f:
            json.dump(fields, f)  # the token is in it: readable by this user only
        os.environ[RUN_DIR_ENV] = str(run_dir)
        # Read by prometheus_client when a worker imports it: the metrics go to files there.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir / METRICS_DIR)
        uvicorn.run(
            "randkit.serve.workers:worker_app",
            factory=True,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            timeout_graceful_shutdown=grace,
            access_log=access_log,
        )


def worker_app() -> Any:
    """The app of one worker process (uvicorn's factory, called in each worker)."""
    from randkit.memory import keep_freed_memory
    from randkit.serve.app import create_app

    keep_freed_memory()
    run_dir = Path(os.environ[RUN_DIR_ENV])
    fields = json.loads((run_dir / SETTINGS_FILE).read_text())
    settings = ServerSettings(**(fields | {"repository": Path(fields["repository"])}))
    slot = claim_slot(run_dir, settings.workers)
    _set_threads(settings)
    return create_app(settings, slot)


_held_locks: list[int] = []  # the slot's lock file stays open (locked) for the process's life


def claim_slot(run_dir: Path, count: int) -> WorkerSlot:
    """The first free slot; its lock is released by the kernel when this process ends."""
    for index in range(count):
        fd = os.open(run_dir / f"slot-{index}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_locks.append(fd)
        _forget_dead_workers(run_dir / METRICS_DIR)
        return WorkerSlot(index, count, run_dir)
    raise RuntimeError(f"all {count} worker slots of {run_dir} are taken")


def _forget_dead_workers(metrics_dir: Path) -> None:
    """Drop the live gauges (requests in flight) of workers that died: the files of their
    counters and histograms stay, their counts still happened."""
    from prometheus_client import multiprocess

    for path in metrics_dir.glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if pid != os.getpid() and not _alive(pid):
            multiprocess.mark_process_dead(pid, str(metrics_dir))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_threads(settings: ServerSettings) -> None:
    """Torch's threads: ``--threads``, else the cores shared out between the workers (each
    taking them all would oversubscribe the machine)."""
    import torch

    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    torch.set_num_threads(settings.threads or max(1, cores // settings.workers))
