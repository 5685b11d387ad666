"""Batched low-rank deltas of heterogeneous rank: y += scale * (x A^T) B, per token's adapter slot.

Storage (no padding to a maximum rank): every factor lives in one flat 1-D `arena` tensor. For output slice i
of a (possibly fused) projection and slot s, the table gives
    A_is  = arena[a_off[i, s] : a_off[i, s] + r * d_in].view(r, d_in)        r = rank[i, s]
    Bt_is = arena[b_off[i, s] : b_off[i, s] + r * w_i].view(r, w_i)          w_i = out_width[i]  (B transposed)
A fused projection (q|k|v, gate|up) is one call with several slices; slice i writes the columns
[out_start[i], out_start[i] + w_i) of y.

Semantics:
    y[t, out_start[i] : out_start[i] + w_i] += scale[i, s] * (A_is @ x[t]) @ Bt_is,   s = token_slot[t]
    s == -1 or rank[i, s] == 0: no change.
    x: (T, d_in)   y: (T, sum_i w_i) contiguous   arena: (N,) same dtype as x   tables: (num_slices, num_slots)

Triton path (Punica SGMV / S-LoRA MBGMV, exact rank): two launches per call, all slices in each.
  shrink  grid (num_tiles, rank_blocks * split_k, num_slices): h[k, t, i*max_rank + j] = x[t, K_k] . A_is[j, K_k]
          for the tokens t of one row tile (Segments.tile_*: up to tile_size tokens of one slot, grouped by slot
          across requests), the ranks j of one rank block, the d_in range K_k of split k. Programs past the
          slot's rank, and padding tiles, return at once; base-model tokens are in no tile.
  expand  grid (num_tiles, sum_i cdiv(w_i, BLOCK_N)): y[t, cols] += scale * (sum_k h[k, t, i*max_rank + :r]) @ Bt_is[:, cols]
          Split-K partials are summed here (no atomics, no zeroing, deterministic); h is read only where written.
  tl.dot on (>= 16)-row tiles, fp32 accumulation; h is rounded to x's dtype before the expand's dot.
  Both kernels take a vectorized copy of their loop when the slot's offsets are multiples of 8 elements.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from kernels.segments import Segments

from kernels.dispatch import tl, triton, use_triton

MAX_SLICES = 4  # slices per fused call the expand kernel takes as scalar arguments (q|k|v needs 3)
MAX_SPLIT_ROWS = 128  # split_k * tile_size: d_in splits are for short (decode) tiles


@dataclass(frozen=True)
class LowRankTable:
    """Where each slot's factors sit in the arena, for one (layer, projection group). Device tensors."""

    a_off: torch.Tensor  # (num_slices, num_slots) int64
    b_off: torch.Tensor  # (num_slices, num_slots) int64
    rank: torch.Tensor  # (num_slices, num_slots) int32
    scale: torch.Tensor  # (num_slices, num_slots) float32
    out_start: tuple[int, ...]  # per slice, first output column
    out_width: tuple[int, ...]  # per slice, number of output columns
    max_rank: int  # upper bound on rank[i, s] (sizes the intermediate)


def lowrank_delta_ref(y: torch.Tensor, x: torch.Tensor, seg: Segments, arena: torch.Tensor, table: LowRankTable) -> None:
    """Reference (and CPU path): per distinct adapter slot, gather its tokens once, then per slice
    y[rows, cols] += scale * (x[rows] A^T) B^T in fp32. Moves r*(d_in + w) weights per slot, not per request."""
    if not seg.has_adapter:
        return
    d_in = x.shape[1]
    a_off, b_off = table.a_off.tolist(), table.b_off.tolist()
    ranks, scales = table.rank.tolist(), table.scale.tolist()
    for s, rows in seg.slot_rows:
        if all(ranks[i][s] == 0 for i in range(len(ranks))):
            continue
        xs = x[rows].float()  # (n, d_in)
        for i, (col, w) in enumerate(zip(table.out_start, table.out_width)):
            r = ranks[i][s]
            if r == 0:
                continue
            a = arena[a_off[i][s] : a_off[i][s] + r * d_in].view(r, d_in).float()
            bt = arena[b_off[i][s] : b_off[i][s] + r * w].view(r, w).float()
            delta = (xs @ a.t()) @ (bt * scales[i][s])  # (n, w)
            if isinstance(rows, slice):
                ys = y[rows, col : col + w]
                ys.copy_((ys.float() + delta).to(y.dtype))
            else:
                y[rows, col : col + w] = (y[rows, col : col + w].float() + delta).to(y.dtype)


# Loads vectorize (16 bytes) only where the compiler can prove alignment; an arena offset is data, so each kernel
# tests it at run time and takes a copy of its loop that can prove it, or the plain one. The proof is rebuilt
# inside the branch as (v // ALIGN) * ALIGN: a tl.multiple_of on v itself would tag v's defining op, outside
# the branch, and so wrongly promise alignment to the plain copy too.
ALIGN_ELEMS = 8


@triton.jit
def _aligned(v, ALIGN: tl.constexpr):
    """v, for a v known (by the caller's test) to be a multiple of ALIGN, in a form the compiler can see is one."""
    return tl.multiple_of((v // ALIGN) * ALIGN, ALIGN)


@triton.jit
def _shrink_dot(x_ptr, a_ptr, rows, m_mask, offs_r, r_mask, d_in, k_start, k_per_split,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """(BM, BR) fp32: x[rows, K] @ A[offs_r, K]^T over K = [k_start, k_start + k_per_split) within d_in."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * d_in + (k_start + offs_k)[None, :]  # (BM, BK)
    a_ptrs = a_ptr + offs_r[None, :].to(tl.int64) * d_in + (k_start + offs_k)[:, None]  # (BK, BR) = A^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            at = tl.load(a_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < d_in - k_start - k
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc += tl.dot(xt, at, input_precision="ieee")  # ignored for 16-bit inputs; no tf32 for fp32 ones
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    return acc


@triton.jit
def _shrink_kernel(
    x_ptr, arena_ptr, h_ptr,  # x (T, d_in), arena (N,), h (split_k, T, num_slices * max_rank) fp32
    sorted_tokens_ptr, tile_start_ptr, tile_len_ptr, tile_slot_ptr,  # (T,), (num_tiles,) x 3, int32
    a_off_ptr, rank_ptr,  # (num_slices, num_slots)
    num_slots, d_in, h_split_stride, h_row_stride, max_rank, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, ALIGN: tl.constexpr,
):
    tile = tl.program_id(0)
    rank_block = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    sid = tl.program_id(2)
    num_rows = tl.load(tile_len_ptr + tile)
    if num_rows == 0:  # padding tile
        return
    slot = tl.load(tile_slot_ptr + tile)
    rank = tl.load(rank_ptr + sid * num_slots + slot)
    if rank_block * BLOCK_R >= rank:  # past this slot's rank (or rank 0)
        return
    a_off = tl.load(a_off_ptr + sid * num_slots + slot)  # int64 element offset
    m_mask = tl.arange(0, BLOCK_M) < num_rows
    rows = tl.load(sorted_tokens_ptr + tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M), mask=m_mask, other=0)
    rows = rows.to(tl.int64)  # (BM,) token ids
    offs_r = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,) rows of A
    r_mask = offs_r < rank
    k_start = split * k_per_split
    if a_off % ALIGN == 0:
        acc = _shrink_dot(x_ptr, arena_ptr + _aligned(a_off, ALIGN), rows, m_mask, offs_r, r_mask, d_in,
                          k_start, k_per_split, BLOCK_M, BLOCK_R, BLOCK_K, EVEN_K)
    else:
        acc = _shrink_dot(x_ptr, arena_ptr + a_off, rows, m_mask, offs_r, r_mask, d_in,
                          k_start, k_per_split, BLOCK_M, BLOCK_R, BLOCK_K, EVEN_K)
    h_ptrs = h_ptr + split * h_split_stride + rows[:, None] * h_row_stride + sid * max_rank + offs_r[None, :]
    tl.store(h_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_store(y_ptr, h_ptr, b_ptr, rows, m_mask, rank, scale, width, col0, first_col,
                  y_cols, h_split_stride, h_row_stride,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
                  BLOCKS_PER_PROGRAM: tl.constexpr):
    """y[rows, col0 + c] += scale * h[rows, :rank] @ Bt[:rank, c] for BLOCKS_PER_PROGRAM blocks of columns c."""
    for j in range(BLOCKS_PER_PROGRAM):
        offs_n = first_col + j * BLOCK_N + tl.arange(0, BLOCK_N)  # columns within the slice
        n_mask = offs_n < width
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, rank, BLOCK_R):
            offs_k = k + tl.arange(0, BLOCK_R)
            k_mask = offs_k < rank
            h_ptrs = h_ptr + rows[:, None] * h_row_stride + offs_k[None, :]  # (BM, BR)
            ht = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):  # the shrink's d_in partials
                ht += tl.load(h_ptrs + split * h_split_stride, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            bt = tl.load(b_ptr + offs_k[:, None].to(tl.int64) * width + offs_n[None, :],
                         mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # (BR, BN)
            acc += tl.dot(ht.to(bt.dtype), bt, input_precision="ieee")
        y_ptrs = y_ptr + rows[:, None] * y_cols + col0 + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
        y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=y_mask)


@triton.jit
def _expand_kernel(
    y_ptr, h_ptr, arena_ptr,  # y (T, y_cols), h (split_k, T, num_slices * max_rank) fp32, arena (N,)
    sorted_tokens_ptr, tile_start_ptr, tile_len_ptr, tile_slot_ptr,  # (T,), (num_tiles,) x 3, int32
    b_off_ptr, rank_ptr, scale_ptr,  # (num_slices, num_slots)
    num_slots, y_cols, h_split_stride, h_row_stride, max_rank,
    w0, w1, w2, w3, c0, c1, c2, c3,  # per slice: out_width, out_start (unused slices: 0)
    g1, g2, g3,  # first column group of slices 1..3 on grid axis 1 (unused slices: past the grid)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr, ALIGN: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)  # a group = BLOCKS_PER_PROGRAM column blocks of BLOCK_N within one slice
    num_rows = tl.load(tile_len_ptr + tile)
    if num_rows == 0:
        return
    # Which slice this column group belongs to, and its width and first column in y.
    sid = (group >= g1).to(tl.int32) + (group >= g2).to(tl.int32) + (group >= g3).to(tl.int32)
    width = tl.where(sid == 0, w0, tl.where(sid == 1, w1, tl.where(sid == 2, w2, w3)))
    col0 = tl.where(sid == 0, c0, tl.where(sid == 1, c1, tl.where(sid == 2, c2, c3)))
    group0 = tl.where(sid == 0, 0, tl.where(sid == 1, g1, tl.where(sid == 2, g2, g3)))
    first_col = (group - group0) * (BLOCKS_PER_PROGRAM * BLOCK_N)
    slot = tl.load(tile_slot_ptr + tile)
    rank = tl.load(rank_ptr + sid * num_slots + slot)
    if rank == 0:
        return
    b_off = tl.load(b_off_ptr + sid * num_slots + slot)  # int64 element offset
    scale = tl.load(scale_ptr + sid * num_slots + slot)
    m_mask = tl.arange(0, BLOCK_M) < num_rows
    rows = tl.load(sorted_tokens_ptr + tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M), mask=m_mask, other=0)
    rows = rows.to(tl.int64)  # (BM,) token ids
    h_slice = h_ptr + sid * max_rank
    if (b_off % ALIGN == 0) & (width % ALIGN == 0) & (col0 % ALIGN == 0):
        _expand_store(y_ptr, h_slice, arena_ptr + _aligned(b_off, ALIGN), rows, m_mask, rank, scale,
                      _aligned(width, ALIGN), _aligned(col0, ALIGN), first_col, y_cols, h_split_stride,
                      h_row_stride, BLOCK_M, BLOCK_N, BLOCK_R, SPLIT_K, BLOCKS_PER_PROGRAM)
    else:
        _expand_store(y_ptr, h_slice, arena_ptr + b_off, rows, m_mask, rank, scale, width, col0, first_col, y_cols,
                      h_split_stride, h_row_stride, BLOCK_M, BLOCK_N, BLOCK_R, SPLIT_K, BLOCKS_PER_PROGRAM)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes for one call, chosen from host ints only (no device sync, same for every replay of a shape)."""

    split_k: int  # shrink: number of d_in ranges, summed by expand
    k_per_split: int  # shrink: d_in columns per range, a multiple of shrink_block_k
    shrink_block_r: int
    shrink_block_k: int
    expand_block_r: int
    expand_block_n: int
    shrink_warps: int = 4
    shrink_stages: int = 3
    expand_warps: int = 4
    expand_stages: int = 2
    expand_blocks_per_program: int = 1  # column blocks of BLOCK_N one expand program walks through


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit-aware wrapper, ~5 us a call on the host


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < min(n, hi):
        p *= 2
    return p


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    # The interpreter mimics an H100 so that CPU tests exercise the configs a GPU would pick.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def lowrank_launch_config(seg: Segments, table: LowRankTable, d_in: int, device: torch.device,
                          split_k: int | None = None, **overrides) -> LaunchConfig:
    """The heuristic config for this call's shape (cached: host ints in, no device work); `overrides` replace
    fields (benchmarks)."""
    cfg = _heuristic_config(seg.num_tiles, seg.tile_size, len(table.out_width), table.max_rank, d_in,
                            _num_sms(device), split_k, overrides.pop("shrink_block_r", None),
                            overrides.pop("shrink_block_k", None))
    return replace(cfg, **overrides) if overrides else cfg


@functools.lru_cache(maxsize=4096)
def _heuristic_config(num_tiles: int, tile_size: int, num_slices: int, max_rank: int, d_in: int, num_sms: int,
                      split_k: int | None, shrink_block_r: int | None, shrink_block_k: int | None) -> LaunchConfig:
    """Tuned on an H100 (python -m kernels.bench --op lowrank_configs): rank blocks of 16..32 in the shrink and
    16 in the expand (most slots have small ranks), wider d_in steps and more d_in splits for decode tiles.
    """
    is_decode = tile_size <= 16
    shrink_block_r = shrink_block_r or _pow2_at_least(max_rank, 16, 32)
    shrink_block_k = shrink_block_k or (128 if is_decode else 64)
    if split_k is None:
        # Few tiles x slices x rank blocks leave most SMs idle (decode): split d_in until ~2 programs per SM,
        # keeping at least 4 K-blocks per split.
        programs = max(num_tiles, 1) * num_slices * _cdiv(max_rank, shrink_block_r)
        split_k = min(_cdiv(2 * num_sms, programs), _cdiv(d_in, 4 * shrink_block_k))
    # The expand sums the partials of a whole row tile in registers: fewer for taller tiles (shared memory).
    split_k = max(1, min(split_k, _cdiv(d_in, shrink_block_k), MAX_SPLIT_ROWS // tile_size))
    k_per_split = _cdiv(_cdiv(d_in, split_k), shrink_block_k) * shrink_block_k
    return LaunchConfig(
        split_k=_cdiv(d_in, k_per_split),  # no empty split
        k_per_split=k_per_split,
        shrink_block_r=shrink_block_r,
        shrink_block_k=shrink_block_k,
        expand_block_r=16,
        expand_block_n=128,
        expand_stages=2 if is_decode else 1,
    )


def _check_inputs(y: torch.Tensor, x: torch.Tensor, seg: Segments, arena: torch.Tensor, table: LowRankTable) -> None:
    """Shapes, dtypes, devices and contiguity, from metadata only (no device sync)."""
    if x.dim() != 2 or y.dim() != 2 or arena.dim() != 1:
        raise ValueError(f"expected x (T, d_in), y (T, d_out), arena (N,); got {tuple(x.shape)}, {tuple(y.shape)}, {tuple(arena.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype {x.dtype} not supported: use float16, bfloat16 or float32")
    if y.dtype != x.dtype or arena.dtype != x.dtype:
        raise ValueError(f"dtypes differ: x {x.dtype}, y {y.dtype}, arena {arena.dtype}")
    if not (x.is_contiguous() and y.is_contiguous() and arena.is_contiguous()):
        raise ValueError("x, y and arena must be contiguous")
    if x.shape[0] != y.shape[0] or x.shape[0] != seg.num_tokens:
        raise ValueError(f"token counts differ: x {x.shape[0]}, y {y.shape[0]}, segments {seg.num_tokens}")
    num_slices = len(table.out_width)
    if len(table.out_start) != num_slices or not 1 <= num_slices <= MAX_SLICES:
        raise ValueError(f"need 1..{MAX_SLICES} slices with one out_start per out_width; got {table.out_start}, {table.out_width}")
    if max(s + w for s, w in zip(table.out_start, table.out_width)) > y.shape[1]:
        raise ValueError(f"slices {table.out_start} + {table.out_width} overflow y's {y.shape[1]} columns")
    for name, t, dtype in (("a_off", table.a_off, torch.int64), ("b_off", table.b_off, torch.int64),
                           ("rank", table.rank, torch.int32), ("scale", table.scale, torch.float32)):
        if t.dim() != 2 or t.shape[0] != num_slices or t.shape[1] != table.a_off.shape[1]:
            raise ValueError(f"table.{name} shape {tuple(t.shape)}: expected (num_slices={num_slices}, num_slots)")
        if t.dtype != dtype or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"table.{name} must be a contiguous {dtype} tensor on {x.device}; got {t.dtype} on {t.device}")
    if seg.sorted_tokens is None or seg.tile_start is None or seg.tile_len is None or seg.tile_slot is None:
        raise ValueError("Segments has no row tiles: build it with kernels.segments.make_segments")
    if seg.tile_start.device != x.device or arena.device != x.device or y.device != x.device:
        raise ValueError(f"x, y, arena and segments must share one device; x is on {x.device}")
    if x.device.type != "cuda" and type(_shrink_kernel).__name__ != "InterpretedFunction":
        raise ValueError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before kernels.lowrank is imported")


def lowrank_delta_triton(y: torch.Tensor, x: torch.Tensor, seg: Segments, arena: torch.Tensor, table: LowRankTable,
                         *, split_k: int | None = None, poison_workspace: bool = False,
                         config: LaunchConfig | None = None) -> None:
    """Triton launcher, same semantics as lowrank_delta_ref (module docstring); y is updated in place.

    Sized from host ints only (Segments, LowRankTable, shapes): no device sync, CUDA-graph capturable.
    Trusts the device tables: slots < num_slots, rank[i, s] <= max_rank, factors inside the arena.
    split_k forces the number of d_in splits of the shrink (tests); poison_workspace fills the fp32
    workspace h with NaN first, so that reading an element the shrink did not write shows up (tests);
    config replaces the heuristic block sizes (benchmarks).
    """
    _check_inputs(y, x, seg, arena, table)
    if not seg.has_adapter or seg.num_tiles == 0 or table.max_rank == 0 or sum(table.out_width) == 0:
        return
    num_slices, max_rank, (num_tokens, d_in) = len(table.out_width), table.max_rank, x.shape
    num_slots = table.a_off.shape[1]
    cfg = config or lowrank_launch_config(seg, table, d_in, x.device, split_k)
    h = torch.empty((cfg.split_k, num_tokens, num_slices * max_rank), dtype=torch.float32, device=x.device)
    if poison_workspace:
        h.fill_(float("nan"))
    grid = (seg.num_tiles, _cdiv(max_rank, cfg.shrink_block_r) * cfg.split_k, num_slices)
    _shrink_kernel[grid](
        x, arena, h, seg.sorted_tokens, seg.tile_start, seg.tile_len, seg.tile_slot, table.a_off, table.rank,
        num_slots, d_in, h.stride(0), h.stride(1), max_rank, cfg.k_per_split,
        BLOCK_M=seg.tile_size, BLOCK_R=cfg.shrink_block_r, BLOCK_K=cfg.shrink_block_k,
        SPLIT_K=cfg.split_k, EVEN_K=d_in % cfg.k_per_split == 0, ALIGN=ALIGN_ELEMS,
        num_warps=cfg.shrink_warps, num_stages=cfg.shrink_stages,
    )
    # Column groups of all slices, one after the other on grid axis 1.
    pad = MAX_SLICES - num_slices
    widths, starts = list(table.out_width) + [0] * pad, list(table.out_start) + [0] * pad
    group_cols = cfg.expand_block_n * cfg.expand_blocks_per_program
    first_group = [0]
    for w in table.out_width:
        first_group.append(first_group[-1] + _cdiv(w, group_cols))
    num_groups = first_group[-1]
    first_group = first_group[:num_slices] + [num_groups] * pad
    _expand_kernel[(seg.num_tiles, num_groups)](
        y, h, arena, seg.sorted_tokens, seg.tile_start, seg.tile_len, seg.tile_slot, table.b_off, table.rank, table.scale,
        num_slots, y.shape[1], h.stride(0), h.stride(1), max_rank,
        *widths, *starts, *first_group[1:],
        BLOCK_M=seg.tile_size, BLOCK_N=cfg.expand_block_n, BLOCK_R=cfg.expand_block_r, SPLIT_K=cfg.split_k,
        BLOCKS_PER_PROGRAM=cfg.expand_blocks_per_program, ALIGN=ALIGN_ELEMS,
        num_warps=cfg.expand_warps, num_stages=cfg.expand_stages,
    )


def lowrank_delta(y: torch.Tensor, x: torch.Tensor, seg: Segments, arena: torch.Tensor, table: LowRankTable) -> None:
    """Dispatch: CUDA tensors -> Triton, anything else -> the reference (MULTIPLEX_KERNELS=reference|triton forces one)."""
    if use_triton(x):
        lowrank_delta_triton(y, x, seg, arena, table)
    else:
        lowrank_delta_ref(y, x, seg, arena, table)
