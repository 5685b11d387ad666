"""Engine-only: a whole fp32 forward of smollm2 (or `--model`) on the CPU (the model alone: no scheduler, sampling
nor HTTP), with our CPU kernels for the elementwise ops and decode attention (kernels/cpu_elementwise.py,
kernels/cpu_attention.py) against PyTorch's ops for them, interleaved in one process: a prefill step of `--requests`
prompts of `--prompt-len` tokens, and a decode step of as many requests with `--context` tokens each.

    python -m benchmarks.cpu_forward [--requests 16] [--prompt-len 64] [--context 96] [--rounds 3] [--out FILE.json]
    python -m benchmarks.cpu_forward --model PATH    # a checkpoint directory or a name the server knows

Each figure is the median of 3 prefill or 15 decode forwards; rounds alternate the ways (this machine is noisy).
The projections run whatever MULTIPLEX_CPU_MATMUL chooses, in both ways.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from kernels import cpu_attention, cpu_elementwise
from server.engine.model_runner import ModelRunner
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import ScheduledBatch, ScheduledSeq
from server.model.catalog import resolve_model_path
from server.model.config import ModelConfig
from server.model.llama import LlamaModel
from server.model.loader import load_state_dict

BLOCK = 16


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a name the server knows or a checkpoint directory")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--context", type=int, default=96, help="tokens each decode request has seen")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="where a named model is converted (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (cpu_elementwise.available() and cpu_attention.available()):
        raise SystemExit("our CPU kernels do not run here (an x86-64 CPU with AVX2 and a C compiler are needed)")
    with tempfile.TemporaryDirectory() as tmp:
        path = resolve_model_path(args.model, args.data_dir or Path(tmp))
        cfg = ModelConfig.from_dir(path)
        model = LlamaModel(cfg, load_state_dict(path), "cpu", torch.float32)
    per_seq = (max(args.prompt_len, args.context) + 1 + BLOCK - 1) // BLOCK
    runner = ModelRunner(model, num_blocks=args.requests * per_seq, block_size=BLOCK, adapter_pool=None,
                         max_model_len=per_seq * BLOCK)

    def batch(start: int, num_tokens: int):
        seqs = []
        for b in range(args.requests):
            req = Request(f"r{b}", [5 + b] * (start + num_tokens), SamplingParams(max_tokens=1))
            req.block_ids, req.num_computed_tokens, req.slot = list(range(b * per_seq, (b + 1) * per_seq)), start, -1
            seqs.append(ScheduledSeq(req, start, num_tokens, True))
        return runner.build(ScheduledBatch(seqs))

    steps = {"prefill": (batch(0, args.prompt_len), 3), "decode": (batch(args.context, 1), 15)}
    times = _time_both_ways(model, runner, steps, args.rounds)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{when}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; {args.model} "
          f"fp32, {args.requests} requests: prefill of {args.prompt_len} tokens each, decode at {args.context}")
    rows = []
    for step in steps:
        ours, theirs = times[step]["ours"], times[step]["torch"]
        rows.append(dict(step=step, ours_ms=ours, torch_ms=theirs))
        print(f"  {step}: ours {', '.join(f'{t:.1f}' for t in ours)} ms; torch's ops "
              f"{', '.join(f'{t:.1f}' for t in theirs)} ms (best {min(theirs) / min(ours):.2f}x)")
    if args.out:
        args.out.write_text(json.dumps(dict(date=when, threads=torch.get_num_threads(), args=vars(args) | {
            "out": str(args.out), "data_dir": str(args.data_dir)}, rows=rows), indent=2))


def _time_both_ways(model, runner, steps: dict, rounds: int) -> dict[str, dict[str, list[float]]]:
    """{step: {way: [median ms per round]}}: each round runs every step with our kernels, then with PyTorch's ops."""
    ways = {"ours": True, "torch": False}
    times: dict[str, dict[str, list[float]]] = {s: {w: [] for w in ways} for s in steps}
    for _ in range(rounds):
        for way, on in ways.items():
            cpu_elementwise._enabled = cpu_attention._enabled = on
            for step, (fb, n) in steps.items():
                model.forward(fb, runner.kv, None)  # warm
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    model.forward(fb, runner.kv, None)
                    samples.append(time.perf_counter() - t0)
                times[step][way].append(sorted(samples)[n // 2] * 1e3)
    return times


if __name__ == "__main__":
    main()
