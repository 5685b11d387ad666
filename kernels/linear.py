"""The backbone's dense projections: y = x @ W^T (+ bias) (+ residual), with W prepared once at load.

Semantics:
    linear(x, prepack(W), bias, residual) == F.linear(x, W, bias) + residual
    x: (T, d_in), any strides   W: (d_out, d_in)   bias: (d_out,) or None   residual: (T, d_out) or None

On a CPU (fp32, PyTorch built with oneDNN), prepack() reorders W into oneDNN's blocked layout and each call is one
oneDNN matmul, the residual add fused into it. F.linear goes to MKL's sgemm instead, much slower on AMD CPUs: on
this repository's 2-core AMD EPYC, one thread, a (16 x 576) @ (576 x 3072) product takes
245 us with oneDNN and 665 us with MKL, and oneDNN is 2.3-2.7x faster for every batch from 4 to 1024 tokens.
Elsewhere (CUDA, other dtypes, no oneDNN) prepack() returns W itself and the call is F.linear / torch.addmm.
Results differ from F.linear's only in the order of the fp32 sums (a few ulps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """W (d_out, d_in) -> the form linear() multiplies fastest: a oneDNN tensor on a CPU, else W itself."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()) if can_prepack(weight) else weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) (+ residual) for a weight from prepack(). -> (T, d_out), a new contiguous tensor."""
    if weight.is_mkldnn:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    if residual is None:
        return F.linear(x, weight, bias)
    out = torch.addmm(residual, x, weight.t())
    return out if bias is None else out.add_(bias)
