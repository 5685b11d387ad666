"""Sparse (SIFT) deltas: the Triton kernel against the fp32 reference, over a sweep of batches and adapters.

Without CUDA the Triton kernel runs in the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET before
any kernels module is imported); the @gpu tests run the same sweep natively on CUDA.
"""
import pytest
import torch

import kernels.sparse as sparse  # noqa: E402
from kernels.segments import make_segments  # noqa: E402
from tests.kernels.conftest import TOLERANCES  # noqa: E402

INTERPRETED = type(sparse._sparse_kernel).__name__ == "InterpretedFunction"



def test_kernels_run_somewhere():
    """Without CUDA the Triton tests must run in the interpreter, not be skipped."""
    assert torch.cuda.is_available() or INTERPRETED
POPULARITY = ("identical", "distinct", "zipf", "skewed")


def random_adapters(num_adapters, d_out, d_in, gen):
    """Per slot: None (no delta in this module) or unique COO entries, nnz differing per slot. Slot 0 packs its
    entries into 3 rows, so one row block holds several chunks of entries."""
    entries = []
    for s in range(num_adapters):
        if s % 5 == 4:
            entries.append(None)
            continue
        rows_used = 3 if s == 0 else d_out
        nnz = min(rows_used * d_in // 2, 300 if s == 0 else int(torch.randint(1, 800, (1,), generator=gen)))
        flat = torch.randint(0, rows_used * d_in, (nnz,), generator=gen).unique()  # unique (row, col), ~nnz of them
        entries.append(((flat // d_in).to(torch.int32), (flat % d_in).to(torch.int32), torch.randn(flat.numel(), generator=gen)))
    return entries


def segment_slots(num_segments, num_adapters, popularity, gen):
    if popularity == "identical":
        slots = [0] * num_segments
    elif popularity == "distinct":
        slots = [i % num_adapters for i in range(num_segments)]
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float64) ** 1.1
        slots = torch.multinomial(weights, num_segments, replacement=True, generator=gen).tolist()
    else:  # skewed: one hot adapter, a long tail
        tail = torch.randint(0, num_adapters, (num_segments,), generator=gen).tolist()
        slots = [0 if i % 4 else tail[i] for i in range(num_segments)]
    return [-1 if i % 6 == 5 else s for i, s in enumerate(slots)]  # some requests use the base model


def check_sparse(num_adapters, popularity, seg_lens, d_out, d_in, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    entries = random_adapters(num_adapters, d_out, d_in, gen)
    seg = make_segments(seg_lens, segment_slots(len(seg_lens), num_adapters, popularity, gen), device)
    idx_arena, val_arena, table = sparse.pack_sparse(entries, d_out, dtype, device)
    x = torch.randn(seg.num_tokens, d_in, generator=gen).to(device, dtype)
    y = torch.randn(seg.num_tokens, d_out, generator=gen).to(device, dtype)
    ref = y.float()
    sparse.sparse_delta_ref(ref, x.float(), seg, idx_arena, val_arena.float(), table)  # fp32 reference
    sparse.sparse_delta_triton(y, x, seg, idx_arena, val_arena, table)
    tol = TOLERANCES[dtype]
    err = (y.float() - ref).abs().max().item()
    assert err <= tol["atol"] + tol["rtol"] * ref.abs().max().item(), f"max abs error {err}"


# Decode tokens, prefill chunks, empty segments, in one step.
SEG_LENS = [1, 5, 0, 1, 20, 1, 0, 3, 1, 40, 1, 1]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("num_adapters", [1, 8, 64])
def test_sparse_interpreter(num_adapters, popularity, dtype):
    seg_lens = SEG_LENS * 6 if num_adapters == 64 else SEG_LENS
    check_sparse(num_adapters, popularity, seg_lens, 80, 96, dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_odd_sizes_interpreter(dtype):
    check_sparse(3, "distinct", [1, 3, 1, 0, 2], 2049, 1376, dtype, "cpu")


@pytest.mark.interpreter
def test_sparse_base_model_only_interpreter():
    seg = make_segments([3, 1], [-1, -1], "cpu")
    idx_arena, val_arena, table = sparse.pack_sparse([None, None], 40, torch.float32, "cpu")
    y = torch.randn(4, 40)
    base = y.clone()
    sparse.sparse_delta_triton(y, torch.randn(4, 24), seg, idx_arena, val_arena, table)
    assert torch.equal(y, base)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("num_adapters", [1, 8, 64])
def test_sparse_cuda(num_adapters, popularity, dtype):
    check_sparse(num_adapters, popularity, SEG_LENS * 8 + [300], 2049, 1376, dtype, "cuda")


def _csr_matrices(entries, d_out, d_in, dtype):
    """Each slot's entries as the CPU path stores them: the packed CSR (values rounded to `dtype`), as torch CSR."""
    out = {}
    for s, entry in enumerate(entries):
        if entry is None:
            continue
        idx_arena, val_arena, table = sparse.pack_sparse([entry], d_out, dtype, "cpu")
        n = int(table.nnz[0])
        out[s] = sparse.csr_matrix(idx_arena[: d_out + 1], idx_arena[d_out + 1 : d_out + 1 + n], val_arena[:n], (d_out, d_in))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("num_adapters", [1, 8, 64])
def test_csr_cpu_path_matches_reference(num_adapters, popularity, dtype):
    """The CPU path (one sparse product per distinct slot) against the reference, base tokens untouched."""
    gen = torch.Generator().manual_seed(num_adapters)
    d_out, d_in = 80, 96
    entries = random_adapters(num_adapters, d_out, d_in, gen)
    seg_lens = SEG_LENS * 6 if num_adapters == 64 else SEG_LENS
    seg = make_segments(seg_lens, segment_slots(len(seg_lens), num_adapters, popularity, gen), "cpu")
    idx_arena, val_arena, table = sparse.pack_sparse(entries, d_out, dtype, "cpu")
    x = torch.randn(seg.num_tokens, d_in, generator=gen).to(dtype)
    y0 = torch.randn(seg.num_tokens, d_out, generator=gen).to(dtype)
    ref, y = y0.clone(), y0.clone()
    sparse.sparse_delta_ref(ref, x, seg, idx_arena, val_arena, table)
    sparse.sparse_delta_csr(y, x, seg.slot_rows, _csr_matrices(entries, d_out, d_in, dtype))
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y.float(), ref.float(), atol=tol["atol"], rtol=tol["rtol"])
    base = seg.token_slot < 0
    assert torch.equal(y[base], y0[base])
