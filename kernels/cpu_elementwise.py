"""The decoder layer's elementwise ops on an x86-64 CPU by our own kernel (kernels/cpu_elementwise.c): RMSNorm, the
MLP's SiLU(gate) x up, and the rotary embedding, each one pass over its rows where PyTorch runs a chain of ops
(rms_norm: pow, mean, add, rsqrt, mul, mul; silu and mul; rotary: mul, roll, addcmul), each a pass over memory.

Semantics: the `*_ref` functions below (PyTorch, fp32), up to the order of fp32 sums and an exp within 2 ulp.
    rms_norm(x, w, eps):  (T, H) -> (T, H)
    silu_mul(gu):         (T, 2I) -> (T, I), silu(gu[:, :I]) * gu[:, I:]
    rope_(x, cos, sin):   x (T, heads, D), any row and head strides, rotated in place; cos and sin_signed (T, D)

Where it runs: `enabled()`, `MULTIPLEX_CPU_ELEMENTWISE=auto|ours|torch` read once at import (`auto`: ours wherever
the kernel builds, kernels/cpu_build.py), for fp32 CPU tensors with unit stride along their last dimension (the
caller's check: server/model/llama.py). A call releases the GIL and splits long inputs over the calling thread's
OpenMP team.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import cpu_build

SOURCE = Path(__file__).with_suffix(".c")
CHOICE = cpu_build.choice("MULTIPLEX_CPU_ELEMENTWISE", "torch")
_enabled: bool | None = None  # decided at the first call: it may compile the kernel


def enabled() -> bool:
    """Whether fp32 elementwise ops on a CPU run this kernel (MULTIPLEX_CPU_ELEMENTWISE and this machine)."""
    global _enabled
    if _enabled is None:
        _enabled = cpu_build.decide("MULTIPLEX_CPU_ELEMENTWISE", CHOICE, "torch", available)
    return _enabled


def available() -> bool:
    """Whether this machine runs the kernel: an x86-64 CPU with AVX2 and FMA, and the source compiles (once)."""
    return cpu_build.loads(_library, "our CPU elementwise kernel")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_ref_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """x: (T, heads, D) <- x * cos + rotate_half(x) * sin, with rotate_half(x) * sin == roll(x, D/2) * sin_signed."""
    cos, sin_signed = cos.view(-1, 1, x.shape[-1]), sin_signed.view(-1, 1, x.shape[-1])
    torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed, out=x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(T, H) -> a new (T, H) tensor (see the module docstring)."""
    num_rows, hidden = x.shape
    weight = weight.contiguous()
    out = torch.empty(num_rows, hidden)
    _library().multiplex_rms_norm(num_rows, hidden, x.data_ptr(), x.stride(0), weight.data_ptr(), eps,
                                  out.data_ptr(), hidden, torch.get_num_threads())
    return out


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """(T, 2I) -> a new (T, I) tensor."""
    num_rows, width = gu.shape
    out = torch.empty(num_rows, width // 2)
    _library().multiplex_silu_mul(num_rows, width // 2, gu.data_ptr(), gu.stride(0), out.data_ptr(), width // 2,
                                  torch.get_num_threads())
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """x (T, heads, D), rotated in place; cos, sin_signed: (T, D) contiguous."""
    num_rows, heads, head_dim = x.shape
    tables = (cos, sin_signed)
    if head_dim % 2 or any(t.shape != (num_rows, head_dim) or not t.is_contiguous() for t in tables):
        raise ValueError("rope_ needs an even head dimension and contiguous (T, D) tables")
    _library().multiplex_rope(num_rows, heads, head_dim, x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(),
                              sin_signed.data_ptr(), head_dim, torch.get_num_threads())


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.multiplex_rms_norm.argtypes = [i64, i64, ptr, i64, ptr, ctypes.c_float, ptr, i64, ctypes.c_int]
    lib.multiplex_silu_mul.argtypes = [i64, i64, ptr, i64, ptr, i64, ctypes.c_int]
    lib.multiplex_rope.argtypes = [i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int]
    for fn in (lib.multiplex_rms_norm, lib.multiplex_silu_mul, lib.multiplex_rope):
        fn.restype = None


def _library() -> ctypes.CDLL:
    """The compiled kernel (its AVX2 form on every CPU that runs it), built on first use; OSError if it cannot be."""
    return cpu_build.load(SOURCE, "avx2", _declare)
