"""Correctness anchor: in one mixed batch, every request's logits equal its adapter merged into the weights."""
import pytest
import torch

from kernels import cpu_layer, cpu_matmul
from kernels.dispatch import use_triton
from server.model.config import ModelConfig
from tests.helpers import make_hf_model, merged_hf, random_lowrank, reference_logits, refs, run_capture, small_engine


def test_mixed_lowrank_batch_matches_merged_weights(tmp_path, monkeypatch):
    """Also: where our CPU kernels serve (the padded store), a projection whose deltas are one rank class's runs
    with them in one call (cpu_matmul.matmul_lowrank, or a layer's: cpu_layer.decode_layer / layer_front), not a
    silent fallback; the golden pass under MULTIPLEX_KERNELS=triton (the arena store) has no such calls."""
    fused = []
    monkeypatch.setattr(cpu_matmul, "matmul_lowrank",
                        lambda *a, real=cpu_matmul.matmul_lowrank: fused.append(1) or real(*a))

    def layer_spy(shapes, layer, step, grids, real=cpu_layer.decode_layer):
        fused.extend(1 for g in grids if g is not None)
        return real(shapes, layer, step, grids)

    def front_spy(shapes, layer, step, grid, real=cpu_layer.layer_front):
        fused.extend([1] if grid is not None else [])
        return real(shapes, layer, step, grid)

    monkeypatch.setattr(cpu_layer, "decode_layer", layer_spy)
    monkeypatch.setattr(cpu_layer, "layer_front", front_spy)
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
    assert bool(fused) == (cpu_matmul.enabled() and not use_triton("cpu"))


def test_a_mixed_batch_with_bf16_lora_factors_is_the_merge_of_its_rounded_factors(tmp_path):
    """`--lora-dtype bfloat16` on a CPU: each request gets the logits of its adapter merged with its factors as the
    engine keeps them (A and scale * B each rounded to bf16 once), within fp32 tolerance; rounding is all it loses."""
    from adapters.delta import AdapterDeltas, LowRank
    from kernels.dispatch import use_triton

    if use_triton("cpu"):  # make test's golden pass, MULTIPLEX_KERNELS=triton: the arena keeps the model's dtype
        with pytest.raises(ValueError, match="kept in the model's dtype"):
            small_engine(make_hf_model(tmp_path / "m", "llama"), lora_dtype="bfloat16")
        return
    path = make_hf_model(tmp_path / "m", "llama")
    cfg = ModelConfig.from_dir(path)
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {"r8-all": random_lowrank(cfg, dict.fromkeys(all7, 8), seed=3),
                "r40-qv": random_lowrank(cfg, {"q_proj": 40, "v_proj": 3}, seed=4),
                "r4-mlp": random_lowrank(cfg, {"up_proj": 4, "down_proj": 4}, seed=5)}
    rounded = {name: AdapterDeltas(lowrank={
        m: LowRank(lr.A.bfloat16().float(), (lr.B.float() * float(lr.scale)).bfloat16().float(), 1.0)
        for m, lr in d.lowrank.items()}) for name, d in adapters.items()}
    engine = small_engine(path, lora_dtype="bfloat16")
    assert engine.runner.adapter_pool.lowrank_dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    plan = [("a", "r8-all", 12), ("b", "r40-qv", 5), ("c", None, 9), ("d", "r4-mlp", 20), ("e", "r8-all", 3)]
    prompts = {rid: torch.randint(3, 300, (n,), generator=gen).tolist() for rid, _, n in plan}
    which = {rid: a for rid, a, _ in plan}
    generated, logits = run_capture(engine, prompts, refs(which, adapters), max_tokens=6, join_after={"e": 2})
    models = {a: merged_hf(path, d) for a, d in rounded.items()}
    models[None] = merged_hf(path, AdapterDeltas())
    for rid, prompt in prompts.items():
        ref = reference_logits(models[which[rid]], prompt, generated[rid])
        assert (torch.stack(logits[rid]) - ref).abs().max().item() <= 1e-4, rid
    exact = reference_logits(merged_hf(path, adapters["r8-all"]), prompts["a"], generated["a"])
    assert (torch.stack(logits["a"]) - exact).abs().max().item() > 1e-6  # the factors really are rounded
