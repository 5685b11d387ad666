"""Which implementation serves an op: the Triton kernel for CUDA tensors, the PyTorch reference for anything else.

`MULTIPLEX_KERNELS=auto|reference|triton`, read once at import, forces one (`triton` on CPU tensors needs
`TRITON_INTERPRET=1` set before triton is first imported: the interpreter). Triton ships for Linux only; elsewhere
the kernels' decorators become no-ops and every op runs its reference.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - non-Linux

    class _NoTriton:
        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

KERNEL_CHOICES = ("auto", "reference", "triton")
KERNELS = os.environ.get("MULTIPLEX_KERNELS", "auto")
if KERNELS not in KERNEL_CHOICES:
    raise ValueError(f"MULTIPLEX_KERNELS={KERNELS!r}: expected one of {', '.join(KERNEL_CHOICES)}")


def use_triton(where: torch.Tensor | torch.device | str) -> bool:
    """Whether an op on this tensor (or device) runs its Triton kernel."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return KERNELS == "triton" or (KERNELS == "auto" and device.type == "cuda")
