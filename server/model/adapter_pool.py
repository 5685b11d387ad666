"""The device pool's slot and memory manager: which slot holds which adapter, and the bytes each one takes.

Memory: every adapter reserves one contiguous range of the flat `arena` (model dtype) for its LowRank factors, its
Sparse values and its PARA generators, and one of `idx_arena` (int32) for its Sparse row pointers and columns, so
every kind counts against the pool's bytes (MULTIPLEX_ADAPTER_POOL_BYTES), and an adapter that does not fit raises
AdapterPoolFull (the adapter cache evicts an unpinned one and retries; `fits_empty` refuses one that never fits).
The LowRank part is what the LowRank store takes (`LowRankStore.arena_elements`): the exact factors on the arena
(S-LoRA style, no padding to a maximum rank), the factors padded to the adapter's rank class in fp32 on the CPU's
padded stacks, so that padding is charged to the adapter that causes it.

Storage of each kind sits in its store, the part the forward reads (server/model/adapter_step.py applies them):
- LowRank: `lowrank` (server/model/lowrank_store.py): the arena and its tables where the Triton kernels serve,
  the padded CPU layout (server/model/padded_lowrank.py) elsewhere; one or the other, never both.
- Sparse: `sparse` (server/model/sparse_store.py): the arenas where the Triton kernel serves, CSR tensors elsewhere.
- Scale: `scale` (server/model/scale_store.py): IA3 vectors per slot, PARA generators, PARA vectors per request row.
On the CPU stores the arena ranges are reserved but not written (the pages stay untouched): they keep the count.
Which adapter gets which slot, and when, is the engine's decision (server/engine/adapter_cache.py).

Fault injection (tests): `fault_hook(slot, layer)`, when set, is called by AdapterStep for every adapter slot a
step's tokens use, in every layer, before that slot's deltas, vectors or PARA generator are applied; what it raises
fails the step the way a faulty adapter would (server/engine/isolation.py finds the culprit). Steps run eagerly
while it is set (ModelRunner), since a CUDA graph replay runs no Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from adapters.delta import AdapterDeltas, parse_module_name
from kernels.dispatch import use_triton
from server.model.adapter_layout import Layout
from server.model.arena import ArenaAllocator
from server.model.config import ModelConfig
from server.model.lowrank_store import ArenaLowRank, LowRankImage, LowRankStore
from server.model.padded_lowrank import PaddedLowRank
from server.model.scale_store import ScaleStore
from server.model.sparse_store import ArenaSparse, CsrSparse, SparseStore, sparse_parts


@dataclass
class SlotInfo:
    arena_start: int | None
    idx_start: int | None
    nbytes: int
    scale_targets: frozenset[str]
    has_para: bool
    has_lowrank: bool
    has_sparse: bool


class AdapterPoolFull(Exception):
    """No free slot or no arena range large enough: the caller evicts an unpinned adapter and retries."""


class AdapterPool:
    def __init__(self, cfg: ModelConfig, max_slots: int, arena_bytes: int, device, dtype, max_requests: int = 256,
                 lora_dtype: torch.dtype | None = None) -> None:
        """`max_requests`: rows of the PARA vector buffer (the scheduler hands them to running PARA requests).
        `lora_dtype`: the LowRank factors' dtype on a CPU (None: fp32; bf16 halves them, rounded at load); on a GPU
        they are kept in the arena, in `dtype`, and another lora_dtype is refused."""
        self.cfg, self.device, self.dtype, self.max_slots = cfg, device, dtype, max_slots
        self.layout = Layout.of(cfg)
        self.max_requests = max_requests
        elem = torch.empty((), dtype=dtype).element_size()
        self.allocator = ArenaAllocator(max(arena_bytes // elem, 64))
        self.arena = torch.zeros(self.allocator.capacity, device=device, dtype=dtype)
        self.idx_allocator = ArenaAllocator(max(arena_bytes // 16, 64), align=16)
        self.idx_arena = torch.zeros(self.idx_allocator.capacity, device=device, dtype=torch.int32)
        size, isize, L = self.allocator.size_of, self.idx_allocator.size_of, cfg.num_layers
        self.lowrank: LowRankStore
        self.sparse: SparseStore
        if use_triton(device):
            if lora_dtype not in (None, dtype):
                raise ValueError(f"where the Triton kernels serve (a GPU) the adapters' factors are kept in the "
                                 f"model's dtype ({dtype}), not {lora_dtype}")
            self.lowrank = ArenaLowRank(self.layout, L, max_slots, self.arena)
            self.sparse = ArenaSparse(self.layout, L, max_slots, self.arena, self.idx_arena, size, isize)
        else:
            self.lowrank = PaddedLowRank(self.layout, L, max_slots, self.arena.element_size(),
                                         factor_dtype=lora_dtype or torch.float32)
            self.sparse = CsrSparse(self.layout, dtype)
        self.scale = ScaleStore(cfg, self.layout, max_slots, max_requests, self.arena, size)
        self.slots: dict[int, SlotInfo] = {}
        self.changes = 0  # loads and frees so far: a step's inputs derived from the slots hold while it stands still
        self.fault_hook: Callable[[int, int], None] | None = None  # (slot, layer); see the module docstring

    @property
    def lowrank_dtype(self) -> torch.dtype:
        """The dtype the LowRank factors are kept in (the arena's on a GPU)."""
        return getattr(self.lowrank, "factor_dtype", self.dtype)

    @property
    def max_rank(self) -> int:
        """The rank bound the LowRank ops are sized for (part of a captured CUDA graph's key)."""
        return self.lowrank.max_rank

    # ---- sizes ------------------------------------------------------------------------------------------------
    def footprint(self, deltas: AdapterDeltas) -> tuple[int, int]:
        """(arena elements, idx_arena elements) an adapter needs, whichever stores serve."""
        size, isize = self.allocator.size_of, self.idx_allocator.size_of
        n = self._lowrank_elements(deltas)
        n += sum(size(sp.values.numel()) for sp in deltas.sparse.values())
        n += sum(size(t.numel()) for p in deltas.para.values() for t in (p.w_down, p.w_up, p.pool_query) if t is not None)
        n_idx = sum(isize(self.layout.group_width[group] + 1 + sum(p[1].numel() for p in parts))
                    for (_, group), parts in sparse_parts(deltas, self.layout).items())
        return n, n_idx

    def _lowrank_elements(self, deltas: AdapterDeltas) -> int:
        """What the LowRank store takes for the adapter (exact factors in the arena, or padded CPU stacks), which is
        also the start of its range's Sparse values (the range is reserved either way)."""
        return self.lowrank.arena_elements(deltas, self.allocator.size_of)

    def nbytes(self, deltas: AdapterDeltas) -> int:
        n, n_idx = self.footprint(deltas)
        return n * self.arena.element_size() + n_idx * 4

    def fits_empty(self, deltas: AdapterDeltas) -> bool:
        n, n_idx = self.footprint(deltas)
        return n <= self.allocator.capacity and n_idx <= self.idx_allocator.capacity

    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_slots) if s not in self.slots]

    def rank_of(self, slot: int, layer: int, proj: str) -> int:
        """The LowRank rank of `proj` in `layer` of the adapter in `slot` (0: none)."""
        return self.lowrank.rank_of(slot, layer, proj)

    # ---- load / free ------------------------------------------------------------------------------------------
    def prepare(self, deltas: AdapterDeltas) -> LowRankImage | None:
        """What `load` copies, prepared off the engine thread (the API side calls it while fetching the adapter)."""
        return self.lowrank.prepare(deltas, self.allocator.size_of)

    def load(self, slot: int, deltas: AdapterDeltas, prepared: LowRankImage | None = None) -> SlotInfo:
        """Copy an adapter's deltas into `slot` (`prepared`: from `prepare`, if done already).
        Raises AdapterPoolFull when the arenas have no room."""
        if slot in self.slots:
            raise ValueError(f"slot {slot} is occupied")
        self._check_shapes(deltas)
        n, n_idx = self.footprint(deltas)
        start = self.allocator.allocate(n) if n else None
        if n and start is None:
            raise AdapterPoolFull(f"arena has no free range of {n} elements")
        idx_start = self.idx_allocator.allocate(n_idx) if n_idx else None
        if n_idx and idx_start is None:
            if start is not None:
                self.allocator.free(start)
            raise AdapterPoolFull(f"index arena has no free range of {n_idx} elements")
        cursor = start or 0  # the range holds, in order: LowRank factors, Sparse values, PARA generators
        try:
            if deltas.lowrank:
                self.lowrank.load(slot, deltas, prepared if prepared is not None else self.prepare(deltas), cursor)
            cursor += self._lowrank_elements(deltas)
            if deltas.sparse:
                self.sparse.load(slot, deltas, cursor, idx_start or 0)
            cursor += sum(self.allocator.size_of(sp.values.numel()) for sp in deltas.sparse.values())
            self.scale.load(slot, deltas, cursor)
        except BaseException:  # a half-written slot applies nothing and gives its arena ranges back
            self._clear(slot, start, idx_start)
            raise
        info = SlotInfo(start, idx_start, self.nbytes(deltas), self.scale.targets[slot], bool(deltas.para),
                        bool(deltas.lowrank), bool(deltas.sparse))
        self.slots[slot] = info
        self.changes += 1
        return info

    def _check_shapes(self, deltas: AdapterDeltas) -> None:
        for name, lr in deltas.lowrank.items():
            d_out, d_in = self.layout.dims[parse_module_name(name)[1]]
            if tuple(lr.A.shape) != (lr.rank, d_in) or tuple(lr.B.shape) != (d_out, lr.rank):
                raise ValueError(f"{name}: A {tuple(lr.A.shape)} / B {tuple(lr.B.shape)} do not fit ({d_out}, {d_in})")
        for name, sp in deltas.sparse.items():
            if tuple(sp.shape) != self.layout.dims[parse_module_name(name)[1]]:
                raise ValueError(f"{name}: sparse shape {tuple(sp.shape)} does not fit {self.layout.dims[parse_module_name(name)[1]]}")

    def free(self, slot: int) -> None:
        info = self.slots.pop(slot)
        self.changes += 1
        self._clear(slot, info.arena_start, info.idx_start)

    def _clear(self, slot: int, arena_start: int | None, idx_start: int | None) -> None:
        if arena_start is not None:
            self.allocator.free(arena_start)
        if idx_start is not None:
            self.idx_allocator.free(idx_start)
        self.lowrank.free(slot)  # a stale slot id now applies nothing
        self.sparse.free(slot)
        self.scale.free(slot)
