"""The load generator: its workload (seeded, Poisson, Zipf, length distributions) and statistics on their own, then
short bounded runs against the real server that finish by themselves with zero errors and the documented JSON."""
from __future__ import annotations

import json
import random
import re
import statistics
import time
from pathlib import Path

import pytest

from clients import Client, loadgen
from clients.cli import main as cli_main
from clients.workload import Distribution, Workload, popularity_weights


def documented_fields(section: str) -> set[str]:
    """Field names listed in the loadgen module docstring under `section` (the JSON layout)."""
    doc = loadgen.__doc__ or ""
    layout = doc[doc.index("The JSON written by `--out`:"):]
    if section == "top":
        return set(re.findall(r"^    (\w+)\s", layout, re.MULTILINE))
    names: set[str] = set()
    for line in re.findall(r"^      (\w[\w, ]*?)\s{2,}", layout, re.MULTILINE):
        names |= {name.strip() for name in line.split(",")}
    return names


# --- workload and statistics, no server ----------------------------------------------------------------------------

def test_distributions() -> None:
    rng = random.Random(0)
    assert Distribution.parse("32").sample(rng) == 32
    uniform = [Distribution.parse("uniform:16:64").sample(rng) for _ in range(2000)]
    assert min(uniform) == 16 and max(uniform) == 64
    assert abs(statistics.mean(Distribution.parse("exp:50").sample(rng) for _ in range(4000)) - 50) < 5
    assert all(Distribution.parse("normal:3:10").sample(rng) >= 1 for _ in range(500))
    assert str(Distribution.parse("uniform:16:64")) == "uniform:16:64" and str(Distribution.parse("8")) == "8"
    for bad in ("0", "uniform:64:16", "uniform:5", "gauss:3:1", "x", "exp:0"):
        with pytest.raises(ValueError, match="distribution"):
            Distribution.parse(bad)


def test_popularity() -> None:
    assert popularity_weights(4, "uniform", 1.0) == [0.25] * 4
    zipf = popularity_weights(3, "zipf", 1.0)
    assert zipf == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    with pytest.raises(ValueError):
        popularity_weights(3, "pareto", 1.0)


def test_plan_is_seeded_poisson_and_bounded() -> None:
    workload = Workload(50.0, ("a", "b", "c"), "zipf", 1.2, 0.2, Distribution.parse("uniform:2:6"),
                        Distribution.parse("8"), seed=3)
    plan = workload.plan(num_requests=4000, duration_s=1e9)
    assert plan == workload.plan(num_requests=4000, duration_s=1e9)  # replayable
    assert len(plan) == 4000 and [p.index for p in plan] == list(range(4000))
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(plan, plan[1:])]
    assert all(g >= 0 for g in gaps) and statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.1)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.15)  # exponential: std = mean
    counts = {name: sum(p.adapter_id == name for p in plan) for name in ("a", "b", "c", None)}
    assert counts[None] / 4000 == pytest.approx(0.2, abs=0.03)
    assert counts["a"] > counts["b"] > counts["c"] > 0
    assert all(2 <= p.prompt_words <= 6 and len(p.prompt.split()) == p.prompt_words for p in plan)
    assert max(p.arrival_s for p in workload.plan(10_000, duration_s=2.0)) <= 2.0
    with pytest.raises(ValueError, match="no adapters"):
        Workload(1.0, (), "zipf", 1.0, 0.0, Distribution.parse("1"), Distribution.parse("1"), 0).plan(1, 1.0)


def test_percentiles_and_summary() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 50) == pytest.approx(50.5)
    assert loadgen.percentile(values, 99) == pytest.approx(99.01)
    assert loadgen.percentile([3.0], 90) == 3.0
    summary = loadgen.summarize([3.0, 1.0, 2.0])
    assert summary == {"mean": 2.0, "p50": 2.0, "p90": pytest.approx(2.8), "p99": pytest.approx(2.98), "max": 3.0,
                       "count": 3}
    assert loadgen.summarize([])["p50"] is None


# --- against the live server ---------------------------------------------------------------------------------------

def check_run(run: dict, num_requests: int) -> None:
    assert set(run) == documented_fields("runs"), set(run) ^ documented_fields("runs")
    assert run["num_requests"] == run["num_completed"] == num_requests, run
    assert run["num_errors"] == 0 and run["errors"] == {}, run["errors"]
    assert sum(run["requests_by_adapter"].values()) == num_requests
    assert run["duration_s"] > 0 and run["request_throughput"] > 0 and run["output_token_throughput"] > 0
    assert run["total_output_tokens"] > 0 and run["total_prompt_tokens"] > 0
    for key in ("ttft_s", "tpot_s", "latency_s"):
        stats = run[key]
        assert stats["count"] > 0, key
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"], (key, stats)
    assert run["ttft_s"]["p50"] <= run["latency_s"]["p50"]


def test_bounded_run_two_adapters_and_base(server_url: str, tmp_path: Path) -> None:
    with Client(server_url) as client:
        adapters = [m.id for m in client.models() if m.is_adapter][:2]
    assert len(adapters) == 2, "the live server (tests/clients/conftest.py) seeds at least 2 adapters"
    out = tmp_path / "results.json"
    started = time.monotonic()
    code = loadgen.main(["--url", server_url, "--rate", "20", "--num-requests", "20", "--duration", "30",
                         "--adapters", ",".join(adapters), "--base-fraction", "0.3", "--prompt-len", "uniform:4:12",
                         "--max-tokens", "uniform:4:12", "--temperature", "0", "--seed", "1", "--out", str(out)])
    assert code == 0 and time.monotonic() - started < 60
    result = json.loads(out.read_text())
    assert set(result) == documented_fields("top") == {"version", "config", "runs"}
    assert result["version"] == 1 and result["config"]["adapter_ids"] == adapters
    assert len(result["runs"]) == 1 and result["runs"][0]["rate"] == 20
    check_run(result["runs"][0], 20)
    assert set(result["runs"][0]["requests_by_adapter"]) <= {*adapters, loadgen.BASE}
    assert result["runs"][0]["total_output_tokens"] <= 20 * 12


def test_sweep_through_the_cli(server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep.json"
    code = cli_main(["loadgen", "--url", server_url, "--rate", "10,20", "--num-requests", "6", "--duration", "10",
                     "--base-fraction", "1", "--prompt-len", "4", "--max-tokens", "4", "--out", str(out)])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["rate"] for r in runs] == [10, 20]
    for run in runs:
        check_run(run, 6)
        assert run["total_output_tokens"] == 6 * 4 and run["requests_by_adapter"] == {loadgen.BASE: 6}
    printed = capsys.readouterr()
    assert "TTFT" in printed.out and "6/6 completed" in printed.out
    png = out.with_suffix(".png")
    assert png.exists() or "matplotlib is not installed" in printed.err


def test_errors_are_counted_by_type(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    code = loadgen.main(["--url", server_url, "--rate", "50", "--num-requests", "4", "--adapters", "no-such-adapter",
                         "--max-tokens", "2", "--prompt-len", "2", "--out", str(out)])
    assert code == 1  # every request failed: the run measured nothing, and the exit code says so
    run = json.loads(out.read_text())["runs"][0]
    assert run["num_errors"] == 4 and run["num_completed"] == 0 and sum(run["errors"].values()) == 4
    assert run["latency_s"]["count"] == 0 and run["latency_s"]["p50"] is None and run["request_throughput"] == 0
