"""/metrics in the Prometheus text format, by `prometheus_client`: what the API measures itself (requests in
flight, responses by status, client disconnects, time to first token and per output token as the client sees
them), the engine's histograms (queue time, adapter load time: server/engine/metrics.py), and a snapshot of the
engine's stats at scrape time (queue depth, free KV blocks, tokens generated, adapter cache, ...), the cumulative
ones typed as counters.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "multiplex"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# engine stats that only grow: exported as counters (`<name>_total`), the others as gauges
ENGINE_COUNTERS = frozenset({
    "num_generated_tokens", "num_steps", "num_preemptions", "adapter_cache_hits", "adapter_cache_misses",
    "adapter_cache_evictions", "adapter_cache_loads", "adapter_cache_load_seconds", "cuda_graphs_captures",
    "cuda_graphs_replays",
})
_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")
disable_created_metrics()  # no `*_created` timestamp series beside every counter and histogram


class ApiMetrics:
    """The API's own metrics, in a registry of this app's (so that several apps in one process keep apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.in_flight = Gauge(f"{PREFIX}_api_requests_in_flight",
                               "completions admitted and not yet answered (running or waiting)", registry=registry)
        self.client_disconnects = Counter(f"{PREFIX}_api_client_disconnects",
                                          "requests aborted because the client went away", registry=registry)
        self.responses = Counter(f"{PREFIX}_api_responses", "HTTP responses by status", ["status"],
                                 registry=registry)
        self.ttft = Histogram(f"{PREFIX}_api_time_to_first_token_seconds",
                              "from the request's arrival to its first token", buckets=LATENCY_BUCKETS,
                              registry=registry)
        self.tpot = Histogram(f"{PREFIX}_api_time_per_output_token_seconds",
                              "after the first token, the mean time between a request's tokens",
                              buckets=PER_TOKEN_BUCKETS, registry=registry)

    def add_engine(self, stats: Callable[[], dict[str, Any]], registry: CollectorRegistry | None) -> None:
        """Export the engine's stats snapshot and its histograms with the API's metrics."""
        self.registry.register(_EngineStats(stats))
        if registry is not None:
            self.registry.register(registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineStats:
    """A collector reading the engine's stats dict at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def describe(self) -> list:
        return []  # names depend on the engine; nothing to check them against at registration

    def collect(self):
        for name, value in sorted(flatten_stats(self.stats()).items()):
            family = CounterMetricFamily if name in ENGINE_COUNTERS else GaugeMetricFamily
            yield family(f"{PREFIX}_engine_{name}", f"engine stat {name}", value=value)


def flatten_stats(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"adapter_cache": {"hits": 3}} -> {"adapter_cache_hits": 3.0}; non-numeric values are left out."""
    flat: dict[str, float] = {}
    for key, value in stats.items():
        name = _BAD_NAME_CHARS.sub("_", f"{prefix}{key}")
        if isinstance(value, dict):
            flat.update(flatten_stats(value, prefix=f"{name}_"))
        elif isinstance(value, (bool, int, float)):
            flat[name] = float(value)
    return flat
