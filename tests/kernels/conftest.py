"""Tolerances for kernel-vs-reference comparisons, set once for every kernel test; the attention tests' batches."""
import torch

import kernels.attention as attn

# Max abs error allowed against the fp32 reference, per input dtype, relative to the reference's max magnitude.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


BLOCK_SIZE = 16


def make_batch(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """Random q and caches; each sequence's blocks are scattered (shuffled ids), every unused slot holds NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    cache_shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"))
    v_cache = torch.full(cache_shape, float("nan"))
    table = torch.zeros(len(seq_lens), max(blocks_per_seq + [1]), dtype=torch.int32)
    used = 0
    for b, (n, s) in enumerate(zip(blocks_per_seq, seq_lens)):
        ids = perm[used : used + n]
        used += n
        table[b, :n] = torch.tensor(ids, dtype=torch.int32)
        kv = torch.randn(2, n * BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)[:, :s]
        k_cache.view(-1, num_kv_heads, head_dim)[[i * BLOCK_SIZE + o for i in ids for o in range(BLOCK_SIZE)][:s]] = kv[0]
        v_cache.view(-1, num_kv_heads, head_dim)[[i * BLOCK_SIZE + o for i in ids for o in range(BLOCK_SIZE)][:s]] = kv[1]
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen)
    q_start = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    meta = attn.AttentionMeta(q_start=q_start.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
                              block_tables=table.to(device), max_q_len=max(q_lens), max_seq_len=max(seq_lens))
    return q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), meta
