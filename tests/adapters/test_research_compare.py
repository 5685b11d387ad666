"""adapters.research.compare (and claims) end to end on a tiny random Llama: the grid of seeds and lr scales, the
per-cell mean and std, the base rows, and the teacher-forced token accuracy on hand-computed cases."""
from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adapters.data import IGNORE_INDEX
from adapters.methods import get_method
from adapters.research import claims, compare, merge, metrics
from adapters.train import build_method
from tests.helpers import small_model


# -- the metric -----------------------------------------------------------------------------------------------
def test_token_hits_counts_only_labelled_next_tokens():
    logits = torch.zeros(1, 4, 10)
    for t, token in enumerate([3, 0, 2, 9]):  # predictions at positions 0..3 (the last predicts past the end)
        logits[0, t, token] = 1.0
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, 2]])  # position t predicts labels[t + 1]: 3 (hit), 1 (miss), 2 (hit)
    assert metrics.token_hits(logits, labels) == (2, 3)


class NextIdPlusOne(nn.Module):
    """A fake LM whose logits are 10 on token (input + 1) mod V and 0 elsewhere."""

    vocab = 12

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        return SimpleNamespace(logits=10.0 * nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float())


def test_heldout_metrics_on_a_hand_computed_case():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 9], [2, 3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
             "labels": torch.tensor([[IGNORE_INDEX, 6, 7, 9], [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX]])}
    loss, acc = metrics.heldout_metrics(NextIdPlusOne(), None, [batch])
    assert acc == pytest.approx(3 / 4)  # 6 and 7 follow, 9 does not (8 predicted); 3 follows 2
    z = math.exp(10.0) + NextIdPlusOne.vocab - 1
    hit, miss = -math.log(math.exp(10.0) / z), -math.log(1.0 / z)
    assert loss == pytest.approx((3 * hit + miss) / 4)


def test_batched_greedy_decoding_matches_one_prompt_at_a_time(tokenizer):
    model = small_model(seed=1, wide_init=False, vocab_size=len(tokenizer), initializer_range=0.1,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    method = build_method("para", model)  # PARA pools over the prompt: the padding must not reach it
    prompts = ["upper: ab =", "upper: abcdef =", "key xq? ->"]
    together = metrics.greedy_completions(model, method, tokenizer, prompts, 5, "cpu")
    alone = [metrics.greedy_completions(model, method, tokenizer, [p], 5, "cpu")[0] for p in prompts]
    assert together == alone


# -- the grid -------------------------------------------------------------------------------------------------
def test_grid_runs_the_sweep_only_at_the_sweep_seeds():
    grid = compare.make_grid(["upper"], ["lora", "ia3"], [0, 1, 2], [1, 10], sweep_seeds=[0])
    assert sum(r.method == compare.BASE for r in grid) == 3
    assert sorted(r.seed for r in grid if r.lr_scale == 10) == [0, 0]
    assert sorted(r.seed for r in grid if r.lr_scale == 1) == [0, 0, 1, 1, 2, 2]


def test_scale_one_is_the_authors_lr_unless_replaced():
    s = compare.Settings(steps=1, batch_size=1, num_train=1, num_eval=1, num_decode=1, eval_every=1, max_new_tokens=1,
                         device="cpu", dtype="fp32", progress=False, lr={"ia3": 0.5})
    assert compare.base_lr("lora", s) == get_method("lora").defaults.lr
    assert compare.base_lr("ia3", s) == 0.5


def test_compare_aggregates_seeds_and_lr_scales(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = compare.main(["--model", str(model_dir), "--out", str(out), "--tasks", "upper", "--methods", "lora,ia3",
                       "--seeds", "0,1", "--lr-scales", "1,10", "--steps", "3", "--batch-size", "4", "--num-train", "16",
                       "--num-eval", "4", "--num-decode", "2", "--max-new-tokens", "3", "--eval-every", "2",
                       "--no-progress"])
    assert rc == 0
    report = json.loads((out / "compare.json").read_text())
    runs, cells = report["runs"], report["cells"]
    assert len(runs) == 2 + 2 * 2 * 2  # a base measurement per seed, then 2 methods x 2 scales x 2 seeds
    assert {(c["method"], c["lr_scale"]) for c in cells} == {
        ("base", None), ("lora", 1.0), ("lora", 10.0), ("ia3", 1.0), ("ia3", 10.0)}
    for c in cells:
        assert c["seeds"] == [0, 1]
        mine = [r for r in runs if (r["method"], r["lr_scale"]) == (c["method"], c["lr_scale"])]
        for key in compare.METRICS:
            values = [r[key] for r in mine]
            assert c[f"{key}_mean"] == pytest.approx(statistics.fmean(values))
            assert c[f"{key}_std"] == pytest.approx(statistics.stdev(values))
    assert all(0.0 <= r["token_accuracy"] <= 1.0 and 0.0 <= r["exact_match"] <= 1.0 for r in runs)
    lora10 = next(c for c in cells if (c["method"], c["lr_scale"]) == ("lora", 10.0))
    assert lora10["lr"] == pytest.approx(10 * get_method("lora").defaults.lr)
    base_rows = [r for r in runs if r["method"] == "base"]
    assert all(r["lr"] is None and r["num_trainable"] == 0 for r in base_rows)
    # training starts from the base model: each run's step-0 held-out loss is its seed's base loss
    for r in runs:
        if r["method"] != "base":
            base = next(b for b in base_rows if b["seed"] == r["seed"])
            assert r["eval_curve"][0] == [0, pytest.approx(base["eval_loss"], rel=1e-5)]
    table = report["table"]
    assert table in (out / "compare.md").read_text()
    assert "| upper | base (no training) | - | - | 2 |" in table and table.count(" ± ") == 5 * 3
    assert report["hyperparams"]["lora"]["authors_lr"] == get_method("lora").defaults.lr
    pytest.importorskip("matplotlib")
    assert (out / "loss_curves.png").stat().st_size > 0


def test_merge_pools_the_runs_of_several_comparisons(model_dir, tmp_path):
    """Seed 0 in one run, seeds 0 and 1 in another: the merge has each run once (the repeated seed 0 skipped),
    cells over both seeds equal to aggregating the runs directly; different settings are refused."""
    common = ["--model", str(model_dir), "--tasks", "upper", "--methods", "ia3", "--steps", "2", "--batch-size", "4",
              "--num-train", "8", "--num-eval", "4", "--num-decode", "2", "--max-new-tokens", "2", "--eval-every", "1",
              "--no-progress"]
    assert compare.main(common + ["--out", str(tmp_path / "a"), "--seeds", "0"]) == 0
    assert compare.main(common + ["--out", str(tmp_path / "b"), "--seeds", "0,1"]) == 0
    assert merge.main(["--out", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    merged = json.loads((tmp_path / "m" / "compare.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in merged["runs"]) == [("base", 0), ("base", 1), ("ia3", 0), ("ia3", 1)]
    assert len(merged["skipped"]) == 2  # seed 0's base and ia3 runs of the second input
    b = json.loads((tmp_path / "b" / "compare.json").read_text())
    a = json.loads((tmp_path / "a" / "compare.json").read_text())
    ia3 = next(c for c in merged["cells"] if c["method"] == "ia3")
    losses = [next(r for r in a["runs"] if r["method"] == "ia3")["eval_loss"],
              next(r for r in b["runs"] if r["method"] == "ia3" and r["seed"] == 1)["eval_loss"]]
    assert ia3["seeds"] == [0, 1] and ia3["eval_loss_mean"] == pytest.approx(statistics.fmean(losses))
    assert compare.main(common + ["--steps", "3", "--out", str(tmp_path / "c"), "--seeds", "2"]) == 0
    with pytest.raises(SystemExit, match="steps"):
        merge.main(["--out", str(tmp_path / "n"), str(tmp_path / "a"), str(tmp_path / "c")])


def test_claims_still_run_on_compare(model_dir, tmp_path):
    rc = claims.main(["--model", str(model_dir), "--out", str(tmp_path), "--only", "sift", "--sift-tasks", "upper",
                      "--steps", "2", "--batch-size", "4", "--num-train", "8", "--num-eval", "2", "--eval-every", "1"])
    assert rc == 0
    rows = json.loads((tmp_path / "claims.json").read_text())["results"]
    assert [(r["method"], r["lr"]) for r in rows] == [("lora", 1e-2), ("sift", 1e-2)]
    lora, sift = rows
    assert sift["num_trainable"] >= lora["num_trainable"] > 0  # LoRA on all seven projections: the count SIFT matches
    assert sift["num_trainable"] - lora["num_trainable"] < 0.01 * lora["num_trainable"]
