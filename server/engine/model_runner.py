"""ScheduledBatch (CPU, no tensors) -> ForwardBatch (device tensors) -> logits. Owns the KV cache."""
from __future__ import annotations

import torch

from kernels.attention import AttentionMeta
from kernels.segments import make_segments
from server.engine.scheduler import ScheduledBatch
from server.model.adapter_pool import AdapterPool
from server.model.forward_batch import ForwardBatch, KVCache
from server.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, adapter_pool: AdapterPool | None) -> None:
        cfg = model.cfg
        self.model, self.block_size, self.adapter_pool = model, block_size, adapter_pool
        self.device = model.device
        self.kv = KVCache.allocate(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, model.device, model.dtype)

    def build(self, batch: ScheduledBatch) -> ForwardBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        q_start, seq_lens, logits_indices = [0], [], []
        max_blocks = max(len(s.request.block_ids) for s in batch.seqs)
        block_tables = torch.zeros((len(batch.seqs), max_blocks), dtype=torch.int32)
        for b, s in enumerate(batch.seqs):
            req = s.request
            end = s.start + s.num_tokens
            input_ids += req.all_ids[s.start : end]
            positions += range(s.start, end)
            slot_mapping += [req.block_ids[p // bs] * bs + p % bs for p in range(s.start, end)]
            q_start.append(q_start[-1] + s.num_tokens)
            seq_lens.append(end)
            block_tables[b, : len(req.block_ids)] = torch.tensor(req.block_ids, dtype=torch.int32)
            if s.needs_logits:
                logits_indices.append(q_start[-1] - 1)
        dev = self.device

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        attn = AttentionMeta(
            q_start=t(q_start, torch.int32), seq_lens=t(seq_lens, torch.int32), block_tables=block_tables.to(dev),
            max_q_len=max(s.num_tokens for s in batch.seqs), max_seq_len=max(seq_lens),
        )
        segments = make_segments([s.num_tokens for s in batch.seqs], [s.request.slot for s in batch.seqs], dev)
        return ForwardBatch(
            input_ids=t(input_ids, torch.int64), positions=t(positions, torch.int64),
            slot_mapping=t(slot_mapping, torch.int64), attn=attn, segments=segments,
            logits_indices=t(logits_indices, torch.int64),
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """-> (num seqs needing logits, V) fp32, in batch order."""
        return self.model.forward(self.build(batch), self.kv, self.adapter_pool)
