"""`python -m server.bench --mode decode-step` runs end to end (on a CPU: tiny shape, static-buffer replays) and
reports every figure the README quotes from it on a GPU."""
import json

from server.bench import main


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
