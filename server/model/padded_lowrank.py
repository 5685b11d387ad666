"""The CPU's LowRank store (server/model/lowrank_store.py): every slot's factors in the padded layout of
kernels.lowrank.PaddedFactors, and nowhere else.

On a CPU, every torch call costs microseconds of dispatch, so applying each adapter with its own matmuls makes the
adapter overhead grow with the number of adapters in the step; the padded layout applies all of them with one
gather-bmm per op. It pads every slot to the largest rank resident (grown on demand, by powers of two, and shrunk
back when the adapter that needed it leaves: one tenant's high-rank adapter must not keep every slot of every layer
padded after it is gone), which is a fine trade on a CPU and a poor one on a GPU, where the exact-rank arena and the
Triton kernels serve instead. The pool still reserves the adapter's exact size in its arena accounting, so both
stores admit the same adapters; the padding is not counted there (see the README's known limits).
"""
from __future__ import annotations

import torch

from adapters.delta import PROJECTIONS, AdapterDeltas, parse_module_name
from kernels.lowrank import PaddedFactors, lowrank_delta_padded
from kernels.segments import Segments
from server.model.adapter_layout import GROUPS, Layout
from server.model.lowrank_store import LowRankImage, rank_class


class PaddedLowRank:
    def __init__(self, layout: Layout, num_layers: int, max_slots: int) -> None:
        self.layout, self.num_layers, self.max_slots = layout, num_layers, max_slots
        self.rank = 0  # the padded rank R of every stack; 0 until a LowRank adapter is loaded
        self.factors: list[dict[str, PaddedFactors]] = []
        self.ranks: dict[int, dict[tuple[int, str], int]] = {}  # slot -> (layer, projection) -> its real rank

    @property
    def max_rank(self) -> int:
        """The rank class the stacks are padded to (16 before any LowRank load, like the arena's)."""
        return rank_class(self.rank)

    def prepare(self, deltas: AdapterDeltas, size_of) -> LowRankImage | None:
        return None  # loads straight from the deltas

    def _slices(self, group: str) -> tuple[str, ...]:
        lo, hi = GROUPS[group]
        return PROJECTIONS[lo:hi]

    def _resize(self, rank: int) -> None:
        """Re-allocate every stack with `rank` rows per slice (0: none), keeping what is loaded (ranks <= `rank`)."""
        if rank == 0:
            self.factors, self.rank = [], 0
            return
        keep = min(rank, self.rank)
        new: list[dict[str, PaddedFactors]] = []
        for layer in range(self.num_layers):
            per_group = {}
            for group in GROUPS:
                projs = self._slices(group)
                d_in = self.layout.dims[projs[0]][1]
                widths = tuple(self.layout.col[p][2] for p in projs)
                a = torch.zeros(self.max_slots, len(projs) * rank, d_in)
                bt = tuple(torch.zeros(self.max_slots, rank, w) for w in widths)
                if self.factors:
                    old = self.factors[layer][group]
                    for i in range(len(projs)):
                        a[:, i * rank : i * rank + keep] = old.a[:, i * self.rank : i * self.rank + keep]
                        bt[i][:, :keep] = old.bt[i][:, :keep]
                per_group[group] = PaddedFactors(a, bt, tuple(self.layout.col[p][1] for p in projs), widths)
            new.append(per_group)
        self.factors, self.rank = new, rank

    def load(self, slot: int, deltas: AdapterDeltas, image: LowRankImage | None, start: int) -> None:
        need = max((lr.rank for lr in deltas.lowrank.values()), default=0)
        if need > self.rank:  # a regrow copies every stack: grow by rank classes
            self._resize(rank_class(need))
        ranks = self.ranks[slot] = {}
        for name, lr in deltas.lowrank.items():
            layer, proj = parse_module_name(name)
            group = self.layout.col[proj][0]
            i, r = self._slices(group).index(proj), lr.rank
            f = self.factors[layer][group]
            f.a[slot, i * self.rank : i * self.rank + r] = lr.A.float()
            f.bt[i][slot, :r] = lr.B.float().t() * float(lr.scale)
            ranks[(layer, proj)] = r

    def free(self, slot: int) -> None:
        if self.ranks.pop(slot, None) is None:
            return
        for per_group in self.factors:
            for f in per_group.values():
                f.a[slot] = 0
                for bt in f.bt:
                    bt[slot] = 0
        resident = max((r for ranks in self.ranks.values() for r in ranks.values()), default=0)
        need = rank_class(resident) if resident else 0
        if need < self.rank:  # the largest adapter left: the stacks shrink back to what the others need
            self._resize(need)

    def rank_of(self, slot: int, layer: int, proj: str) -> int:
        return self.ranks.get(slot, {}).get((layer, proj), 0)

    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> None:
        if self.rank:
            lowrank_delta_padded(y, x, seg, self.factors[layer][group])
