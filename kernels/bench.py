"""Kernel micro-benchmarks on one CUDA GPU, next to their baselines, measured in the same run.

    python -m kernels.bench --op lowrank --out bench.json [--quick]
    python -m kernels.bench --op lowrank_configs        (launch configs around the heuristic, for retuning)

Each op registers one function in OPS: it takes the parsed arguments and returns result rows (dicts), which
are printed as a table and written, with the device and the measured copy bandwidth, to --out as JSON.
Every implementation's output is checked against the op's reference once before it is timed.
Times: `us` is triton.testing.do_bench (eager: includes the Python launch cost), `us_graph` the same call
replayed from a CUDA graph (device time only); GB/s uses the graph time when there is one.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch
import triton
import triton.testing

from kernels.lowrank import LowRankTable, lowrank_delta_ref, lowrank_delta_triton, lowrank_launch_config
from kernels.segments import make_segments

log = logging.getLogger(__name__)

# Llama-2-7B projections: (d_in, output slice widths); fused groups are one call.
LLAMA2_7B = {"qkv": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)), "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))}
BATCHES = {"decode1": [1], "decode8": [1] * 8, "decode32": [1] * 32, "decode64": [1] * 64, "prefill4x512": [512] * 4}
RANKS = {"r8": (8,), "r16": (16,), "r64": (64,), "mix8-128": (8, 16, 32, 64, 128)}
MAX_GATHER_BYTES = 4 << 30  # the padded baseline gathers (T, max_rank, d_in + w) per slice; skip it past this


def timed(fn: Callable[[], object]) -> tuple[float, float | None]:
    """(eager us, CUDA-graph us or None when fn cannot be captured)."""
    eager = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
    except Exception as exc:  # a baseline that syncs cannot be captured; report eager time only
        log.warning("cuda graph capture failed: %s", exc)
        graph = None
    return eager, graph


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth (read + write) of a 1 GiB tensor, the ceiling for a memory-bound op."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


# ---------------------------------------------------------------------------------------------------- lowrank


@dataclass
class LowRankProblem:
    x: torch.Tensor  # (T, d_in)
    y: torch.Tensor  # (T, sum w)
    arena: torch.Tensor
    table: LowRankTable
    seg: object  # Segments
    seg_slots: list[int]
    ranks: list[list[int]]  # [slice][slot]
    bytes_moved: int


def bench_lowrank_problem(d_in: int, widths: tuple[int, ...], seg_lens: list[int], num_adapters: int,
                          rank_choices: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> LowRankProblem:
    """Adapters k = 0..num_adapters-1 of rank rank_choices[k % len], segment j uses adapter j % num_adapters."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_slices, num_tokens = len(widths), sum(seg_lens)
    ranks = [[rank_choices[k % len(rank_choices)] for k in range(num_adapters)] for _ in widths]
    a_off, b_off, pos = [[0] * num_adapters for _ in widths], [[0] * num_adapters for _ in widths], 0
    for i, w in enumerate(widths):
        for k in range(num_adapters):
            a_off[i][k], b_off[i][k] = pos, pos + ranks[i][k] * d_in
            pos += ranks[i][k] * (d_in + w)
    arena = torch.randn(pos, generator=gen, device="cuda").to(dtype)
    for i, w in enumerate(widths):  # A ~ N(0, 1/d_in), Bt ~ N(0, 1/r): the delta is O(1)
        for k in range(num_adapters):
            r = ranks[i][k]
            arena[a_off[i][k] : b_off[i][k]] /= d_in**0.5
            arena[b_off[i][k] : b_off[i][k] + r * w] /= r**0.5
    dev = dict(device="cuda")
    table = LowRankTable(
        a_off=torch.tensor(a_off, dtype=torch.int64, **dev), b_off=torch.tensor(b_off, dtype=torch.int64, **dev),
        rank=torch.tensor(ranks, dtype=torch.int32, **dev), scale=torch.full((num_slices, num_adapters), 0.5, **dev),
        out_start=tuple(sum(widths[:i]) for i in range(num_slices)), out_width=widths, max_rank=max(rank_choices),
    )
    seg_slots = [j % num_adapters for j in range(len(seg_lens))]
    used = sorted(set(seg_slots))
    elem = torch.empty((), dtype=dtype).element_size()
    factor_bytes = sum(ranks[i][k] * (d_in + w) for i, w in enumerate(widths) for k in used) * elem
    return LowRankProblem(
        x=torch.randn(num_tokens, d_in, generator=gen, **dev).to(dtype),
        y=torch.randn(num_tokens, sum(widths), generator=gen, **dev).to(dtype),
        arena=arena, table=table, seg=make_segments(seg_lens, seg_slots, "cuda"), seg_slots=seg_slots, ranks=ranks,
        bytes_moved=(num_tokens * d_in + 2 * num_tokens * sum(widths)) * elem + factor_bytes,
    )


def bench_lowrank_padded_bmm(p: LowRankProblem) -> Callable[[], None] | None:
    """Baseline (a): factors padded to max_rank per slot, gathered per token, two torch.bmm per slice."""
    num_tokens, d_in = p.x.shape
    max_rank, widths = p.table.max_rank, p.table.out_width
    if num_tokens * max_rank * (d_in + max(widths)) * p.x.element_size() > MAX_GATHER_BYTES:
        return None
    a_pad, bt_pad, scales = [], [], p.table.scale.tolist()
    for i, w in enumerate(widths):
        a = torch.zeros(len(p.ranks[i]), max_rank, d_in, dtype=p.x.dtype, device="cuda")
        bt = torch.zeros(len(p.ranks[i]), max_rank, w, dtype=p.x.dtype, device="cuda")
        for k, r in enumerate(p.ranks[i]):
            a0, b0 = int(p.table.a_off[i, k]), int(p.table.b_off[i, k])
            a[k, :r] = p.arena[a0 : a0 + r * d_in].view(r, d_in)
            bt[k, :r] = p.arena[b0 : b0 + r * w].view(r, w) * scales[i][k]
        a_pad.append(a)
        bt_pad.append(bt)
    slot = p.seg.token_slot.long()  # every token has an adapter in these problems

    def run() -> None:
        for i, (col, w) in enumerate(zip(p.table.out_start, widths)):
            h = torch.bmm(a_pad[i][slot], p.x[:, :, None])  # (T, R, 1)
            delta = torch.bmm(h.transpose(1, 2), bt_pad[i][slot])  # (T, 1, w)
            p.y[:, col : col + w] += delta[:, 0]

    return run


def bench_lowrank_loop(p: LowRankProblem) -> Callable[[], None]:
    """Baseline (b): one pair of torch matmuls per (adapter present, slice), tokens gathered per adapter."""
    d_in = p.x.shape[1]
    starts = p.seg.seg_start.tolist()
    work = []
    for k in sorted(set(p.seg_slots)):
        rows = [t for j, s in enumerate(p.seg_slots) if s == k for t in range(starts[j], starts[j + 1])]
        idx = torch.tensor(rows, dtype=torch.long, device="cuda")
        for i, (col, w) in enumerate(zip(p.table.out_start, p.table.out_width)):
            r, a0, b0 = p.ranks[i][k], int(p.table.a_off[i, k]), int(p.table.b_off[i, k])
            a, bt = p.arena[a0 : a0 + r * d_in].view(r, d_in), p.arena[b0 : b0 + r * w].view(r, w)
            work.append((idx, col, w, a, bt, float(p.table.scale[i, k])))

    def run() -> None:
        for idx, col, w, a, bt, scale in work:
            delta = (p.x[idx] @ a.t()) @ bt  # (n, w)
            p.y[:, col : col + w].index_add_(0, idx, delta, alpha=scale)

    return run


def bench_lowrank_check(name: str, fn: Callable[[], None], p: LowRankProblem) -> None:
    """Run fn once on a copy of y and compare it with the fp32 reference (bf16 tolerance, as in the tests)."""
    y0 = p.y.clone()
    y_ref = y0.float()
    lowrank_delta_ref(y_ref, p.x.float(), p.seg, p.arena.float(), p.table)
    fn()
    err = (p.y.float() - y_ref).abs().max().item()
    p.y.copy_(y0)
    if err > 6e-2 * max(y_ref.abs().max().item(), 1.0):
        raise AssertionError(f"lowrank {name}: max abs error {err:.3g} against the reference")


def bench_lowrank_case(op: str, batch: str, num_adapters: int, rank_name: str, copy_gbs: float) -> dict:
    d_in, widths = LLAMA2_7B[op]
    p = bench_lowrank_problem(d_in, widths, BATCHES[batch], num_adapters, RANKS[rank_name])
    impls = {
        "triton": lambda: lowrank_delta_triton(p.y, p.x, p.seg, p.arena, p.table),
        "padded_bmm": bench_lowrank_padded_bmm(p),
        "loop": bench_lowrank_loop(p),
    }
    row = dict(op=f"lowrank.{op}", batch=batch, tokens=p.x.shape[0], adapters=num_adapters, ranks=rank_name,
               mbytes=p.bytes_moved / 1e6)
    for name, fn in impls.items():
        if fn is None:
            row[f"{name}_us"] = row[f"{name}_us_graph"] = None
            continue
        bench_lowrank_check(name, fn, p)
        row[f"{name}_us"], row[f"{name}_us_graph"] = timed(fn)
    us = row["triton_us_graph"] or row["triton_us"]
    row["triton_gbs"] = p.bytes_moved / us / 1e3
    row["pct_copy"] = 100 * row["triton_gbs"] / copy_gbs
    baselines = [row[f"{b}_us_graph"] or row[f"{b}_us"] for b in ("padded_bmm", "loop") if row[f"{b}_us"] is not None]
    row["speedup"] = min(baselines) / us  # over the faster baseline
    del p
    torch.cuda.empty_cache()
    return row


def bench_lowrank(args: argparse.Namespace) -> list[dict]:
    """Llama-2-7B projections x batches x adapters present x ranks, bf16."""
    ops = ["qkv", "down"] if args.quick else list(LLAMA2_7B)
    batches = ["decode1", "decode64", "prefill4x512"] if args.quick else list(BATCHES)
    ranks = ["r16", "mix8-128"] if args.quick else list(RANKS)
    rows = []
    for op in ops:
        for batch in batches:
            num_segments = len(BATCHES[batch])
            for num_adapters in sorted({1, min(8, num_segments), min(64, num_segments)}):
                for rank_name in ranks:
                    rows.append(bench_lowrank_case(op, batch, num_adapters, rank_name, args.copy_gbs))
                    print_rows(rows[-1:], header=len(rows) == 1)
    return rows


CONFIG_SWEEP = {  # LaunchConfig field -> values tried one at a time around the heuristic choice
    "shrink_block_k": (64, 128, 256), "shrink_block_r": (16, 32, 64), "shrink_warps": (4, 8),
    "expand_block_n": (64, 128, 256), "expand_block_r": (16, 32, 64), "expand_warps": (2, 4), "expand_stages": (1, 2),
    "expand_blocks_per_program": (1, 2, 4, 8), "split_k": (1, 2, 4, 8, 16),
}
CONFIG_PROBLEMS = [  # (op, batch, adapters, ranks)
    ("qkv", "decode1", 1, "r16"), ("qkv", "decode64", 64, "r16"), ("qkv", "decode64", 1, "r16"),
    ("down", "decode64", 64, "mix8-128"), ("qkv", "prefill4x512", 4, "mix8-128"), ("gate_up", "prefill4x512", 1, "r16"),
]


def bench_lowrank_configs(args: argparse.Namespace) -> list[dict]:
    """Launch configs of the Triton kernels, one field at a time around the heuristic (for retuning)."""
    rows = []
    for op, batch, num_adapters, rank_name in CONFIG_PROBLEMS:
        d_in, widths = LLAMA2_7B[op]
        p = bench_lowrank_problem(d_in, widths, BATCHES[batch], num_adapters, RANKS[rank_name])
        base = lowrank_launch_config(p.seg, p.table, d_in, p.x.device)
        for field, values in [("heuristic", (None,)), *CONFIG_SWEEP.items()]:
            for value in values:
                if field == "split_k":
                    cfg = lowrank_launch_config(p.seg, p.table, d_in, p.x.device, split_k=value)
                    cfg = replace(base, split_k=cfg.split_k, k_per_split=cfg.k_per_split)
                else:
                    cfg = base if value is None else replace(base, **{field: value})
                fn = lambda: lowrank_delta_triton(p.y, p.x, p.seg, p.arena, p.table, config=cfg)  # noqa: E731
                try:
                    bench_lowrank_check(f"{field}={value}", fn, p)
                    us = triton.testing.do_bench_cudagraph(fn) * 1e3
                except Exception as exc:  # out of shared memory, registers: report and go on
                    us, value = None, f"{value} ({type(exc).__name__})"
                rows.append(dict(op=f"lowrank.{op}", batch=batch, adapters=num_adapters, ranks=rank_name,
                                 field=field, value=value, us=us, gbs=us and p.bytes_moved / us / 1e3))
                print(f"{op:8} {batch:13} {num_adapters:3} {rank_name:9} {field:15} {str(value):28} "
                      f"{'-' if us is None else f'{us:8.1f} us {p.bytes_moved / us / 1e3:6.0f} GB/s'}", flush=True)
        print(f"  heuristic: {base}", flush=True)
        del p
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------- attention, sparse, scale
# Rows of these ops print as `key=value` lines: their columns differ from lowrank's table.


def bench_print(row: dict) -> None:
    print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def bench_time_impls(row: dict, impls: dict[str, Callable[[], object]], bytes_moved: int, copy_gbs: float) -> dict:
    """Time each implementation (already checked); GB/s and speedup are the first one's, over the last."""
    for name, fn in impls.items():
        row[f"{name}_us"], row[f"{name}_us_graph"] = timed(fn)
    first, last = list(impls)
    us = row[f"{first}_us_graph"] or row[f"{first}_us"]
    row["gbs"] = bytes_moved / us / 1e3
    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
    row["speedup"] = (row[f"{last}_us_graph"] or row[f"{last}_us"]) / us
    return row


def bench_attention_case(q_lens: list[int], seq_lens: list[int], copy_gbs: float, heads=(32, 32, 128)) -> dict:
    """Llama-2-7B attention (32 query heads, 32 KV heads, head_dim 128), bf16, block size 16, scattered blocks."""
    from kernels.attention import AttentionMeta, paged_attention_ref, paged_attention_triton

    num_q_heads, num_kv_heads, head_dim = heads
    block_size, dev = 16, dict(device="cuda")
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    perm = torch.randperm(sum(blocks_per_seq), **dev).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, **dev)
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = perm[sum(blocks_per_seq[:b]) : sum(blocks_per_seq[: b + 1])]
    cache_shape = (len(perm), block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=torch.bfloat16, **dev)
    v_cache = torch.randn(cache_shape, dtype=torch.bfloat16, **dev)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, dtype=torch.bfloat16, **dev)
    q_start = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, **dev)
    meta = AttentionMeta(q_start, torch.tensor(seq_lens, dtype=torch.int32, **dev), table, max(q_lens), max(seq_lens))
    scale = head_dim**-0.5
    impls = {"triton": lambda: paged_attention_triton(q, k_cache, v_cache, meta, scale),
             "sdpa_ref": lambda: paged_attention_ref(q, k_cache, v_cache, meta, scale)}
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    for name, fn in impls.items():
        err = (fn().float() - ref).abs().max().item()
        if err > 6e-2 * max(ref.abs().max().item(), 1.0):
            raise AssertionError(f"attention {name}: max abs error {err:.3g} against the reference")
    kv_bytes = 2 * sum(seq_lens) * num_kv_heads * head_dim * 2 + 2 * q.numel() * 2
    row = dict(op="attention", batch=len(seq_lens), q_len=max(q_lens), ctx=max(seq_lens), mbytes=kv_bytes / 1e6)
    row = bench_time_impls(row, impls, kv_bytes, copy_gbs)
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return row


def bench_attention(args: argparse.Namespace) -> list[dict]:
    """Decode at batch 1..64, context 512..4096; then prefill chunks of 512 after 1536 cached tokens."""
    batches, contexts = ((1, 64), (512, 4096)) if args.quick else ((1, 8, 16, 32, 64), (512, 1024, 2048, 4096))
    rows = []
    for batch in batches:
        for ctx in contexts:
            rows.append(bench_attention_case([1] * batch, [ctx] * batch, args.copy_gbs))
            bench_print(rows[-1])
    for batch in (1, 4):
        rows.append(bench_attention_case([512] * batch, [2048] * batch, args.copy_gbs))
        bench_print(rows[-1])
    return rows


SPARSE_SHAPES = {"o": (4096, 4096), "down": (4096, 11008)}  # (d_out, d_in)


def bench_sparse_case(shape: str, batch: str, num_adapters: int, density: float, copy_gbs: float) -> dict:
    """SIFT deltas of `density` per adapter on a Llama-2-7B projection, bf16; segment j uses adapter j % n."""
    from kernels.sparse import pack_sparse, sparse_delta_ref, sparse_delta_triton

    d_out, d_in = SPARSE_SHAPES[shape]
    seg_lens, dev = BATCHES[batch], dict(device="cuda")
    nnz = int(density * d_out * d_in)
    entries = [(torch.randint(0, d_out, (nnz,), dtype=torch.int32, **dev), torch.randint(0, d_in, (nnz,), dtype=torch.int32, **dev),
                torch.randn(nnz, **dev) * 0.1) for _ in range(num_adapters)]
    idx_arena, val_arena, table = pack_sparse(entries, d_out, torch.bfloat16, "cuda")
    del entries
    seg_slots = [j % num_adapters for j in range(len(seg_lens))]
    seg = make_segments(seg_lens, seg_slots, "cuda")
    x = torch.randn(seg.num_tokens, d_in, dtype=torch.bfloat16, **dev)
    y = torch.randn(seg.num_tokens, d_out, dtype=torch.bfloat16, **dev)
    impls = {"triton": lambda: sparse_delta_triton(y, x, seg, idx_arena, val_arena, table),
             "ref": lambda: sparse_delta_ref(y, x, seg, idx_arena, val_arena, table)}
    y0 = y.clone()
    y_ref = y0.float()
    sparse_delta_ref(y_ref, x.float(), seg, idx_arena, val_arena.float(), table)
    for name, fn in impls.items():
        fn()
        err = (y.float() - y_ref).abs().max().item()
        y.copy_(y0)
        if err > 6e-2 * max(y_ref.abs().max().item(), 1.0):
            raise AssertionError(f"sparse {name}: max abs error {err:.3g} against the reference")
    used = len(set(seg_slots))
    bytes_moved = used * (nnz * 6 + (d_out + 1) * 4) + (x.numel() + 2 * y.numel()) * 2
    row = dict(op=f"sparse.{shape}", batch=batch, tokens=seg.num_tokens, adapters=num_adapters, density=density,
               mbytes=bytes_moved / 1e6)
    return bench_time_impls(row, impls, bytes_moved, copy_gbs)


def bench_sparse(args: argparse.Namespace) -> list[dict]:
    """Llama-2-7B o/down projections x batches x adapters present, 1% density, bf16."""
    rows = []
    for shape in SPARSE_SHAPES:
        for batch in ["decode1", "decode64", "prefill4x512"] if args.quick else list(BATCHES):
            num_segments = len(BATCHES[batch])
            for num_adapters in sorted({1, min(8, num_segments), min(64, num_segments)}):
                rows.append(bench_sparse_case(shape, batch, num_adapters, 0.01, args.copy_gbs))
                bench_print(rows[-1])
                torch.cuda.empty_cache()
    return rows


def bench_scale(args: argparse.Namespace) -> list[dict]:
    """IA3/PARA scaling of the FFN intermediate (11008 wide, columns 11008.. of a fused gate|up output), bf16."""
    from kernels.scale import scale_rows_ref, scale_rows_triton

    rows, width = [], 11008
    for num_tokens in (1, 64, 2048) if args.quick else (1, 16, 64, 256, 2048, 8192):
        wide = torch.randn(num_tokens, 2 * width, dtype=torch.bfloat16, device="cuda")
        vectors = torch.rand(64, width, dtype=torch.bfloat16, device="cuda") + 0.5
        row = torch.randint(0, 64, (num_tokens,), dtype=torch.int32, device="cuda")
        ys = wide[:, width:]
        impls = {"triton": lambda: scale_rows_triton(wide, vectors, row, width),
                 "torch": lambda: ys.mul_(vectors[row.long()])}
        want = wide.float()
        scale_rows_ref(want, vectors.float(), row, width)
        for name, fn in impls.items():
            w0 = wide.clone()
            fn()
            err = (wide.float() - want).abs().max().item()
            wide.copy_(w0)
            if err > 6e-2 * want.abs().max().item():
                raise AssertionError(f"scale {name}: max abs error {err:.3g} against the reference")
        bytes_moved = 2 * num_tokens * width * 2 + min(num_tokens, 64) * width * 2
        result = dict(op="scale", tokens=num_tokens, width=width, mbytes=bytes_moved / 1e6)
        rows.append(bench_time_impls(result, impls, bytes_moved, args.copy_gbs))
        bench_print(rows[-1])
    return rows


# ---------------------------------------------------------------------------------------------------- driver

OPS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {"lowrank": bench_lowrank, "lowrank_configs": bench_lowrank_configs}
OPS.update(attention=bench_attention, sparse=bench_sparse, scale=bench_scale)

COLUMNS = [  # (row key, header, width, format)
    ("op", "op", 16, "s"), ("batch", "batch", 12, "s"), ("adapters", "ad", 3, "d"), ("ranks", "ranks", 8, "s"),
    ("mbytes", "MB", 7, ".1f"), ("triton_us_graph", "tri_us", 8, ".1f"), ("triton_us", "tri_eager", 9, ".1f"),
    ("triton_gbs", "GB/s", 6, ".0f"), ("pct_copy", "%copy", 5, ".0f"), ("padded_bmm_us_graph", "pad_us", 8, ".1f"),
    ("loop_us_graph", "loop_us", 8, ".1f"), ("loop_us", "loop_eager", 10, ".1f"), ("speedup", "speedup", 7, ".2f"),
]


def print_rows(rows: list[dict], header: bool) -> None:
    if header:
        print(" ".join(f"{label:>{width}}" for _, label, width, _ in COLUMNS))
    for row in rows:
        cells = [("-" if row.get(key) is None else format(row[key], fmt)).rjust(width) for key, _, width, fmt in COLUMNS]
        print(" ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=list(OPS), nargs="+", default=["lowrank"])
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="a few representative cases only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA GPU")
    args.copy_gbs = copy_gbs = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  copy {copy_gbs:.0f} GB/s")
    results = {}
    for name in args.op:
        results[name] = OPS[name](args)
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, copy_gbs=copy_gbs)
        with open(args.out, "w") as f:
            json.dump(dict(meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
