"""Prometheus metrics of one server (its own registry, so several servers in one process,
as in the tests, do not collide); with ``--workers``, of all the workers: each writes its
values to files in ``prometheus_client``'s multi-process folder and ``/metrics`` sums them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Why a request was refused, a fixed set (never a string from the request).
REFUSAL_REASONS = ("auth", "size", "parse", "validation", "not_found", "conflict", "timeout")


class ServerMetrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self._answered: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        self.requests = Counter(
            "randkit_requests",
            "Inference requests by model, version, protocol and HTTP status.",
            ["model", "version", "protocol", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "randkit_request_latency_seconds",
            "Time from a request's arrival to its response, by model and version.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "randkit_queue_seconds",
            "Time a request waited for its batch to start, by model and version.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "randkit_batch_rows",
            "Rows (inputs times Monte-Carlo samples) per forward batch.",
            ["model", "version"],
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "randkit_batch_requests",
            "Requests per forward batch.",
            ["model", "version"],
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "randkit_requests_in_flight",
            "Requests being handled.",
            registry=self.registry,
            multiprocess_mode="livesum",  # with --workers: the live workers' sum
        )
        self.refused = Counter(
            "randkit_refused_requests",
            "Requests refused, by reason (auth, size, parse, validation, not_found, conflict, "
            "timeout) and protocol (v2, tf, grpc, other).",
            ["reason", "protocol"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:  # every series from the start, so rates work at once
            for protocol in ("v2", "tf", "grpc", "other"):
                self.refused.labels(reason, protocol)
        # The process's CPU, memory, file descriptors and garbage collections, in this registry
        # (the default collectors live in the global one, which this server does not expose).
        # Not with --workers: they would describe whichever worker answers the scrape.
        if multiprocess_dir is None:
            self._process_collectors()

    def _process_collectors(self) -> None:
        if PROCESS_COLLECTOR is not None:
            ProcessCollector(registry=self.registry)
        if PLATFORM_COLLECTOR is not None:
            PlatformCollector(registry=self.registry)
        if GC_COLLECTOR is not None:
            GCCollector(registry=self.registry)

    def answered(
        self, model: str, version: str, protocol: str, status: int, seconds: float
    ) -> None:
        """Count an answered request and observe its latency (the label lookups are cached:
        this runs once per request)."""
        key = (model, version, protocol, status)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (
                self.requests.labels(model, version, protocol, str(status)),
                self.latency.labels(model, version),
            )
        children[0].inc()
        children[1].observe(seconds)

    def on_batch(self, model: str, version: str, rows: int, queued: list[float]) -> None:
        self.batch_rows.labels(model, version).observe(rows)
        self.batch_requests.labels(model, version).observe(len(queued))
        queue_time = self.queue_time.labels(model, version)
        for seconds in queued:
            queue_time.observe(seconds)

    def refuse(self, status: int, protocol: str, parse: bool = False) -> None:
        """Count a refused request under the reason its status (or ``parse``) gives."""
        reason = {
            401: "auth",
            403: "auth",
            404: "not_found",
            408: "timeout",
            409: "conflict",
            413: "size",
        }.get(status, "parse" if parse else "validation")
        self.refused.labels(reason, protocol).inc()

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker, str(self.multiprocess_dir))
        return generate_latest(every_worker)
