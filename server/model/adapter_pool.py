"""The device pool: every resident adapter's deltas, of every kind, in shared buffers addressed by slot.

Layout (S-LoRA style: exact sizes, no padding to a maximum rank):
- `arena` (model dtype, flat): each slot owns one contiguous range holding its LowRank factors A (r, d_in) and
  B^T (r, d_out), its Sparse values and its PARA generators (so every kind counts against the pool's bytes). `idx_arena` (int32, flat): each slot's Sparse CSR row pointers and columns.
- Per layer, projection and slot, LowRank tables (offsets, rank, scale) and per layer, group and slot, Sparse
  tables (CSR over the group's fused output rows). A group's LowRank table is a view of consecutive
  projections, so one kernel launch serves a fused projection.
- Scale: IA3 vectors in per-target buffers (num_layers, max_slots + 1, width: a fixed cost), rows = slots; the PARA
  vectors of running requests in (num_layers, max_requests + 1, d_q + d_kv + d_ff), rows = request rows.
  Layers an adapter leaves unscaled hold ones (multiplying by 1 is exact), and so does the last row of each buffer,
  which nobody owns: the CPU path maps a token without a vector there (server/model/adapter_step.py).
The pool only stores; AdapterStep applies; which adapter gets which slot, and when, is the engine's decision.

Fault injection (tests): `fault_hook(slot, layer)`, when set, is called for every adapter slot a step's tokens use,
in every layer, before that slot's deltas, vectors or PARA generator are applied; what it raises fails the step the
way a faulty adapter would (server/engine/isolation.py finds the culprit). Steps run eagerly while it is set
(ModelRunner), since a CUDA graph replay runs no Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from adapters.delta import PROJECTIONS, AdapterDeltas, ParaLayer, parse_module_name, parse_scale_name
from kernels.dispatch import use_triton
from kernels.lowrank import LowRankTable
from kernels.sparse import SparseTable, csr_matrix
from server.model.adapter_layout import GROUPS, Layout
from server.model.arena import ArenaAllocator
from server.model.config import ModelConfig
from server.model.forward_batch import ForwardBatch
from server.model.padded_lowrank import PaddedLowRank


@dataclass
class SlotInfo:
    arena_start: int | None
    idx_start: int | None
    nbytes: int
    scale_targets: frozenset[str]
    has_para: bool
    has_lowrank: bool
    has_sparse: bool


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


class AdapterPoolFull(Exception):
    """No free slot or no arena range large enough: the caller evicts an unpinned adapter and retries."""


class AdapterPool:
    def __init__(self, cfg: ModelConfig, max_slots: int, arena_bytes: int, device, dtype, max_requests: int = 256) -> None:
        self.cfg, self.device, self.dtype, self.max_slots = cfg, device, dtype, max_slots
        self.layout = Layout.of(cfg)
        self.max_requests = max_requests
        elem = torch.empty((), dtype=dtype).element_size()
        self.allocator = ArenaAllocator(max(arena_bytes // elem, 64))
        self.arena = torch.zeros(self.allocator.capacity, device=device, dtype=dtype)
        self.idx_allocator = ArenaAllocator(max(arena_bytes // 16, 64), align=16)
        self.idx_arena = torch.zeros(self.idx_allocator.capacity, device=device, dtype=torch.int32)
        L, P, G = cfg.num_layers, len(PROJECTIONS), len(GROUPS)
        self.a_off = torch.zeros((L, P, max_slots), dtype=torch.int64, device=device)
        self.b_off = torch.zeros((L, P, max_slots), dtype=torch.int64, device=device)
        self.rank = torch.zeros((L, P, max_slots), dtype=torch.int32, device=device)
        self.scale = torch.zeros((L, P, max_slots), dtype=torch.float32, device=device)
        self.sp_idx_off = torch.zeros((L, G, max_slots), dtype=torch.int64, device=device)
        self.sp_val_off = torch.zeros((L, G, max_slots), dtype=torch.int64, device=device)
        self.sp_nnz = torch.zeros((L, G, max_slots), dtype=torch.int32, device=device)
        self.static_vectors: dict[str, torch.Tensor] = {}  # scale target -> (L, max_slots + 1, width), on first use
        self.para_layers: dict[int, dict[int, ParaLayer]] = {}  # slot -> layer -> generator (device tensors)
        self.para_vectors: torch.Tensor | None = None  # (L, max_requests + 1, d_q + d_kv + d_ff), made on first use
        self.slots: dict[int, SlotInfo] = {}
        self.max_rank = rank_class(1)
        self._build_tables()
        # On a CPU (unless the Triton kernels are forced), LowRank deltas are applied from a padded mirror, and
        # Sparse ones from torch sparse CSR matrices: slot -> (layer, group) -> (group width, d_in)
        self.padded = None if use_triton(device) else PaddedLowRank(self.layout, cfg.num_layers, max_slots)
        self.sparse_csr: dict[int, dict[tuple[int, str], torch.Tensor]] | None = None if use_triton(device) else {}
        self.fault_hook: Callable[[int, int], None] | None = None  # (slot, layer); see the module docstring

    def _build_tables(self) -> None:
        self.lowrank_tables: list[dict[str, LowRankTable]] = []
        self.sparse_tables: list[dict[str, SparseTable]] = []
        for layer in range(self.cfg.num_layers):
            lr, sp = {}, {}
            for g, (group, (lo, hi)) in enumerate(GROUPS.items()):
                projs = PROJECTIONS[lo:hi]
                lr[group] = LowRankTable(
                    a_off=self.a_off[layer, lo:hi], b_off=self.b_off[layer, lo:hi], rank=self.rank[layer, lo:hi],
                    scale=self.scale[layer, lo:hi], out_start=tuple(self.layout.col[p][1] for p in projs),
                    out_width=tuple(self.layout.col[p][2] for p in projs), max_rank=self.max_rank)
                sp[group] = SparseTable(idx_off=self.sp_idx_off[layer, g], val_off=self.sp_val_off[layer, g],
                                        nnz=self.sp_nnz[layer, g], num_rows=self.layout.group_width[group])
            self.lowrank_tables.append(lr)
            self.sparse_tables.append(sp)

    # ---- sizes ------------------------------------------------------------------------------------------------
    def _sparse_by_group(self, deltas: AdapterDeltas) -> dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """(layer, group) -> [(column offset of the projection in the group, rows, cols, values)]."""
        out: dict[tuple[int, str], list] = {}
        for name, sp in deltas.sparse.items():
            layer, proj = parse_module_name(name)
            group, start, _ = self.layout.col[proj]
            out.setdefault((layer, group), []).append((start, sp.rows, sp.cols, sp.values))
        return out

    def footprint(self, deltas: AdapterDeltas) -> tuple[int, int]:
        """(arena elements, idx_arena elements) an adapter needs."""
        size, isize = self.allocator.size_of, self.idx_allocator.size_of
        n = sum(size(t.numel()) for lr in deltas.lowrank.values() for t in (lr.A, lr.B))
        n += sum(size(sp.values.numel()) for sp in deltas.sparse.values())
        n += sum(size(t.numel()) for p in deltas.para.values() for t in (p.w_down, p.w_up, p.pool_query) if t is not None)
        n_idx = 0
        for (_, group), parts in self._sparse_by_group(deltas).items():
            n_idx += isize(self.layout.group_width[group] + 1 + sum(p[1].numel() for p in parts))
        return n, n_idx

    def nbytes(self, deltas: AdapterDeltas) -> int:
        n, n_idx = self.footprint(deltas)
        return n * self.arena.element_size() + n_idx * 4

    def fits_empty(self, deltas: AdapterDeltas) -> bool:
        n, n_idx = self.footprint(deltas)
        return n <= self.allocator.capacity and n_idx <= self.idx_allocator.capacity

    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_slots) if s not in self.slots]

    # ---- load / free ------------------------------------------------------------------------------------------
    def load(self, slot: int, deltas: AdapterDeltas, image: LowRankImage | None = None) -> SlotInfo:
        """Copy an adapter's deltas into `slot` (`image`: its lowrank_image, if prepared already).
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
        try:
            cursor = self._write_lowrank(slot, image or self.lowrank_image(deltas), start or 0)
            if self.padded is not None:
                self.padded.load(slot, deltas)
            cursor = self._write_sparse(slot, deltas, cursor, idx_start or 0)
            targets = self._write_scale(slot, deltas)
            if deltas.para:
                self._write_para(slot, deltas, cursor)
        except BaseException:  # a half-written slot applies nothing and gives its arena ranges back
            self._clear(slot, start, idx_start)
            raise
        info = SlotInfo(start, idx_start, self.nbytes(deltas), frozenset(targets), bool(deltas.para),
                        bool(deltas.lowrank), bool(deltas.sparse))
        self.slots[slot] = info
        return info

    def _check_shapes(self, deltas: AdapterDeltas) -> None:
        for name, lr in deltas.lowrank.items():
            d_out, d_in = self.layout.dims[parse_module_name(name)[1]]
            if tuple(lr.A.shape) != (lr.rank, d_in) or tuple(lr.B.shape) != (d_out, lr.rank):
                raise ValueError(f"{name}: A {tuple(lr.A.shape)} / B {tuple(lr.B.shape)} do not fit ({d_out}, {d_in})")
        for name, sp in deltas.sparse.items():
            if tuple(sp.shape) != self.layout.dims[parse_module_name(name)[1]]:
                raise ValueError(f"{name}: sparse shape {tuple(sp.shape)} does not fit {self.layout.dims[parse_module_name(name)[1]]}")

    def lowrank_image(self, deltas: AdapterDeltas) -> LowRankImage:
        """The host-side layout of an adapter's LowRank factors in its arena range (offsets relative to the range's
        start). Pure: callable off the engine thread (the API side prepares it while fetching the adapter), so a
        cold load on the engine thread is one copy of the image and one of each table column."""
        size = self.allocator.size_of
        image = torch.zeros(sum(size(t.numel()) for lr in deltas.lowrank.values() for t in (lr.A, lr.B)), dtype=self.dtype)
        shape = self.a_off.shape[:2]  # (num_layers, 7)
        a_rel, b_rel = torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int64)
        rank, scale = torch.zeros(shape, dtype=torch.int32), torch.zeros(shape, dtype=torch.float32)
        cursor = 0
        for name, lr in sorted(deltas.lowrank.items()):
            layer, proj = parse_module_name(name)
            p = PROJECTIONS.index(proj)
            d_out, d_in = self.layout.dims[proj]
            r = lr.rank
            a_at, cursor = cursor, cursor + size(r * d_in)
            b_at, cursor = cursor, cursor + size(r * d_out)
            image[a_at : a_at + r * d_in] = lr.A.reshape(-1)
            image[b_at : b_at + r * d_out] = lr.B.t().reshape(-1)
            a_rel[layer, p], b_rel[layer, p], rank[layer, p], scale[layer, p] = a_at, b_at, r, float(lr.scale)
        if image.numel() and torch.device(self.device).type == "cuda":
            image = image.pin_memory()  # so the engine thread's copy is asynchronous
        return LowRankImage(image, a_rel, b_rel, rank, scale)

    def _write_lowrank(self, slot: int, image: LowRankImage, start: int) -> int:
        n = image.image.numel()
        if n:
            self.arena[start : start + n].copy_(image.image, non_blocking=True)
        self.a_off[:, :, slot] = (image.a_rel + start).to(self.device, non_blocking=True)
        self.b_off[:, :, slot] = (image.b_rel + start).to(self.device, non_blocking=True)
        self.rank[:, :, slot] = image.rank.to(self.device, non_blocking=True)
        self.scale[:, :, slot] = image.scale.to(self.device, non_blocking=True)
        max_rank = rank_class(max(self.max_rank, int(image.rank.max()) if image.rank.numel() else 0))
        if max_rank != self.max_rank:
            self.max_rank = max_rank
            self._build_tables()
        return start + n

    def _write_sparse(self, slot: int, deltas: AdapterDeltas, cursor: int, idx_cursor: int) -> None:
        groups = list(GROUPS)
        for (layer, group), parts in sorted(self._sparse_by_group(deltas).items()):
            num_rows = self.layout.group_width[group]
            rows = torch.cat([p[1].long() + p[0] for p in parts])
            cols = torch.cat([p[2].long() for p in parts])
            vals = torch.cat([p[3].float() for p in parts])
            order = torch.argsort(rows * (1 << 32) + cols)  # CSR: by (row, col)
            rows, cols, vals = rows[order], cols[order], vals[order]
            nnz = rows.numel()
            row_ptr = torch.zeros(num_rows + 1, dtype=torch.int64)
            row_ptr[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
            g = groups.index(group)
            self.idx_arena[idx_cursor : idx_cursor + num_rows + 1] = row_ptr.to(self.device, torch.int32)
            self.idx_arena[idx_cursor + num_rows + 1 : idx_cursor + num_rows + 1 + nnz] = cols.to(self.device, torch.int32)
            self.arena[cursor : cursor + nnz] = vals.to(self.device, self.dtype)
            self.sp_idx_off[layer, g, slot], self.sp_val_off[layer, g, slot], self.sp_nnz[layer, g, slot] = idx_cursor, cursor, nnz
            if self.sparse_csr is not None:
                d_in = self.layout.dims[PROJECTIONS[GROUPS[group][0]]][1]
                self.sparse_csr.setdefault(slot, {})[(layer, group)] = csr_matrix(row_ptr, cols, vals.to(self.dtype), (num_rows, d_in))
            idx_cursor += self.idx_allocator.size_of(num_rows + 1 + nnz)
            cursor += sum(self.allocator.size_of(p[3].numel()) for p in parts)
        return cursor

    def _write_para(self, slot: int, deltas: AdapterDeltas, cursor: int) -> None:
        """PARA generators live in the slot's arena range too (so they count against the pool), as views."""
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
                cursor += self.allocator.size_of(t.numel())
            layers[i] = ParaLayer(p.pool, views[0], views[1], views[2], p.act)
        self.para_layers[slot] = layers

    def _write_scale(self, slot: int, deltas: AdapterDeltas) -> set[str]:
        targets = set()
        for name, vec in deltas.scale.items():
            layer, target = parse_scale_name(name)
            buf = self._static_buffer(target)
            if targets.isdisjoint({target}):
                buf[:, slot] = 1.0
                targets.add(target)
            buf[layer, slot] = vec.to(self.device, self.dtype)
        return targets

    def _static_buffer(self, target: str) -> torch.Tensor:
        if target not in self.static_vectors:
            width = self.layout.scale_site[target][2]
            self.static_vectors[target] = torch.ones((self.cfg.num_layers, self.max_slots + 1, width), device=self.device,
                                                     dtype=self.dtype)
        return self.static_vectors[target]

    def free(self, slot: int) -> None:
        info = self.slots.pop(slot)
        self._clear(slot, info.arena_start, info.idx_start)

    def _clear(self, slot: int, arena_start: int | None, idx_start: int | None) -> None:
        if arena_start is not None:
            self.allocator.free(arena_start)
        if idx_start is not None:
            self.idx_allocator.free(idx_start)
        self.rank[:, :, slot] = 0  # a stale slot id now applies nothing
        if self.padded is not None:
            self.padded.free(slot)
        if self.sparse_csr is not None:
            self.sparse_csr.pop(slot, None)
        self.sp_nnz[:, :, slot] = 0
        self.para_layers.pop(slot, None)

    # ---- per-request PARA vectors -----------------------------------------------------------------------------
    def para_buffer(self) -> torch.Tensor:
        if self.para_vectors is None:
            c = self.cfg
            self.para_vectors = torch.ones((c.num_layers, self.max_requests + 1, c.q_size + c.kv_size + c.intermediate_size),
                                           device=self.device, dtype=self.dtype)
        return self.para_vectors

    # ---- forward hooks (AdapterStep, server/model/adapter_step.py, applies the deltas) -------------------------
    def compute_para(self, layer: int, h: torch.Tensor, batch: ForwardBatch) -> None:
        """During a PARA request's prefill: its vectors for `layer` from its prompt tokens' normed hidden states."""
        from adapters.methods.para import para_vectors

        self.inject_faults(layer, batch)
        buf = self.para_buffer()
        for p in batch.para_prefills:
            gen = self.para_layers[p.slot].get(layer)
            if gen is None:
                buf[layer, p.row] = 1.0
                continue
            hp = h[p.token_start : p.token_start + p.num_prompt_tokens]  # (n, H)
            mask = torch.ones((1, hp.shape[0]), dtype=torch.bool, device=h.device)
            buf[layer, p.row] = para_vectors(gen, hp[None], mask)[0].to(buf.dtype)

    def inject_faults(self, layer: int, batch: ForwardBatch) -> None:
        """The test seam of the module docstring: before a layer's deltas of any kind are applied."""
        if self.fault_hook is not None:
            for slot, _ in batch.segments.slot_rows:  # the slots this step's tokens use
                self.fault_hook(slot, layer)
