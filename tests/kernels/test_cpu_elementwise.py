"""kernels.cpu_elementwise (RMSNorm, SiLU x up, rotary in place) against its PyTorch references: widths around the
kernel's 8- and 16-float steps, one row to long prefills (split over threads), strided rows (a slice of a fused
projection), extreme values (exp's clamps). That the model's forward runs it: tests/server/test_cpu_paths.py."""
import pytest
import torch

from kernels import cpu_elementwise as ew

pytestmark = pytest.mark.skipif(not ew.available(), reason="needs an x86-64 CPU with AVX2 and FMA and a C compiler")

ROWS = [1, 3, 16, 1024]  # 1024 x 576 floats: split over the team


@pytest.mark.parametrize("hidden", [1, 7, 8, 15, 16, 17, 64, 576, 2049])
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows, hidden):
    torch.manual_seed(rows + hidden)
    base = torch.randn(rows, hidden + 5) * 3  # rows with a stride: a slice of a wider tensor
    x, w = base[:, 2 : 2 + hidden], torch.randn(hidden)
    out = ew.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, ew.rms_norm_ref(x, w, 1e-5), rtol=2e-6, atol=1e-6)


def test_rms_norm_of_zero_and_huge_rows():
    x = torch.zeros(2, 64)
    x[1] = 1e18  # squares overflow to inf in both: the row normalises to 0 in both
    w = torch.randn(64)
    torch.testing.assert_close(ew.rms_norm(x, w, 1e-6), ew.rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("inter", [1, 5, 8, 13, 64, 1536])
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(rows, inter):
    torch.manual_seed(rows * inter)
    gu = torch.randn(rows, 2 * inter) * 4
    torch.testing.assert_close(ew.silu_mul(gu), ew.silu_mul_ref(gu), rtol=1e-6, atol=1e-6)


def test_silu_mul_at_extremes():
    """exp's clamps: silu(g) for |g| past 88 is g or ~0, as PyTorch's; inf and NaN pass through as PyTorch's do."""
    g = torch.tensor([-1e4, -120.0, -90.0, -88.5, -87.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 87.0, 88.5, 90.0, 1e4,
                      float("inf"), float("nan")])
    gu = torch.cat([g, torch.full_like(g, 1.5)])[None]
    ours, ref = ew.silu_mul(gu), ew.silu_mul_ref(gu)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("head_dim", [2, 8, 14, 16, 64, 128])
@pytest.mark.parametrize("rows", ROWS)
def test_rope_on_the_q_and_k_heads_of_a_fused_qkv(rows, head_dim):
    torch.manual_seed(rows + head_dim)
    q_heads, kv_heads = 6, 2
    qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * head_dim)
    angles = torch.rand(rows, head_dim // 2) * 100
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    sin_signed = torch.cat([-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]], dim=1)
    expected = qkv.clone()
    ew.rope_ref_(expected[:, : (q_heads + kv_heads) * head_dim].view(rows, -1, head_dim), cos, sin_signed)
    ew.rope_(qkv[:, : (q_heads + kv_heads) * head_dim].view(rows, -1, head_dim), cos, sin_signed)
    torch.testing.assert_close(qkv, expected, rtol=1e-6, atol=1e-6)  # v untouched: it is compared too


def test_rope_refuses_an_odd_head_dim():
    with pytest.raises(ValueError, match="even head dimension"):
        ew.rope_(torch.zeros(2, 1, 5), torch.zeros(2, 5), torch.zeros(2, 5))
