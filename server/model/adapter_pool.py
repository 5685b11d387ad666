"""The device pool: every resident adapter's deltas in shared buffers, addressed by slot.

Data layout (S-LoRA style, exact ranks): one flat `arena` of the model dtype holds all factors. Per layer and
projection, per slot, tables give the arena offsets of A (r, d_in) and B^T (r, d_out), the rank and the scale:
    a_off, b_off: (num_layers, 7, max_slots) int64    rank: (..) int32    scale: (..) float32
Projection groups match the backbone's fused matmuls: qkv = (q, k, v), o, gate_up = (gate, up), down; a group's
table is a view of consecutive projections, so one kernel launch serves a fused projection. The pool only stores;
which adapter gets which slot, and when, is the engine's decision (server/engine/adapter_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.delta import PROJECTIONS, AdapterDeltas, parse_module_name
from kernels.lowrank import LowRankTable, lowrank_delta
from kernels.segments import Segments
from server.model.arena import ArenaAllocator
from server.model.config import ModelConfig

GROUPS = {"qkv": (0, 3), "o": (3, 4), "gate_up": (4, 6), "down": (6, 7)}  # group -> projection index range


@dataclass
class SlotInfo:
    arena_start: int
    num_elements: int
    nbytes: int


class AdapterPoolFull(Exception):
    """No free slot or no arena range large enough: the caller evicts an unpinned adapter and retries."""


class AdapterPool:
    def __init__(self, cfg: ModelConfig, max_slots: int, arena_bytes: int, device, dtype) -> None:
        self.cfg, self.device, self.dtype, self.max_slots = cfg, device, dtype, max_slots
        elem = torch.empty((), dtype=dtype).element_size()
        self.allocator = ArenaAllocator(max(arena_bytes // elem, 64))
        self.arena = torch.zeros(self.allocator.capacity, device=device, dtype=dtype)
        shape = (cfg.num_layers, len(PROJECTIONS), max_slots)
        self.a_off = torch.zeros(shape, dtype=torch.int64, device=device)
        self.b_off = torch.zeros(shape, dtype=torch.int64, device=device)
        self.rank = torch.zeros(shape, dtype=torch.int32, device=device)
        self.scale = torch.zeros(shape, dtype=torch.float32, device=device)
        self.slots: dict[int, SlotInfo] = {}
        self.max_rank = 1
        self._build_tables()

    # ---- dims -------------------------------------------------------------------------------------------------
    def _dims(self, proj: str) -> tuple[int, int]:
        """(d_out, d_in) of a projection."""
        c = self.cfg
        return {
            "q_proj": (c.q_size, c.hidden_size),
            "k_proj": (c.kv_size, c.hidden_size),
            "v_proj": (c.kv_size, c.hidden_size),
            "o_proj": (c.hidden_size, c.q_size),
            "gate_proj": (c.intermediate_size, c.hidden_size),
            "up_proj": (c.intermediate_size, c.hidden_size),
            "down_proj": (c.hidden_size, c.intermediate_size),
        }[proj]

    def _build_tables(self) -> None:
        self.tables: list[dict[str, LowRankTable]] = []
        for layer in range(self.cfg.num_layers):
            per_group = {}
            for group, (lo, hi) in GROUPS.items():
                widths = [self._dims(PROJECTIONS[p])[0] for p in range(lo, hi)]
                starts = [sum(widths[:i]) for i in range(len(widths))]
                per_group[group] = LowRankTable(
                    a_off=self.a_off[layer, lo:hi], b_off=self.b_off[layer, lo:hi],
                    rank=self.rank[layer, lo:hi], scale=self.scale[layer, lo:hi],
                    out_start=tuple(starts), out_width=tuple(widths), max_rank=self.max_rank,
                )
            self.tables.append(per_group)

    # ---- load / free ------------------------------------------------------------------------------------------
    def num_elements(self, deltas: AdapterDeltas) -> int:
        """Arena elements an adapter needs (each factor aligned)."""
        return sum(self.allocator.size_of(t.numel()) for lr in deltas.lowrank.values() for t in (lr.A, lr.B))

    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_slots) if s not in self.slots]

    def load(self, slot: int, deltas: AdapterDeltas) -> SlotInfo:
        """Copy an adapter's LowRank deltas into `slot`. Raises AdapterPoolFull when the arena has no room."""
        if slot in self.slots:
            raise ValueError(f"slot {slot} is occupied")
        if deltas.sparse or deltas.scale or deltas.para:
            raise NotImplementedError("only LowRank deltas are served so far (Sparse/Scale/PARA: issue 7)")
        for name, lr in deltas.lowrank.items():
            d_out, d_in = self._dims(parse_module_name(name)[1])
            if tuple(lr.A.shape) != (lr.rank, d_in) or tuple(lr.B.shape) != (d_out, lr.rank):
                raise ValueError(f"{name}: A {tuple(lr.A.shape)} / B {tuple(lr.B.shape)} do not fit ({d_out}, {d_in})")
        total = self.num_elements(deltas)
        start = self.allocator.allocate(total)
        if start is None:
            raise AdapterPoolFull(f"arena has no free range of {total} elements")
        cursor = start
        max_rank = self.max_rank
        for name, lr in sorted(deltas.lowrank.items()):
            layer, proj = parse_module_name(name)
            p = PROJECTIONS.index(proj)
            d_out, d_in = self._dims(proj)
            r = lr.rank
            a_at, cursor = cursor, cursor + self.allocator.size_of(r * d_in)
            b_at, cursor = cursor, cursor + self.allocator.size_of(r * d_out)
            self.arena[a_at : a_at + r * d_in] = lr.A.reshape(-1).to(self.device, self.dtype)
            self.arena[b_at : b_at + r * d_out] = lr.B.t().contiguous().reshape(-1).to(self.device, self.dtype)
            self.a_off[layer, p, slot], self.b_off[layer, p, slot] = a_at, b_at
            self.rank[layer, p, slot], self.scale[layer, p, slot] = r, float(lr.scale)
            max_rank = max(max_rank, r)
        info = SlotInfo(start, total, total * self.arena.element_size())
        self.slots[slot] = info
        if max_rank != self.max_rank:
            self.max_rank = max_rank
            self._build_tables()
        return info

    def free(self, slot: int) -> None:
        info = self.slots.pop(slot)
        self.allocator.free(info.arena_start)
        self.rank[:, :, slot] = 0  # a stale slot id now applies nothing

    # ---- forward hook -----------------------------------------------------------------------------------------
    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> None:
        """y += this step's low-rank deltas of `group` in `layer` (y, x: (T, d_out) / (T, d_in))."""
        if seg.has_adapter:
            lowrank_delta(y, x, seg, self.arena, self.tables[layer][group])
