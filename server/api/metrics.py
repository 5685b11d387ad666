"""What the API layer counts itself, and the Prometheus text rendering of it together with the engine's stats.

The engine owns the scheduling numbers (queue depth, running batch, tokens/s, adapter cache); the API owns what only
it can see: requests admitted and answered, client disconnects, time to first token as the client experiences it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_PREFIX = "multiplex"
_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")


@dataclass
class ApiMetrics:
    """Mutated only from the event loop thread, so no lock."""

    num_in_flight: int = 0  # completions admitted and not yet answered (running or waiting in the engine)
    num_client_disconnects: int = 0  # requests aborted because the client went away
    responses_by_status: Counter = field(default_factory=Counter)
    ttft_seconds_sum: float = 0.0
    ttft_count: int = 0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_seconds_sum += seconds
        self.ttft_count += 1


def flatten_stats(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"adapter_cache": {"hits": 3}} -> {"adapter_cache_hits": 3.0}; non-numeric values are left out."""
    flat: dict[str, float] = {}
    for key, value in stats.items():
        name = _BAD_NAME_CHARS.sub("_", f"{prefix}{key}")
        if isinstance(value, dict):
            flat.update(flatten_stats(value, prefix=f"{name}_"))
        elif isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
    return flat


def _line(name: str, value: float, kind: str, labels: str = "") -> list[str]:
    return [f"# TYPE {name} {kind}", f"{name}{labels} {value:g}"]


def render_prometheus(engine_stats: dict[str, Any], api: ApiMetrics) -> str:
    lines: list[str] = []
    for key, value in sorted(flatten_stats(engine_stats).items()):
        # Engine stats are a snapshot; counters among them are exported as gauges, which Prometheus handles fine.
        lines += _line(f"{_PREFIX}_engine_{key}", value, "gauge")
    lines += _line(f"{_PREFIX}_api_requests_in_flight", api.num_in_flight, "gauge")
    lines += _line(f"{_PREFIX}_api_client_disconnects_total", api.num_client_disconnects, "counter")
    lines.append(f"# TYPE {_PREFIX}_api_responses_total counter")
    for status, count in sorted(api.responses_by_status.items()):
        lines.append(f'{_PREFIX}_api_responses_total{{status="{status}"}} {count}')
    lines.append(f"# TYPE {_PREFIX}_api_time_to_first_token_seconds summary")
    lines.append(f"{_PREFIX}_api_time_to_first_token_seconds_sum {api.ttft_seconds_sum:g}")
    lines.append(f"{_PREFIX}_api_time_to_first_token_seconds_count {api.ttft_count}")
    return "\n".join(lines) + "\n"
