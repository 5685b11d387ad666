"""Every delta kind in one mixed batch: LowRank of many ranks (LoRA, ALoRA, SORSA/PiSSA at 2r), Sparse (SIFT),
Scale (IA3), PARA and a combination; each request's logits equal its own reference model's."""
from unittest.mock import patch

import torch

from adapters.delta import AdapterDeltas
from server.model.adapter_step import AdapterStep
from server.model.config import ModelConfig
from tests.helpers import (
    every_kind,
    make_hf_model,
    random_lowrank,
    random_para,
    reference_logits,
    reference_model,
    refs,
    run_capture,
    small_engine,
)

def test_every_kind_in_one_mixed_batch(tmp_path):
    path = make_hf_model(tmp_path / "m", "qwen2")  # qkv bias: Scale must come after the bias
    cfg = ModelConfig.from_dir(path)
    adapters = every_kind(cfg)
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

        def spy(step, layer, h):
            compute(step, layer, h)
            rid_by_row = {r.para_row: rid for rid, r in engine.requests.items() if r.para_row >= 0}
            for p in step.batch.para_prefills:
                captured.setdefault(rid_by_row[p.row], {})[layer] = pool.scale.para_vectors()[layer, p.row].clone()

        with patch.object(AdapterStep, "compute_para", spy):
            _, logits = run_capture(engine, prompts, which, max_tokens=4, join_after=join_after)
        return captured, logits

    compute = AdapterStep.compute_para

    alone, logits_alone = vectors_for({"a": p1}, refs({"a": "para"}, adapters))
    crowd, logits_crowd = vectors_for({"a": p1, "b": p2, "c": other}, refs({"a": "para", "b": "para", "c": "lora"}, adapters), {"c": 1})
    for layer in range(cfg.num_layers):
        assert torch.allclose(alone["a"][layer], crowd["a"][layer], atol=1e-5)  # equal up to BLAS summation order
        assert not torch.allclose(crowd["a"][layer], crowd["b"][layer])
    assert (torch.stack(logits_alone["a"]) - torch.stack(logits_crowd["a"])).abs().max().item() <= 1e-5


def test_para_rows_are_the_schedulers_and_a_request_waits_for_one(tmp_path):
    """PARA vector rows are handed out by the scheduler like KV blocks: with one row, three PARA requests run one
    after another (the others wait, nothing fails), each gives the logits it gives with a row to spare, and every
    row is free at the end."""
    from server.engine.para_rows import ParaRows

    path = make_hf_model(tmp_path / "m", "llama")
    cfg = ModelConfig.from_dir(path)
    adapters = {"para": random_para(cfg, seed=1), "lora": random_lowrank(cfg, {"q_proj": 4}, seed=2)}
    gen = torch.Generator().manual_seed(4)
    prompts = {rid: torch.randint(3, 300, (n,), generator=gen).tolist() for rid, n in (("a", 7), ("b", 9), ("c", 5), ("d", 6))}
    which = refs({"a": "para", "b": "para", "c": "lora", "d": "para"}, adapters)
    _, roomy = run_capture(small_engine(path), prompts, which, max_tokens=3)
    engine = small_engine(path)
    engine.scheduler.para_rows = ParaRows(1)
    in_flight = []
    run = engine.runner.run

    def count(step):
        in_flight.append(sum(s.request.para_row >= 0 for s in step.batch.seqs))
        return run(step)

    engine.runner.run = count
    _, tight = run_capture(engine, prompts, which, max_tokens=3)
    assert max(in_flight) == 1  # never two PARA requests at once
    for rid in prompts:
        assert len(tight[rid]) == 3 and (torch.stack(tight[rid]) - torch.stack(roomy[rid])).abs().max().item() <= 1e-5
    assert engine.scheduler.para_rows.num_free == 1
