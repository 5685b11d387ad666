"""The index work of a step's attention on a CPU (`CpuAttentionPlan`), done once per step and shared by every layer:
kernels/attention.py's `paged_attention_cpu` and `write_kv_cpu` read it; kernels/cpu_attention.c reads its keys in
place. The layout of the cache and of a step's metadata are kernels/attention.py's (`AttentionMeta`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class CpuAttentionPlan:
    """The index work of one step's attention on a CPU, done once and shared by every layer (the reference
    redoes it in each call). Host tensors; built by plan_cpu_attention from the step's metadata, with NumPy on
    host lists (a few microseconds an op where a torch op on small tensors costs ~10: the plan is per step).

    Decode rows of all sequences run as one batched softmax over keys gathered with one index_select per cache
    and layer. Their keys are laid out (sequence, KV head, key) so that the GQA group of each KV head is one
    matrix product: with sequences b, KV heads g and S the longest visible key range,
        keys[window]: (Bd * Hkv * S,) rows of the cache viewed as (num_blocks * block_size * Hkv, D): key j of
                      sequence b is its position lo_b + j (lo_b: 0, or the window's first position); positions past
                      the sequence's last one read that last key (written, so finite) and are masked
        visible[window]: (Bd,) int64, how many of its S keys each sequence sees (a prefix: the rest are masked)
        bias(window): (Bd * Hkv, 1, S) fp32, 0 for a visible key, -inf for a masked one (made from `visible` when
                      asked for, once: only the PyTorch path reads it; our kernel reads `visible`)
    Example (block_size 4, Hkv 1, no window): seq 0 has 6 tokens in blocks [7, 2], seq 1 has 3 in block [4]:
        S = 6   keys = [28 29 30 31 8 9 | 16 17 18 18 18 18]   bias = [0 0 0 0 0 0 | 0 0 0 -inf -inf -inf]
    Prefill chunks (and empty sequences) of the same shape (query rows, context) run as one batch. Where our kernel runs
    (kernels/cpu_attention.py: fp32 on x86-64), decode rows read keys and values in place instead of gathering them.
    """

    write_slots: torch.Tensor  # (W,) int64 cache rows of the tokens written (slot_mapping without its -1 entries)
    write_rows: torch.Tensor | None  # (W,) int64 token rows written; None: every token, in order
    decode_rows: torch.Tensor | None  # (Bd,) int64 query rows of the decode sequences; None: all rows, in order
    keys: dict[int, torch.Tensor]  # window (0 = none) -> (Bd * Hkv * S,) int64
    visible: dict[int, torch.Tensor]  # window -> (Bd,) int64
    prefills: tuple[tuple[tuple[int, ...], tuple[int, ...], int, int], ...]  # (sequences, their first query rows,
    #                                                                           query rows each, seq_len) per shape
    num_kv_heads: int = 1

    def bias(self, window: int) -> torch.Tensor:
        """(Bd * Hkv, 1, S) fp32: 0 for each visible key, -inf for a masked one; made once per window."""
        cache = self.__dict__.setdefault("_bias", {})  # frozen: written past __setattr__, as cached_property does
        if window not in cache:
            seen = self.visible[window]
            width = self.keys[window].numel() // max(1, seen.numel() * self.num_kv_heads)
            b = torch.zeros((seen.numel(), width)).masked_fill_(torch.arange(width)[None, :] >= seen[:, None],
                                                                float("-inf"))
            cache[window] = b[:, None, None, :].expand(-1, self.num_kv_heads, 1, -1).reshape(-1, 1, width)
        return cache[window]


def plan_cpu_attention(meta: Any, slot_mapping: torch.Tensor, block_size: int, num_kv_heads: int,
                       windows: tuple[int, ...] = (0,)) -> CpuAttentionPlan:
    """The CpuAttentionPlan of a step (`meta`: its kernels.attention.AttentionMeta, whose module imports this one),
    for the sliding windows its layers use (0 = full attention)."""
    q_start, seq_lens = meta.q_start.tolist(), meta.seq_lens.tolist()
    num_tokens = q_start[-1]
    decode = [b for b in range(len(seq_lens)) if q_start[b + 1] - q_start[b] == 1 and seq_lens[b] > 0]
    shapes: dict[tuple[int, int], list[tuple[int, int]]] = {}  # prefill chunks of one shape attend in one batch
    if len(decode) < len(seq_lens):
        for b in range(len(seq_lens)):
            n = q_start[b + 1] - q_start[b]
            if n > 1 or (n == 1 and seq_lens[b] == 0):
                shapes.setdefault((n, seq_lens[b]), []).append((b, q_start[b]))
    prefills = tuple((tuple(b for b, _ in members), tuple(q0 for _, q0 in members), n, seq_len)
                     for (n, seq_len), members in shapes.items())
    slots = slot_mapping.numpy()
    all_written = bool((slots >= 0).all())
    keys, seen = {}, {}
    if decode:
        every = len(decode) == len(seq_lens)
        lens = np.asarray(seq_lens if every else [seq_lens[b] for b in decode], dtype=np.int64)[:, None]  # (Bd, 1)
        tables = meta.block_tables.numpy()
        tables = (tables if every else tables[decode]).astype(np.int64)  # (Bd, max_blocks)
        for window in set(windows):
            lo = np.maximum(lens - window, 0) if window > 0 else np.zeros_like(lens)
            pos = lo + np.arange(int((lens - lo).max()))[None, :]  # (Bd, S)
            np.minimum(pos, lens - 1, out=pos)  # masked keys read the last one: written, so never NaN
            rows = np.take_along_axis(tables, pos // block_size, 1) * block_size + pos % block_size  # (Bd, S)
            keys[window] = torch.from_numpy(
                (rows[:, None, :] * num_kv_heads + np.arange(num_kv_heads)[None, :, None]).reshape(-1))
            seen[window] = torch.from_numpy((lens - lo)[:, 0])
    return CpuAttentionPlan(
        write_slots=slot_mapping.long() if all_written else torch.from_numpy(slots[slots >= 0].astype(np.int64)),
        write_rows=None if all_written else torch.from_numpy(np.flatnonzero(slots >= 0)),
        decode_rows=None if len(decode) == num_tokens else torch.tensor([q_start[b] for b in decode], dtype=torch.long),
        keys=keys, visible=seen, prefills=prefills, num_kv_heads=num_kv_heads)
