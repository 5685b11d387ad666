"""Where resident adapters' LowRank factors live on the device, and the op the forward calls to apply them.

Two stores, one interface (`LowRankStore`); the pool picks one by the kernels' dispatch (kernels.dispatch.use_triton
on its device), so each factor is stored once:
- `ArenaLowRank` (the Triton kernels, and their PyTorch reference where MULTIPLEX_KERNELS=reference|triton forces the
  arena on a CPU): exact-rank factors in the pool's flat arena (S-LoRA style, no padding to a maximum rank),
  addressed per layer, projection and slot by kernels.lowrank.LowRankTable.
- `PaddedLowRank` (the CPU, server/model/padded_lowrank.py): each adapter padded to its rank class, in stacks per
  class, so one gather-bmm per op and class serves the adapters of a step.
Each store says what the pool charges an adapter (`arena_elements`): what it takes there, exact or padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from adapters.delta import PROJECTIONS, AdapterDeltas, parse_module_name
from kernels.lowrank import LowRankTable, lowrank_delta
from kernels.segments import Segments
from server.model.adapter_layout import GROUPS, Layout


class LowRankStore(Protocol):
    max_rank: int  # the rank bound the ops are sized for (part of a captured CUDA graph's key)

    def prepare(self, deltas: AdapterDeltas, size_of) -> "LowRankImage | None": ...  # off the engine thread
    def arena_elements(self, deltas: AdapterDeltas, size_of) -> int: ...  # the pool's charge, in arena elements
    def load(self, slot: int, deltas: AdapterDeltas, image: "LowRankImage | None", start: int) -> None: ...
    def free(self, slot: int) -> None: ...
    def rank_of(self, slot: int, layer: int, proj: str) -> int: ...
    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> None: ...
    # apply()'s work as one call of our CPU grid kernel for the projection's own call to run (None: apply() it)
    def kernel_call(self, layer: int, group: str, x: torch.Tensor, seg: Segments): ...
    # every layer's deltas as calls of that kernel, for kernels/cpu_layer.c (None: the step needs more)
    def layer_grids(self, seg: Segments): ...


@dataclass(frozen=True)
class LowRankImage:
    """An adapter's LowRank factors laid out as in its arena range; offsets relative to the range's start."""

    image: torch.Tensor  # (n,) model dtype, host (pinned on CUDA machines)
    a_rel: torch.Tensor  # (num_layers, 7) int64
    b_rel: torch.Tensor  # (num_layers, 7) int64
    rank: torch.Tensor  # (num_layers, 7) int32; 0 = no delta on that projection
    scale: torch.Tensor  # (num_layers, 7) float32


def rank_class(rank: int) -> int:
    """The bound on ranks the kernels are sized for: a power of two >= 16, so that it changes at most a few times
    (each change re-sizes the low-rank intermediate and grid, and makes the captured CUDA graphs stale). Programs
    past a slot's real rank return at once, so the bound costs nothing measurable."""
    return max(16, 1 << (max(rank, 1) - 1).bit_length())


class ArenaLowRank:
    """Factors A (r, d_in) and B^T (r, d_out) of each (layer, projection) in the slot's arena range; tables per
    (layer, group) are views of consecutive projections, so one kernel launch serves a fused projection."""

    def __init__(self, layout: Layout, num_layers: int, max_slots: int, arena: torch.Tensor) -> None:
        self.layout, self.num_layers, self.arena = layout, num_layers, arena
        device, shape = arena.device, (num_layers, len(PROJECTIONS), max_slots)
        self.a_off = torch.zeros(shape, dtype=torch.int64, device=device)
        self.b_off = torch.zeros(shape, dtype=torch.int64, device=device)
        self.rank = torch.zeros(shape, dtype=torch.int32, device=device)
        self.scale = torch.zeros(shape, dtype=torch.float32, device=device)
        self.max_rank = rank_class(1)
        self._build_tables()

    def _build_tables(self) -> None:
        self.tables: list[dict[str, LowRankTable]] = []
        for layer in range(self.num_layers):
            per_group = {}
            for group, (lo, hi) in GROUPS.items():
                projs = PROJECTIONS[lo:hi]
                per_group[group] = LowRankTable(
                    a_off=self.a_off[layer, lo:hi], b_off=self.b_off[layer, lo:hi], rank=self.rank[layer, lo:hi],
                    scale=self.scale[layer, lo:hi], out_start=tuple(self.layout.col[p][1] for p in projs),
                    out_width=tuple(self.layout.col[p][2] for p in projs), max_rank=self.max_rank)
            self.tables.append(per_group)

    def arena_elements(self, deltas: AdapterDeltas, size_of) -> int:
        """The adapter's exact factors, each rounded by `size_of` (the allocator's), as `prepare` lays them out."""
        return sum(size_of(t.numel()) for lr in deltas.lowrank.values() for t in (lr.A, lr.B))

    def prepare(self, deltas: AdapterDeltas, size_of) -> LowRankImage:
        """The host-side layout of an adapter's factors in its arena range (`size_of`: the allocator's rounding).
        Pure: callable off the engine thread (the API side prepares it while fetching the adapter), so a cold load
        on the engine thread is one copy of the image and one of each table column."""
        image = torch.zeros(sum(size_of(t.numel()) for lr in deltas.lowrank.values() for t in (lr.A, lr.B)),
                            dtype=self.arena.dtype)
        shape = self.a_off.shape[:2]  # (num_layers, 7)
        a_rel, b_rel = torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int64)
        rank, scale = torch.zeros(shape, dtype=torch.int32), torch.zeros(shape, dtype=torch.float32)
        cursor = 0
        for name, lr in sorted(deltas.lowrank.items()):
            layer, proj = parse_module_name(name)
            p = PROJECTIONS.index(proj)
            d_out, d_in = self.layout.dims[proj]
            r = lr.rank
            a_at, cursor = cursor, cursor + size_of(r * d_in)
            b_at, cursor = cursor, cursor + size_of(r * d_out)
            image[a_at : a_at + r * d_in] = lr.A.reshape(-1)
            image[b_at : b_at + r * d_out] = lr.B.t().reshape(-1)
            a_rel[layer, p], b_rel[layer, p], rank[layer, p], scale[layer, p] = a_at, b_at, r, float(lr.scale)
        if image.numel() and self.arena.device.type == "cuda":
            image = image.pin_memory()  # so the engine thread's copy is asynchronous
        return LowRankImage(image, a_rel, b_rel, rank, scale)

    def load(self, slot: int, deltas: AdapterDeltas, image: LowRankImage | None, start: int) -> None:
        if image is None:
            raise ValueError("the arena store loads a prepared image (AdapterPool.prepare)")
        n, dev = image.image.numel(), self.arena.device
        if n:
            self.arena[start : start + n].copy_(image.image, non_blocking=True)
        self.a_off[:, :, slot] = (image.a_rel + start).to(dev, non_blocking=True)
        self.b_off[:, :, slot] = (image.b_rel + start).to(dev, non_blocking=True)
        self.rank[:, :, slot] = image.rank.to(dev, non_blocking=True)
        self.scale[:, :, slot] = image.scale.to(dev, non_blocking=True)
        max_rank = rank_class(max(self.max_rank, int(image.rank.max()) if image.rank.numel() else 0))
        if max_rank != self.max_rank:
            self.max_rank = max_rank
            self._build_tables()

    def free(self, slot: int) -> None:
        self.rank[:, :, slot] = 0  # a stale slot id now applies nothing

    def rank_of(self, slot: int, layer: int, proj: str) -> int:
        return int(self.rank[layer, PROJECTIONS.index(proj), slot])

    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> None:
        lowrank_delta(y, x, seg, self.arena, self.tables[layer][group])

    def kernel_call(self, layer: int, group: str, x: torch.Tensor, seg: Segments) -> None:
        return None  # the arena's kernels run apart from the projection

    def layer_grids(self, seg: Segments) -> None:
        return None  # the same: no grid of ours over the arena
