"""kernels.cpu_matmul (our fp32 projection) against its reference, F.linear, in each form this CPU runs (AVX2; AVX-512
too where PyTorch finds it): token counts around the 6-, 12- and 16-row blocks, output widths around the 16-column
panels and their pairs, odd and long inner sizes, bias, residual, strided rows, one and two threads, both forms'
outputs bit for bit (its build: tests/kernels/test_cpu_build.py)."""
import pytest
import torch

from kernels import cpu_matmul
from tests.kernels.conftest import TOLERANCES

pytestmark = pytest.mark.skipif(not cpu_matmul.available(), reason="needs an x86-64 CPU with AVX2 and FMA and a C compiler")
FORMS = ["avx2", "avx512"] if cpu_matmul.VARIANT == "avx512" else ["avx2"]  # an AVX-512 CPU runs both


@pytest.fixture(params=FORMS, autouse=True)
def form(request, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "VARIANT", request.param)
    return request.param


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 6, 7, 12, 16, 17, 24, 33, 130])
@pytest.mark.parametrize("d_out, d_in", [(16, 64), (17, 1), (40, 577), (1376, 7), (11, 2049), (100, 2049), (960, 576)])
@pytest.mark.parametrize("with_bias, with_residual", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_equals_its_reference(num_tokens, d_out, d_in, with_bias, with_residual):
    gen = torch.Generator().manual_seed(num_tokens * 7 + d_out + d_in)
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    x = torch.randn(num_tokens, d_in + 5, generator=gen)[:, 2 : 2 + d_in]  # rows strided, as column slices are
    bias = torch.randn(d_out, generator=gen) if with_bias else None
    residual = torch.randn(num_tokens, d_out + 3, generator=gen)[:, :d_out] if with_residual else None
    out = cpu_matmul.matmul(x, cpu_matmul.pack(w), bias, residual)
    assert out.shape == (num_tokens, d_out) and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, cpu_matmul.reference(x, w, bias, residual), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_is_the_same_on_any_number_of_threads(threads):
    """Each output is one in-order sum whichever thread computes its panel: the same bits on 1 or 2 threads."""
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(200, 96, generator=gen), torch.randn(9, 96, generator=gen)
    packed, before = cpu_matmul.pack(w), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_matmul.matmul(x, packed)
        torch.set_num_threads(threads)
        assert torch.equal(cpu_matmul.matmul(x, packed), one)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(len(FORMS) < 2, reason="needs an AVX-512 CPU to run both forms")
def test_both_forms_give_the_same_bits():
    gen = torch.Generator().manual_seed(5)
    w, x, bias = torch.randn(200, 96, generator=gen), torch.randn(40, 96, generator=gen), torch.randn(200, generator=gen)
    packed, outs = cpu_matmul.pack(w), []
    for variant in FORMS:
        cpu_matmul.VARIANT = variant  # the fixture restores it
        outs += [cpu_matmul.matmul(x[:n], packed, bias, residual=x[:n, :1].expand(n, 200)) for n in (3, 16, 40)]
    for one, other in zip(outs[:3], outs[3:]):
        assert torch.equal(one, other)


def test_pack_lays_out_panels_of_16_columns_zero_past_the_end():
    w = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    packed = cpu_matmul.pack(w)
    assert packed.panels.shape == (2, 3, 16) and packed.out_features == 20 and packed.in_features == 3
    assert torch.equal(packed.panels[1, 2, :4], w[16:20, 2]) and not packed.panels[1, :, 4:].any()


def test_a_wrong_inner_size_is_refused():
    with pytest.raises(ValueError, match="x has 5 features, the weight 4"):
        cpu_matmul.matmul(torch.randn(2, 5), cpu_matmul.pack(torch.randn(3, 4)))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("counts", [(2, 1, 0, 2), (1,), (40, 1, 17), (70,)])  # tokens per group: decodes, prefills
def test_matmul_lowrank_is_the_matmul_then_the_grid(counts, bf16, threads):
    """One call for a projection and its deltas (cpu_matmul.matmul_lowrank, one parallel region) gives the same bits
    as matmul, then lowrank_grid on its output: bias, residual, groups of few tokens (the dots) and many (the blocks),
    rows of a group apart."""
    gen = torch.Generator().manual_seed(sum(counts) + bf16)
    num_slots, rank, d_in, widths = 5, 16, 72, (48, 24, 24)
    num_tokens, d_out = sum(counts) + 3, sum(widths) + 8
    w, bias = torch.randn(d_out, d_in, generator=gen) / d_in**0.5, torch.randn(d_out, generator=gen)
    x = torch.randn(num_tokens, d_in, generator=gen)
    residual = torch.randn(num_tokens, d_out, generator=gen)
    a = torch.randn(num_slots, len(widths) * rank, d_in, generator=gen) / d_in**0.5
    bt = tuple(torch.randn(num_slots, rank, wi, generator=gen) / rank for wi in widths)
    if bf16:
        a, bt = a.bfloat16(), tuple(b.bfloat16() for b in bt)
    order = torch.randperm(num_tokens, generator=gen)[: sum(counts)]  # each group's rows, scattered
    slots = torch.tensor([(3 * g + 1) % num_slots for g in range(len(counts))])
    offsets = torch.tensor([0, *counts]).cumsum(0)
    starts = (8, 8 + widths[0], 8 + widths[0] + widths[1])
    factors = cpu_matmul.grid_factors(a, bt, starts)
    groups = cpu_matmul.grid_groups(slots, offsets, order)
    packed, before = cpu_matmul.pack(w), torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        want = cpu_matmul.matmul(x, packed, bias, residual)
        cpu_matmul.lowrank_grid_prepared(want, x, factors, groups)
        got = cpu_matmul.matmul_lowrank(x, packed, bias, residual, factors, groups)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)
    assert not torch.equal(got, cpu_matmul.matmul(x, packed, bias, residual))  # the deltas are there
