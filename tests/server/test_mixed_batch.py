"""Correctness anchor: in one mixed batch, every request's logits equal its adapter merged into the weights."""
import torch

from server.model.config import ModelConfig
from tests.helpers import make_hf_model, merged_hf, random_lowrank, reference_logits, refs, run_capture, small_engine


def test_mixed_lowrank_batch_matches_merged_weights(tmp_path):
    path = make_hf_model(tmp_path / "m", "llama")
    cfg = ModelConfig.from_dir(path)
    adapters = {
        "r1-q": random_lowrank(cfg, {"q_proj": 1}, seed=1),
        "r4-qv": random_lowrank(cfg, {"q_proj": 4, "v_proj": 4}, seed=2),
        "r64-all": random_lowrank(cfg, dict.fromkeys(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 64), seed=3),
        "mixed-ranks": random_lowrank(cfg, {"k_proj": 2, "o_proj": 16, "gate_proj": 8, "down_proj": 3}, seed=4, layers=[1]),
        "mlp-only": random_lowrank(cfg, {"up_proj": 12, "down_proj": 5}, seed=5),
    }
    engine = small_engine(path)
    gen = torch.Generator().manual_seed(0)
    plan = [("base", None, 7), ("a", "r1-q", 12), ("b", "r4-qv", 3), ("c", "r64-all", 30), ("d", "mixed-ranks", 9),
            ("e", "mlp-only", 17), ("f", "r64-all", 4), ("g", None, 21), ("h", "r4-qv", 11)]
    prompts = {rid: torch.randint(3, 300, (n,), generator=gen).tolist() for rid, _, n in plan}
    which = {rid: a for rid, a, _ in plan}
    generated, logits = run_capture(engine, prompts, refs(which, adapters), max_tokens=8, join_after={"f": 3, "g": 5, "h": 5})
    models = {a: merged_hf(path, d) for a, d in adapters.items()}
    models[None] = merged_hf(path, type(next(iter(adapters.values())))())
    for rid, prompt in prompts.items():
        ref = reference_logits(models[which[rid]], prompt, generated[rid])
        ours = torch.stack(logits[rid])
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4, rid
    # the adapters really change the output (a test that cannot fail proves nothing)
    base_ref = reference_logits(models[None], prompts["c"], generated["c"])
    assert (torch.stack(logits["c"]) - base_ref).abs().max().item() > 1e-2
