"""`python -m benchmarks.peers` end to end on the tiny model: our server as a subprocess over real HTTP and
transformers/PEFT in-process, one short round each, in bf16; vLLM (not installed in this environment) is skipped, saying so."""
import json
import re

from benchmarks.peers import main


def test_peers_benchmark_prints_a_table_with_numbers_and_skips_vllm(tmp_path, capsys):
    out = tmp_path / "peers.json"
    rc = main(["--model", "tiny", "--data-dir", str(tmp_path / "data"), "--requests", "2", "--max-tokens", "4",
               "--prompt-len", "16", "--num-adapters", "2", "--warmup", "1", "--rounds", "1", "--dtype", "bfloat16",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed

    assert "| system | base model tok/s | 2 adapters mixed tok/s |" in printed
    number = r"\d+\.\d"
    assert re.search(rf"^\| multiplex .*\(HTTP, 2 concurrent requests\) \| {number} \| {number} \|$", printed, re.M)
    assert re.search(rf"^\| transformers .* PEFT .* \| {number} \| {number} \|$", printed, re.M)
    assert re.search(r"^\| vLLM .* \| not run: no --vllm-python", printed, re.M)
    assert re.search(r"^\| ours / transformers \| \d+\.\d\dx \| \d+\.\d\dx \|$", printed, re.M)
    for line in ("date: ", "machine: ", "load average (1/5/15 min): before ", "command: python -m benchmarks.peers ",
                 "code: "):
        assert line in printed

    report = json.loads(out.read_text())
    ours, peft, vllm = report["rows"]
    assert [r["peer"] for r in report["rows"]] == ["multiplex", "transformers", "vllm"]
    for row in (ours, peft):
        assert len(row["base_s"]) == len(row["mixed_s"]) == 1
        assert row["base_tok_s"] > 0 and row["mixed_tok_s"] > 0
    assert "server serve" in ours["command"] and "skipped" in vllm
    assert "--dtype bfloat16" in ours["command"] and ", bfloat16 on the CPU;" in printed  # every system in bf16
