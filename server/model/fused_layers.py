"""A CPU step's layers in one or two calls each of our C kernel (kernels/cpu_layer.py), where the step allows it.

server/model/llama.py runs a layer as ~10 ops (norm, projections, RoPE, cache writes, attention, SiLU), each a call
from Python that starts on caches the previous projection's weights just evicted. On a CPU, for a step whose adapters
are LowRank of one rank class (the grid kernel's) or none, `FusedLayers.run` runs each layer as one call when every
row is a decode, else as two around the prefill rows' attention (PyTorch's, as the op-by-op path runs it): the same
sums in the same order (kernels/cpu_layer.c includes the ops' own C sources). Any other step (Sparse or Scale
adapters, two rank classes, a fault hook, a kernel switched off) keeps the op-by-op path, which stays the reference.
"""
from __future__ import annotations

import torch

from kernels import cpu_attention, cpu_elementwise, cpu_layer, cpu_matmul
from kernels.attention import prefill_attention_cpu
from kernels.attention_plan import CpuAttentionPlan
from server.model.adapter_step import AdapterStep
from server.model.forward_batch import ForwardBatch, KVCache

GROUPS = ("qkv", "o", "gate_up", "down")  # the grid factors' order in cpu_layer.decode_layer


class FusedLayers:
    def __init__(self, model) -> None:
        """model: a server.model.llama.LlamaModel (its config, layer weights and windows)."""
        cfg = model.cfg
        self.model = model
        self.shapes = cpu_layer.Shapes(cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.num_heads,
                                       cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, model.sm_scale)
        self.windows = sorted(set(model.windows))
        packed = all(isinstance(m, cpu_matmul.PackedWeight)
                     for lw in model.layers for m in (lw.qkv, lw.o, lw.gate_up, lw.down))
        self.supported = (packed and model.dtype == torch.float32 and torch.device(model.device).type == "cpu"
                          and len(self.windows) <= cpu_layer.MAX_WINDOWS
                          and cfg.num_heads // cfg.num_kv_heads <= cpu_attention.MAX_REP)
        self._layers: list[cpu_layer.LayerRefs] = []
        self._cache_of: tuple[int, int] | None = None  # the KV cache the layer refs point into

    def run(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, plan: CpuAttentionPlan | None,
            rope: tuple[torch.Tensor, torch.Tensor], step: AdapterStep | None) -> bool:
        """Every layer over x (T, H), in place, if this step allows it (module docstring) -> whether it ran (if not,
        nothing was touched)."""
        if not self._applies(x, batch, kv, plan):
            return False
        grids = step.layer_grids() if step is not None else (None, None)
        if grids is None:
            return False
        groups, factors = grids
        buffers = self._step_refs(x, plan, rope, groups, factors)
        shapes, refs = self.shapes, buffers.refs
        every_row_decodes = not plan.prefills and plan.decode_rows is None
        cfg, num_rows = self.model.cfg, x.shape[0]
        q = buffers.qkv[:, : cfg.q_size].view(num_rows, cfg.num_heads, cfg.head_dim)
        attn = buffers.attn.view(num_rows, cfg.num_heads, cfg.head_dim)
        for i, layer in enumerate(self._layer_refs(kv)):
            per_group = factors[i] if factors is not None else {}
            g = tuple(per_group[name].struct if name in per_group else None for name in GROUPS)
            if every_row_decodes:
                cpu_layer.decode_layer(shapes, layer, refs, g)
                continue
            cpu_layer.layer_front(shapes, layer, refs, g[0])
            window = self.model.windows[i]
            prefill_attention_cpu(q, kv.k[i], kv.v[i], batch.attn, self.model.sm_scale, window, plan, attn)
            cpu_layer.layer_back(shapes, layer, refs, g[1:])
        return True

    def _applies(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, plan: CpuAttentionPlan | None) -> bool:
        if not (self.supported and plan is not None and x.shape[0] > 0 and cpu_layer.enabled()
                and cpu_attention.enabled() and cpu_elementwise.enabled()):
            return False
        kinds = batch.adapter_kinds
        return (not kinds.sparse and not kinds.scale and not batch.para_prefills
                and kv.k.dtype == kv.v.dtype == torch.float32 and kv.k.is_contiguous() and kv.v.is_contiguous())

    def _layer_refs(self, kv: KVCache) -> list[cpu_layer.LayerRefs]:
        """Each layer's weights and cache, made once per KV cache."""
        key = (kv.k.data_ptr(), kv.v.data_ptr())
        if self._cache_of != key:
            self._layers = [cpu_layer.layer_refs(lw.input_norm, lw.qkv, lw.qkv_bias, lw.o, lw.post_norm, lw.gate_up,
                                                 lw.down, kv.k[i], kv.v[i], self.windows.index(window))
                            for i, (lw, window) in enumerate(zip(self.model.layers, self.model.windows))]
            self._cache_of = key
        return self._layers

    def _step_refs(self, x: torch.Tensor, plan: CpuAttentionPlan, rope: tuple[torch.Tensor, torch.Tensor], groups,
                   factors) -> cpu_layer.StepBuffers:
        """The step's rows and fresh buffers (held until the layers ran)."""
        widest = max((f.width for per_layer in factors or () for f in per_layer.values()), default=1)
        none = torch.zeros(0, dtype=torch.int64)  # a step without decode rows has no keys
        return cpu_layer.step_refs(self.shapes, x, *rope, plan.write_slots, plan.write_rows, plan.decode_rows,
                                   [plan.keys.get(w, none) for w in self.windows],
                                   [plan.visible.get(w, none) for w in self.windows], groups, widest)
