"""Where resident adapters' Scale deltas live on the device: IA3 vectors per slot, PARA generators per slot, and
the PARA vectors of running requests.

- IA3: per scale target a buffer (num_layers, max_slots + 1, width), row = slot; a fixed cost per target, made on
  first use. Layers an adapter leaves unscaled hold ones (multiplying by 1 is exact), and so does the last row,
  which no slot owns: a token without a vector reads it on the CPU path (server/model/adapter_step.py).
- PARA generators (ParaLayer per layer): views of the slot's range in the pool's arena, so they count against it.
- PARA vectors: (num_layers, max_requests + 1, d_q + d_kv + d_ff), row = the request's PARA row (handed out by the
  scheduler, server/engine/scheduler.py, like KV blocks), written during its prefill; the last row is ones.
"""
from __future__ import annotations

import torch

from adapters.delta import AdapterDeltas, ParaLayer, parse_scale_name
from server.model.adapter_layout import Layout
from server.model.config import ModelConfig


class ScaleStore:
    def __init__(self, cfg: ModelConfig, layout: Layout, max_slots: int, max_requests: int, arena: torch.Tensor,
                 size_of) -> None:
        self.cfg, self.layout, self.max_slots, self.max_requests = cfg, layout, max_slots, max_requests
        self.arena, self.size_of = arena, size_of
        self.static_vectors: dict[str, torch.Tensor] = {}  # scale target -> (L, max_slots + 1, width)
        self.targets: dict[int, frozenset[str]] = {}  # slot -> its IA3 targets
        self.para_layers: dict[int, dict[int, ParaLayer]] = {}  # slot -> layer -> generator (device tensors)
        self._para_vectors: torch.Tensor | None = None

    def load(self, slot: int, deltas: AdapterDeltas, arena_start: int) -> None:
        targets: set[str] = set()
        for name, vec in deltas.scale.items():
            layer, target = parse_scale_name(name)
            buf = self._static_buffer(target)
            if target not in targets:
                buf[:, slot] = 1.0
                targets.add(target)
            buf[layer, slot] = vec.to(buf.device, buf.dtype)
        self.targets[slot] = frozenset(targets)
        if deltas.para:
            self.para_layers[slot] = self._write_para(deltas, arena_start)

    def _write_para(self, deltas: AdapterDeltas, cursor: int) -> dict[int, ParaLayer]:
        layers = {}
        for i, p in sorted(deltas.para.items()):
            views = []
            for t in (p.w_down, p.w_up, p.pool_query):
                if t is None:
                    views.append(None)
                    continue
                view = self.arena[cursor : cursor + t.numel()].view(t.shape)
                view.copy_(t)
                views.append(view)
                cursor += self.size_of(t.numel())
            layers[i] = ParaLayer(p.pool, views[0], views[1], views[2], p.act)
        return layers

    def _static_buffer(self, target: str) -> torch.Tensor:
        if target not in self.static_vectors:
            width = self.layout.scale_site[target][2]
            self.static_vectors[target] = torch.ones((self.cfg.num_layers, self.max_slots + 1, width),
                                                     device=self.arena.device, dtype=self.arena.dtype)
        return self.static_vectors[target]

    def free(self, slot: int) -> None:
        self.targets.pop(slot, None)  # its IA3 rows are rewritten in full by the next load of the slot
        self.para_layers.pop(slot, None)

    def para_vectors(self) -> torch.Tensor:
        if self._para_vectors is None:
            c = self.cfg
            self._para_vectors = torch.ones((c.num_layers, self.max_requests + 1, c.q_size + c.kv_size + c.intermediate_size),
                                            device=self.arena.device, dtype=self.arena.dtype)
        return self._para_vectors
