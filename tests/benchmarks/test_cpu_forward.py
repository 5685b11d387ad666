"""`python -m benchmarks.cpu_forward` runs end to end on a small prefill and decode and reports both ways."""
import json

import pytest

from benchmarks.cpu_forward import main
from kernels import cpu_attention, cpu_elementwise


@pytest.mark.skipif(not (cpu_elementwise.available() and cpu_attention.available()),
                    reason="needs an x86-64 CPU with AVX2 and FMA and a C compiler")
def test_cpu_forward_bench_reports_both_ways_per_step(tmp_path, smollm2_dir, monkeypatch):
    monkeypatch.setattr(cpu_elementwise, "_enabled", cpu_elementwise._enabled)  # restored after the bench flips it
    monkeypatch.setattr(cpu_attention, "_enabled", cpu_attention._enabled)
    out = tmp_path / "forward.json"
    main(["--model", str(smollm2_dir), "--requests", "2", "--prompt-len", "5", "--context", "7", "--rounds", "2",
          "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows] == ["prefill", "decode"]
    for r in rows:
        assert len(r["ours_ms"]) == len(r["torch_ms"]) == 2 and min(r["ours_ms"] + r["torch_ms"]) > 0
