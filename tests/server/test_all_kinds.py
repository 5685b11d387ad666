"""Every delta kind in one mixed batch: LowRank of many ranks (LoRA, ALoRA, SORSA/PiSSA at 2r), Sparse (SIFT),
Scale (IA3), PARA and a combination; each request's logits equal its own reference model's."""
import torch

from adapters.delta import AdapterDeltas
from server.model.config import ModelConfig
from tests.helpers import (
    ALL,
    combine,
    make_hf_model,
    random_ia3,
    random_lowrank,
    random_para,
    random_sparse,
    reference_logits,
    reference_model,
    refs,
    run_capture,
    small_engine,
)

def test_every_kind_in_one_mixed_batch(tmp_path):
    path = make_hf_model(tmp_path / "m", "qwen2")  # qkv bias: Scale must come after the bias
    cfg = ModelConfig.from_dir(path)
    adapters = {
        "lora4": random_lowrank(cfg, {"q_proj": 4, "v_proj": 4}, seed=1),
        "lora64": random_lowrank(cfg, dict.fromkeys(ALL, 64), seed=2),
        "alora": combine(random_lowrank(cfg, {"q_proj": 3, "down_proj": 11}, seed=3, layers=[0]),
                         random_lowrank(cfg, {"k_proj": 7, "gate_proj": 1, "o_proj": 5}, seed=4, layers=[1])),
        "sorsa-2r": random_lowrank(cfg, dict.fromkeys(ALL, 16), seed=5),
        "pissa-2r": random_lowrank(cfg, {"q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 8}, seed=6),
        "sift": random_sparse(cfg, ["q_proj", "v_proj", "up_proj", "down_proj"], 0.05, seed=7),
        "ia3": random_ia3(cfg, seed=8),
        "para": random_para(cfg, seed=9),
        "para-mean-lora": combine(random_para(cfg, seed=10, pool="mean", layers=[1]),
                                  random_lowrank(cfg, {"o_proj": 2}, seed=11)),
        "lora+sift+ia3": combine(random_lowrank(cfg, {"q_proj": 6, "up_proj": 6}, seed=12),
                                 random_sparse(cfg, ["k_proj", "down_proj"], 0.03, seed=13), random_ia3(cfg, seed=14)),
    }
    engine = small_engine(path, max_prefill_chunk=8)  # long prompts are chunked (except PARA's)
    gen = torch.Generator().manual_seed(0)
    plan = [("base", None, 6), ("l4", "lora4", 13), ("l64", "lora64", 3), ("al", "alora", 19), ("so", "sorsa-2r", 9),
            ("pi", "pissa-2r", 4), ("si", "sift", 15), ("ia", "ia3", 8), ("pa", "para", 21), ("pa2", "para", 5),
            ("pm", "para-mean-lora", 12), ("co", "lora+sift+ia3", 10), ("late-pa", "para", 7), ("late-si", "sift", 2)]
    prompts = {rid: torch.randint(3, 300, (n,), generator=gen).tolist() for rid, _, n in plan}
    which = {rid: a for rid, a, _ in plan}
    generated, logits = run_capture(engine, prompts, refs(which, adapters), max_tokens=9, join_after={"late-pa": 3, "late-si": 6})
    for rid, prompt in prompts.items():
        deltas = adapters[which[rid]] if which[rid] else AdapterDeltas()
        ref = reference_logits(reference_model(path, deltas, len(prompt)), prompt, generated[rid])
        ours = torch.stack(logits[rid])
        assert ours.shape == ref.shape == (9, ref.shape[1])
        assert (ours - ref).abs().max().item() <= 1e-4, rid


def test_para_vectors_depend_on_the_prompt_and_not_on_neighbours(tmp_path):
    path = make_hf_model(tmp_path / "m", "llama")
    cfg = ModelConfig.from_dir(path)
    adapters = {"para": random_para(cfg, seed=1), "lora": random_lowrank(cfg, {"q_proj": 4}, seed=2)}
    gen = torch.Generator().manual_seed(3)
    p1, p2, other = (torch.randint(3, 300, (n,), generator=gen).tolist() for n in (9, 9, 14))

    def vectors_for(prompts, which, join_after=None):
        engine = small_engine(path)
        captured = {}
        pool = engine.runner.adapter_pool
        compute = pool.compute_para

        def spy(layer, h, batch):
            compute(layer, h, batch)
            rid_by_row = {v: k for k, v in engine.runner._para_rows.items()}
            for p in batch.para_prefills:
                captured.setdefault(rid_by_row[p.row], {})[layer] = pool.para_buffer()[layer, p.row].clone()

        pool.compute_para = spy
        _, logits = run_capture(engine, prompts, which, max_tokens=4, join_after=join_after)
        return captured, logits

    alone, logits_alone = vectors_for({"a": p1}, refs({"a": "para"}, adapters))
    crowd, logits_crowd = vectors_for({"a": p1, "b": p2, "c": other}, refs({"a": "para", "b": "para", "c": "lora"}, adapters), {"c": 1})
    for layer in range(cfg.num_layers):
        assert torch.allclose(alone["a"][layer], crowd["a"][layer], atol=1e-5)  # equal up to BLAS summation order
        assert not torch.allclose(crowd["a"][layer], crowd["b"][layer])
    assert (torch.stack(logits_alone["a"]) - torch.stack(logits_crowd["a"])).abs().max().item() <= 1e-5
