"""Per model version inference statistics in Triton's shapes (``GET .../stats`` and gRPC
``ModelStatistics``), which Triton's ``perf_analyzer`` reads to split a request's latency
into queue and compute time.

Counts follow Triton's definitions: ``inference_count`` is inputs answered (batch elements),
``execution_count`` is forward batches run; ``success`` and ``fail`` time whole requests
(from routing to the answer). Of a request that came back from its batch: ``compute_input``
is routing, reading and checking its input and options; ``queue`` its wait for the batch to
start (the batcher's hook); ``compute_infer`` the rest of its time in the batcher (a batch's
forward pass counts once for each request in it, as in Triton); ``compute_output`` turning
the result into output arrays. perf_analyzer insists the three compute counts are equal.
``batch_stats`` stays empty: the batcher does not time batches per size.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from randkit.serve.repository import Repository

DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class RequestTimes:
    """What the server learns about one request on its way: the version that took it and
    when it reached the batcher (``perf_counter_ns``)."""

    started_ns: int = field(default_factory=time.perf_counter_ns)
    version: str | None = None
    submitted_ns: int | None = None  # handed to the batcher
    answered_ns: int | None = None  # back from it


@dataclass
class VersionStats:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    batched: Duration = field(default_factory=Duration)  # queue + compute_infer
    compute_output: Duration = field(default_factory=Duration)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        durations = {name: Duration() for name in DURATIONS}
        durations.update(
            success=self.success,
            fail=self.fail,
            queue=self.queue,
            compute_input=self.compute_input,
            compute_output=self.compute_output,
        )
        durations["compute_infer"] = Duration(
            self.batched.count, max(0, self.batched.ns - self.queue.ns)
        )
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: d.as_dict() for k, d in durations.items()},
            "batch_stats": [],
        }


class StatsCollector:
    """Counters per (model, version), fed by the server (requests) and the batchers
    (batches); both run on the event loop, the lock guards reads from other threads."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], VersionStats] = {}
        self._lock = threading.Lock()

    def _of(self, model: str, version: str) -> VersionStats:
        return self._stats.setdefault((model, version), VersionStats())

    def _finish(self, stats: VersionStats, times: RequestTimes, now: int) -> int:
        if times.submitted_ns is not None and times.answered_ns is not None:
            stats.compute_input.add(times.submitted_ns - times.started_ns)
            stats.batched.add(times.answered_ns - times.submitted_ns)
            stats.compute_output.add(now - times.answered_ns)
        return now - times.started_ns

    def success(self, model: str, version: str, inputs: int, times: RequestTimes) -> None:
        """A request answered ``inputs`` inputs."""
        now = time.perf_counter_ns()
        with self._lock:
            stats = self._of(model, version)
            stats.success.add(self._finish(stats, times, now))
            stats.inference_count += inputs
            stats.last_inference_ms = time.time_ns() // 1_000_000

    def failure(self, model: str, times: RequestTimes) -> None:
        """A request refused or failed after routing (before, it has no version)."""
        if times.version is None:
            return
        now = time.perf_counter_ns()
        with self._lock:
            stats = self._of(model, times.version)
            stats.fail.add(self._finish(stats, times, now))

    def batch(self, model: str, version: str, queued_s: list[float]) -> None:
        """A forward batch started for requests that waited ``queued_s`` seconds."""
        with self._lock:
            stats = self._of(model, version)
            stats.execution_count += 1
            for seconds in queued_s:
                stats.queue.add(int(seconds * 1e9))

    def report(self, model: str, versions: list[str]) -> dict[str, Any]:
        """Triton's ``{"model_stats": [...]}`` for these versions of ``model`` (zeros for a
        version that has not answered yet)."""
        with self._lock:
            return {
                "model_stats": [
                    self._stats.get((model, v), VersionStats()).as_dict(model, v) for v in versions
                ]
            }


def stats_of(
    collector: StatsCollector, repository: Repository, name: str, version: str | None
) -> dict[str, Any]:
    """The statistics of model ``name``: the named version (a number or a label), else every
    loaded version."""
    model = repository.model(name)
    if version:
        return collector.report(model.name, [repository.version(model, version).version])
    return collector.report(model.name, sorted(model.versions))
