"""Decode attention over the paged KV cache on an x86-64 CPU by our own kernel (kernels/cpu_attention.c), and the
writes of a step's keys and values into it (`write_kv`): the keys and values of each decode sequence are read in
place from the cache, where kernels/attention.py's
paged_attention_cpu (the reference here) gathers copies of them with index_select, then runs baddbmm, softmax and
bmm over the copies: five ops and three passes over the keys per layer become one call and one pass.

Semantics (fp32 q and caches; the plan's rows, kernels/attention.py's CpuAttentionPlan):
    decode(q, k_cache, v_cache, keys, visible, decode_rows, sm_scale) == the decode rows' output of
    paged_attention_cpu: (Bd, Hq, D), query heads in groups of Hq / Hkv per KV head
keys: (Bd * Hkv * S,) cache rows (of the caches viewed as (rows, D)), key j of (sequence b, KV head g) at
(b Hkv + g) S + j; visible: (Bd,) how many of each sequence's S keys it sees (a prefix; the rest are padding).

Where it runs: `enabled()`, `MULTIPLEX_CPU_ATTENTION=auto|ours|torch` read once at import (`auto`: ours wherever
the kernel builds, kernels/cpu_build.py). The call releases the GIL and runs on the calling thread's OpenMP team
with `torch.get_num_threads()` threads. Results differ from the reference's by the order of fp32 sums and an exp
within 2 ulp.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kernels import cpu_build

SOURCE = Path(__file__).with_suffix(".c")
MAX_REP = 16  # query heads per KV head the kernel takes; kernels/cpu_attention.c's MAX_REP
CHOICE = cpu_build.choice("MULTIPLEX_CPU_ATTENTION", "torch")
_enabled: bool | None = None  # decided at the first call: it may compile the kernel


def enabled() -> bool:
    """Whether fp32 decode attention on a CPU runs this kernel (MULTIPLEX_CPU_ATTENTION and this machine)."""
    global _enabled
    if _enabled is None:
        _enabled = cpu_build.decide("MULTIPLEX_CPU_ATTENTION", CHOICE, "torch", available)
    return _enabled


def available() -> bool:
    """Whether this machine runs the kernel: an x86-64 CPU with AVX2 and FMA, and the source compiles (once)."""
    return cpu_build.loads(_library, "our CPU attention kernel")


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode() takes these tensors: fp32 on the CPU, contiguous caches, unit stride within a head, and a
    GQA group the kernel holds."""
    return (q.dtype == torch.float32 and k_cache.dtype == torch.float32 and q.device.type == "cpu"
            and k_cache.is_contiguous() and q.stride(-1) == 1 and q.shape[1] // k_cache.shape[2] <= MAX_REP)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
           decode_rows: torch.Tensor | None, sm_scale: float) -> torch.Tensor:
    """The decode rows' attention output (Bd, Hq, D), a new fp32 tensor (see the module docstring). q: (T, Hq, D)
    with unit stride within a head; decode_rows: (Bd,) rows of q, or None for rows 0..Bd-1."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_q_heads = q.shape[1]
    rep = num_q_heads // num_kv_heads
    num_seqs = visible.shape[0]
    span = keys.shape[0] // (num_seqs * num_kv_heads)  # S
    if not (v_cache.is_contiguous() and keys.dtype == torch.int64 and visible.dtype == torch.int64):
        raise ValueError("decode needs contiguous caches and int64 keys and visible counts")
    out = torch.empty(num_seqs, num_q_heads, head_dim)
    scratch = torch.empty(num_seqs * num_kv_heads * rep * span)
    rows = None if decode_rows is None else decode_rows.to(torch.int64).contiguous()  # held until the call returns
    keys, visible = keys.contiguous(), visible.contiguous()
    _library().multiplex_decode_attention(
        num_seqs, num_kv_heads, rep, head_dim, span, q.data_ptr(), q.stride(0), q.stride(1),
        None if rows is None else rows.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), keys.data_ptr(),
        visible.data_ptr(), sm_scale, out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return out


def writes(k: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether write_kv() takes these: fp32 on the CPU, each row's KV heads end to end, a contiguous cache."""
    return (k.dtype == k_cache.dtype == torch.float32 and k.device.type == "cpu" and k_cache.is_contiguous()
            and k.stride(2) == 1 and k.stride(1) == k.shape[2])


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             rows: torch.Tensor | None) -> None:
    """k, v (T, Hkv, D) as writes() takes them (views of a fused qkv): row rows[i] (row i when rows is None) to cache
    row slots[i] of each cache (viewed as (rows, Hkv D)); slots, rows int64 contiguous. kernels/attention.py's
    write_kv_cpu is the reference: one call where it runs six ops."""
    if not (writes(v, v_cache) and slots.dtype == torch.int64 and slots.is_contiguous()
            and (rows is None or (rows.dtype == torch.int64 and rows.is_contiguous()))):
        raise ValueError("write_kv needs fp32 rows of unit-stride heads, contiguous caches and int64 indices")
    width = k.shape[1] * k.shape[2]
    _library().multiplex_write_kv(slots.shape[0], width, k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                  None if rows is None else rows.data_ptr(), slots.data_ptr(), k_cache.data_ptr(),
                                  v_cache.data_ptr())


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.multiplex_decode_attention
    fn.argtypes = ([ctypes.c_int] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                   + [ctypes.c_void_p] * 5 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])
    fn.restype = None
    lib.multiplex_write_kv.argtypes = ([ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64] * 2
                                       + [ctypes.c_void_p] * 4)
    lib.multiplex_write_kv.restype = None


def _library() -> ctypes.CDLL:
    """The compiled kernel (its AVX2 form on every CPU that runs it), built on first use; OSError if it cannot be."""
    return cpu_build.load(SOURCE, "avx2", _declare)
