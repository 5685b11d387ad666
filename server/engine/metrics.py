"""What the engine measures as distributions (Prometheus histograms): how long requests wait before their first
step, and how long adapters take to load onto the device. Snapshot numbers (queue depth, free KV blocks, tokens
generated, ...) stay in `LLMEngine.stats()`; /metrics exports both (server/api/metrics.py).

prometheus_client's metrics are thread-safe: the engine thread observes, the API's event loop renders.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue_time = Histogram(
            "multiplex_engine_queue_time_seconds", "from a request's arrival to its first scheduled step",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.adapter_load_time = Histogram(
            "multiplex_engine_adapter_load_seconds", "copying an adapter into a device slot (evictions included)",
            buckets=LATENCY_BUCKETS, registry=self.registry)
