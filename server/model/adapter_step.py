"""The adapter work of one forward step: what every layer shares is looked up once, then the deltas of each layer.

    step = AdapterStep(pool, batch)        # once per forward
    step.apply(layer, group, y, x)          # y += this step's LowRank and Sparse deltas of `group` (qkv, o, ...)
    step.scale(layer, activation, y)        # IA3 and PARA vectors of `activation` (qkv, gate_up, ffn)

On a CUDA device (or with MULTIPLEX_KERNELS=triton) each call launches the Triton kernels on the pool's tables and
does no host work (CUDA-graph capturable). On a CPU, LowRank runs from the padded mirror (padded_lowrank.py) with the
step's slot grid computed once (Segments.slot_batch), Sparse from the pool's CSR matrices, one product per slot
(not per request), and each Scale row of -1 (no vector) is mapped once per step to the pool's row of ones past the
last slot (request), so that a layer's scaling is one gather and one multiply.
"""
from __future__ import annotations

import torch

from kernels.dispatch import use_triton
from kernels.lowrank import lowrank_delta, lowrank_delta_padded
from kernels.scale import scale_rows_
from kernels.sparse import sparse_delta, sparse_delta_csr
from server.model.adapter_pool import AdapterPool
from server.model.forward_batch import ForwardBatch


class AdapterStep:
    def __init__(self, pool: AdapterPool, batch: ForwardBatch) -> None:
        self.pool, self.batch = pool, batch
        self.use_triton = use_triton(pool.device)
        c = pool.cfg
        # (y column, vector column, width) of the PARA vectors in each activation: q and v, then up
        self.para_spans = {"qkv": ((0, 0, c.q_size), (c.q_size + c.kv_size, c.q_size, c.kv_size)),
                           "gate_up": ((c.intermediate_size, c.q_size + c.kv_size, c.intermediate_size),)}
        self.scale_index: dict[str, torch.Tensor] = {}  # CPU: target -> (T,) int64 row of its vector table
        self.para_index: torch.Tensor | None = None
        if not self.use_triton:
            for target, rows in batch.scale_rows.items():
                self.scale_index[target] = torch.where(rows >= 0, rows, pool.max_slots).long()
            if batch.para_rows is not None:
                self.para_index = torch.where(batch.para_rows >= 0, batch.para_rows, pool.max_requests).long()

    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += this step's LowRank and Sparse deltas of `group` in `layer` (y: (T, group width), x: (T, d_in))."""
        pool, batch = self.pool, self.batch
        pool.inject_faults(layer, batch)
        seg = batch.segments
        if batch.adapter_kinds.lowrank:
            if pool.padded is not None:
                if pool.padded.rank:
                    lowrank_delta_padded(y, x, seg, pool.padded.factors[layer][group])
            else:
                lowrank_delta(y, x, seg, pool.arena, pool.lowrank_tables[layer][group])
        if batch.adapter_kinds.sparse:
            if pool.sparse_csr is not None:
                matrices = {s: m[(layer, group)] for s, _ in seg.slot_rows
                            if (m := pool.sparse_csr.get(s)) is not None and (layer, group) in m}
                sparse_delta_csr(y, x, seg.slot_rows, matrices)
            else:
                sparse_delta(y, x, seg, pool.idx_arena, pool.arena, pool.sparse_tables[layer][group])

    def scale(self, layer: int, activation: str, y: torch.Tensor) -> None:
        """Multiply the Scale sites inside `activation` ("qkv", "gate_up" or "ffn") of this layer."""
        pool, batch = self.pool, self.batch
        pool.inject_faults(layer, batch)
        for target, rows in batch.scale_rows.items():
            act, col, _ = pool.layout.scale_site[target]
            if act != activation:
                continue
            vectors = pool.static_vectors[target][layer]  # (max_slots + 1, width)
            if self.use_triton:
                scale_rows_(y, vectors, rows, col)
            else:
                _mul_columns(y, col, vectors.index_select(0, self.scale_index[target]))
        if batch.para_rows is not None and activation != "ffn":
            vectors = pool.para_buffer()[layer]  # (max_requests + 1, d_q + d_kv + d_ff): written during prefills
            per_token = None if self.use_triton else vectors.index_select(0, self.para_index)  # (T, ...)
            for y_col, v_col, width in self.para_spans[activation]:
                if self.use_triton:
                    scale_rows_(y, vectors[:, v_col : v_col + width], batch.para_rows, y_col)
                else:
                    _mul_columns(y, y_col, per_token[:, v_col : v_col + width])


def _mul_columns(y: torch.Tensor, col: int, factor: torch.Tensor) -> None:
    """y[:, col : col + w] *= factor (T, w), in fp32 and rounded once (kernels.scale's semantics)."""
    ys = y[:, col : col + factor.shape[1]]
    if ys.dtype == torch.float32 and factor.dtype == torch.float32:
        ys.mul_(factor)
    else:
        ys.copy_((ys.float() * factor.float()).to(ys.dtype))
