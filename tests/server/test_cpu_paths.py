"""The CPU forward takes its fast paths (the golden tests check their values; this checks they are the ones
running): prepacked projections (our kernel's panels where it builds, else oneDNN's layout), the planned attention and KV write, one padded gather-bmm per LowRank op
and one CSR product per Sparse slot, from stores that keep each adapter once (nothing written to the arena)."""
import pytest
import torch

import kernels.attention as attention
from kernels import cpu_elementwise, cpu_layer, cpu_matmul, cpu_sampler
import kernels.sparse as sparse
from server.engine.request import SamplingParams
from server.model.config import ModelConfig
import server.model.padded_lowrank as padded_lowrank
import server.model.sparse_store as sparse_store
from server.model.padded_lowrank import PaddedLowRank
from server.model.sparse_store import CsrSparse
from tests.helpers import make_hf_model, random_lowrank, random_sparse, refs, run_capture, small_engine


def test_cpu_forward_uses_prepacked_weights_the_attention_plan_and_csr_sparse(tmp_path, monkeypatch):
    path = make_hf_model(tmp_path / "m", "llama")
    engine = small_engine(path)
    model = engine.runner.model
    def prepacked(w):
        return isinstance(w, cpu_matmul.PackedWeight) if cpu_matmul.enabled() else w.is_mkldnn
    assert all(prepacked(w) for lw in model.layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down))
    assert prepacked(model.lm_head) and not model.embed.is_mkldnn
    pool = engine.runner.adapter_pool
    assert isinstance(pool.lowrank, PaddedLowRank) and isinstance(pool.sparse, CsrSparse)
    calls = {"attention": 0, "write": 0, "reference": 0, "csr": 0, "padded": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(attention, "paged_attention_cpu", counting("attention", attention.paged_attention_cpu))
    monkeypatch.setattr(attention, "write_kv_cpu", counting("write", attention.write_kv_cpu))
    monkeypatch.setattr(attention, "paged_attention_ref", counting("reference", attention.paged_attention_ref))
    monkeypatch.setattr(sparse_store, "sparse_delta_csr", counting("csr", sparse.sparse_delta_csr))
    planned = padded_lowrank.lowrank_delta_planned
    monkeypatch.setattr(padded_lowrank, "lowrank_delta_planned", counting("padded", planned))
    cfg = ModelConfig.from_dir(path)
    adapters = {"sift": random_sparse(cfg, ["q_proj", "down_proj"], 0.05, seed=1),
                "lora": random_lowrank(cfg, {"q_proj": 4, "down_proj": 4}, seed=2)}
    prompts = {"a": list(range(3, 12)), "b": list(range(20, 25)), "c": list(range(30, 36))}
    run_capture(engine, prompts, refs({"a": "sift", "b": None, "c": "lora"}, adapters), max_tokens=3)
    steps = 3  # one prefill step, then two decode steps
    assert calls["attention"] == calls["write"] == steps * cfg.num_layers and calls["reference"] == 0
    assert calls["csr"] == steps * cfg.num_layers * 4  # q|k|v, o, gate|up, down of every layer
    assert calls["padded"] == steps * cfg.num_layers * 2  # the groups the LoRA targets only: q|k|v, down
    assert len(pool.slots) == 2 and not pool.arena.any()  # both adapters resident, neither written twice


def test_cpu_forward_runs_our_elementwise_kernel_with_the_logits_of_pytorchs_ops(tmp_path, monkeypatch):
    """Not a silent fallback: where it builds, auto enables kernels/cpu_elementwise.c and every layer of an fp32 CPU
    forward calls its RMSNorm (twice), rotary and SiLU x up; the logits are PyTorch's ops' within fp32 rounding."""
    if not cpu_elementwise.available():
        pytest.skip("needs an x86-64 CPU with AVX2 and FMA and a C compiler")
    assert cpu_elementwise.CHOICE != "auto" or cpu_elementwise.enabled()
    monkeypatch.setattr(cpu_layer, "_enabled", False)  # op by op (a layer in one call: tests/server/test_fused_layers.py)
    path = make_hf_model(tmp_path / "m", "qwen2")  # q|k|v bias, GQA
    cfg = ModelConfig.from_dir(path)
    prompts = {"a": list(range(3, 12)), "b": list(range(20, 25))}
    calls = []
    for name in ("rms_norm", "silu_mul", "rope_"):
        fn = getattr(cpu_elementwise, name)
        monkeypatch.setattr(cpu_elementwise, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    ids, ours = run_capture(small_engine(path), prompts, {}, max_tokens=3)
    steps = 3
    assert calls.count("rms_norm") == steps * (2 * cfg.num_layers + 1)
    assert calls.count("rope_") == calls.count("silu_mul") == steps * cfg.num_layers
    monkeypatch.setattr(cpu_elementwise, "_enabled", False)
    calls.clear()
    ids_torch, theirs = run_capture(small_engine(path), prompts, {}, max_tokens=3)
    assert not calls and ids == ids_torch
    for rid in prompts:
        torch.testing.assert_close(torch.stack(ours[rid]), torch.stack(theirs[rid]), rtol=1e-5, atol=1e-5)


def test_cpu_engine_samples_with_our_kernel_the_tokens_of_the_pytorch_path(tmp_path, monkeypatch):
    """Not a silent fallback: where it builds, auto enables kernels/cpu_sampler.c and every step of an fp32 CPU engine
    samples through it, greedy and seeded rows in one call; the seeded tokens are those of the PyTorch path."""
    if not cpu_sampler.available():
        pytest.skip("needs an x86-64 CPU with AVX2 and FMA and a C compiler")
    assert cpu_sampler.CHOICE != "auto" or cpu_sampler.enabled()
    path = make_hf_model(tmp_path / "m", "llama")
    prompts = {"a": list(range(3, 12)), "b": list(range(20, 25)), "c": list(range(30, 36))}
    calls = []
    monkeypatch.setattr(cpu_sampler, "sample_checked",
                        lambda *a, _fn=cpu_sampler.sample_checked: calls.append(len(a[0])) or _fn(*a))
    seeded = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    ids, _ = run_capture(small_engine(path), prompts, {}, max_tokens=6, params=seeded)
    assert calls == [3] * 6  # one call a step for all three rows
    monkeypatch.setattr(cpu_sampler, "_enabled", False)
    ids_torch, _ = run_capture(small_engine(path), prompts, {}, max_tokens=6, params=seeded)
    assert ids == ids_torch and len(calls) == 6


def test_a_step_with_the_previous_steps_layout_shares_its_segments(tmp_path):
    """Decode steps of an unchanged batch reuse one Segments (and with it the slot plan the forward derived from it);
    any other layout (a token count or an adapter slot that differs) gets its own."""
    from server.engine.scheduler import ScheduledBatch, ScheduledSeq
    from server.engine.request import Request
    engine = small_engine(make_hf_model(tmp_path / "m", "llama"))
    runner = engine.runner
    reqs = [Request(f"r{i}", list(range(3, 11)), SamplingParams(max_tokens=4)) for i in range(3)]
    for i, req in enumerate(reqs):
        req.slot = (-1, 0, 1)[i]
        engine.scheduler.blocks.grow(req.block_ids, 8)

    def batch(starts, counts):
        return ScheduledBatch([ScheduledSeq(r, s, n, True) for r, s, n in zip(reqs, starts, counts)])

    first = runner.build(batch([5, 5, 5], [1, 1, 1])).segments
    plan = first.slot_plan
    again = runner.build(batch([6, 6, 6], [1, 1, 1])).segments  # the next decode step: positions move, layout not
    assert again is first and again.slot_plan is plan
    assert runner.build(batch([4, 6, 6], [2, 1, 1])).segments is not first  # a token count differs
    reqs[1].slot = 1
    moved = runner.build(batch([6, 6, 6], [1, 1, 1])).segments  # a slot differs
    assert moved is not first and moved.seg_slot.tolist() == [-1, 1, 1]


def test_the_padded_store_shrinks_back_when_its_largest_adapter_leaves(tmp_path):
    """A rank-64 adapter takes rank-64 rows of its own while it is resident, the rank-16 stacks of the others stay
    as they are; once it is freed its class is gone, the others' factors and deltas unchanged, and nothing is left
    when none is."""
    from kernels.segments import make_segments
    path = make_hf_model(tmp_path / "m", "llama")
    cfg = ModelConfig.from_dir(path)
    store = small_engine(path).runner.adapter_pool.lowrank
    small = random_lowrank(cfg, {"q_proj": 4, "down_proj": 4}, seed=1)
    store.load(1, small, None, 0)
    x = torch.randn(3, cfg.hidden_size)
    seg = make_segments([3], [1], "cpu")

    def delta():
        y = torch.zeros(3, store.layout.group_width["qkv"])
        store.apply(0, "qkv", y, x, seg)
        return y

    before = delta()
    assert before.abs().sum() > 0
    store.load(0, random_lowrank(cfg, {"q_proj": 64}, seed=2), None, 0)
    assert sorted(store.classes) == [16, 64] and store.max_rank == 64
    assert store.classes[16].factors[0]["qkv"].a.shape == (1, 3 * 16, cfg.hidden_size)
    assert store.classes[64].factors[0]["qkv"].a.shape == (1, 3 * 64, cfg.hidden_size)
    assert "down" not in store.classes[64].factors[0]  # it targets q_proj only
    assert torch.equal(delta(), before)
    store.free(0)
    assert sorted(store.classes) == [16] and store.max_rank == 16 and store.rank_of(1, 0, "q_proj") == 4
    assert torch.equal(delta(), before)
    store.free(1)
    assert store.classes == {} and store.where == {} and store.max_rank == 16
    assert not delta().any()
