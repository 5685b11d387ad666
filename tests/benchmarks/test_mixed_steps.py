"""`python -m benchmarks.mixed_steps` runs end to end on a small model and reports both kinds of step both ways, with
the adapters' factors in fp32 and in bf16."""
import json

from benchmarks.mixed_steps import main
from tests.helpers import make_hf_model


def test_mixed_steps_reports_prefill_and_decode_for_base_and_mixed(tmp_path):
    path = make_hf_model(tmp_path / "m", "llama")
    reports = {}
    for lora in ("float32", "bfloat16"):
        out = tmp_path / f"steps-{lora}.json"
        main(["--model", str(path), "--requests", "3", "--prompt-len", "5", "--max-tokens", "3", "--num-adapters",
              "2", "--rank", "4", "--rounds", "2", "--lora-dtype", lora, "--out", str(out)])
        report = reports[lora] = json.loads(out.read_text())
        for kind in ("base", "mixed"):
            assert len(report["rounds"][kind]) == 2
            assert all(r["prefill_ms"] > 0 and r["decode_ms"] > 0 for r in report["rounds"][kind])
    fp32, bf16 = reports["float32"]["bytes"], reports["bfloat16"]["bytes"]
    assert fp32["adapters_mb"] == 2 * bf16["adapters_mb"] > 0
    assert 0 < fp32["equal_speed_decode_ratio"] < bf16["equal_speed_decode_ratio"] < 1
