"""`python -m benchmarks.tenant_flood` runs end to end (a real `multiplex serve`, two tenants' keys, HTTP streams)."""
import json

from benchmarks.tenant_flood import main


def test_tenant_flood_reports_the_calm_tenants_latency_and_every_answer(tmp_path):
    out = tmp_path / "flood.json"
    main(["--flood", "6", "--flood-tokens", "8", "--calm", "2", "--calm-tokens", "4", "--max-num-seqs", "2",
          "--delay", "0.2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["calm_statuses"] == {"200": 2} and report["flood_statuses"] == {"200": 6}
    assert 0 < report["calm_ttft_s_median"] <= report["calm_latency_s_median"]
    assert len(report["rows"]) == 8 and report["code"]
