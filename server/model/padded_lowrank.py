"""A CPU mirror of the pool's LowRank factors in the padded layout of kernels.lowrank.PaddedFactors.

On a CPU, every torch call costs microseconds of dispatch, so applying each adapter with its own matmuls makes the
adapter overhead grow with the number of adapters in the step; the padded layout applies all of them with one
gather-bmm per op. It pads every slot to the largest rank loaded (grown on demand), which is a fine trade on a
CPU and a poor one on a GPU, where the exact-rank arena and the Triton kernels serve instead.
"""
from __future__ import annotations

import torch

from adapters.delta import PROJECTIONS, AdapterDeltas, parse_module_name
from kernels.lowrank import PaddedFactors
from server.model.adapter_layout import GROUPS, Layout


class PaddedLowRank:
    def __init__(self, layout: Layout, num_layers: int, max_slots: int) -> None:
        self.layout, self.num_layers, self.max_slots = layout, num_layers, max_slots
        self.rank = 0
        self.factors: list[dict[str, PaddedFactors]] = []

    def _slices(self, group: str) -> tuple[str, ...]:
        lo, hi = GROUPS[group]
        return PROJECTIONS[lo:hi]

    def _grow(self, rank: int) -> None:
        """Re-allocate every stack with `rank` rows per slice, keeping what is loaded."""
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
                        a[:, i * rank : i * rank + self.rank] = old.a[:, i * self.rank : (i + 1) * self.rank]
                        bt[i][:, : self.rank] = old.bt[i]
                per_group[group] = PaddedFactors(a, bt, tuple(self.layout.col[p][1] for p in projs), widths)
            new.append(per_group)
        self.factors, self.rank = new, rank

    def load(self, slot: int, deltas: AdapterDeltas) -> None:
        need = max((lr.rank for lr in deltas.lowrank.values()), default=0)
        if need > self.rank:  # grow by powers of two (at least 16): a regrow copies every stack
            self._grow(max(16, 1 << (need - 1).bit_length()))
        for name, lr in deltas.lowrank.items():
            layer, proj = parse_module_name(name)
            group = self.layout.col[proj][0]
            i, r = self._slices(group).index(proj), lr.rank
            f = self.factors[layer][group]
            f.a[slot, i * self.rank : i * self.rank + r] = lr.A.float()
            f.bt[i][slot, :r] = lr.B.float().t() * float(lr.scale)

    def free(self, slot: int) -> None:
        for per_group in self.factors:
            for f in per_group.values():
                f.a[slot] = 0
                for bt in f.bt:
                    bt[slot] = 0
