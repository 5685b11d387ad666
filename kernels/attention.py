"""Paged attention over a flat batch of variable-length sequences (prefill chunks and decode tokens mixed).

KV cache layout per layer: k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim).
Sequence b owns the query rows [q_start[b], q_start[b+1]) of the flat batch; its context after this step
has seq_lens[b] tokens, stored in the blocks block_tables[b, :]. Causal with an offset: query row j of
sequence b sits at position p = seq_lens[b] - q_len_b + j and attends to keys 0..p.

Semantics (per sequence b, head h, GQA group g = h // (Hq // Hkv)):
    out[q_start[b] + j, h] = softmax(sm_scale * q[., h] @ K_b[lo:p+1, g]^T) @ V_b[lo:p+1, g]
    lo = 0, or with a sliding window W (Mistral; window > 0): lo = max(0, p - W + 1), the last W positions.

Running example (block_size 4, Hq 4, Hkv 2, so a GQA group of 2 query heads per KV head):

    seq 0: decode, 6 tokens of context (blocks 7, 2), 1 new query      q rows [0, 1)   positions 5
    seq 1: prefill chunk starting mid-sequence: 3 cached + 4 new tokens q rows [1, 5)   positions 3..6
    q_start = [0, 1, 5]   seq_lens = [6, 7]   block_tables = [[7, 2], [4, 0]]

The Triton kernel is one flash-attention program per (query block, KV head, KV split):
  * A query block is BLOCK_Q consecutive query tokens of ONE sequence times the GROUP query heads sharing
    the KV head, packed into the BLOCK_M = BLOCK_Q * GROUP rows of the tile (row m: token m // GROUP, head
    m % GROUP). Packing the group makes a decode step (one token) still fill >= 16 rows of tl.dot with
    useful work when GROUP > 1, and each K/V tile is read once for the whole group.
  * Query blocks are numbered flat over the batch: sequence b owns q_start[b] // BLOCK_Q + b ... so the grid
    is T // BLOCK_Q + B programs (host ints only, no device sync) and a program finds its sequence by binary
    search over q_start. Programs left over (a sequence shorter than its share) return at once.
  * Keys stream in tiles of BLOCK_N positions through the block table (online softmax, fp32 statistics and
    accumulator), from the first position the block's queries can see (sliding window) to the last (causal).
  * With few programs (small decode batches) the key range is split NUM_SPLITS ways (flash-decoding); each
    split writes its unnormalised (acc, max, sum) and a second kernel merges them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_attention
from kernels.attention_plan import CpuAttentionPlan, plan_cpu_attention  # noqa: F401 (callers import it from here)
from kernels.dispatch import tl, triton, use_triton



@dataclass(frozen=True)
class AttentionMeta:
    q_start: torch.Tensor  # (B+1,) int32, device
    seq_lens: torch.Tensor  # (B,) int32, device
    block_tables: torch.Tensor  # (B, max_blocks_per_seq) int32, device; unused entries hold 0
    max_q_len: int
    max_seq_len: int


def _use_triton(t: torch.Tensor) -> bool:
    return use_triton(t)


def _check_interpreter(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and type(_paged_attn_kernel).__name__ != "InterpretedFunction":
        raise ValueError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before kernels.attention is imported")


# ----------------------------------------------------------------------------------------------- references


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: (T, Hkv, D) -> cache rows slot_mapping[t] = block * block_size + offset (-1: skip)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, sm_scale: float,
                        window: int = 0) -> torch.Tensor:
    """Reference (and CPU path): decode rows of all sequences in one batched softmax over their gathered blocks;
    each longer query range (a prefill chunk) by SDPA with a causal offset mask. fp32 math. window > 0: each
    query sees only the last `window` positions up to its own."""
    out = torch.empty_like(q)
    q_start = meta.q_start.tolist()
    seq_lens = meta.seq_lens.tolist()
    q_lens = [q_start[b + 1] - q_start[b] for b in range(len(seq_lens))]
    decode = [b for b, n in enumerate(q_lens) if n == 1 and seq_lens[b] > 0]
    if decode:
        _decode_ref(q, k_cache, v_cache, meta, sm_scale, decode, [q_start[b] for b in decode],
                    [seq_lens[b] for b in decode], out, window)
    for b, n in enumerate(q_lens):
        if n > 1 or (n == 1 and seq_lens[b] == 0):
            _prefill_ref(q, k_cache, v_cache, meta.block_tables[[b]], [q_start[b]], n, seq_lens[b], sm_scale, out, window)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """(B, max_blocks) block ids -> (B, num_blocks * block_size, Hkv, D) keys or values, in position order."""
    b = block_tables.shape[0]
    return cache[block_tables[:, :num_blocks].long()].reshape(b, -1, *cache.shape[2:])


def _decode_ref(q, k_cache, v_cache, meta, sm_scale, seqs, rows, lens, out, window) -> None:
    num_kv_heads, block_size, head_dim = k_cache.shape[2], k_cache.shape[1], k_cache.shape[3]
    rep = q.shape[1] // num_kv_heads
    tables = meta.block_tables[torch.tensor(seqs, device=q.device)]
    num_blocks = -(-max(lens) // block_size)
    pos = torch.arange(num_blocks * block_size, device=q.device)[None, :]
    lens_t = torch.tensor(lens, device=q.device)[:, None]
    valid = pos < lens_t
    if window > 0:
        valid &= pos >= lens_t - window
    k = _gather(k_cache, tables, num_blocks).float()  # (Bd, S, Hkv, D)
    v = _gather(v_cache, tables, num_blocks).float().masked_fill(~valid[:, :, None, None], 0.0)  # unused slots may hold NaN
    qd = q[torch.tensor(rows, device=q.device)].float().view(len(seqs), num_kv_heads, rep, head_dim)  # (Bd, Hkv, rep, D)
    scores = torch.einsum("bgrd,bsgd->bgrs", qd, k) * sm_scale  # (Bd, Hkv, rep, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    o = torch.einsum("bgrs,bsgd->bgrd", torch.softmax(scores, dim=-1), v)  # (Bd, Hkv, rep, D)
    out[torch.tensor(rows, device=q.device)] = o.reshape(len(seqs), -1, head_dim).to(q.dtype)


def _prefill_ref(q, k_cache, v_cache, block_tables, q0s, n, seq_len, sm_scale, out, window) -> None:
    """The prefill chunks of G sequences of the same shape (n query rows each, seq_len tokens of context): block_tables
    (G, max_blocks), q0s their first query rows. One batched attention for the G of them."""
    num_q_heads, num_kv_heads, block_size = q.shape[1], k_cache.shape[2], k_cache.shape[1]
    rows = (torch.tensor(q0s, device=q.device)[:, None] + torch.arange(n, device=q.device)[None, :]).reshape(-1)
    if seq_len == 0:
        out.index_fill_(0, rows, 0)
        return
    # Keys from the first query's window on (0 without a window): earlier blocks may have been freed
    lo = max(0, seq_len - n - window + 1) if window > 0 else 0
    num_blocks = -(-seq_len // block_size)
    k = _gather(k_cache, block_tables, num_blocks)[:, lo:seq_len]  # (G, S, Hkv, D)
    v = _gather(v_cache, block_tables, num_blocks)[:, lo:seq_len]
    rep = num_q_heads // num_kv_heads
    k = k.repeat_interleave(rep, dim=2).transpose(1, 2).float()  # (G, Hq, S, D)
    v = v.repeat_interleave(rep, dim=2).transpose(1, 2).float()
    qb = q.index_select(0, rows).view(len(q0s), n, num_q_heads, -1).transpose(1, 2).float()  # (G, Hq, n, D)
    pos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]  # (n, 1)
    keys = torch.arange(lo, seq_len, device=q.device)[None, :]
    mask = keys <= pos  # (n, S)
    if window > 0:
        mask &= keys > pos - window
    o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=sm_scale)  # (G, Hq, n, D)
    out.index_copy_(0, rows, o.transpose(1, 2).reshape(-1, num_q_heads, o.shape[-1]).to(q.dtype))


# ----------------------------------------------------------------------------------------------- CPU path


def write_kv_cpu(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 plan: CpuAttentionPlan) -> None:
    """write_kv_ref's semantics with the plan's rows: one index_copy_ per cache, or one call of our kernel for both
    (kernels/cpu_attention.py, fp32: in a smollm2 decode step 27 us a layer against 44, most of either the first touch
    of cold caches after a projection's weights streamed through them). k, v may be strided views."""
    if cpu_attention.enabled() and cpu_attention.writes(k, k_cache) and cpu_attention.writes(v, v_cache):
        cpu_attention.write_kv(k, v, k_cache, v_cache, plan.write_slots, plan.write_rows)
        return
    for src, cache in ((k, k_cache), (v, v_cache)):
        rows = src.reshape(src.shape[0], -1)  # (T, Hkv * D): a view for slices of a fused qkv
        if plan.write_rows is not None:
            rows = rows.index_select(0, plan.write_rows)
        cache.view(-1, rows.shape[1]).index_copy_(0, plan.write_slots, rows.to(cache.dtype))


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                        sm_scale: float, window: int, plan: CpuAttentionPlan) -> torch.Tensor:
    """paged_attention_ref's semantics with the plan's gathers (fp32 math). q: (T, Hq, D), any strides."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    rep = num_q_heads // k_cache.shape[2]
    out = None
    if plan.keys:
        keys = plan.keys[window]
        if cpu_attention.enabled() and cpu_attention.supports(q, k_cache):  # keys and values read in place
            o = cpu_attention.decode(q, k_cache, v_cache, keys, plan.visible[window], plan.decode_rows, sm_scale)
        else:
            bias = plan.bias(window)
            qd = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)
            qd = qd.reshape(bias.shape[0], rep, head_dim).float()  # (Bd * Hkv, rep, D): a GQA group per matrix
            k = k_cache.view(-1, head_dim).index_select(0, keys).view(bias.shape[0], -1, head_dim).float()  # (Bd*Hkv, S, D)
            v = v_cache.view(-1, head_dim).index_select(0, keys).view(bias.shape[0], -1, head_dim).float()
            scores = torch.baddbmm(bias, qd, k.transpose(1, 2), alpha=sm_scale)  # (Bd * Hkv, rep, S)
            o = torch.bmm(torch.softmax(scores, dim=-1), v).view(-1, num_q_heads, head_dim).to(q.dtype)  # (Bd, Hq, D)
        if plan.decode_rows is None:
            return o
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device).index_copy_(0, plan.decode_rows, o)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    prefill_attention_cpu(q, k_cache, v_cache, meta, sm_scale, window, plan, out)
    return out


def prefill_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                          sm_scale: float, window: int, plan: CpuAttentionPlan, out: torch.Tensor) -> None:
    """The plan's prefill rows of paged_attention_cpu, into their rows of out (T, Hq, D); the others untouched."""
    for seqs, q0s, n, seq_len in plan.prefills:
        _prefill_ref(q, k_cache, v_cache, meta.block_tables[list(seqs)], q0s, n, seq_len, sm_scale, out, window)


# ----------------------------------------------------------------------------------------------- write_kv


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (token, chunk of the Hkv*D row): cache[slot] = k[t]; slot -1 is padding."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat index into (Hkv, D)
    mask = offs < ROW
    head, dim = offs // HEAD_DIM, offs % HEAD_DIM
    k = tl.load(k_ptr + t * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + head * stride_vh + dim, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton scatter, same semantics as write_kv_ref. k, v may be strided views (e.g. slices of a fused qkv)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} do not fit caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("KV caches must be contiguous")
    if k.stride(2) != 1 or v.stride(2) != 1 or slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError("k, v need a unit stride on head_dim; slot_mapping must be (T,) int32/int64")
    _check_interpreter(k_cache)
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    block = min(triton.next_power_of_2(row), 4096)
    _write_kv_kernel[(num_tokens, triton.cdiv(row, block))](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HEAD_DIM=head_dim, ROW=row, BLOCK=block)


# ----------------------------------------------------------------------------------------------- attention


@triton.jit
def _find_seq(q_start_ptr, qblock, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence b whose flat query blocks [q_start[b] // BLOCK_Q + b, ...) contain `qblock` (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(q_start_ptr + mid) // BLOCK_Q + mid <= qblock:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attn_kernel(
    out_ptr, part_acc_ptr, part_stat_ptr,  # out: (T, Hq, D); partials (splits only): (S, T, Hq, D), (S, 2, T, Hq)
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, q_start_ptr, seq_lens_ptr,
    qk_scale, num_seqs, num_tokens, stride_qt, stride_bt, window,  # qk_scale = sm_scale * log2(e); window 0 = none
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    qblock, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = _find_seq(q_start_ptr, qblock, num_seqs, BLOCK_Q)
    q0 = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q0
    qblock_local = qblock - (q0 // BLOCK_Q + seq)
    if qblock_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    q_pos = qblock_local * BLOCK_Q + offs_m // GROUP  # (M,) query index within the sequence
    head = kv_head * GROUP + offs_m % GROUP  # (M,) query head
    row_ok = (offs_m // GROUP < BLOCK_Q) & (q_pos < q_len)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + (q0 + q_pos)[:, None].to(tl.int64) * stride_qt + head[:, None] * HEAD_DIM + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, Dp)

    # Keys this block can see end at the last query's position and, with a sliding window, start at the first
    # query's window; this split takes a contiguous share of the tiles in between.
    kv_end = tl.minimum(context_len + (qblock_local + 1) * BLOCK_Q, seq_len)
    kv_start = tl.where(window > 0, tl.maximum(context_len + qblock_local * BLOCK_Q - window + 1, 0), 0)
    first_tile = kv_start // BLOCK_N
    end_tile = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(end_tile - first_tile, NUM_SPLITS)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, end_tile)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    ROW: tl.constexpr = NUM_KV_HEADS * HEAD_DIM  # cache stride of one slot
    table = block_tables_ptr + seq * stride_bt
    for tile in range(tile_lo, tile_hi):
        pos = tile * BLOCK_N + offs_n  # (N,) key positions
        pos_ok = (pos < kv_end) & (pos >= kv_start)  # never load before the window: those blocks may be freed
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE  # (N,)
        kv_off = slot[:, None] * ROW + kv_head * HEAD_DIM + offs_d[None, :]  # (N, Dp)
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # (N, Dp)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N), log2 domain
        visible = (pos[None, :] <= context_len + q_pos[:, None]) & pos_ok[None, :]
        visible &= (window <= 0) | (pos[None, :] > context_len + q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet (only in later splits)
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    m_i = tl.where(l_i > 0, m_i, float("-inf"))  # a split that saw no key for a row must weigh nothing
    out_off = (q0 + q_pos)[:, None].to(tl.int64) * (NUM_Q_HEADS * HEAD_DIM) + head[:, None] * HEAD_DIM + offs_d[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        acc = acc / l_i[:, None]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(part_acc_ptr + split * num_tokens * (NUM_Q_HEADS * HEAD_DIM) + out_off, acc, mask=out_mask)
        stat_off = split * 2 * num_tokens * NUM_Q_HEADS + (q0 + q_pos) * NUM_Q_HEADS + head
        tl.store(part_stat_ptr + stat_off, m_i, mask=row_ok)
        tl.store(part_stat_ptr + stat_off + num_tokens * NUM_Q_HEADS, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(out_ptr, part_acc_ptr, part_stat_ptr, num_tokens,
                         NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         NUM_SPLITS: tl.constexpr):
    """One program per (token, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    t, h = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    stat_off = splits * 2 * num_tokens * NUM_Q_HEADS + t * NUM_Q_HEADS + h
    m = tl.load(part_stat_ptr + stat_off)  # (S,)  -inf for a split that saw no key
    l = tl.load(part_stat_ptr + stat_off + num_tokens * NUM_Q_HEADS)
    w = tl.exp2(m - tl.max(m, axis=0))  # (S,)
    row = t.to(tl.int64) * (NUM_Q_HEADS * HEAD_DIM) + h * HEAD_DIM
    acc = tl.load(part_acc_ptr + splits[:, None] * num_tokens * (NUM_Q_HEADS * HEAD_DIM) + row + offs_d[None, :],
                  mask=offs_d[None, :] < HEAD_DIM, other=0.0)  # (S, Dp)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _attention_tiles(max_q_len: int, group: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_Q, BLOCK_N): 16 packed rows for decode-only steps, 64 (128 on GPU) with prefill."""
    rows_needed = max(max_q_len, 1) * group
    block_m = 16 if rows_needed <= 16 else (128 if on_gpu and max_q_len >= 128 else 64)
    block_m = max(block_m, triton.next_power_of_2(group))
    block_n = 32 if block_m <= 16 else 64
    return block_m, block_m // group, block_n


def _num_splits(num_programs: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Split the keys when the (query block, KV head) programs alone would leave most SMs idle."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    if num_programs >= num_sms:
        return 1
    splits = min(triton.cdiv(2 * num_sms, num_programs), triton.cdiv(max_seq_len, 4 * block_n), 16)
    return triton.next_power_of_2(splits) if splits > 1 else 1


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                           sm_scale: float, num_splits: int | None = None, out: torch.Tensor | None = None,
                           window: int = 0) -> torch.Tensor:
    """Triton paged attention, same semantics as paged_attention_ref. Never syncs with the device.

    q: (T, Hq, D) with unit strides inside a token (a view of a fused qkv is fine)   caches: contiguous
    num_splits: KV splits per query block (a power of 2; None: chosen from the device and the batch shape).
    out: (T, Hq, D) contiguous, written in full (None: a new tensor).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape or num_q_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.stride(2) != 1 or q.stride(1) != head_dim or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q needs unit strides within a token; KV caches must be contiguous")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but caches are {k_cache.dtype}, {v_cache.dtype}")
    if meta.block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    _check_interpreter(q)
    if out is None:
        out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    num_seqs = meta.seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    block_m, block_q, block_n = _attention_tiles(meta.max_q_len, group, q.is_cuda)
    num_qblocks = num_tokens // block_q + num_seqs
    splits = num_splits or _num_splits(num_qblocks * num_kv_heads, meta.max_seq_len, block_n, q.device)
    if splits & (splits - 1):
        raise ValueError(f"num_splits must be a power of 2, not {splits}")
    part_acc = part_stat = out  # unused placeholders when there is one split
    if splits > 1:
        part_acc = torch.empty((splits, num_tokens, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
        part_stat = torch.empty((splits, 2, num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
    head_dim_pad = max(triton.next_power_of_2(head_dim), 16)
    _paged_attn_kernel[(num_qblocks, num_kv_heads, splits)](
        out, part_acc, part_stat, q, k_cache, v_cache, meta.block_tables, meta.q_start, meta.seq_lens,
        sm_scale * math.log2(math.e), num_seqs, num_tokens, q.stride(0), meta.block_tables.stride(0), window,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        NUM_SPLITS=splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_m <= 64 else 8, num_stages=2)
    if splits > 1:
        # Tokens of empty ranges own no row, so every (t, h) here has a split-0 partial.
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out, part_acc, part_stat, num_tokens, NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=splits)
    return out


# ----------------------------------------------------------------------------------------------- dispatch


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             plan: CpuAttentionPlan | None = None) -> None:
    """Dispatch: CUDA tensors -> Triton, anything else -> the CPU path with the step's plan, or the reference
    without one (MULTIPLEX_KERNELS overrides)."""
    if _use_triton(k_cache):
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    elif plan is not None:
        write_kv_cpu(k, v, k_cache, v_cache, plan)
    else:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, sm_scale: float,
                    window: int = 0, plan: CpuAttentionPlan | None = None) -> torch.Tensor:
    """Dispatch: CUDA tensors -> Triton, anything else -> the CPU path with the step's plan, or the reference
    without one (MULTIPLEX_KERNELS overrides)."""
    if _use_triton(q):
        return paged_attention_triton(q, k_cache, v_cache, meta, sm_scale, window=window)
    if plan is not None:
        return paged_attention_cpu(q, k_cache, v_cache, meta, sm_scale, window, plan)
    return paged_attention_ref(q, k_cache, v_cache, meta, sm_scale, window)
