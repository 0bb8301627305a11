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

With ``--workers``, each worker writes its counts to a JSON file every ``SHARE_EVERY_S``
(``share``) and reports its own plus its siblings' last files: the others' part of a report
is at most that old. A replacement worker starts from its dead predecessor's file.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from randkit.serve.repository import Repository
    from randkit.serve.workers import WorkerSlot

SHARE_EVERY_S = 0.25

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

    def counts(self) -> dict[str, Any]:
        """Every field as JSON values (durations as ``[count, ns]``)."""
        return {
            f.name: [v.count, v.ns] if isinstance(v := getattr(self, f.name), Duration) else v
            for f in fields(self)
        }

    def add(self, counts: dict[str, Any]) -> None:
        """Add another worker's ``counts()``."""
        for name, value in counts.items():
            mine = getattr(self, name, None)
            if isinstance(mine, Duration):
                mine.count, mine.ns = mine.count + int(value[0]), mine.ns + int(value[1])
            elif name == "last_inference_ms":
                self.last_inference_ms = max(self.last_inference_ms, int(value))
            elif isinstance(mine, int):
                setattr(self, name, mine + int(value))

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

    def __init__(self, slot: WorkerSlot | None = None) -> None:
        self._stats: dict[tuple[str, str], VersionStats] = {}
        self._lock = threading.Lock()
        self._changes, self._shared = 0, 0  # updates made, and made when last shared
        self.slot = slot
        if slot is not None:  # a replacement worker goes on from its predecessor's counts
            for entry in _read_counts(slot.stats_file(slot.index)):
                self._of(entry["model"], entry["version"]).add(entry["counts"])

    def _of(self, model: str, version: str) -> VersionStats:
        self._changes += 1
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
        merged = {v: VersionStats() for v in versions}
        with self._lock:
            for version, stats in merged.items():
                if (mine := self._stats.get((model, version))) is not None:
                    stats.add(mine.counts())
        for entry in self._siblings_counts():
            if entry["model"] == model and entry["version"] in merged:
                merged[entry["version"]].add(entry["counts"])
        return {"model_stats": [merged[v].as_dict(model, v) for v in versions]}

    def share(self) -> None:
        """Write this worker's counts for its siblings (atomically: a reader never sees half
        a file)."""
        if self.slot is None or self._shared == self._changes:
            return
        with self._lock:
            self._shared = self._changes
            entries = [
                {"model": model, "version": version, "counts": stats.counts()}
                for (model, version), stats in self._stats.items()
            ]
        path = self.slot.stats_file(self.slot.index)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(entries))
        os.replace(partial, path)

    async def share_forever(self) -> None:
        """``share`` every ``SHARE_EVERY_S`` (a task of a worker's server)."""
        while True:
            await asyncio.sleep(SHARE_EVERY_S)
            self.share()

    def _siblings_counts(self) -> list[dict[str, Any]]:
        slot = self.slot
        if slot is None:
            return []
        others = (slot.stats_file(i) for i in range(slot.count) if i != slot.index)
        return [entry for path in others for entry in _read_counts(path)]


def _read_counts(path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(path.read_text()))
    except FileNotFoundError:  # that worker has not answered yet
        return []


def stats_of(
    collector: StatsCollector, repository: Repository, name: str, version: str | None
) -> dict[str, Any]:
    """The statistics of model ``name``: the named version (a number or a label), else every
    loaded version."""
    model = repository.model(name)
    if version:
        return collector.report(model.name, [repository.version(model, version).version])
    return collector.report(model.name, sorted(model.versions))
