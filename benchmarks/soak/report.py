"""Each request's verdict (see benchmarks/soak/__init__.py), and the run's summary."""
from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import asdict
from typing import Any

from benchmarks.soak.config import ABSENT, RSS_SLACK_BYTES, Adapter, Change, Outcome, SoakConfig
from benchmarks.soak.traffic import AdminLog


# ---- verdicts ---------------------------------------------------------------------------------------------------

def possible_states(changes: list[Change], sent: float, done: float) -> set[int]:
    """The states an adapter may have had at some moment of [sent, done] (its changes are sequential)."""
    states = {changes[0].new}  # the initial upload, before traffic
    for change in changes[1:]:
        if change.done <= sent:
            states = {change.new}  # settled before the request was sent
        elif change.sent <= done:
            states |= {change.old, change.new}
    return states


def verdict(outcome: Outcome, admin: AdminLog, texts: dict, adapters: dict[str, Adapter],
            outages: list[tuple[float, float]]) -> str:
    if outcome.status is None:
        return "lost"
    redis_down = any(start <= outcome.done and outcome.sent <= end for start, end in outages)
    if outcome.adapter_id is None:
        states = {0}
    elif adapters[outcome.adapter_id].tenant not in (None, outcome.tenant):
        if outcome.status == 404 and outcome.error_type == "adapter_not_found":
            return "other_tenant"
        return "redis_down" if outcome.status == 503 and redis_down else "unexpected"
    else:
        states = possible_states(admin.changes[outcome.adapter_id], outcome.sent, outcome.done)
    if outcome.status == 200 and outcome.error_type is None:
        expected = {texts[outcome.adapter_id, s][outcome.prompt] for s in states if s != ABSENT}
        return "ok" if outcome.text in expected else "mismatch"
    if outcome.status == 404 and outcome.error_type == "adapter_not_found" and ABSENT in states:
        return "gone"
    if outcome.status == 503 and redis_down:
        return "redis_down"
    return "unexpected"


def summarize(cfg: SoakConfig, command: list[str], outcomes: list[Outcome], verdicts: list[str], admin: AdminLog,
              start_stats: dict, end_stats: dict, start_rss: int, end_rss: int, traffic_s: float,
              rss_samples: list[tuple[float, int]]) -> dict[str, Any]:
    counts = Counter(verdicts)
    bad = [asdict(o) | {"verdict": v} for o, v in zip(outcomes, verdicts) if v in ("mismatch", "unexpected", "lost")]
    max_rss = start_rss * (1 + cfg.max_rss_growth) + RSS_SLACK_BYTES
    checks = {
        "no_mismatch": counts["mismatch"] == 0,
        "no_unexpected": counts["unexpected"] == 0,
        "no_lost": counts["lost"] == 0,
        "admin_operations_succeeded": not admin.failures,
        "redis_recovered": len(admin.kills) == cfg.num_redis_kills and all(k["recovery_s"] is not None
                                                                             for k in admin.kills),
        "kv_blocks_back": end_stats["num_free_kv_blocks"] == start_stats["num_free_kv_blocks"],
        "pinned_back": end_stats["num_pinned_adapters"] == start_stats["num_pinned_adapters"],
        "idle_at_end": not (end_stats["num_running"] or end_stats["num_waiting"] or end_stats["num_streams"]),
        "rss_back": end_rss <= max_rss,
    }
    return {
        "config": asdict(cfg), "command": " ".join(command),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "traffic_s": round(traffic_s, 1), "num_requests": len(outcomes), "by_verdict": dict(sorted(counts.items())),
        "by_status": dict(sorted(Counter(str(o.status) for o in outcomes).items())),
        "num_mismatches": counts["mismatch"], "num_lost": counts["lost"],
        "rss_bytes": {"start": start_rss, "end": end_rss, "limit": int(max_rss),
                      "max_during": max((rss for _, rss in rss_samples), default=start_rss)},
        "rss_samples": rss_samples,  # (seconds into the traffic, bytes)
        "free_kv_blocks": {"start": start_stats["num_free_kv_blocks"], "end": end_stats["num_free_kv_blocks"]},
        "pinned_adapters": {"start": start_stats["num_pinned_adapters"], "end": end_stats["num_pinned_adapters"]},
        "resident_adapters_end": end_stats["num_resident_adapters"],
        "admin_operations": dict(admin.operations), "admin_failures": admin.failures,
        "redis_kills": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in kill.items() if k != "at_s"
                         and k != "recovered_at_s"} for kill in admin.kills],
        "adapter_cache_end": end_stats.get("adapter_cache", {}),
        "checks": checks, "passed": all(checks.values()), "bad_requests": bad[:50],
    }


def format_summary(summary: dict[str, Any]) -> str:
    mb = 1 << 20
    rss, kv, pins = summary["rss_bytes"], summary["free_kv_blocks"], summary["pinned_adapters"]
    lines = [
        f"soak {summary['date']}: {summary['traffic_s']} s of traffic, {summary['config']['num_clients']} clients, "
        f"{summary['config']['num_adapters']} adapters over {summary['config']['max_adapter_slots']} slots",
        f"requests        {summary['num_requests']}  by verdict {summary['by_verdict']}",
        f"by status       {summary['by_status']}",
        f"mismatches      {summary['num_mismatches']}   lost {summary['num_lost']}",
        f"RSS             start {rss['start'] / mb:.1f} MiB, end {rss['end'] / mb:.1f} MiB "
        f"(limit {rss['limit'] / mb:.1f} MiB; at most {rss['max_during'] / mb:.1f} MiB during the traffic)",
        f"free KV blocks  start {kv['start']}, end {kv['end']}",
        f"pinned adapters start {pins['start']}, end {pins['end']}",
        f"admin           {summary['admin_operations']}, failures {len(summary['admin_failures'])}",
    ]
    for i, kill in enumerate(summary["redis_kills"], 1):
        recovery = f"{kill['recovery_s']:.2f} s" if kill["recovery_s"] is not None else "NOT RECOVERED"
        lines.append(f"redis kill {i}    pid {kill['redis_pid']} -> {kill['new_redis_pid']}, recovered in {recovery}"
                     f" (/health saw the outage: {kill['health_saw_outage']})")
    failed = [name for name, ok in summary["checks"].items() if not ok]
    lines.append("PASSED" if summary["passed"] else f"FAILED: {', '.join(failed)}")
    return "\n".join(lines)
