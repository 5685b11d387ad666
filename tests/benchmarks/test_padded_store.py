"""`python -m benchmarks.padded_store` measures the CPU LowRank store: a high-rank adapter adds its own padded rows
(what the pool charges it), not a padding of every slot."""
import pytest

from benchmarks.padded_store import main
from tests.helpers import make_hf_model


def test_a_high_rank_adapter_adds_what_it_is_charged(tmp_path):
    path = make_hf_model(tmp_path / "m", "llama")
    row = main(["--model", str(path), "--count", "4", "--rank", "16", "--high-rank", "128", "--slots", "16"])
    assert row["store_mb_low"] == pytest.approx(4 * row["charge_mb_low"])  # 4 rows of class 16
    assert row["store_mb_with_high"] - row["store_mb_low"] == pytest.approx(row["charge_mb_high"])
    assert row["charge_mb_high"] == pytest.approx(8 * row["charge_mb_low"])
