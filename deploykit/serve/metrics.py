"""Prometheus metrics, in a registry of the app's own (two apps in one process never share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float], max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("deploykit_requests", "POST /generate requests by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("deploykit_request_latency_seconds",
                                 "POST /generate time from arrival to response, queueing included, by HTTP status",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("deploykit_queue_depth", "requests waiting for the model (not counting the batch "
                                 "being run)", registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_images = Histogram("deploykit_batch_images", "images per model batch", buckets=sizes,
                                      registry=self.registry)
        self.batch_requests = Histogram("deploykit_batch_requests", "requests merged into one model batch",
                                        buckets=sizes, registry=self.registry)
        self.batch_seconds = Histogram("deploykit_batch_seconds", "model time per batch (sampling loop and decode)",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_batch(self, requests: int, images: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.latency.labels(status=str(status)).observe(seconds)
