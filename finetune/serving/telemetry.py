"""The server's Prometheus metrics (``GET /metrics``): requests and errors by route, latency, batch sizes."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Telemetry:
    """One server's metrics, in a registry of its own (two apps in one process do not share counts)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "finetune_requests",
            "Requests answered, by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.errors = Counter(
            "finetune_request_errors",
            "Requests answered with an error (4xx or 5xx), by route.",
            ["route"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "finetune_request_seconds",
            "Time from request to answer, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "finetune_batch_size",
            "Images in each call of the model (dynamic batching merges requests).",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter("finetune_images", "Images the model predicted.", registry=self.registry)
        frozen = Gauge(
            "finetune_gc_frozen_objects", "Objects moved out of the garbage collector's sight at start-up.",
            registry=self.registry,
        )  # fmt: skip
        frozen.set_function(gc.get_freeze_count)

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route).inc()

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)
        self.images.inc(size)

    def text(self) -> bytes:
        return generate_latest(self.registry)
