"""Engine-only: the fp32 projections of a CPU decode step, oneDNN (prepacked) against our kernel
(kernels/cpu_matmul.py, the form this CPU builds or `--variant`), on the weights of `--layers` smollm2 layers (q|k|v 960 x 576, o 576 x 576, gate|up 3072 x
576, down 576 x 1536: 14 MB a layer, more than the CPU's caches hold at 8 layers, so the weights stream from memory
as in a real step), for each token count. `--grid`: instead, the LoRA deltas of a decode step
(kernels/lowrank_padded.py's padded grid) over all 30 layers' four projection groups, 8 rank-16 adapters on 16 slots, one token per request in
turn across the adapters, torch's gather-bmm against our kernel, on fp32 factors and on the same in bf16.

    python -m benchmarks.cpu_matmul [--tokens 1 4 16 64 512] [--layers 8] [--out FILE.json]
    python -m benchmarks.cpu_matmul --grid [--tokens 16 32]

Each figure is the median of 15 passes over all the weights, the better of 3 rounds that alternate the two (this
machine is noisy); outputs are compared with F.linear (the grid: with the gather-bmm).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone

import torch

from kernels import cpu_build, cpu_matmul, lowrank_padded
from kernels.segments import make_segments

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # smollm2's q|k|v, o, gate|up, down: (d_out, d_in)
GROUPS = ((576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,)))  # (d_in, slice widths)


def grid_ways(tokens: int, gen: torch.Generator, rank: int = 16, layers: int = 30, adapters: int = 8):
    """The padded LoRA factors of a smollm2 step and its inputs -> (fp32 weight bytes, {way: fn}, max |diff|).
    Ways: torch's gather-bmm, our kernel, our kernel on the factors in bf16 (`--lora-dtype bfloat16`: half the
    bytes)."""
    ops = []
    for _ in range(layers):
        for d_in, widths in GROUPS:
            a = torch.randn(16, len(widths) * rank, d_in, generator=gen) * 0.01
            bt = tuple(torch.randn(16, rank, w, generator=gen) * 0.01 for w in widths)
            starts = tuple(sum(widths[:i]) for i in range(len(widths)))
            ops.append((lowrank_padded.PaddedFactors(a, bt, starts, widths), torch.randn(tokens, d_in, generator=gen),
                        torch.zeros(tokens, sum(widths))))
    seg = make_segments([1] * tokens, [i % adapters for i in range(tokens)], "cpu")
    weight_bytes = sum(4 * adapters * (f.a[0].numel() + sum(b[0].numel() for b in f.bt)) for f, _, _ in ops)

    bf16_ops = [(replace(f, a=f.a.bfloat16(), bt=tuple(b.bfloat16() for b in f.bt)), x, y) for f, x, y in ops]

    def way(kernel: bool, factors=ops):
        def run(_):
            cpu_matmul._enabled = kernel  # the dispatch kernels/lowrank_padded.py reads
            for f, x, y in factors:
                lowrank_padded.lowrank_delta_padded(y, x, seg, f)
        return run

    f, x, _ = ops[0]
    outs = []
    for kernel in (False, True):
        y = torch.zeros(tokens, sum(f.out_width))
        cpu_matmul._enabled = kernel
        lowrank_padded.lowrank_delta_padded(y, x, seg, f)
        outs.append(y)
    return (weight_bytes, {"gather-bmm": way(False), "ours": way(True), "ours-bf16": way(True, bf16_ops)},
            (outs[0] - outs[1]).abs().max().item())


def _best_of_rounds(ways: dict, arg) -> dict[str, float]:
    """Each way's median pass, the best of 3 rounds that alternate the ways."""
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(3):
        for name, fn in ways.items():
            best[name] = min(best[name], _median_pass_s(fn, arg))
    return best


def _write(path: str | None, argv: list[str], rows: list[dict], **meta) -> None:
    if path:
        meta = dict(when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    cpu=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads(),
                    command=" ".join(["python -m benchmarks.cpu_matmul", *argv]), **meta)
        with open(path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


def _median_pass_s(fn, xs) -> float:
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        fn(xs)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--grid", action="store_true", help="the LoRA grid of a decode step instead of the projections")
    ap.add_argument("--variant", choices=sorted(cpu_build.VARIANTS), help="our kernel's form (default: this CPU's)")
    ap.add_argument("--out", help="write the rows as JSON here")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if not cpu_matmul.available():
        raise SystemExit("our kernel cannot run on this machine (needs x86-64 with AVX2 and FMA, and cc)")
    if args.variant:
        if args.variant == "avx512" and cpu_matmul.VARIANT != "avx512":
            raise SystemExit("the AVX-512 form needs an AVX-512 CPU")
        cpu_matmul.VARIANT = args.variant
    gen = torch.Generator().manual_seed(0)
    if args.grid:
        return grid_main(args, argv, gen)
    weights = [torch.randn(d_out, d_in, generator=gen) / d_in**0.5 for _ in range(args.layers) for d_out, d_in in SHAPES]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    panels = [cpu_matmul.pack(w) for w in weights]
    weight_bytes = sum(w.numel() * 4 for w in weights)
    ways = {"onednn": lambda xs: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for x, w in zip(xs, onednn)],
            "ours": lambda xs: [cpu_matmul.matmul(x, w) for x, w in zip(xs, panels)]}
    rows = []
    for tokens in args.tokens:
        xs = [torch.randn(tokens, w.shape[1], generator=gen) for w in weights]
        err = max((cpu_matmul.matmul(x, p) - x @ w.t()).abs().max().item() for x, p, w in zip(xs, panels, weights))
        best = _best_of_rounds(ways, xs)
        row = dict(tokens=tokens, onednn_ms=1e3 * best["onednn"], ours_ms=1e3 * best["ours"],
                   speedup=best["onednn"] / best["ours"], ours_weight_gb_s=weight_bytes / best["ours"] / 1e9,
                   ours_gflop_s=2 * tokens * weight_bytes / 4 / best["ours"] / 1e9, max_abs_err=err)
        rows.append(row)
        print(f"{tokens:5d} tokens: oneDNN {row['onednn_ms']:7.2f} ms, ours ({cpu_matmul.VARIANT}) "
              f"{row['ours_ms']:7.2f} ms ({row['speedup']:.2f}x; weights at {row['ours_weight_gb_s']:.1f} GB/s, "
              f"{row['ours_gflop_s']:.0f} GFLOP/s; max |diff| vs F.linear {err:.1e})", flush=True)
    _write(args.out, argv, rows, layers=args.layers, weight_mb=weight_bytes / 1e6, variant=cpu_matmul.VARIANT)
    return rows


def grid_main(args, argv: list[str], gen: torch.Generator) -> list[dict]:
    rows = []
    for tokens in args.tokens:
        weight_bytes, ways, err = grid_ways(tokens, gen)
        best = _best_of_rounds(ways, None)
        row = dict(tokens=tokens, gather_bmm_ms=1e3 * best["gather-bmm"], ours_ms=1e3 * best["ours"],
                   speedup=best["gather-bmm"] / best["ours"], ours_factor_gb_s=weight_bytes / best["ours"] / 1e9,
                   ours_bf16_ms=1e3 * best["ours-bf16"], bf16_speedup=best["ours"] / best["ours-bf16"],
                   ours_bf16_factor_gb_s=weight_bytes / 2 / best["ours-bf16"] / 1e9, max_abs_err=err)
        rows.append(row)
        print(f"{tokens:5d} tokens over 8 adapters, 120 ops: gather-bmm {row['gather_bmm_ms']:7.2f} ms, ours "
              f"{row['ours_ms']:7.2f} ms ({row['speedup']:.2f}x; factors at {row['ours_factor_gb_s']:.1f} GB/s; "
              f"max |diff| {err:.1e}); bf16 factors {row['ours_bf16_ms']:7.2f} ms ({row['bf16_speedup']:.2f}x ours, "
              f"at {row['ours_bf16_factor_gb_s']:.1f} GB/s)", flush=True)
    _write(args.out, argv, rows, grid=True, variant=cpu_matmul.VARIANT)
    return rows


if __name__ == "__main__":
    main()
