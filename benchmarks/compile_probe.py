"""What torch.compile (Inductor, CPU) would buy the CPU forward: one decoder layer's dense half at smollm2's shapes
(o_proj + residual, RMSNorm, gate|up, SiLU * up, down_proj + residual), timed three ways in one process:

  eager oneDNN  the engine's path: weights prepacked once (kernels/linear.py), elementwise ops eager
  compiled      torch.compile(dynamic=True) of the same block as an nn.Module, Inductor with freezing (which packs
                the weights for oneDNN itself and fuses the elementwise ops into C++ loops)
  eager F.linear  the plain module (MKL sgemm on this CPU)

    python -m benchmarks.compile_probe [--tokens 16 64 1024] [--threads 1]

The first compiled call compiles (printed); the timings are medians of 7 interleaved rounds of later calls, same
inputs, outputs compared.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kernels.linear import linear, prepack


class DenseHalf(torch.nn.Module):
    def __init__(self, hidden: int, intermediate: int, q_size: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.o = torch.nn.Linear(q_size, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False)
        self.norm = torch.nn.Parameter(torch.ones(hidden))

    def forward(self, attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o(attn)
        gate, up = self.gate_up(F.rms_norm(x, (self.hidden,), self.norm, 1e-5)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


def eager_onednn(block: DenseHalf):
    o, gate_up, down = (prepack(m.weight.detach()) for m in (block.o, block.gate_up, block.down))

    def run(attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = linear(attn, o, residual=x)
        gate, up = linear(F.rms_norm(x, (block.hidden,), block.norm, 1e-5), gate_up).chunk(2, -1)
        return linear(F.silu(gate) * up, down, residual=x)

    return run


def _time_us(fns, args, iters: int, rounds: int = 7) -> list[float]:
    """Median microseconds per call of each fn, timed in interleaved rounds (the machine's noise hits all alike)."""
    for fn in fns:
        for _ in range(3):
            fn(*args)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, samples):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(*args)
            out.append((time.perf_counter() - t0) / iters * 1e6)
    return [sorted(s)[len(s) // 2] for s in samples]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 1024])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    args = ap.parse_args(argv)
    import torch._inductor.config as inductor_config

    torch.set_num_threads(args.threads)
    inductor_config.freezing = True
    torch.manual_seed(0)
    block = DenseHalf(args.hidden, args.intermediate, args.hidden).eval()
    eager = eager_onednn(block)
    print(f"torch {torch.__version__}, {args.threads} thread(s); hidden {args.hidden}, intermediate {args.intermediate}")
    print("| tokens | eager oneDNN (the engine) | torch.compile | eager F.linear | compiled / engine |")
    print("| --- | --- | --- | --- | --- |")
    with torch.no_grad():
        compiled = torch.compile(block, dynamic=True)
        for n in args.tokens:
            inputs = (torch.randn(n, args.hidden), torch.randn(n, args.hidden))
            t0 = time.perf_counter()
            out = compiled(*inputs)
            first = time.perf_counter() - t0
            diff = (out - eager(*inputs)).abs().max().item()
            te, tc, tm = _time_us((eager, compiled, block), inputs, iters=max(2, 1000 // n))
            print(f"| {n} | {te:.0f} us | {tc:.0f} us (first call {first:.1f} s) | {tm:.0f} us | {tc / te:.2f}x |"
                  f"  max |diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
