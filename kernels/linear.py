"""The backbone's dense projections: y = x @ W^T (+ bias) (+ residual), with W prepared once at load.

Semantics:
    linear(x, prepack(W), bias, residual) == F.linear(x, W, bias) + residual
    x: (T, d_in), any strides   W: (d_out, d_in)   bias: (d_out,) or None   residual: (T, d_out) or None

On a CPU (fp32, or bf16 where the CPU has bf16 instructions; PyTorch built with oneDNN), prepack() reorders W
into oneDNN's blocked layout and each call is one oneDNN matmul, the residual add fused into it. F.linear goes to
MKL's sgemm instead, much slower on AMD CPUs: on this repository's 2-core AMD EPYC, one thread, a (16 x 576) @
(576 x 3072) product takes 245 us with oneDNN and 665 us with MKL, and oneDNN is 2.3-2.7x faster for every batch
from 4 to 1024 tokens. In bf16, prepacked, the same product takes 147 us where F.linear takes 221 us at 16
tokens (fp32 prepacked: 277 us; 2026-12-02, same machine); at 1024 tokens both take ~8 ms, half of fp32's.
Where our own kernel builds (x86-64 with AVX2 and a C compiler), fp32 weights are packed for it instead
(kernels/cpu_matmul.py: on an AVX2 EPYC 1.4-1.6x oneDNN's speed from 1 to 16 tokens, 1.1-1.5x at 64, on par at
512-2048; on an AVX-512 Xeon 1.2x at 1 and 16 tokens, 1.0-1.2x at 32-64, 0.94x at 512; `MULTIPLEX_CPU_MATMUL` picks,
see there). Elsewhere (CUDA, fp16, no oneDNN) prepack() returns W itself and the call is F.linear /
torch.addmm. Results differ from F.linear's only in the order of the fp32 sums (a few ulps), and in bf16 by the
fused residual add, rounded once instead of twice (1 ulp of bf16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_matmul


def can_prepack(weight: torch.Tensor) -> bool:
    if not (weight.device.type == "cpu" and weight.dim() == 2 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _cpu_has_bf16())


def _cpu_has_bf16() -> bool:
    """oneDNN's bf16 matmuls run natively here (AVX512-BF16 or AMX); without them it emulates bf16, slowly."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack(weight: torch.Tensor) -> torch.Tensor | cpu_matmul.PackedWeight:
    """W (d_out, d_in) -> the form linear() multiplies fastest: on a CPU our kernel's panels or a oneDNN
    tensor, else W itself."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2 and cpu_matmul.enabled():
        return cpu_matmul.pack(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()) if can_prepack(weight) else weight


def linear(x: torch.Tensor, weight: torch.Tensor | cpu_matmul.PackedWeight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) (+ residual) for a weight from prepack(). -> (T, d_out), a new contiguous tensor."""
    if isinstance(weight, cpu_matmul.PackedWeight):
        return cpu_matmul.matmul(x, weight, bias, residual)
    if weight.is_mkldnn:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    if residual is None:
        return F.linear(x, weight, bias)
    out = torch.addmm(residual, x, weight.t())
    return out if bias is None else out.add_(bias)
