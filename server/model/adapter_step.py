"""The adapter operations the forward calls in one step: what every layer shares is looked up once, then the
deltas of each layer, from the pool's stores (server/model/adapter_pool.py).

    step = AdapterStep(pool, batch)        # once per forward
    step.compute_para(layer, h)             # PARA prefills: their vectors from this layer's normed prompt states
    step.apply(layer, group, y, x)          # y += this step's LowRank and Sparse deltas of `group` (qkv, o, ...)
    y = step.linear(layer, group, x, w)     # linear(x, w) and apply(), in one call of our CPU kernels where they run
    step.scale(layer, activation, y)        # IA3 and PARA vectors of `activation` (qkv, gate_up, ffn)

Which implementation serves is the stores' (kernels.dispatch picks them per device): on a CUDA device (or with
MULTIPLEX_KERNELS=triton) the Triton kernels on the arenas, with no host work (CUDA-graph capturable); on a CPU the
padded LowRank stacks (per rank class, their slot plans computed once a step, PaddedLowRank) and CSR Sparse
matrices, one product per slot. For Scale on the CPU each row of -1 (no vector) is mapped once per step to the
store's row of ones past the last slot (request), so that a layer's scaling is one gather and one multiply.
"""
from __future__ import annotations

import torch

from adapters.delta import para_vectors
from kernels import cpu_matmul
from kernels.dispatch import use_triton
from kernels.linear import linear
from kernels.scale import scale_rows_
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

    def inject_faults(self, layer: int) -> None:
        """The pool's test seam (AdapterPool.fault_hook): before a layer's deltas of any kind are applied."""
        hook = self.pool.fault_hook
        if hook is not None:
            for slot, _ in self.batch.segments.slot_rows:  # the slots this step's tokens use
                hook(slot, layer)

    def compute_para(self, layer: int, h: torch.Tensor) -> None:
        """During PARA prefills: each request's vectors for `layer` from its prompt tokens' normed hidden states
        h (T, H), into its row of the PARA vector buffer (the generators' semantics: adapters.delta.para_vectors)."""
        self.inject_faults(layer)
        store = self.pool.scale
        buf = store.para_vectors()
        for p in self.batch.para_prefills:
            gen = store.para_layers[p.slot].get(layer)
            if gen is None:
                buf[layer, p.row] = 1.0
                continue
            hp = h[p.token_start : p.token_start + p.num_prompt_tokens]  # (n, H)
            mask = torch.ones((1, hp.shape[0]), dtype=torch.bool, device=h.device)
            buf[layer, p.row] = para_vectors(gen, hp[None], mask)[0].to(buf.dtype)

    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += this step's LowRank and Sparse deltas of `group` in `layer` (y: (T, group width), x: (T, d_in))."""
        pool, batch = self.pool, self.batch
        self.inject_faults(layer)
        if batch.adapter_kinds.lowrank:
            pool.lowrank.apply(layer, group, y, x, batch.segments)
        if batch.adapter_kinds.sparse:
            pool.sparse.apply(layer, group, y, x, batch.segments)

    def linear(self, layer: int, group: str, x: torch.Tensor, weight, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """kernels.linear.linear(x, weight, bias, residual) plus this step's deltas of `group` (apply): where the
        projection is our CPU kernel's and one call of our grid kernel covers the deltas, both in one call
        (cpu_matmul.matmul_lowrank: no Python between them, which after the weights streamed through the caches
        runs cold)."""
        pool, kinds = self.pool, self.batch.adapter_kinds
        if (isinstance(weight, cpu_matmul.PackedWeight) and kinds.lowrank and not kinds.sparse
                and pool.fault_hook is None):
            call = pool.lowrank.kernel_call(layer, group, x, self.batch.segments)
            if call is not None:
                return cpu_matmul.matmul_lowrank(x, weight, bias, residual, *call)
        y = linear(x, weight, bias, residual)
        self.apply(layer, group, y, x)
        return y

    def layer_grids(self):
        """Every layer's LowRank deltas as our grid kernel's calls, for kernels/cpu_layer.c to run inside each layer
        (server/model/fused_layers.py): (the step's groups, per layer {group: GridFactors}); (None, None) without
        LowRank adapters; None where the step's adapters need more than the grid (Sparse or Scale kinds, two rank
        classes, the Triton arenas, a fault hook)."""
        pool, kinds = self.pool, self.batch.adapter_kinds
        if kinds.sparse or kinds.scale or pool.fault_hook is not None:
            return None
        if not kinds.lowrank:
            return None, None
        return pool.lowrank.layer_grids(self.batch.segments)

    def scale(self, layer: int, activation: str, y: torch.Tensor) -> None:
        """Multiply the Scale sites inside `activation` ("qkv", "gate_up" or "ffn") of this layer."""
        pool, batch = self.pool, self.batch
        self.inject_faults(layer)
        for target, rows in batch.scale_rows.items():
            act, col, _ = pool.layout.scale_site[target]
            if act != activation:
                continue
            vectors = pool.scale.static_vectors[target][layer]  # (max_slots + 1, width)
            if self.use_triton:
                scale_rows_(y, vectors, rows, col)
            else:
                _mul_columns(y, col, vectors.index_select(0, self.scale_index[target]))
        if batch.para_rows is not None and activation != "ffn":
            vectors = pool.scale.para_vectors()[layer]  # (max_requests + 1, d_q + d_kv + d_ff): written during prefills
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
