"""End-to-end throughput: our engine on a mixed-adapter batch vs. the same batch with no adapters vs. PEFT.

    python -m benchmarks.engine                     # CPU: tiny and ~100M configs, 16 requests over 8 adapters
    python -m benchmarks.engine --mode decode-step  # GPU: one 7B-shaped decode step, batch 32, 0/1/8/32 adapters
    python -m benchmarks.engine --mode host --batch 64 --gen-len 500   # host time per step not overlapped
    python -m benchmarks.engine --mode sampling --batch 64              # the sampler on smollm2's real logits

Weights are random (no download); timings do not depend on their values. Ratios are measured in one run.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from adapters.delta import PROJECTIONS, AdapterDeltas, LowRank
from server.engine.builder import EngineOptions, build_llm_engine
from server.engine.cpu_threads import cpu_threads
from server.engine.request import AdapterRef, Request, SamplingParams
from server.engine.scheduler import ScheduledBatch, ScheduledSeq
from server.model.adapter_layout import Layout
from server.model.config import ModelConfig

CONFIGS = {
    "tiny": dict(vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}


def random_adapter(cfg: ModelConfig, rank: int, seed: int) -> AdapterDeltas:
    gen = torch.Generator().manual_seed(seed)
    dims = Layout.of(cfg).dims  # projection -> (d_out, d_in)
    d = AdapterDeltas()
    for layer in range(cfg.num_layers):
        for proj in PROJECTIONS:
            d_out, d_in = dims[proj]
            d.lowrank[f"layers.{layer}.{proj}"] = LowRank(torch.randn(rank, d_in, generator=gen) * 0.01,
                                                         torch.randn(d_out, rank, generator=gen) * 0.01, 2.0)
    return d


def make_checkpoint(name: str, directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.model.tiny import byte_level_tokenizer

    cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def bench_engine(path: Path, adapters: dict[str, AdapterDeltas], assign: list[str | None], prompt_len: int,
                 gen_len: int) -> float:
    """Generated tokens per second for one batch of len(assign) requests, all submitted at once."""
    engine = build_llm_engine(str(path), EngineOptions(device="cpu", dtype="fp32", max_num_seqs=len(assign),
                                                        max_num_batched_tokens=4096, max_prefill_chunk=512))
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    refs = {a: AdapterRef(a, 1, d) for a, d in adapters.items()}

    def run() -> float:
        for i, a in enumerate(assign):
            engine.add_request(Request(f"r{i}-{time.monotonic_ns()}", list(range(3, 3 + prompt_len)), params,
                                       adapter=refs[a] if a else None))
        t0 = time.perf_counter()
        while engine.has_work():
            engine.step()
        return len(assign) * gen_len / (time.perf_counter() - t0)

    run()  # warm-up
    best = max(run() for _ in range(2))
    engine.close()  # its forward thread's OpenMP team would throttle the next one's (server/engine/cpu_threads.py)
    return best


def bench_peft(path: Path, adapters: dict[str, AdapterDeltas], assign: list[str | None], prompt_len: int, gen_len: int) -> float:
    """PEFT's mixed-batch generate(adapter_names=...) on the same model and adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cpu_threads())  # the threads our engine's forward has
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rank = next(iter(adapters.values())).lowrank["layers.0.q_proj"].rank
    targets = list(PROJECTIONS)
    peft_model = None
    for name, deltas in adapters.items():
        cfg = LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=targets, init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        sd = {}
        for mod, lr in deltas.lowrank.items():
            _, layer, proj = mod.split(".")
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{proj}"
            sd[f"{prefix}.lora_A.{name}.weight"] = lr.A
            sd[f"{prefix}.lora_B.{name}.weight"] = lr.B
        missing = peft_model.load_state_dict(sd, strict=False)
        assert not [k for k in missing.unexpected_keys], missing.unexpected_keys
    peft_model.eval()
    ids = torch.arange(3, 3 + prompt_len).repeat(len(assign), 1)
    names = [a if a is not None else "__base__" for a in assign]

    def run() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                      max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False)
        assert out.shape[1] == prompt_len + gen_len
        return len(assign) * gen_len / (time.perf_counter() - t0)

    run()
    return max(run() for _ in range(2))


def cpu_suite(args) -> list[dict]:
    rows = []
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_checkpoint(name, Path(tmp))
            cfg = ModelConfig.from_dir(path)
            adapters = {f"a{i}": random_adapter(cfg, args.rank, seed=i) for i in range(args.num_adapters)}
            assign = [f"a{i % args.num_adapters}" for i in range(args.batch)]
            base = bench_engine(path, {}, [None] * args.batch, args.prompt_len, args.gen_len)
            mixed = bench_engine(path, adapters, assign, args.prompt_len, args.gen_len)
            peft = bench_peft(path, adapters, assign, args.prompt_len, args.gen_len)
            row = dict(config=name, batch=args.batch, adapters=args.num_adapters, rank=args.rank, prompt_len=args.prompt_len,
                       gen_len=args.gen_len, base_tok_s=base, mixed_tok_s=mixed, peft_mixed_tok_s=peft,
                       adapter_overhead=base / mixed - 1.0, speedup_vs_peft=mixed / peft, device="cpu",
                       threads=cpu_threads())
            rows.append(row)
            print(f"{name:>5}: base {base:8.1f} tok/s | {args.num_adapters} adapters {mixed:8.1f} tok/s "
                  f"(overhead {100 * row['adapter_overhead']:5.1f}%) | PEFT mixed {peft:8.1f} tok/s "
                  f"(ours {row['speedup_vs_peft']:.2f}x)", flush=True)
    return rows


def decode_step_suite(args) -> list[dict]:
    """One decode step (batch 32, context 512) of a random-weight model (7B-shaped by default) with 0/1/8/32
    distinct rank-16 adapters on all seven projections: the eager forward, the CUDA-graph replay, and the engine's
    whole step (host metadata + replay). On a CPU (--device cpu, for a smoke run) graphs are static-buffer replays."""
    from server.engine.cuda_graphs import DecodeGraphs, cuda_capture, eager_capture
    from server.engine.model_runner import ModelRunner
    from server.model.adapter_pool import AdapterPool
    from server.model.llama import LlamaModel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hf = {**CONFIGS[args.shape], "max_position_embeddings": 4096, "architectures": ["LlamaForCausalLM"]}
    cfg = ModelConfig.from_hf(hf)
    state = _random_state(cfg, device, dtype)
    model = LlamaModel(cfg, state, device, dtype)
    del state
    batch, ctx, block = args.batch, args.context, 16
    blocks_per_seq = ctx // block + 2
    counts = sorted(set(args.adapter_counts))
    pool = AdapterPool(cfg, max_slots=max(max(counts), 1), arena_bytes=(8 << 30) if on_gpu else (1 << 30),
                       device=device, dtype=dtype)
    graphs = DecodeGraphs(batch, device, cuda_capture(torch.cuda.graph_pool_handle()) if on_gpu else eager_capture)
    runner = ModelRunner(model, num_blocks=batch * blocks_per_seq, block_size=block, adapter_pool=pool,
                         max_model_len=blocks_per_seq * block, graphs=graphs)
    # One adapter's values in every slot: each slot still has its own copy in the arena, so the kernels read
    # max(counts) distinct factor sets, and the timing does not depend on the values.
    adapter = random_adapter(cfg, args.rank, seed=0)
    image = pool.prepare(adapter)
    for slot in range(max(counts)):
        pool.load(slot, adapter, image)
    rows = []
    floor_base = _decode_bytes(cfg, batch, ctx, 0, args.rank, dtype)
    for n in counts:
        reqs = []
        for b in range(batch):
            r = Request(f"r{b}", [5] * ctx, SamplingParams(max_tokens=1))
            r.block_ids = list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq))
            r.num_computed_tokens = ctx - 1
            r.slot = (b % n) if n else -1
            reqs.append(r)
        sched = ScheduledBatch([ScheduledSeq(r, ctx - 1, 1, True) for r in reqs])
        fb = runner.build(sched)
        eager_ms = _time(lambda: model.forward(fb, runner.kv, pool), device)  # noqa: B023
        host_fb = runner.build(sched, pad_to=graphs.batch_size_for(sched), device="cpu")
        key = runner.graph_key(host_fb)
        replay_ms = _time(lambda: graphs.run(key, host_fb, runner.forward), device)  # noqa: B023
        step_ms = _time(lambda: runner.execute(sched), device)  # noqa: B023
        rows.append(dict(shape=args.shape, batch=batch, context=ctx, distinct_adapters=n, rank=args.rank,
                         eager_ms=eager_ms, graph_replay_ms=replay_ms, engine_step_ms=step_ms,
                         tokens_per_s=batch / step_ms * 1e3, graphs_enabled=graphs.enabled,
                         bytes_floor_vs_base=_decode_bytes(cfg, batch, ctx, n, args.rank, dtype) / floor_base,
                         device=torch.cuda.get_device_name(device) if on_gpu else "cpu", dtype=str(dtype)))
        print(f"decode step {args.shape} batch {batch} ctx {ctx}: {n:2d} distinct rank-{args.rank} adapters -> eager "
              f"{eager_ms:7.3f} ms, graph replay {replay_ms:7.3f} ms, engine step {step_ms:7.3f} ms "
              f"({rows[-1]['tokens_per_s']:8.0f} tok/s){'' if graphs.enabled else ' [graph capture failed: eager]'}",
              flush=True)
    base = rows[0]
    for r in rows:
        for k in ("eager_ms", "graph_replay_ms", "engine_step_ms"):
            r[k.replace("_ms", "_vs_base")] = r[k] / base[k]
    if base["distinct_adapters"] == 0:
        print("vs. no adapters: " + ", ".join(f"{r['distinct_adapters']}: eager {r['eager_vs_base']:.3f}x "
                                              f"graph {r['graph_replay_vs_base']:.3f}x "
                                              f"(bytes floor {r['bytes_floor_vs_base']:.3f}x)" for r in rows[1:]))
    return rows


def host_suite(args) -> list[dict]:
    """The engine's host time per decode step not overlapped with the forward, measured on its own step loop
    (`LLMEngine.step_times`: each step's period minus its model forward): `--batch` running requests over 8 adapters,
    sampling with temperature 0.8 and top-p 0.9, after `--gen-len` generated tokens. Also timed apart, on one step's
    batch: schedule, build (eager and graph-padded) and sampling. `--host-model`: tiny (320-token vocabulary) or a
    model the server knows by name or path (smollm2: 49152 tokens, where sampling's share shows)."""
    from server.engine.sampler import sample
    from server.model.catalog import resolve_model_path

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.host_model == "tiny":
            path = make_checkpoint("tiny", Path(tmp))
        else:
            path = resolve_model_path(args.host_model, Path(tmp) if args.data_dir is None else args.data_dir)
        cfg = ModelConfig.from_dir(path)
        device = args.device or "cpu"
        engine = build_llm_engine(str(path), EngineOptions(device=device, dtype="fp32" if device == "cpu" else "auto",
                                                            max_num_seqs=args.batch, max_num_batched_tokens=8192,
                                                            max_prefill_chunk=4096))
        engine.overlap_text = not args.no_overlap
        engine.lookahead = args.lookahead
        engine.run_forwards_here()  # as the server's engine thread (nothing overlapped: no hand-off)
        refs = [AdapterRef(f"a{i}", 1, random_adapter(cfg, args.rank, seed=i)) for i in range(8)]
        params = SamplingParams(max_tokens=args.gen_len + 100, temperature=0.8, top_p=0.9, ignore_eos=True)
        for i in range(args.batch):
            engine.add_request(Request(f"r{i}", list(range(3, 3 + args.prompt_len)), params, adapter=refs[i % 8]))
        while min((len(r.output_ids) for r in engine.requests.values()), default=0) < args.gen_len:
            engine.step()
        iters = 20
        engine.step_times.clear()
        ahead_before = engine.num_lookahead_steps
        for _ in range(iters):
            engine.step()
        ahead_steps = engine.num_lookahead_steps - ahead_before
        busy = [t for t in engine.step_times if t.period_s is not None]
        loop = {"forward_ms": 1e3 * sum(t.forward_s for t in busy) / len(busy),
                "host_not_overlapped_ms": 1e3 * sum(t.host_s for t in busy) / len(busy),
                "step_ms": 1e3 * sum(t.period_s for t in busy) / len(busy)}
        runner, sched = engine.runner, engine.scheduler
        parts = dict(schedule=0.0, build=0.0, build_graph_padded=0.0, sample=0.0)
        for _ in range(iters):  # each part alone; then the step is run so the engine's state moves on
            t0 = time.perf_counter()
            batch = sched.schedule()
            t1 = time.perf_counter()
            fb = runner.build(batch)
            t2 = time.perf_counter()
            runner.build(batch, pad_to=args.batch, device="cpu")
            t3 = time.perf_counter()
            logits = runner.forward(fb)
            reqs = [q.request for q in batch.seqs]
            t4 = time.perf_counter()
            result = engine.on_forward_thread(  # where the engine samples (and with its threads)
                sample, logits, [r.params for r in reqs], [r.generator for r in reqs], [r.output_ids for r in reqs])
            t5 = time.perf_counter()
            for q in batch.seqs:
                q.request.num_computed_tokens = q.start + q.num_tokens
            for req, token in zip(reqs, result.token_ids):
                req.output_ids.append(token)
            for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t5 - t4)):
                parts[k] += dt
        row = dict(requests=args.batch, generated_tokens=args.gen_len, vocab=cfg.vocab_size, model=args.host_model,
                   overlap_text=engine.overlap_text, lookahead=engine.lookahead, lookahead_steps=ahead_steps,
                   device=device, torch_threads=engine.on_forward_thread(torch.get_num_threads), **loop,
                   **{f"{k}_ms": v / iters * 1e3 for k, v in parts.items()})
        rows.append(row)
        print(f"{args.host_model} (vocabulary {cfg.vocab_size}), {args.batch} requests after {args.gen_len} tokens, "
              f"{row['torch_threads']} torch threads in the forward's thread, text work "
              f"{'overlapped' if engine.overlap_text else 'after the forward'}, lookahead "
              f"{'on' if engine.lookahead else 'off'} ({ahead_steps} of {iters} steps built ahead): step "
              f"{loop['step_ms']:.2f} ms = forward "
              f"{loop['forward_ms']:.2f} ms + host not overlapped {loop['host_not_overlapped_ms']:.2f} ms; apart: " +
              ", ".join(f"{k} {v / iters * 1e3:.2f} ms" for k, v in parts.items()), flush=True)
    return rows


TOPICS = ("the history of Rome", "how to bake bread", "a poem about the sea", "why the sky is blue",
          "python decorators", "the French revolution", "training for a marathon", "black holes")


def sampling_suite(args) -> list[dict]:
    """Sampling one token for each of `--batch` requests from a real model's next-token logits (chat prompts, a few
    tokens into their answers), per sampling setting: the sampler (`server.engine.sampler.sample`: on a CPU our
    kernel, kernels/cpu_sampler.c), its batched PyTorch ops, and the plain way both are checked against
    (`reference_sample_rows`: one float64 cumsum over the whole row, sorted whole for top-k/top-p), the same logits
    and seeds, in one process. `--host-model`: a model name or path the server
    accepts (default smollm2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels import cpu_sampler
    from server.engine.sampler import make_generator, reference_sample_rows, sample
    from server.model.catalog import resolve_model_path

    with tempfile.TemporaryDirectory() as tmp:
        name = "smollm2" if args.host_model == "tiny" else args.host_model
        path = resolve_model_path(name, Path(tmp) if args.data_dir is None else args.data_dir)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    logits = []
    for i in range(args.batch):
        ids = tok.apply_chat_template([{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % 8]}."}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=1 + 3 * (i // 8) % 24, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        logits.append(out.logits[-1][0])
    logits = torch.stack(logits)
    rows = []
    for temperature, top_p in ((0.8, 0.9), (1.0, 0.95), (1.5, 0.95), (1.0, 1.0), (0.0, 1.0)):  # 1.5: flatter rows
        params = [SamplingParams(temperature=temperature, top_p=top_p, seed=i) for i in range(args.batch)]
        sampled = [p.temperature > 0 for p in params]

        def ours():
            return sample(logits, params, [make_generator(p) for p in params]).token_ids

        def torch_ops():
            return sample(logits, params, [make_generator(p) for p in params], cpu_kernel=False).token_ids

        def reference():
            if not any(sampled):
                return logits.argmax(-1).tolist()
            return reference_sample_rows(logits, params, [make_generator(p) for p in params]).tolist()

        same = ours() == reference()
        same_torch = torch_ops() == reference()
        ms = {name: _time_cpu(fn) for name, fn in (("sampler", ours), ("torch_ops", torch_ops),
                                                    ("reference", reference))}
        rows.append(dict(model=name, requests=args.batch, vocab=logits.shape[1], temperature=temperature, top_p=top_p,
                         torch_threads=torch.get_num_threads(), cpu_kernel=cpu_sampler.enabled(), same_tokens=same,
                         same_tokens_torch_ops=same_torch, **{f"{k}_ms": v for k, v in ms.items()}))
        print(f"{name}, {args.batch} rows of {logits.shape[1]}, temperature {temperature}, top_p {top_p}: sampler "
              f"{ms['sampler']:.2f} ms ({'our CPU kernel' if cpu_sampler.enabled() else 'PyTorch ops'}), its "
              f"PyTorch ops {ms['torch_ops']:.2f} ms, reference {ms['reference']:.2f} ms "
              f"({ms['reference'] / ms['sampler']:.1f}x), same tokens: {same} (PyTorch ops: {same_torch})",
              flush=True)
    return rows


def _time_cpu(fn, iters: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def _decode_bytes(cfg: ModelConfig, batch: int, ctx: int, num_adapters: int, rank: int, dtype) -> int:
    """Bytes one decode step must read at least: every weight matrix (lm_head included), every sequence's KV
    cache, and the factors of each distinct adapter (rank r on all seven projections of every layer)."""
    elem = torch.empty((), dtype=dtype).element_size()
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    layer = h * (q + 2 * kv) + q * h + 2 * h * i + i * h
    weights = cfg.num_layers * layer + cfg.vocab_size * h
    kv_cache = batch * ctx * cfg.num_layers * 2 * kv
    dims = Layout.of(cfg).dims.values()  # (d_out, d_in) per projection
    adapters = num_adapters * cfg.num_layers * sum(rank * (d_out + d_in) for d_out, d_in in dims)
    return (weights + kv_cache + adapters) * elem


def _random_state(cfg: ModelConfig, device, dtype) -> dict[str, torch.Tensor]:
    def rnd(*shape):
        return (torch.randn(*shape, device=device, dtype=dtype) * 0.02)

    s = {"model.embed_tokens.weight": rnd(cfg.vocab_size, cfg.hidden_size), "model.norm.weight": torch.ones(cfg.hidden_size, device=device, dtype=dtype),
         "lm_head.weight": rnd(cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = torch.ones(cfg.hidden_size, device=device, dtype=dtype)
        s[p + "post_attention_layernorm.weight"] = torch.ones(cfg.hidden_size, device=device, dtype=dtype)
        s[p + "self_attn.q_proj.weight"] = rnd(cfg.q_size, cfg.hidden_size)
        s[p + "self_attn.k_proj.weight"] = rnd(cfg.kv_size, cfg.hidden_size)
        s[p + "self_attn.v_proj.weight"] = rnd(cfg.kv_size, cfg.hidden_size)
        s[p + "self_attn.o_proj.weight"] = rnd(cfg.hidden_size, cfg.q_size)
        s[p + "mlp.gate_proj.weight"] = rnd(cfg.intermediate_size, cfg.hidden_size)
        s[p + "mlp.up_proj.weight"] = rnd(cfg.intermediate_size, cfg.hidden_size)
        s[p + "mlp.down_proj.weight"] = rnd(cfg.hidden_size, cfg.intermediate_size)
    return s


def _time(fn, device: torch.device, iters: int = 20) -> float:
    """Mean milliseconds per call (CUDA events on a GPU, wall clock elsewhere), after 3 warm-up calls."""
    with torch.inference_mode():
        for _ in range(3):
            fn()
        if device.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters * 1e3
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["engine", "decode-step", "host", "sampling"], default="engine")
    ap.add_argument("--configs", nargs="+", default=["tiny", "100m"], choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--shape", default="7b", choices=list(CONFIGS))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--adapter-counts", type=int, nargs="+", default=[0, 1, 8, 32])
    ap.add_argument("--host-model", default="tiny", help="host: 'tiny' or a model name/path the server accepts "
                                                        "(sampling: that model, smollm2 for 'tiny')")
    ap.add_argument("--no-overlap", action="store_true", help="host: text work after the forward (the old order)")
    ap.add_argument("--lookahead", action="store_true",
                    help="host: build the next decode step while the forward runs (on a GPU by default)")
    ap.add_argument("--data-dir", type=Path, default=None, help="host: where a named model is converted (default: temp)")
    ap.add_argument("--device", default=None,
                    help="decode-step: cuda (default when available) or cpu (smoke run); host: cpu (default) or cuda")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.mode == "decode-step" and args.batch == 16:
        args.batch = 32
    if args.mode == "sampling":
        torch.set_num_threads(cpu_threads())  # as the engine's forward thread, which samples (server/engine/cpu_threads.py)
    rows = {"engine": cpu_suite, "decode-step": decode_step_suite, "host": host_suite,
            "sampling": sampling_suite}[args.mode](args)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
