"""Per-token activation scaling (IA3 static vectors, PARA per-request vectors), in place.

Which vector a token uses is the engine's choice: row[t] indexes a table of vectors that may hold IA3
adapters' static vectors (one per slot) or the PARA vectors of running requests (one per request, produced
during its prefill). The op multiplies one column range of an activation, e.g. the k part of a fused qkv
output or the FFN intermediate, without copying it.

Semantics:
    y[t, col_start : col_start + w] *= vectors[row[t]]   for row[t] >= 0;  row[t] == -1: untouched
    y: (T, >= col_start + w), unit column stride, any row stride   vectors: (R, w), any float dtype
    row: (T,) int32   the product is taken in fp32 and rounded once to y's dtype

Triton path: grid (cdiv(T, BLOCK_T), cdiv(w, BLOCK_W)); each program loads its tokens' rows, then reads,
scales and writes only the (token, column) elements whose row is >= 0. Pure bandwidth: 2 * itemsize bytes
of y per scaled element, the vectors mostly from L2.
"""
from __future__ import annotations


import torch

from kernels.dispatch import tl, triton, use_triton



def scale_rows_ref(y: torch.Tensor, vectors: torch.Tensor, row: torch.Tensor, col_start: int) -> None:
    """Reference: untouched tokens are multiplied by 1, which is exact (no sync, no gather of y)."""
    width = vectors.shape[1]
    keep = (row >= 0)[:, None]  # (T, 1)
    factor = torch.where(keep, vectors.float()[row.clamp(min=0).long()], 1.0)  # (T, w) fp32
    ys = y[:, col_start : col_start + width]  # a view: updated in place
    ys.copy_((ys.float() * factor).to(y.dtype))


@triton.jit
def _scale_rows_kernel(y_ptr, vec_ptr, row_ptr, num_tokens, width, stride_yt, stride_vr,
                       BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    rows = tl.load(row_ptr + offs_t, mask=offs_t < num_tokens, other=-1)  # (T,)
    mask = (rows >= 0)[:, None] & (offs_w < width)[None, :]  # (T, W)
    vec = tl.load(vec_ptr + rows[:, None].to(tl.int64) * stride_vr + offs_w[None, :], mask=mask, other=1.0)
    y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + offs_w[None, :]
    y_old = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) * vec.to(tl.float32)).to(y_old.dtype), mask=mask)


def scale_rows_triton(y: torch.Tensor, vectors: torch.Tensor, row: torch.Tensor, col_start: int) -> None:
    """Triton launcher, same semantics as scale_rows_ref (module docstring). No device sync."""
    if y.dim() != 2 or vectors.dim() != 2 or row.shape != (y.shape[0],) or row.dtype != torch.int32:
        raise ValueError(f"expected y (T, d), vectors (R, w), row (T,) int32; got {tuple(y.shape)}, {tuple(vectors.shape)}, "
                         f"{tuple(row.shape)} {row.dtype}")
    num_tokens, width = y.shape[0], vectors.shape[1]
    if not 0 <= col_start <= y.shape[1] - width:
        raise ValueError(f"columns [{col_start}, {col_start + width}) do not fit y's {y.shape[1]}")
    if y.stride(1) != 1 or vectors.stride(1) != 1 or not row.is_contiguous():
        raise ValueError("y and vectors need unit column strides; row must be contiguous")
    if y.device != vectors.device or y.device != row.device:
        raise ValueError(f"y, vectors and row must share a device; y is on {y.device}")
    if y.device.type != "cuda" and type(_scale_rows_kernel).__name__ != "InterpretedFunction":
        raise ValueError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before kernels.scale is imported")
    if num_tokens == 0 or width == 0:
        return
    block_t, block_w = 4, min(triton.next_power_of_2(width), 1024)
    _scale_rows_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_w))](
        y[:, col_start:], vectors, row, num_tokens, width, y.stride(0), vectors.stride(0),
        BLOCK_T=block_t, BLOCK_W=block_w)


def scale_rows_(y: torch.Tensor, vectors: torch.Tensor, row: torch.Tensor, col_start: int = 0) -> None:
    """Dispatch: CUDA tensors -> Triton, anything else -> the reference (MULTIPLEX_KERNELS=reference|triton forces one)."""
    if use_triton(y):
        scale_rows_triton(y, vectors, row, col_start)
    else:
        scale_rows_ref(y, vectors, row, col_start)
