"""kernels.linear: the prepacked projection against F.linear (its reference), odd sizes, with bias and residual;
which form prepack() picks (kernels/cpu_matmul.py's own tests sweep that kernel)."""
import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_matmul
from kernels.linear import can_prepack, linear, prepack
from tests.kernels.conftest import TOLERANCES


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 16, 33, 257])
@pytest.mark.parametrize("d_out, d_in", [(960, 576), (11, 2049), (1376, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_f_linear(num_tokens, d_out, d_in, with_bias, with_residual, dtype):
    gen = torch.Generator().manual_seed(num_tokens + d_in)
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype)
    x = torch.randn(num_tokens, d_in + 5, generator=gen)[:, 2 : 2 + d_in].to(dtype)  # strided rows, as slices are
    bias = torch.randn(d_out, generator=gen).to(dtype) if with_bias else None
    residual = torch.randn(num_tokens, d_out, generator=gen).to(dtype) if with_residual else None
    ref = F.linear(x, w, bias) + (residual if residual is not None else 0)
    out = linear(x, prepack(w), bias, residual)
    assert out.shape == ref.shape and out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])


def test_prepack_takes_our_kernel_or_onednn_on_a_cpu_in_fp32_onednn_in_bf16_and_nothing_else():
    w = torch.randn(8, 4)
    ours = cpu_matmul.available()
    assert cpu_matmul.enabled() == ours  # MULTIPLEX_CPU_MATMUL unset: auto, ours wherever it builds
    if ours:
        assert isinstance(prepack(w), cpu_matmul.PackedWeight)
    else:
        assert prepack(w).is_mkldnn == can_prepack(w)
    assert can_prepack(w) == torch.backends.mkldnn.is_available()  # the CPU machines this runs on have it
    bf16 = w.to(torch.bfloat16)
    assert can_prepack(bf16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()  # this CPU has AVX512-BF16
    assert prepack(bf16).is_mkldnn == can_prepack(bf16)
    half = w.to(torch.float16)
    assert prepack(half) is half
