"""ForwardBatch: the device tensors for one engine step; the model's only input besides its weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention import AttentionMeta
from kernels.segments import Segments


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64: prefill chunks and decode tokens, request after request
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: KV cache row (block * block_size + offset) of each token
    attn: AttentionMeta  # one sequence per request, in the same order as the tokens
    segments: Segments  # one segment per request, with its adapter slot (-1 = base)
    logits_indices: torch.Tensor  # (B,) int64: rows whose next-token logits are needed


@dataclass(frozen=True)
class KVCache:
    k: torch.Tensor  # (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    v: torch.Tensor

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device, dtype) -> "KVCache":
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
