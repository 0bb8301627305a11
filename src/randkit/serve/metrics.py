"""Prometheus metrics of one server (its own registry, so several servers in one process,
as in the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "randkit_requests",
            "Inference requests by model, version, protocol and HTTP status.",
            ["model", "version", "protocol", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "randkit_request_latency_seconds",
            "Time from a request's arrival to its response, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "randkit_queue_seconds",
            "Time a request waited for its batch to start.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "randkit_batch_rows",
            "Rows (inputs times Monte-Carlo samples) per forward batch.",
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "randkit_batch_requests",
            "Requests per forward batch.",
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "randkit_requests_in_flight", "Requests being handled.", registry=self.registry
        )

    def on_batch(self, rows: int, queued: list[float]) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(len(queued))
        for seconds in queued:
            self.queue_time.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
