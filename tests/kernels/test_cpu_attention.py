"""kernels.cpu_attention (our decode attention over the paged KV cache) against the reference, paged_attention_ref:
head dims around its 8- and 32-column chunks, GQA groups of 1 to 8, block sizes, contexts from 1 to 4000 keys,
sliding windows, decode rows among prefill chunks, q a strided view of a fused qkv, unused cache slots NaN (never
read); and that the CPU path really runs it where it builds."""
import pytest
import torch

import kernels.attention as attn
from kernels import cpu_attention
from tests.kernels.conftest import TOLERANCES, make_batch

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="needs an x86-64 CPU with AVX2 and FMA and a C compiler")


def _check(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, window=0, seed=0):
    q, k_cache, v_cache, meta = make_batch(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, torch.float32,
                                           "cpu", seed=seed)
    qkv = torch.cat([q.reshape(q.shape[0], -1), torch.randn(q.shape[0], 2 * num_kv_heads * head_dim)], dim=1)
    q_view = qkv[:, : q[0].numel()].view(q.shape)  # the model's q: a slice of the fused projection
    plan = attn.plan_cpu_attention(meta, torch.zeros(q.shape[0], dtype=torch.long), k_cache.shape[1], num_kv_heads,
                                   (window,))
    scale = head_dim**-0.5
    out = cpu_attention.decode(q_view, k_cache, v_cache, plan.keys[window], plan.visible[window], plan.decode_rows,
                               scale)
    ref = attn.paged_attention_ref(q, k_cache, v_cache, meta, scale, window)
    rows = plan.decode_rows if plan.decode_rows is not None else torch.arange(len(q_lens))
    assert out.shape == (rows.numel(), num_q_heads, head_dim) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref[rows], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("head_dim", [8, 17, 32, 40, 64, 80, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_decode_equals_the_reference(head_dim, group):
    _check([1, 1, 1, 1, 1], [1, 7, 16, 37, 70], 2 * group, 2, head_dim, seed=head_dim + group)


@pytest.mark.parametrize("window", [0, 1, 7, 16, 40])
def test_decode_rows_among_prefill_chunks_and_windows(window):
    _check([1, 9, 0, 20, 1, 0, 1], [40, 9, 5, 51, 16, 0, 3], 6, 2, 64, window=window, seed=window)


def test_long_contexts():
    """Thousands of keys: the softmax's max and sum over long rows, the scratch sized by the longest."""
    _check([1, 1, 1], [2049, 4000, 5], 9, 3, 64, seed=1)
    _check([1, 1], [3000, 1200], 4, 1, 128, window=1024, seed=2)


def test_large_and_small_scores():
    """Scores far apart (exp underflows to 0 for all but the max) and all equal (uniform weights)."""
    q, k_cache, v_cache, meta = make_batch([1, 1], [50, 50], 2, 1, 32, torch.float32, "cpu", seed=3)
    plan = attn.plan_cpu_attention(meta, torch.zeros(2, dtype=torch.long), k_cache.shape[1], 1)
    for scale in (100.0, 0.0):
        out = cpu_attention.decode(q, k_cache, v_cache, plan.keys[0], plan.visible[0], None, scale)
        torch.testing.assert_close(out, attn.paged_attention_ref(q, k_cache, v_cache, meta, scale, 0),
                                   **TOLERANCES[torch.float32])


def test_the_cpu_path_runs_it(monkeypatch):
    """Not a silent fallback: where it builds, auto enables it and paged_attention's CPU path calls it per layer."""
    assert cpu_attention.CHOICE != "auto" or cpu_attention.enabled()
    monkeypatch.setattr(cpu_attention, "_enabled", True)
    calls = []
    decode = cpu_attention.decode
    monkeypatch.setattr(cpu_attention, "decode", lambda *args: calls.append(1) or decode(*args))
    q, k_cache, v_cache, meta = make_batch([1, 1], [5, 9], 4, 2, 32, torch.float32, "cpu")
    plan = attn.plan_cpu_attention(meta, torch.zeros(2, dtype=torch.long), k_cache.shape[1], 2)
    out = attn.paged_attention(q, k_cache, v_cache, meta, 0.2, 0, plan=plan)
    assert calls == [1]
    torch.testing.assert_close(out, attn.paged_attention_ref(q, k_cache, v_cache, meta, 0.2, 0),
                               **TOLERANCES[torch.float32])
