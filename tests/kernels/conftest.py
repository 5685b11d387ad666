"""Tolerances for kernel-vs-reference comparisons, set once for every kernel test."""
import torch

# Max abs error allowed against the fp32 reference, per input dtype, relative to the reference's max magnitude.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}
