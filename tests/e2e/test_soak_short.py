"""A short soak (benchmarks/soak/): `multiplex serve` as a subprocess, 8 clients of two tenants for 20 s over 12
adapters churning through 4 device slots, replaces and delete/re-uploads every 3 s, the embedded Redis killed once.
Every answer is the expected text of a version its adapter had meanwhile, or an error documented for its own
adapter; none is lost; free KV blocks, pinned adapters and RSS are back at the end. (The 5-minute run:
`python -m benchmarks.soak --model tiny`.)"""
from __future__ import annotations

import pytest

from benchmarks.soak import SoakConfig, format_summary, run

pytestmark = pytest.mark.slow


def test_short_soak(tmp_path) -> None:
    cfg = SoakConfig(model="tiny", duration_s=20, num_clients=8, num_redis_kills=1)
    summary = run(cfg, tmp_path)
    report = format_summary(summary) + f"\nfirst bad requests: {summary['bad_requests'][:5]}"
    assert summary["num_requests"] > 50, report
    assert summary["num_mismatches"] == 0 and summary["num_lost"] == 0, report
    assert summary["by_verdict"].get("unexpected", 0) == 0, report
    assert summary["by_verdict"].get("ok", 0) > summary["num_requests"] // 2, report
    assert summary["admin_operations"].get("replace", 0) >= 1 and summary["admin_operations"].get("delete", 0) >= 1, \
        report
    assert not summary["admin_failures"], report
    [kill] = summary["redis_kills"]
    assert kill["recovery_s"] is not None and kill["new_redis_pid"] != kill["redis_pid"], report
    assert summary["free_kv_blocks"]["end"] == summary["free_kv_blocks"]["start"], report
    assert summary["pinned_adapters"]["end"] == summary["pinned_adapters"]["start"] == 0, report
    assert summary["rss_bytes"]["end"] <= summary["rss_bytes"]["limit"], report
    assert summary["passed"], report
