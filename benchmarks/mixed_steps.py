"""Engine-only: where a mixed batch's adapters cost time. The peers benchmark's workload (`--requests` prompts of
`--prompt-len` tokens, `--max-tokens` greedy tokens each) through the engine's own step loop (no HTTP), once on the
base model and once over `--num-adapters` random rank-`--rank` LoRAs on all seven projections, interleaved round by
round: each round's prefill step and its median decode step. `--lora-dtype`: the adapters' factors' (the server's
`--lora-dtype`; compare two in separate runs, one process each: two engines in one process slowed both kinds of step
by a third). Also the bytes a decode step streams: the base's weights (in `--dtype`) and the distinct adapters'
factors, and what the mixed/base ratio of a decode step would be if both streamed at the same speed.

    python -m benchmarks.mixed_steps [--model smollm2] [--data-dir .multiplex] [--rounds 4] [--dtype fp32|bf16]
                                     [--lora-dtype float32|bfloat16] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from adapters.delta import PROJECTIONS
from benchmarks.engine import random_adapter
from benchmarks.peers import code_version
from server.engine.builder import EngineOptions, build_llm_engine
from server.engine.request import AdapterRef, Request, SamplingParams
from server.model.adapter_layout import Layout
from server.model.catalog import resolve_model_path
from server.model.config import ModelConfig


def stream_bytes(cfg: ModelConfig, num_adapters: int, rank: int, elem: int = 4, lora_elem: int = 4) -> dict:
    """Bytes a decode step reads: the projections and the LM head, `elem` bytes a value (fp32: 4, bf16: 2), and
    the adapters' A and B factors, `lora_elem` bytes a value (on a CPU fp32 whatever the model's dtype, or bf16 with
    `--lora-dtype bfloat16`: server/model/padded_lowrank.py)."""
    dims = Layout.of(cfg).dims  # projection -> (d_out, d_in)
    shapes = [dims[p] for p in PROJECTIONS]
    base = cfg.num_layers * sum(o * i for o, i in shapes) + cfg.vocab_size * cfg.hidden_size
    adapters = num_adapters * cfg.num_layers * rank * sum(o + i for o, i in shapes)
    return {"base_mb": base * elem * 1e-6, "adapters_mb": adapters * lora_elem * 1e-6,
            "equal_speed_decode_ratio": base * elem / (base * elem + adapters * lora_elem)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a name the server knows or a checkpoint directory")
    ap.add_argument("--data-dir", type=Path, default=None, help="where a named model is converted (default: temp)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds of each, after one warm-up round")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--lora-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = resolve_model_path(args.model, args.data_dir or Path(tmp))
        cfg = ModelConfig.from_dir(path)
        engine = build_llm_engine(str(path), EngineOptions(
            device="cpu", dtype=args.dtype, lora_dtype=args.lora_dtype, max_num_seqs=args.requests,
            max_num_batched_tokens=max(2048, args.requests * args.prompt_len), max_prefill_chunk=2048))
    refs = [AdapterRef(f"a{i}", 1, random_adapter(cfg, args.rank, seed=i)) for i in range(args.num_adapters)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    def one_round(mixed: bool, tag: str) -> tuple[float, float]:
        for i in range(args.requests):
            engine.add_request(Request(f"{tag}-{i}", [100 + (i + t) % 1000 for t in range(args.prompt_len)], params,
                                       adapter=refs[i % len(refs)] if mixed else None))
        times = []
        while engine.has_work():
            t0 = time.perf_counter()
            engine.step()
            times.append(1e3 * (time.perf_counter() - t0))
        return times[0], statistics.median(times[1:] or times)

    rows = {"base": [], "mixed": []}
    for rnd in range(args.rounds + 1):
        for kind in rows:
            prefill, decode = one_round(kind == "mixed", f"{kind}{rnd}")
            if rnd:  # the first round warms up
                rows[kind].append({"prefill_ms": prefill, "decode_ms": decode})
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
              platform.machine(), "code": code_version(), "model": str(path),
              "args": {k: str(v) for k, v in vars(args).items()},
              "bytes": stream_bytes(cfg, args.num_adapters, args.rank, 2 if args.dtype == "bf16" else 4,
                                    2 if args.lora_dtype == "bfloat16" else 4),
              "rounds": rows}
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("prefill_ms", "decode_ms")} for k, v in rows.items()}
    for kind, v in rows.items():
        print(f"{kind:5s} prefill ms {[round(r['prefill_ms'], 1) for r in v]}, decode ms "
              f"{[round(r['decode_ms'], 1) for r in v]}")
    b, m = report["bytes"], med["mixed"]
    print(f"mixed ({args.lora_dtype} factors) / base time: prefill {med['base']['prefill_ms'] / m['prefill_ms']:.2f}x, "
          f"decode {med['base']['decode_ms'] / m['decode_ms']:.2f}x (medians); a decode step streams "
          f"{b['base_mb']:.0f} MB of base weights and {b['adapters_mb']:.0f} MB of adapter factors: at equal speed "
          f"{b['equal_speed_decode_ratio']:.3f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
