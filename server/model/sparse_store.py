"""Where resident adapters' Sparse deltas (SIFT) live on the device, and the op the forward calls to apply them.

Each adapter's entries of one layer are one CSR matrix per projection group (rows: the group's fused output
columns, server/model/adapter_layout.py). Two stores, one interface, picked by the pool like the LowRank ones
(server/model/lowrank_store.py), so each entry is stored once:
- `ArenaSparse` (the Triton kernel and its reference): row pointers and columns in the pool's int32 index arena,
  values in its arena, addressed by kernels.sparse.SparseTable per (layer, group).
- `CsrSparse` (the CPU): torch sparse CSR tensors, one product per slot (MKL's sparse kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from adapters.delta import PROJECTIONS, AdapterDeltas, parse_module_name
from kernels.segments import Segments
from kernels.sparse import SparseTable, csr_matrix, sparse_delta, sparse_delta_csr
from server.model.adapter_layout import GROUPS, Layout


@dataclass(frozen=True)
class GroupCsr:
    """One adapter's entries of one (layer, group) in CSR order."""

    layer: int
    group: str
    row_ptr: torch.Tensor  # (num_rows + 1,) int64
    cols: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,) fp32
    value_elements: list[int]  # per projection of the group, its entry count (the arena reserves each rounded)


def sparse_parts(deltas: AdapterDeltas, layout: Layout) -> dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """(layer, group) -> [(column offset of the projection in the group, rows, cols, values)]."""
    out: dict[tuple[int, str], list] = {}
    for name, sp in deltas.sparse.items():
        layer, proj = parse_module_name(name)
        group, start, _ = layout.col[proj]
        out.setdefault((layer, group), []).append((start, sp.rows, sp.cols, sp.values))
    return out


def group_csrs(deltas: AdapterDeltas, layout: Layout) -> Iterator[GroupCsr]:
    for (layer, group), parts in sorted(sparse_parts(deltas, layout).items()):
        num_rows = layout.group_width[group]
        rows = torch.cat([p[1].long() + p[0] for p in parts])
        cols = torch.cat([p[2].long() for p in parts])
        vals = torch.cat([p[3].float() for p in parts])
        order = torch.argsort(rows * (1 << 32) + cols)  # CSR: by (row, col)
        row_ptr = torch.zeros(num_rows + 1, dtype=torch.int64)
        row_ptr[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
        yield GroupCsr(layer, group, row_ptr, cols[order], vals[order], [p[3].numel() for p in parts])


class SparseStore(Protocol):
    def load(self, slot: int, deltas: AdapterDeltas, val_start: int, idx_start: int) -> None: ...
    def free(self, slot: int) -> None: ...
    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> None: ...


class ArenaSparse:
    def __init__(self, layout: Layout, num_layers: int, max_slots: int, arena: torch.Tensor, idx_arena: torch.Tensor,
                 size_of, idx_size_of) -> None:
        """`size_of`, `idx_size_of`: the arenas' allocators' rounding (the pool reserved the ranges with them)."""
        self.layout, self.arena, self.idx_arena = layout, arena, idx_arena
        self.size_of, self.idx_size_of = size_of, idx_size_of
        shape, device = (num_layers, len(GROUPS), max_slots), arena.device
        self.idx_off = torch.zeros(shape, dtype=torch.int64, device=device)
        self.val_off = torch.zeros(shape, dtype=torch.int64, device=device)
        self.nnz = torch.zeros(shape, dtype=torch.int32, device=device)
        self.tables = [{group: SparseTable(idx_off=self.idx_off[layer, g], val_off=self.val_off[layer, g],
                                           nnz=self.nnz[layer, g], num_rows=layout.group_width[group])
                        for g, group in enumerate(GROUPS)} for layer in range(num_layers)]

    def load(self, slot: int, deltas: AdapterDeltas, val_start: int, idx_start: int) -> None:
        groups, dev = list(GROUPS), self.arena.device
        for m in group_csrs(deltas, self.layout):
            num_rows, nnz = m.row_ptr.numel() - 1, m.cols.numel()
            self.idx_arena[idx_start : idx_start + num_rows + 1] = m.row_ptr.to(dev, torch.int32)
            self.idx_arena[idx_start + num_rows + 1 : idx_start + num_rows + 1 + nnz] = m.cols.to(dev, torch.int32)
            self.arena[val_start : val_start + nnz] = m.values.to(dev, self.arena.dtype)
            g = groups.index(m.group)
            self.idx_off[m.layer, g, slot], self.val_off[m.layer, g, slot], self.nnz[m.layer, g, slot] = idx_start, val_start, nnz
            idx_start += self.idx_size_of(num_rows + 1 + nnz)
            val_start += sum(self.size_of(n) for n in m.value_elements)

    def free(self, slot: int) -> None:
        self.nnz[:, :, slot] = 0

    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> None:
        sparse_delta(y, x, seg, self.idx_arena, self.arena, self.tables[layer][group])


class CsrSparse:
    def __init__(self, layout: Layout, dtype: torch.dtype) -> None:
        self.layout, self.dtype = layout, dtype
        self.matrices: dict[int, dict[tuple[int, str], torch.Tensor]] = {}  # slot -> (layer, group) -> (width, d_in)

    def load(self, slot: int, deltas: AdapterDeltas, val_start: int, idx_start: int) -> None:
        per_slot = self.matrices[slot] = {}
        for m in group_csrs(deltas, self.layout):
            d_in = self.layout.dims[PROJECTIONS[GROUPS[m.group][0]]][1]
            # values rounded to the serving dtype, as the arena stores them
            per_slot[(m.layer, m.group)] = csr_matrix(m.row_ptr, m.cols, m.values.to(self.dtype), (m.row_ptr.numel() - 1, d_in))

    def free(self, slot: int) -> None:
        self.matrices.pop(slot, None)

    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> None:
        key = (layer, group)
        matrices = {s: m[key] for s, _ in seg.slot_rows if (m := self.matrices.get(s)) is not None and key in m}
        sparse_delta_csr(y, x, seg.slot_rows, matrices)
