"""Paged attention and write_kv: the Triton kernels against the fp32 reference.

Without CUDA the Triton kernels run in the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET before
any kernels module is imported); the @gpu tests run the same sweeps natively on CUDA.
"""
import pytest
import torch

import kernels.attention as attn  # noqa: E402
from kernels import cpu_attention  # noqa: E402
from tests.kernels.conftest import BLOCK_SIZE, TOLERANCES, make_batch  # noqa: E402

INTERPRETED = type(attn._paged_attn_kernel).__name__ == "InterpretedFunction"


def test_kernels_run_somewhere():
    """Without CUDA the Triton tests must run in the interpreter, not be skipped."""
    assert torch.cuda.is_available() or INTERPRETED


def check_attention(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, dtype, device, num_splits=None, window=0):
    q, k_cache, v_cache, meta = make_batch(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, dtype, device)
    sm_scale = head_dim**-0.5
    ref = attn.paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, sm_scale, window)  # (T, Hq, D)
    out = torch.full_like(q, float("nan"))
    attn.paged_attention_triton(q, k_cache, v_cache, meta, sm_scale, num_splits=num_splits, out=out, window=window)
    tol = TOLERANCES[dtype]
    err = (out.float() - ref).abs().max().item()
    assert err <= tol["atol"] + tol["rtol"] * ref.abs().max().item(), f"max abs error {err}"


# (q_lens, seq_lens): decode rows (q_len 1), a fresh prefill, prefill chunks starting mid-sequence, empty query
# ranges, sequence lengths on and off block boundaries, prefill chunks of the same shape.
BATCHES = {
    "decode": ([1, 1, 1, 1], [1, 16, 37, 70]),
    "prefill": ([23], [23]),
    "mixed": ([1, 9, 0, 20, 1, 0], [40, 9, 5, 51, 16, 0]),
    "same-shape prefills": ([6, 6, 1, 6, 6], [6, 6, 30, 21, 6]),  # the CPU path batches the chunks of one shape
}


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_paged_attention_interpreter(batch, group, dtype):
    check_attention(*BATCHES[batch], 2 * group, 2, 32, dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_paged_attention_head_dims_interpreter(head_dim):
    check_attention([1, 5, 1], [33, 20, 3], 4, 2, head_dim, torch.float16, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("num_splits", [2, 4])
def test_paged_attention_split_kv_interpreter(num_splits):
    # The split path merges partial softmaxes, including splits that see no key for some rows.
    check_attention([1, 6, 0, 1], [150, 70, 4, 9], 4, 1, 32, torch.float32, "cpu", num_splits=num_splits)


@pytest.mark.interpreter
@pytest.mark.parametrize("num_splits", [None, 2])
@pytest.mark.parametrize("window", [1, 7, 16, 40])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_paged_attention_sliding_window_interpreter(batch, window, num_splits):
    # Windows shorter than a key tile, on a block boundary, and longer than some contexts (then nothing is cut).
    check_attention(*BATCHES[batch], 4, 2, 32, torch.float32, "cpu", num_splits=num_splits, window=window)


@pytest.mark.interpreter
@pytest.mark.parametrize("num_splits", [None, 2])
def test_paged_attention_never_reads_before_the_window_interpreter(num_splits):
    """The engine frees a sequence's blocks that left the window (their ids may then hold anybody's data): NaN in
    every position before each sequence's window must not reach the output, in the kernel or the reference."""
    q_lens, seq_lens, window = [1, 1, 9, 1], [70, 33, 51, 5], 10
    q, k_cache, v_cache, meta = make_batch(q_lens, seq_lens, 4, 2, 32, torch.float32, "cpu", seed=5)
    for b, (n, length) in enumerate(zip(q_lens, seq_lens)):
        for p in range(max(0, length - n - window + 1)):  # before the first query's window
            block = int(meta.block_tables[b, p // BLOCK_SIZE])
            k_cache[block, p % BLOCK_SIZE] = float("nan")
            v_cache[block, p % BLOCK_SIZE] = float("nan")
    ref = attn.paged_attention_ref(q, k_cache, v_cache, meta, 0.2, window)
    out = torch.full_like(q, float("nan"))
    attn.paged_attention_triton(q, k_cache, v_cache, meta, 0.2, num_splits=num_splits, out=out, window=window)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])


def test_sliding_window_reference_is_softmax_over_the_last_window_positions():
    """The reference's window, checked by hand on one decode row and one prefill chunk."""
    q_lens, seq_lens, window = [1, 5], [30, 12], 6
    q, k_cache, v_cache, meta = make_batch(q_lens, seq_lens, 2, 2, 16, torch.float32, "cpu", seed=3)
    out = attn.paged_attention_ref(q, k_cache, v_cache, meta, 0.25, window)
    for b, (q0, n, length) in enumerate([(0, 1, 30), (1, 5, 12)]):
        blocks = meta.block_tables[b].long()
        keys = k_cache[blocks].reshape(-1, 2, 16)[:length]
        vals = v_cache[blocks].reshape(-1, 2, 16)[:length]
        for j in range(n):
            p = length - n + j
            lo = max(0, p - window + 1)
            scores = torch.einsum("hd,shd->hs", q[q0 + j], keys[lo : p + 1]) * 0.25
            expected = torch.einsum("hs,shd->hd", scores.softmax(-1), vals[lo : p + 1])
            assert torch.allclose(out[q0 + j], expected, atol=1e-5)


def check_write_kv(dtype, device):
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_kv_heads, head_dim = 11, 2, 32
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen).to(device, dtype)
    k = qkv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)  # strided views, as the model passes
    v = qkv[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(5 * BLOCK_SIZE, generator=gen)[:num_tokens].to(torch.int32)
    slots[[2, 7]] = -1
    base = torch.randn(2, 5, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    k_ref, v_ref = base[0].clone(), base[1].clone()
    k_out, v_out = base[0].clone(), base[1].clone()
    attn.write_kv_ref(k, v, k_ref, v_ref, slots.to(device))
    attn.write_kv_triton(k, v, k_out, v_out, slots.to(device))
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # a copy, no tl.dot: bf16 is sound
def test_write_kv_interpreter(dtype):
    check_write_kv(dtype, "cpu")


def test_write_kv_cpu_path_equals_reference(decode_path, monkeypatch):
    """The CPU path's write (rows planned once per step), -1 slots skipped, both ways: one index_copy_ per cache, and
    one call of kernels/cpu_attention.c for both (where it runs: not a silent fallback)."""
    calls = []
    monkeypatch.setattr(cpu_attention, "_library", lambda real=cpu_attention._library: calls.append(1) or real())
    gen = torch.Generator().manual_seed(2)
    num_tokens, num_kv_heads, head_dim = 9, 2, 16
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen)
    k = qkv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    for skipped in ([], [0, 5]):
        slots = torch.randperm(4 * BLOCK_SIZE, generator=gen)[:num_tokens]
        slots[skipped] = -1
        base = torch.randn(2, 4, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
        k_ref, v_ref, k_out, v_out = base[0].clone(), base[1].clone(), base[0].clone(), base[1].clone()
        meta = attn.AttentionMeta(torch.arange(num_tokens + 1, dtype=torch.int32), torch.ones(num_tokens, dtype=torch.int32),
                                  torch.zeros(num_tokens, 1, dtype=torch.int32), 1, 1)
        plan = attn.plan_cpu_attention(meta, slots, BLOCK_SIZE, num_kv_heads)
        assert (plan.write_rows is None) == (not skipped)
        attn.write_kv_ref(k, v, k_ref, v_ref, slots)
        attn.write_kv_cpu(k, v, k_out, v_out, plan)
        assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    assert len(calls) == (2 if decode_path == "ours" else 0)


@pytest.fixture(params=["torch", "ours"])
def decode_path(request, monkeypatch):
    """The CPU path's decode rows both ways: PyTorch ops over gathered keys, and kernels/cpu_attention.c's (where it
    runs), which reads them in place."""
    if request.param == "ours" and not cpu_attention.available():
        pytest.skip("our attention kernel needs an x86-64 CPU with AVX2 and FMA and a C compiler")
    monkeypatch.setattr(cpu_attention, "_enabled", request.param == "ours")
    return request.param


@pytest.mark.parametrize("window", [0, 1, 7, 16, 40])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_cpu_path_equals_reference(batch, group, window, decode_path):
    """The CPU path (decode rows batched over keys gathered once per layer, or read in place by our kernel; indices
    planned once per step) against the reference, with q a strided view of a fused qkv as the model passes it.
    Unused cache slots hold NaN."""
    q_lens, seq_lens = BATCHES[batch]
    q, k_cache, v_cache, meta = make_batch(q_lens, seq_lens, 2 * group, 2, 32, torch.float32, "cpu", seed=4)
    qkv = torch.cat([q.reshape(q.shape[0], -1), torch.randn(q.shape[0], 40)], dim=1)
    q_view = qkv[:, : q[0].numel()].view(q.shape)
    plan = attn.plan_cpu_attention(meta, torch.zeros(q.shape[0], dtype=torch.long), BLOCK_SIZE, 2, (0, window))
    assert (plan.decode_rows is None) == (batch == "decode")
    ref = attn.paged_attention_ref(q, k_cache, v_cache, meta, 0.3, window)
    out = attn.paged_attention(q_view, k_cache, v_cache, meta, 0.3, window, plan=plan)
    rows = [t for b, n in enumerate(q_lens) for t in range(sum(q_lens[:b]), sum(q_lens[:b]) + n) if seq_lens[b] > 0]
    assert torch.isfinite(out[rows]).all()
    torch.testing.assert_close(out[rows], ref[rows], **TOLERANCES[torch.float32])


def test_cpu_path_never_reads_before_the_window(decode_path):
    q_lens, seq_lens, window = [1, 1, 9, 1], [70, 33, 51, 5], 10
    q, k_cache, v_cache, meta = make_batch(q_lens, seq_lens, 4, 2, 32, torch.float32, "cpu", seed=5)
    for b, (n, length) in enumerate(zip(q_lens, seq_lens)):
        for p in range(max(0, length - n - window + 1)):
            block = int(meta.block_tables[b, p // BLOCK_SIZE])
            k_cache[block, p % BLOCK_SIZE] = float("nan")
            v_cache[block, p % BLOCK_SIZE] = float("nan")
    plan = attn.plan_cpu_attention(meta, torch.zeros(q.shape[0], dtype=torch.long), BLOCK_SIZE, 2, (window,))
    out = attn.paged_attention_cpu(q, k_cache, v_cache, meta, 0.2, window, plan)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attn.paged_attention_ref(q, k_cache, v_cache, meta, 0.2, window),
                               **TOLERANCES[torch.float32])


LONG_BATCH = ([1, 300, 1, 0, 64], [2049, 300, 4000, 7, 1000])  # long decode contexts next to prefill chunks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch", ["mixed", "long"])
def test_paged_attention_cuda(batch, head_dim, group, dtype):
    check_attention(*BATCHES.get(batch, LONG_BATCH), 4 * group, 4, head_dim, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("batch", ["decode", "long"])
def test_paged_attention_split_kv_cuda(batch, group):
    check_attention(*BATCHES.get(batch, LONG_BATCH), 4 * group, 4, 128, torch.bfloat16, "cuda", num_splits=4)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("window", [16, 100, 4096])
def test_paged_attention_sliding_window_cuda(window, num_splits):
    check_attention(*LONG_BATCH, 8, 2, 128, torch.bfloat16, "cuda", num_splits=num_splits, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_cuda(dtype):
    check_write_kv(dtype, "cuda")
