"""Triton low-rank delta kernels vs the fp32 reference (kernels/lowrank.py).

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton
is imported); with CUDA the same sweep runs natively in the `gpu` tests. Every run starts from a random y (the
same for kernel and reference), a NaN-poisoned workspace, and an arena whose gaps between factors are NaN,
so an element read or written out of place fails the comparison.
"""
import importlib.util
from dataclasses import dataclass, replace

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

import triton.language as tl  # noqa: E402

from kernels import cpu_matmul  # noqa: E402
import kernels.dispatch as dispatch  # noqa: E402
import kernels.lowrank as lowrank  # noqa: E402
import kernels.lowrank_padded as lowrank_padded  # noqa: E402
from kernels.segments import make_segments, max_tiles  # noqa: E402
from tests.kernels.conftest import TOLERANCES  # noqa: E402

INTERPRET = all(type(f).__name__ == "InterpretedFunction" for f in (lowrank._shrink_kernel, tl.zeros))
LowRankTable = lowrank.LowRankTable

MIXED_RANKS = (1, 7, 8, 16, 33, 64, 100, 128)


@dataclass(frozen=True)
class Case:
    """One batch: segments (length, popularity), adapters (ranks per slice), projection shape."""

    name: str
    seg_lens: tuple[int, ...]
    popularity: str  # identical | distinct | zipf | skewed | given
    num_slots: int
    d_in: int
    widths: tuple[int, ...]
    ranks: tuple[int, ...] = MIXED_RANKS  # drawn per (slice, slot)
    base_fraction: float = 0.0  # share of segments with no adapter (slot -1)
    slots: tuple[int, ...] = ()  # for popularity "given"
    zero_rank_fraction: float = 0.0  # share of (slice, slot) with rank 0
    aligned: bool = False  # every offset a multiple of 8 (the kernels' vectorized branch), else random gaps
    seed: int = 0


CASES = [
    Case("decode_distinct_mixed_ranks", (1,) * 8, "distinct", 8, 64, (48,), aligned=True),
    Case("decode_identical", (1,) * 6, "identical", 3, 64, (40,), ranks=(16,)),
    Case("decode_zipf_qkv_gqa", (1,) * 12, "zipf", 6, 96, (64, 32, 32), base_fraction=0.25),
    Case("decode_skewed_gate_up", (1,) * 10, "skewed", 5, 80, (40, 40), zero_rank_fraction=0.2),
    Case("decode_64_adapters", (1,) * 64, "distinct", 64, 32, (24,), base_fraction=0.1, seed=3),
    Case("prefill_long_segments", (70, 33, 5, 0, 128), "zipf", 4, 48, (40, 40), aligned=True, seed=1),
    Case("prefill_identical_rank128", (40, 40), "identical", 1, 64, (32,), ranks=(128,)),
    Case("mixed_prefill_decode", (40, 1, 1, 1, 17, 1, 1), "given", 4, 72, (64, 32, 32), slots=(2, -1, 0, 3, -1, 1, 2)),
    Case("empty_segments", (0, 3, 0, 0, 2), "given", 3, 40, (24,), slots=(0, 1, 2, -1, 2)),
    Case("only_empty_adapter_segments", (0, 4, 0), "given", 2, 40, (24,), slots=(0, -1, 1)),
    Case("no_adapter", (3, 1, 5), "given", 2, 40, (24,), slots=(-1, -1, -1)),
    Case("rank0_slices", (2, 3, 1, 4), "distinct", 4, 48, (32, 16, 16), zero_rank_fraction=0.5, seed=2),
    Case("four_slices", (2, 1, 3), "distinct", 3, 40, (16, 24, 8, 20)),
    Case("odd_large_decode", (1, 1, 1, 1, 1), "given", 3, 2049, (1376,), ranks=(16, 128, 7), slots=(0, 1, 2, -1, 1)),
    Case("odd_large_prefill_qkv", (20, 9), "given", 2, 1376, (64, 32, 32), ranks=(128, 11), slots=(0, 1)),
]
ODD_LARGE = {"odd_large_decode", "odd_large_prefill_qkv"}  # slow in the interpreter: fp32 only there


def _slots(case: Case, gen: torch.Generator) -> list[int]:
    n = len(case.seg_lens)
    if case.popularity == "given":
        return list(case.slots)
    if case.popularity == "identical":
        slots = [0] * n
    elif case.popularity == "distinct":
        slots = [k % case.num_slots for k in range(n)]
    elif case.popularity == "zipf":
        weights = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(case.num_slots)])
        slots = torch.multinomial(weights, n, replacement=True, generator=gen).tolist()
    elif case.popularity == "skewed":  # one hot adapter, a long tail
        slots = [0 if torch.rand(1, generator=gen).item() < 0.8 else int(torch.randint(case.num_slots, (1,), generator=gen)) for _ in range(n)]
    else:
        raise ValueError(case.popularity)
    return [-1 if torch.rand(1, generator=gen).item() < case.base_fraction else s for s in slots]


def _make_table(case: Case, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple[torch.Tensor, LowRankTable]:
    """Factors placed in random order with NaN gaps between them (odd-sized unless case.aligned)."""
    num_slices, d_in = len(case.widths), case.d_in
    choice = torch.randint(len(case.ranks), (num_slices, case.num_slots), generator=gen)
    rank = torch.tensor(case.ranks)[choice].to(torch.int32)
    rank[torch.rand(rank.shape, generator=gen) < case.zero_rank_fraction] = 0
    a_off = torch.zeros(num_slices, case.num_slots, dtype=torch.int64)
    b_off = torch.zeros_like(a_off)
    chunks, pos = [], 0
    for flat in torch.randperm(num_slices * case.num_slots, generator=gen).tolist():
        i, s = divmod(flat, case.num_slots)
        r, w = int(rank[i, s]), case.widths[i]
        gap = int(torch.randint(0, 3, (1,), generator=gen)) * 8 if case.aligned else int(torch.randint(0, 9, (1,), generator=gen))
        a = torch.randn(r, d_in, generator=gen) / d_in**0.5  # x @ a.T ~ N(0, 1)
        bt = torch.randn(r, w, generator=gen) / max(r, 1) ** 0.5  # delta ~ scale * N(0, 1)
        chunks += [torch.full((gap,), float("nan")), a.flatten(), bt.flatten()]
        a_off[i, s], b_off[i, s] = pos + gap, pos + gap + r * d_in
        pos += gap + r * (d_in + w)
    chunks.append(torch.full((5,), float("nan")))
    arena = torch.cat(chunks).to(dtype).to(device)
    scale = (0.5 + 1.5 * torch.rand(rank.shape, generator=gen)).float()
    out_start = tuple(sum(case.widths[:i]) for i in range(num_slices))
    table = LowRankTable(
        a_off=a_off.to(device), b_off=b_off.to(device), rank=rank.to(device), scale=scale.to(device),
        out_start=out_start, out_width=case.widths, max_rank=max(int(rank.max()), 1),
    )
    return arena, table


def _run_case(case: Case, dtype: torch.dtype, device: str, split_k: int | None = None, **config) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    slots = _slots(case, gen)
    seg = make_segments(list(case.seg_lens), slots, device)
    arena, table = _make_table(case, dtype, device, gen)
    x = torch.randn(seg.num_tokens, case.d_in, generator=gen).to(dtype).to(device)
    y0 = torch.randn(seg.num_tokens, sum(case.widths), generator=gen).to(dtype).to(device)

    y_ref = y0.float().clone()  # .float() of an fp32 tensor is the tensor itself
    lowrank.lowrank_delta_ref(y_ref, x.float(), seg, arena.float(), table)
    y = y0.clone()
    cfg = lowrank.lowrank_launch_config(seg, table, case.d_in, x.device, split_k, **config) if config else None
    lowrank.lowrank_delta_triton(y, x, seg, arena, table, split_k=split_k, poison_workspace=True, config=cfg)

    tol = TOLERANCES[dtype]
    magnitude = max(y_ref.abs().max().item(), 1.0) if y_ref.numel() else 1.0
    torch.testing.assert_close(y.float(), y_ref, atol=tol["atol"] * magnitude, rtol=tol["rtol"])
    # Base-model tokens, and slices of rank 0, are left bit for bit as they were.
    token_slot = seg.token_slot.long()
    untouched = (token_slot < 0)[:, None].expand_as(y).clone()
    for i, (col, w) in enumerate(zip(table.out_start, table.out_width)):
        zero_rank = torch.cat([table.rank[i], table.rank.new_zeros(1)])[token_slot] == 0  # index -1 -> the 0 appended
        untouched[:, col : col + w] |= zero_rank[:, None]
    assert torch.equal(y[untouched], y0[untouched])


def _cpu_params():
    for case in CASES:
        for dtype in (torch.float32, torch.float16):
            if case.name in ODD_LARGE and dtype != torch.float32:
                continue
            yield pytest.param(case, dtype, id=f"{case.name}-{str(dtype)[6:]}")


def _gpu_params():
    for case in CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            yield pytest.param(case, dtype, id=f"{case.name}-{str(dtype)[6:]}")


def test_interpreter_engaged():
    """Without CUDA the CPU sweep must run in the interpreter, not be skipped."""
    if _HAS_CUDA and not INTERPRET:
        pytest.skip("CUDA present: the native `gpu` tests run the sweep")
    assert INTERPRET, "the Triton interpreter is off: triton was imported before TRITON_INTERPRET=1 was set " \
        "(set it in the environment or at the top of tests/conftest.py, before anything imports triton)"
    y, x = torch.zeros(1, 16), torch.randn(1, 16)
    table = LowRankTable(torch.zeros(1, 1, dtype=torch.int64), torch.full((1, 1), 16, dtype=torch.int64),
                         torch.ones(1, 1, dtype=torch.int32), torch.ones(1, 1), (0,), (16,), 1)
    arena = torch.randn(32)
    lowrank.lowrank_delta_triton(y, x, make_segments([1], [0], "cpu"), arena, table)  # CPU tensors: only the interpreter can
    torch.testing.assert_close(y, (x @ arena[:16, None]) * arena[None, 16:], **TOLERANCES[torch.float32])


@pytest.mark.interpreter
@pytest.mark.parametrize("case,dtype", list(_cpu_params()))
def test_lowrank_triton_interpreter(case: Case, dtype: torch.dtype):
    _run_case(case, dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_lowrank_triton_split_k(split_k: int):
    _run_case(Case("split", (1, 1, 2, 1), "zipf", 3, 200, (24, 16), seed=4), torch.float32, "cpu", split_k=split_k)


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [
    dict(expand_blocks_per_program=3, expand_block_n=16), dict(shrink_block_k=32, shrink_block_r=16, expand_block_r=16),
    dict(shrink_block_k=128, shrink_block_r=64, expand_block_r=64, expand_block_n=128),
], ids=["blocks_per_program", "small_blocks", "large_blocks"])
def test_lowrank_triton_launch_configs(config: dict):
    _run_case(Case("configs", (1, 1, 2, 5, 1), "zipf", 3, 200, (40, 24, 8), aligned=True, seed=8), torch.float32, "cpu", **config)


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", list(_gpu_params()))
def test_lowrank_triton_gpu(case: Case, dtype: torch.dtype):
    _run_case(case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seg_lens", [(1,) * 64, (512, 300, 1, 1, 7)], ids=["decode64", "prefill"])
def test_lowrank_triton_gpu_llama_shapes(seg_lens, dtype):
    """Llama-2-7B q|k|v (4096 -> 3 x 4096) and down (11008 -> 4096), 64 adapters, ranks 1..128."""
    for d_in, widths in ((4096, (4096, 4096, 4096)), (11008, (4096,))):
        _run_case(Case("llama", seg_lens, "zipf", 64, d_in, widths, base_fraction=0.1, seed=5), dtype, "cuda")
    for split_k in (1, 7):
        _run_case(Case("llama", seg_lens, "distinct", 64, 4096, (4096,), seed=6), dtype, "cuda", split_k=split_k)


@pytest.mark.gpu
def test_lowrank_triton_cuda_graph_replay():
    """Captured once, replayed after the step's metadata changed in place (same T and S): still exact."""
    case = Case("graph", (1,) * 16, "distinct", 8, 256, (128, 64, 64))
    gen = torch.Generator().manual_seed(7)
    arena, table = _make_table(case, torch.float16, "cuda", gen)
    x = torch.randn(16, case.d_in, generator=gen).half().cuda()
    y = torch.zeros(16, 256, dtype=torch.float16, device="cuda")
    seg = make_segments([1] * 16, [k % 8 for k in range(16)], "cuda")
    lowrank.lowrank_delta_triton(y, x, seg, arena, table)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lowrank.lowrank_delta_triton(y, x, seg, arena, table)
    new_slots = [-1 if k % 3 == 0 else (5 * k) % 8 for k in range(16)]
    new = make_segments([1] * 16, new_slots, "cuda")
    for name in ("seg_start", "seg_slot", "token_slot", "sorted_tokens", "tile_start", "tile_len", "tile_slot"):
        getattr(seg, name).copy_(getattr(new, name))
    y.zero_()
    graph.replay()
    y_ref = torch.zeros(16, 256, device="cuda")
    lowrank.lowrank_delta_ref(y_ref, x.float(), new, arena.float(), table)
    torch.testing.assert_close(y.float(), y_ref, **TOLERANCES[torch.float16])


def test_make_segments_tiles():
    seg = make_segments([4, 1, 2], [3, -1, 0], "cpu")  # the example in kernels/segments.py
    assert (seg.num_tiles, seg.tile_size) == (3, 16)
    assert seg.sorted_tokens.tolist() == [0, 1, 2, 3, 5, 6, 0]
    assert seg.tile_start.tolist() == [0, 4, 0] and seg.tile_len.tolist() == [4, 2, 0] and seg.tile_slot.tolist() == [3, 0, -1]
    seg = make_segments([1] * 6, [2, 0, 2, -1, 0, 2], "cpu")  # decode: one tile per adapter, not per request
    assert seg.sorted_tokens.tolist()[:5] == [0, 2, 5, 1, 4] and seg.tile_len.tolist() == [3, 2, 0, 0, 0, 0]
    seg = make_segments([130, 0, 1, 64, 3], [1, 2, 0, -1, 1], "cpu")
    assert seg.tile_size == 64 and seg.tile_len.tolist()[:4] == [64, 64, 5, 1] and seg.tile_slot.tolist()[:4] == [1, 1, 1, 0]
    assert seg.num_tiles == max_tiles(198, 5, 64) >= 4
    assert make_segments([], [], "cpu").num_tiles == 0


def test_dispatch_cpu_uses_reference():
    case = CASES[0]
    gen = torch.Generator().manual_seed(0)
    arena, table = _make_table(case, torch.float32, "cpu", gen)
    seg = make_segments(list(case.seg_lens), _slots(case, gen), "cpu")
    x = torch.randn(seg.num_tokens, case.d_in, generator=gen)
    y, y_ref = torch.zeros(seg.num_tokens, 48), torch.zeros(seg.num_tokens, 48)
    lowrank.lowrank_delta(y, x, seg, arena, table)
    lowrank.lowrank_delta_ref(y_ref, x, seg, arena, table)
    if not dispatch.use_triton(x):
        assert torch.equal(y, y_ref)


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv("MULTIPLEX_KERNELS", "cuda")
    spec = importlib.util.spec_from_file_location("_dispatch_copy", dispatch.__file__)
    with pytest.raises(ValueError, match="MULTIPLEX_KERNELS"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_launcher_checks_inputs():
    case = Case("checks", (2, 1), "distinct", 2, 32, (16, 16))
    gen = torch.Generator().manual_seed(0)
    arena, table = _make_table(case, torch.float32, "cpu", gen)
    seg = make_segments([2, 1], [0, 1], "cpu")
    x, y = torch.randn(3, 32), torch.zeros(3, 32)
    call = lowrank.lowrank_delta_triton
    with pytest.raises(ValueError, match="dtypes differ"):
        call(y.half(), x, seg, arena, table)
    with pytest.raises(ValueError, match="contiguous"):
        call(y, torch.randn(32, 3).t(), seg, arena, table)
    with pytest.raises(ValueError, match="token counts"):
        call(y[:2], x[:2], seg, arena, table)
    with pytest.raises(ValueError, match="overflow"):
        call(y[:, :20].contiguous(), x, seg, arena, table)
    with pytest.raises(ValueError, match="table.rank"):
        call(y, x, seg, arena, replace(table, rank=table.rank.long()))
    with pytest.raises(ValueError, match="make_segments"):
        call(y, x, replace(seg, tile_start=None), arena, table)
    five = replace(table, out_start=(0, 1, 2, 3, 4), out_width=(1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="slices"):
        call(y, x, seg, arena, five)


def _padded_from_table(arena: torch.Tensor, table: LowRankTable, d_in: int) -> "lowrank_padded.PaddedFactors":
    """The same factors in the CPU padded layout (scale folded into B^T, zero past each rank)."""
    num_slices, num_slots = table.rank.shape
    r_max = table.max_rank
    a = torch.zeros(num_slots, num_slices * r_max, d_in)
    bt = tuple(torch.zeros(num_slots, r_max, w) for w in table.out_width)
    for i, w in enumerate(table.out_width):
        for s in range(num_slots):
            r, ao, bo = int(table.rank[i, s]), int(table.a_off[i, s]), int(table.b_off[i, s])
            a[s, i * r_max : i * r_max + r] = arena[ao : ao + r * d_in].view(r, d_in).float()
            bt[i][s, :r] = arena[bo : bo + r * w].view(r, w).float() * float(table.scale[i, s])
    return lowrank_padded.PaddedFactors(a, bt, table.out_start, table.out_width)


def _check_padded_against_reference(case: Case, seg, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the padded CPU path and the reference on the same random inputs; they must agree. -> (y, y before)."""
    arena, table = _make_table(case, torch.float32, "cpu", gen)
    x = torch.randn(seg.num_tokens, case.d_in, generator=gen)
    y0 = torch.randn(seg.num_tokens, sum(case.widths), generator=gen)
    y_ref, y = y0.clone(), y0.clone()
    lowrank.lowrank_delta_ref(y_ref, x, seg, arena, table)
    lowrank_padded.lowrank_delta_padded(y, x, seg, _padded_from_table(arena, table, case.d_in))
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    return y, y0


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_padded_cpu_path_matches_reference(case: Case, grid_path):
    """The CPU path (one gather-bmm per op for all adapters) against the reference, same sweep."""
    gen = torch.Generator().manual_seed(case.seed)
    slots = _slots(case, gen)
    seg = make_segments(list(case.seg_lens), slots, "cpu")
    y, y0 = _check_padded_against_reference(case, seg, gen)
    base = seg.token_slot < 0
    assert torch.equal(y[base], y0[base])  # base-model tokens untouched


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_padded_cpu_path_with_bf16_factors_is_the_fp32_path_on_their_values(case: Case, grid_path):
    """bf16 factor stacks (`--lora-dtype bfloat16` on a CPU) give what fp32 stacks holding the same values give (each
    bf16 value widened exactly, the sums in fp32), and stay within bf16's rounding of the exact delta."""
    gen = torch.Generator().manual_seed(case.seed)
    seg = make_segments(list(case.seg_lens), _slots(case, gen), "cpu")
    arena, table = _make_table(case, torch.float32, "cpu", gen)
    exact = _padded_from_table(arena, table, case.d_in)
    bf16 = replace(exact, a=exact.a.bfloat16(), bt=tuple(b.bfloat16() for b in exact.bt))
    widened = replace(exact, a=bf16.a.float(), bt=tuple(b.float() for b in bf16.bt))
    x = torch.randn(seg.num_tokens, case.d_in, generator=gen)
    y0 = torch.randn(seg.num_tokens, sum(case.widths), generator=gen)
    y_bf16, y_widened, y_exact = y0.clone(), y0.clone(), y0.clone()
    lowrank_padded.lowrank_delta_padded(y_bf16, x, seg, bf16)
    lowrank_padded.lowrank_delta_padded(y_widened, x, seg, widened)
    lowrank_padded.lowrank_delta_padded(y_exact, x, seg, exact)
    torch.testing.assert_close(y_bf16, y_widened, **TOLERANCES[torch.float32])
    delta = (y_exact - y0).abs().amax().item()
    assert (y_bf16 - y_exact).abs().amax().item() <= 0.02 * delta + 1e-6  # bf16 keeps 8 bits: 2^-8 per factor
    assert torch.equal(y_bf16[seg.token_slot < 0], y0[seg.token_slot < 0])


def test_the_grid_kernel_refuses_factors_of_mixed_dtypes():
    if not cpu_matmul.available():
        pytest.skip("our kernel needs an x86-64 CPU with AVX2 and FMA and a C compiler")
    a, bt = torch.zeros(2, 16, 32), torch.zeros(2, 16, 8)
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="all fp32 or all bf16"):
        cpu_matmul.lowrank_grid(torch.zeros(1, 8), torch.zeros(1, 32), a.bfloat16(), (bt,), (0,), one,
                                torch.tensor([0, 1]), one)


@pytest.mark.parametrize("slots, uses_range", [
    ([3, 5, 3, -1, 4], True),  # adjacent slots, one repeated across requests: read as the range 3..5
    ([6, -1, 9, 6], True),  # a range with unused slots in it (7, 8): padding rows only
    ([0, 40, -1], False),  # far apart: gathered
])
def test_padded_cpu_path_reads_a_slot_range_or_gathers(slots, uses_range, grid_path):
    gen = torch.Generator().manual_seed(7)
    case = next(c for c in CASES if len(c.widths) == 3)
    seg_lens = [(2 * k + 1) % 5 + 1 for k in range(len(slots))]
    seg = make_segments(seg_lens, slots, "cpu")
    assert not seg.slot_plan.solo and (seg.slot_plan.padded.slot_range is not None) == uses_range
    _check_padded_against_reference(replace(case, num_slots=48), seg, gen)


@pytest.mark.parametrize("seg_lens, slots, solo, padded", [
    ((1,), [2], [2], None),  # a lone request decoding: its own matmuls, no gather or scatter
    ((9, 1, 1), [4, 4, 4], [4], None),  # one adapter: a prefill and two decodes
    ((3, 1), [4, -1], [4], None),  # a base-model token beside it
    ((1, 1), [4, 5], [], [4, 5]),  # decodes of two adapters: one padded grid
    ((12, 1, 1, 2), [4, 5, 6, 4], [4], [5, 6]),  # a prefill (12 tokens) alone; the decodes share the grid
    ((1, 10, 1, 1), [3, 5, 3, 5], [5], [3]),  # a solo slot's rows are not contiguous (an index, not a slice)
    ((1,) * 36, [4, -1] * 18, [4], None),  # the only slot, its rows in 18 runs: more than added run by run
])
def test_padded_cpu_path_solo_slots_and_the_grid(seg_lens, slots, solo, padded, grid_path):
    """A slot with many tokens (a prefill), or the step's only slot, gets its own matmuls, so the padded grid of the
    other slots is not padded to its length; same values as the reference, also for slices not adjacent in y."""
    gen = torch.Generator().manual_seed(11)
    seg = make_segments(list(seg_lens), slots, "cpu")
    plan = seg.slot_plan
    assert [s for s, _ in plan.solo] == solo
    for (_, rows), runs in zip(plan.solo, plan.solo_runs):  # the runs are the rows, in order
        want = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        assert torch.equal(torch.cat([torch.arange(a, b) for a, b in runs]), want)
    assert (plan.padded.slots.tolist() if plan.padded is not None else None) == (
        None if padded is None else list(range(min(padded), max(padded) + 1)))
    for widths in ((64, 32, 32), (16, 24, 8, 20)):
        case = Case("solo", tuple(seg_lens), "given", 8, 48, widths, slots=tuple(slots), ranks=(16, 7))
        _check_padded_against_reference(case, seg, gen)


def test_our_grid_kernel_is_what_serves_the_padded_grid_where_it_runs(monkeypatch):
    """Not a silent fallback: with the kernel enabled, a step of several adapters' decodes calls it once per op."""
    if not cpu_matmul.available():
        pytest.skip("our kernel needs an x86-64 CPU with AVX2 and FMA and a C compiler")
    monkeypatch.setattr(cpu_matmul, "_enabled", True)
    calls = []
    monkeypatch.setattr(cpu_matmul, "lowrank_grid_prepared", lambda *args: calls.append(args))
    case = Case("grid", (1, 1, 1), "given", 3, 48, (64, 32, 32), slots=(0, 1, 2))
    seg = make_segments(list(case.seg_lens), list(case.slots), "cpu")
    gen = torch.Generator().manual_seed(0)
    arena, table = _make_table(case, torch.float32, "cpu", gen)
    lowrank_padded.lowrank_delta_padded(torch.zeros(3, 128), torch.randn(3, 48), seg, _padded_from_table(arena, table, 48))
    assert len(calls) == 1


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("seg_lens, slots", [
    ((1, 1, 1), (1, 1, 1)),  # the step's only adapter, decoding (a solo slot)
    ((30,), (1,)),  # a prefill (a solo slot of many tokens)
    ((20, 1, 1, 17), (1, 0, 2, 1)),  # a prefill in two runs beside two decodes (solo slots and the padded grid)
])
def test_our_grid_kernel_takes_every_slot_of_a_step_in_one_call(monkeypatch, seg_lens, slots, bf16):
    """Where our grid kernel runs, one call per op covers the step's solo slots (a prefill, or the only adapter
    decoding; their own matmuls took longer, and on bf16 stacks widened a copy of their factors for every op) and
    the padded grid's. The values: the sweeps above, whose prefills take the kernel's blocked path."""
    if not cpu_matmul.available():
        pytest.skip("our kernel needs an x86-64 CPU with AVX2 and FMA and a C compiler")
    monkeypatch.setattr(cpu_matmul, "_enabled", True)
    calls = []
    monkeypatch.setattr(cpu_matmul, "lowrank_grid_prepared", lambda *args: calls.append(args))
    case = Case("one_call", seg_lens, "given", 3, 48, (64, 32, 32), slots=slots)
    seg = make_segments(list(seg_lens), list(case.slots), "cpu")
    arena, table = _make_table(case, torch.float32, "cpu", torch.Generator().manual_seed(0))
    f = _padded_from_table(arena, table, 48)
    if bf16:
        f = replace(f, a=f.a.bfloat16(), bt=tuple(b.bfloat16() for b in f.bt))
    lowrank_padded.lowrank_delta_padded(torch.zeros(sum(seg_lens), 128), torch.randn(sum(seg_lens), 48), seg, f)
    assert len(calls) == 1
    got_slots, offsets, rows = calls[0][3]
    groups = [(s, rows[offsets[g] : offsets[g + 1]].tolist()) for g, s in enumerate(got_slots.tolist())]
    groups = [(s, r) for s, r in groups if r]  # a padded grid's range may hold unused slots: no rows
    want = {s: [t for t, ts in enumerate(seg.token_slot.tolist()) if ts == s] for s in set(slots)}
    assert len(groups) == len(want) and dict(groups) == want  # each slot's tokens in one group


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [slice(0, 40), slice(8, 24)])  # the whole row (contiguous), a column slice
def test_add_at_rows_is_index_add(dtype, cols):
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(12, 40, generator=gen).to(dtype)
    rows, o = torch.tensor([7, 2, 11, 0]), torch.randn(4, cols.stop - cols.start, generator=gen)
    want = y.clone()
    want[:, cols].index_add_(0, rows, o.to(dtype))
    lowrank_padded.add_at_rows(y[:, cols], rows, o)
    assert torch.equal(y, want)
