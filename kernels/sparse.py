"""Batched heterogeneous sparse deltas (SIFT): y[t] += W_s x[t] with W_s sparse, per token's adapter slot.

Storage (CSR per slot, no padding): the indices of every slot live in one int32 arena, the values in a second
arena of x's dtype. For one (layer, projection) and slot s, with n = nnz[s] and d_out = num_rows:
    row_ptr_s = idx_arena[idx_off[s] : idx_off[s] + d_out + 1]          row_ptr_s[0] = 0, row_ptr_s[d_out] = n
    cols_s    = idx_arena[idx_off[s] + d_out + 1 : idx_off[s] + d_out + 1 + n]
    vals_s    = val_arena[val_off[s] : val_off[s] + n]
Entries of row r are cols_s / vals_s[row_ptr_s[r] : row_ptr_s[r + 1]], sorted by column (the artifact's
(row, col) order). A fused projection (q|k|v, gate|up) is one matrix whose rows index the fused output y.
pack_sparse builds the arenas and the table from per-slot COO triples.

Semantics:
    y[t].index_add_(0, rows_s, vals_s * x[t, cols_s]),   s = token_slot[t],
        rows_s = repeat_interleave(arange(d_out), diff(row_ptr_s));  s == -1 or nnz[s] == 0: no change.
    x: (T, d_in)   y: (T, d_out)   idx_arena: (N,) int32   val_arena: (M,) x.dtype   table: (num_slots,)
    fp32 accumulation; y is rounded once.

Triton path (row-parallel CSR, deterministic: no atomics): grid (num_tiles, cdiv(d_out, BLOCK_R)).
One program owns a row tile of one slot's tokens (Segments.tile_*: up to tile_size tokens of one adapter,
possibly from several requests, so a popular adapter's entries are read once per tile; base-model tokens
have no tile) and BLOCK_R consecutive output rows. It streams that row range's entries [row_ptr[r0],
row_ptr[r0 + BLOCK_R]) in chunks of BLOCK_E, scatters each chunk's values into a dense (BLOCK_R, BLOCK_E)
slice of W_s (entry e goes to row row(e) - r0, found by comparing e with row_ptr) and accumulates
slice @ x[tile, cols]^T with tl.dot: the segmented per-row sum runs on the tensor cores. Each product
x * value appears once in the dot, so the fp32 sums equal the reference's up to order. x is first copied
transposed with the tokens in tile order (xt: (d_in, T), one pass over x), so the gather x[tile, col] reads
one contiguous run per entry rather than one memory sector per token. Bytes moved: (4 + itemsize) * nnz per
tile, plus the gathered xt (mostly from L2), plus y's touched rows read and written.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from kernels.segments import Segments

from kernels.dispatch import tl, triton, use_triton



@dataclass(frozen=True)
class SparseTable:
    """Where each slot's CSR matrix sits in the arenas, for one (layer, projection group). Device tensors."""

    idx_off: torch.Tensor  # (num_slots,) int64: row_ptr (num_rows + 1), then cols (nnz), in idx_arena
    val_off: torch.Tensor  # (num_slots,) int64: values (nnz) in val_arena
    nnz: torch.Tensor  # (num_slots,) int32; 0 = no delta in this module (offsets then unused)
    num_rows: int  # d_out: rows of every slot's matrix, the width of y


def pack_sparse(entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None], num_rows: int,
                dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, SparseTable]:
    """(idx_arena, val_arena, table) for slots 0..len(entries)-1 from COO (rows, cols, values) or None per slot.

    Entries may come in any order and on any device; they are sorted by (row, col) where they are.
    """
    idx_parts, val_parts, idx_off, val_off, nnz = [], [], [], [], []
    num_idx = num_val = 0
    for entry in entries:
        idx_off.append(num_idx)
        val_off.append(num_val)
        nnz.append(0 if entry is None else entry[0].numel())
        if not nnz[-1]:
            continue  # nothing stored: nnz 0 tells the kernels to skip the slot
        rows, cols, vals = entry
        if int(rows.min()) < 0 or int(rows.max()) >= num_rows:
            raise ValueError(f"row indices must lie in [0, {num_rows})")
        order = torch.argsort(cols, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]  # by (row, col)
        row_ptr = torch.bincount(rows.long(), minlength=num_rows).cumsum(0)  # (d_out,), then a leading 0
        idx_parts += [torch.zeros(1, dtype=torch.int32, device=device), row_ptr.to(device, torch.int32),
                      cols[order].to(device, torch.int32)]
        val_parts.append(vals[order].to(device, dtype))
        num_idx += num_rows + 1 + nnz[-1]
        num_val += nnz[-1]
    table = SparseTable(
        idx_off=torch.tensor(idx_off, dtype=torch.int64, device=device),
        val_off=torch.tensor(val_off, dtype=torch.int64, device=device),
        nnz=torch.tensor(nnz, dtype=torch.int32, device=device),
        num_rows=num_rows,
    )
    idx_arena = torch.cat(idx_parts) if idx_parts else torch.zeros(1, dtype=torch.int32, device=device)
    val_arena = torch.cat(val_parts) if val_parts else torch.zeros(1, dtype=dtype, device=device)
    return idx_arena, val_arena, table


def sparse_delta_ref(y: torch.Tensor, x: torch.Tensor, seg: Segments, idx_arena: torch.Tensor,
                     val_arena: torch.Tensor, table: SparseTable) -> None:
    """Reference: loop over segments; fp32 accumulation. Moves (4 + itemsize) * nnz bytes per segment."""
    if not seg.has_adapter:
        return
    d_out = table.num_rows
    starts, slots = seg.seg_start.tolist(), seg.seg_slot.tolist()
    idx_off, val_off, nnz = table.idx_off.tolist(), table.val_off.tolist(), table.nnz.tolist()
    for k, s in enumerate(slots):
        if s < 0 or starts[k] == starts[k + 1] or nnz[s] == 0:
            continue
        n, base = nnz[s], idx_off[s]
        row_ptr = idx_arena[base : base + d_out + 1].long()
        rows = torch.repeat_interleave(torch.arange(d_out, device=x.device), row_ptr.diff())  # (n,)
        cols = idx_arena[base + d_out + 1 : base + d_out + 1 + n].long()
        vals = val_arena[val_off[s] : val_off[s] + n].float()
        xs = x[starts[k] : starts[k + 1]].float()  # (len, d_in)
        delta = torch.zeros(xs.shape[0], d_out, device=x.device).index_add_(1, rows, xs[:, cols] * vals)
        ys = y[starts[k] : starts[k + 1]]
        ys.copy_((ys.float() + delta).to(y.dtype))


def csr_matrix(row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """One slot's matrix as a torch sparse CSR tensor (the CPU path's storage): row_ptr (d_out + 1,), cols and
    values (nnz,) in (row, col) order, as pack_sparse lays them out."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are long stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_ptr.long(), cols.long(), values.float(), shape, check_invariants=False)


def sparse_delta_csr(y: torch.Tensor, x: torch.Tensor, slot_rows: list, matrices: dict[int, torch.Tensor]) -> None:
    """The CPU path, sparse_delta_ref's semantics: per distinct slot s (not per request), its tokens' delta as one
    sparse @ dense product, y[rows_s] += (W_s @ x[rows_s]^T)^T, with W_s a csr_matrix (MKL's sparse kernels).
    slot_rows: Segments.slot_rows (slot, token rows as a slice or an index tensor); matrices: slot -> W_s, a slot
    without one has no delta in this module. fp32 accumulation; y is rounded once."""
    for s, rows in slot_rows:
        w = matrices.get(s)
        if w is None:
            continue
        delta = (w @ x[rows].float().t()).t()  # (n, d_out)
        if isinstance(rows, slice):
            ys = y[rows]
            ys.add_(delta) if ys.dtype == torch.float32 else ys.copy_((ys.float() + delta).to(ys.dtype))
        elif y.dtype == torch.float32:
            y.index_add_(0, rows, delta)
        else:
            y[rows] = (y[rows].float() + delta).to(y.dtype)


@triton.jit
def _sparse_kernel(
    y_ptr, xt_ptr, idx_ptr, val_ptr,  # y (T, d_out); xt (d_in, T): x transposed, tokens in sorted_tokens order
    sorted_tokens_ptr, tile_start_ptr, tile_len_ptr, tile_slot_ptr,  # (T,), (num_tiles,) x 3, int32
    idx_off_ptr, val_off_ptr, nnz_ptr,  # (num_slots,)
    num_rows, num_all_tokens, stride_yt,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile, row_block = tl.program_id(0), tl.program_id(1)
    num_tokens = tl.load(tile_len_ptr + tile)
    if num_tokens == 0:  # padding tile
        return
    slot = tl.load(tile_slot_ptr + tile)
    if tl.load(nnz_ptr + slot) == 0:
        return
    row_ptr = idx_ptr + tl.load(idx_off_ptr + slot)  # int64 offset
    cols_ptr = row_ptr + num_rows + 1
    vals_ptr = val_ptr + tl.load(val_off_ptr + slot)
    r0 = row_block * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < num_rows
    lo = tl.load(row_ptr + offs_r, mask=r_ok, other=0)  # (R,) first entry of each row
    hi = tl.load(row_ptr + offs_r + 1, mask=r_ok, other=0)  # (R,) one past its last entry
    e_begin = tl.load(row_ptr + r0)
    e_end = tl.load(row_ptr + tl.minimum(r0 + BLOCK_R, num_rows))
    if e_begin == e_end:  # no entry in these rows: y stays as it is
        return

    tile_start = tl.load(tile_start_ptr + tile)
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_tokens
    xt_cols = xt_ptr + tile_start + offs_t  # (T,) this tile's tokens: contiguous in each row of xt
    acc = tl.zeros([BLOCK_R, BLOCK_T], tl.float32)
    for e0 in range(e_begin, e_end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_ok = offs_e < e_end
        cols = tl.load(cols_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)  # (E,)
        vals = tl.load(vals_ptr + offs_e, mask=e_ok, other=0.0)  # (E,)
        in_row = (offs_e[None, :] >= lo[:, None]) & (offs_e[None, :] < hi[:, None])  # (R, E) one-hot of row(e)
        w = tl.where(in_row, vals[None, :], 0.0).to(vals.dtype)  # (R, E): a dense slice of W_s
        xg = tl.load(xt_cols[None, :] + cols[:, None] * num_all_tokens, mask=e_ok[:, None] & t_ok[None, :], other=0.0)
        acc += tl.dot(w, xg, input_precision=DOT_PRECISION)  # (R, T)
    tokens = tl.load(sorted_tokens_ptr + tile_start + offs_t, mask=t_ok, other=0).to(tl.int64)  # (T,)
    y_ptrs = y_ptr + tokens[None, :] * stride_yt + offs_r[:, None]  # (R, T)
    y_mask = r_ok[:, None] & t_ok[None, :]
    y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=y_mask)


def _check_inputs(y: torch.Tensor, x: torch.Tensor, seg: Segments, idx_arena: torch.Tensor,
                  val_arena: torch.Tensor, table: SparseTable) -> None:
    """Shapes, dtypes, devices and strides, from metadata only (no device sync)."""
    if x.dim() != 2 or y.dim() != 2 or idx_arena.dim() != 1 or val_arena.dim() != 1:
        raise ValueError(f"expected x (T, d_in), y (T, d_out), 1-D arenas; got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or y.dtype != x.dtype or val_arena.dtype != x.dtype:
        raise ValueError(f"x, y and val_arena must share a float dtype; got {x.dtype}, {y.dtype}, {val_arena.dtype}")
    if idx_arena.dtype != torch.int32:
        raise ValueError(f"idx_arena must be int32, not {idx_arena.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1 or not (idx_arena.is_contiguous() and val_arena.is_contiguous()):
        raise ValueError("x and y need unit column strides; arenas must be contiguous")
    if x.shape[0] != y.shape[0] or x.shape[0] != seg.num_tokens or y.shape[1] != table.num_rows:
        raise ValueError(f"x {tuple(x.shape)}, y {tuple(y.shape)}: expected {seg.num_tokens} tokens and {table.num_rows} rows")
    for name, t, dtype in (("idx_off", table.idx_off, torch.int64), ("val_off", table.val_off, torch.int64),
                           ("nnz", table.nnz, torch.int32)):
        if t.dim() != 1 or t.shape != table.nnz.shape or t.dtype != dtype or t.device != x.device:
            raise ValueError(f"table.{name} must be a (num_slots,) {dtype} tensor on {x.device}")
    if seg.sorted_tokens is None or seg.tile_start is None or seg.tile_len is None or seg.tile_slot is None:
        raise ValueError("Segments has no row tiles: build it with kernels.segments.make_segments")
    if x.device.type != "cuda" and type(_sparse_kernel).__name__ != "InterpretedFunction":
        raise ValueError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before kernels.sparse is imported")


def sparse_delta_triton(y: torch.Tensor, x: torch.Tensor, seg: Segments, idx_arena: torch.Tensor,
                        val_arena: torch.Tensor, table: SparseTable, *, block_r: int = 16, block_e: int = 128,
                        num_warps: int = 4, num_stages: int = 2) -> None:
    """Triton launcher, same semantics as sparse_delta_ref (module docstring); y is updated in place.

    Sized from host ints only: no device sync. Trusts the device tables (slots < num_slots, CSR inside the arenas).
    Block sizes: tuned on an H100 (Llama-2-7B o/down projections, 1% density, decode and prefill batches).
    """
    _check_inputs(y, x, seg, idx_arena, val_arena, table)
    if not seg.has_adapter or seg.num_tiles == 0 or table.num_rows == 0:
        return
    # x transposed with the tokens grouped by slot: the tokens of a tile sit side by side in each row of xt, so
    # that gathering x[tile, col] reads one contiguous run per entry instead of one sector per token.
    xt = x.t().index_select(1, seg.sorted_tokens)  # (d_in, T)
    _sparse_kernel[(seg.num_tiles, triton.cdiv(table.num_rows, block_r))](
        y, xt, idx_arena, val_arena, seg.sorted_tokens, seg.tile_start, seg.tile_len, seg.tile_slot,
        table.idx_off, table.val_off, table.nnz, table.num_rows, seg.num_tokens, y.stride(0),
        BLOCK_T=seg.tile_size, BLOCK_R=block_r, BLOCK_E=block_e,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )


def sparse_delta(y: torch.Tensor, x: torch.Tensor, seg: Segments, idx_arena: torch.Tensor,
                 val_arena: torch.Tensor, table: SparseTable) -> None:
    """Dispatch: CUDA tensors -> Triton, anything else -> the reference (MULTIPLEX_KERNELS=reference|triton forces one)."""
    if use_triton(x):
        sparse_delta_triton(y, x, seg, idx_arena, val_arena, table)
    else:
        sparse_delta_ref(y, x, seg, idx_arena, val_arena, table)
