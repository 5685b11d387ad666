"""Activation scaling (IA3 / PARA): the Triton kernel against the fp32 reference, in place on a strided view.

Without CUDA the Triton kernel runs in the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET before
any kernels module is imported); the @gpu tests run the same sweep natively on CUDA.
"""
import pytest
import torch

import kernels.scale as scale  # noqa: E402
from tests.kernels.conftest import TOLERANCES  # noqa: E402

INTERPRETED = type(scale._scale_rows_kernel).__name__ == "InterpretedFunction"



def test_kernels_run_somewhere():
    """Without CUDA the Triton tests must run in the interpreter, not be skipped."""
    assert torch.cuda.is_available() or INTERPRETED


def check_scale(num_tokens, width, col_start, num_vectors, dtype, vec_dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # y is a column slice of a wider activation (a row stride, as the k part of a fused qkv output is).
    wide = torch.randn(num_tokens, col_start + width + 7 + 3, generator=gen).to(device, dtype)
    y = wide[:, 3:]
    vectors = (1 + 0.5 * torch.randn(num_vectors, width, generator=gen)).to(device, vec_dtype)
    row = torch.randint(-1, num_vectors, (num_tokens,), generator=gen, dtype=torch.int32).to(device)
    base = wide.clone()
    ref = y.float()
    scale.scale_rows_ref(ref, vectors.float(), row, col_start)  # fp32 reference
    scale.scale_rows_triton(y, vectors, row, col_start)
    tol = TOLERANCES[dtype]
    got, want = y[:, col_start : col_start + width].float(), ref[:, col_start : col_start + width]
    err = (got - want).abs().amax().item() if num_tokens else 0.0
    bound = tol["atol"] + tol["rtol"] * (want.abs().amax().item() if num_tokens else 0.0)
    assert err <= bound, f"max abs error {err}"
    # Everything outside the scaled block, and every token with row -1, is bit-identical.
    changed = torch.zeros_like(wide, dtype=torch.bool)
    changed[:, 3 + col_start : 3 + col_start + width] = (row >= 0)[:, None]
    assert torch.equal(wide[~changed], base[~changed])


@pytest.mark.interpreter
@pytest.mark.parametrize("vec_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # no tl.dot: bf16 is sound here
@pytest.mark.parametrize("width,col_start", [(1376, 0), (2049, 13), (64, 4096)])
def test_scale_interpreter(width, col_start, dtype, vec_dtype):
    check_scale(37, width, col_start, 5, dtype, vec_dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("num_tokens", [0, 1])
def test_scale_tiny_batches_interpreter(num_tokens):
    check_scale(num_tokens, 33, 2, 1, torch.float16, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("vec_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3000])
@pytest.mark.parametrize("width,col_start", [(1376, 0), (2049, 13), (11008, 4096)])
def test_scale_cuda(width, col_start, num_tokens, dtype, vec_dtype):
    check_scale(num_tokens, width, col_start, 64, dtype, vec_dtype, "cuda")
