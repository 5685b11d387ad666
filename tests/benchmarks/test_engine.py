"""`python -m benchmarks.engine --mode decode-step` and `--mode host` run end to end on a CPU (decode-step: tiny shape,
static-buffer replays) and report every figure the README quotes from them."""
import json

import pytest

from benchmarks.engine import main


def test_decode_step_bench_reports_eager_graph_and_engine_step_per_adapter_count(tmp_path):
    out = tmp_path / "rows.json"
    main(["--mode", "decode-step", "--device", "cpu", "--shape", "tiny", "--batch", "3", "--context", "24",
          "--adapter-counts", "0", "1", "3", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["distinct_adapters"] for r in rows] == [0, 1, 3]
    for r in rows:
        assert r["device"] == "cpu" and r["graphs_enabled"] and r["batch"] == 3
        assert r["eager_ms"] > 0 and r["graph_replay_ms"] > 0 and r["engine_step_ms"] > 0
    assert rows[0]["eager_vs_base"] == 1.0 and rows[0]["bytes_floor_vs_base"] == 1.0
    assert 1.0 < rows[1]["bytes_floor_vs_base"] < rows[2]["bytes_floor_vs_base"]  # more distinct adapters, more bytes


@pytest.mark.parametrize("lookahead", [False, True])
def test_host_overhead_bench_reports_each_phase(tmp_path, lookahead):
    out = tmp_path / "host.json"
    main(["--mode", "host", "--batch", "4", "--gen-len", "3", "--prompt-len", "5", "--out", str(out)]
         + ["--lookahead"] * lookahead)
    (row,) = json.loads(out.read_text())
    assert row["requests"] == 4 and row["lookahead"] is lookahead
    assert row["lookahead_steps"] == (20 if lookahead else 0)  # every timed step is a decode step of all four
    for phase in ("schedule", "build", "build_graph_padded", "sample"):
        assert row[f"{phase}_ms"] > 0
    assert row["forward_ms"] > 0 and row["host_not_overlapped_ms"] >= 0
    assert row["step_ms"] == pytest.approx(row["forward_ms"] + row["host_not_overlapped_ms"], rel=1e-6)


def test_sampling_bench_compares_the_sampler_with_its_reference_on_real_logits(tmp_path, smollm2_dir):
    out = tmp_path / "sampling.json"
    main(["--mode", "sampling", "--batch", "3", "--host-model", str(smollm2_dir), "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["temperature"], r["top_p"]) for r in rows] == [(0.8, 0.9), (1.0, 0.95), (1.5, 0.95), (1.0, 1.0),
                                                              (0.0, 1.0)]
    assert all(r["same_tokens"] and r["sampler_ms"] > 0 and r["reference_ms"] > 0 and r["vocab"] == 49152 for r in rows)
