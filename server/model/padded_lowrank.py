"""The CPU's LowRank store (server/model/lowrank_store.py): every slot's factors in the padded layout of
kernels.lowrank_padded.PaddedFactors, and nowhere else.

On a CPU, every torch call costs microseconds of dispatch, so applying each adapter with its own matmuls makes the
adapter overhead grow with the number of adapters in the step; the padded layout applies many at once with one
gather-bmm per op. The padding is per adapter, not per store: an adapter's factors are padded to its rank class R
(rank_class of its largest rank: 16, 32, 64, 128, ...) and sit in one row of its class's stacks, whose rows follow
the resident adapters of that class (doubled when full, halved when a quarter full, dropped when empty), and which
exist only for the (layer, group)s that some adapter of the class targets. So one tenant's rank-128 adapter takes
rank-128 rows for itself, never for the rank-16 adapters beside it. A step applies each class present among its
slots with one planned call per op (its slots' rows: one SlotPlan per class, built once per Segments and mapping).

The stacks are fp32, or bf16 with `--lora-dtype bfloat16` (each factor rounded once at load; half the memory, and
half the bytes a decode step streams, which on a bandwidth-bound CPU is most of an adapter's cost; the kernels widen
them exactly and sum in fp32).

The pool charges every adapter the bytes of its padded rows (`arena_elements`: R x (num_slices x d_in + the group's
output width) values per (layer, group) it targets, in the stacks' dtype) against MULTIPLEX_ADAPTER_POOL_BYTES, so
an adapter that does not fit evicts others or waits, as on the exact-rank arena (whose range is reserved here, never
written).
Not charged: the rows a class holds beyond its adapters (fewer than 3 of every 4 rows), and an adapter's rows in
stacks of (layer, group)s that only other adapters of its class target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.delta import PROJECTIONS, AdapterDeltas, parse_module_name
from kernels.lowrank_padded import PaddedFactors, grid_takes, kernel_call, lowrank_delta_planned
from kernels.segments import SlotPlan, Segments, plan_for_groups
from server.model.adapter_layout import GROUPS, Layout
from server.model.lowrank_store import LowRankImage, rank_class


@dataclass(eq=False)
class RankClass:
    """The stacks of the adapters of one rank class: row i holds slot `slots[i]`'s factors (None: a free row, zero)."""

    rank: int  # R: every slice padded to R rows of A and of B^T
    slots: list[int | None]  # row -> slot; len(slots) rows are allocated
    factors: list[dict[str, PaddedFactors]]  # per layer, group -> stacks of len(slots) rows (absent: none targeted)


class PaddedLowRank:
    def __init__(self, layout: Layout, num_layers: int, max_slots: int, arena_element_size: int = 4,
                 factor_dtype: torch.dtype = torch.float32) -> None:
        """`arena_element_size`: bytes of the pool arena's element, the unit `arena_elements` charges in;
        `factor_dtype`: the stacks' (float32 or bfloat16), whatever the model's."""
        if factor_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the CPU's LoRA factors are float32 or bfloat16, not {factor_dtype}")
        self.layout, self.num_layers, self.max_slots = layout, num_layers, max_slots
        self.arena_element_size, self.factor_dtype = arena_element_size, factor_dtype
        self.factor_bytes = torch.empty((), dtype=factor_dtype).element_size()
        self.classes: dict[int, RankClass] = {}  # R -> its stacks
        self.where: dict[int, tuple[RankClass, int]] = {}  # slot -> (its class, its row there)
        self.ranks: dict[int, dict[tuple[int, str], int]] = {}  # slot -> (layer, projection) -> its real rank
        # Replaced at every load and free: the step plans cached under another one map slots to stale rows.
        self.mapping = object()
        # values of one row of a (layer, group)'s stacks per unit of R: num_slices * d_in + sum of widths
        self.row_values = {g: len(self._slices(g)) * layout.dims[self._slices(g)[0]][1] + layout.group_width[g]
                           for g in GROUPS}

    @property
    def max_rank(self) -> int:
        """The largest rank class resident (16 before any LowRank load, like the arena's); informational here."""
        return max(self.classes, default=rank_class(0))

    def prepare(self, deltas: AdapterDeltas, size_of) -> LowRankImage | None:
        return None  # loads straight from the deltas

    def _slices(self, group: str) -> tuple[str, ...]:
        lo, hi = GROUPS[group]
        return PROJECTIONS[lo:hi]

    # ---- sizes ------------------------------------------------------------------------------------------------
    def padded_values(self, deltas: AdapterDeltas) -> int:
        """Values of the adapter's rows: R x row_values[group] for every (layer, group) it targets."""
        if not deltas.lowrank:
            return 0
        r = rank_class(max(lr.rank for lr in deltas.lowrank.values()))
        return sum(r * self.row_values[group] for _, group in self._targets(map(parse_module_name, deltas.lowrank)))

    def arena_elements(self, deltas: AdapterDeltas, size_of) -> int:
        """The pool arena elements charged for the adapter's LowRank factors: its padded rows' bytes, in the arena's
        element size (fp32 rows in a bf16 arena: 2 elements per value), rounded by `size_of` (the allocator's)."""
        values = self.padded_values(deltas)
        return size_of(-(-values * self.factor_bytes // self.arena_element_size)) if values else 0

    def _targets(self, modules) -> set[tuple[int, str]]:
        """The (layer, group)s of (layer, projection)s."""
        return {(layer, self.layout.col[proj][0]) for layer, proj in modules}

    # ---- load / free ------------------------------------------------------------------------------------------
    def load(self, slot: int, deltas: AdapterDeltas, image: LowRankImage | None, start: int) -> None:
        if not deltas.lowrank:
            return
        r_class = rank_class(max(lr.rank for lr in deltas.lowrank.values()))
        cls = self.classes.setdefault(r_class, RankClass(r_class, [], [{} for _ in range(self.num_layers)]))
        if None not in cls.slots:  # full: double its rows (a regrow copies the class's stacks)
            self._resize(cls, list(range(len(cls.slots))), min(max(1, 2 * len(cls.slots)), self.max_slots))
        row = cls.slots.index(None)
        cls.slots[row], self.where[slot], self.mapping = slot, (cls, row), object()
        ranks = self.ranks[slot] = {}
        for name, lr in deltas.lowrank.items():
            layer, proj = parse_module_name(name)
            group = self.layout.col[proj][0]
            i, r = self._slices(group).index(proj), lr.rank
            ranks[(layer, proj)] = r  # first, so that a failed load's free clears this stack's row
            f = self._stacks(cls, layer, group)
            f.a[row, i * r_class : i * r_class + r] = lr.A.float()  # rounded once to a bf16 stack's dtype
            f.bt[i][row, :r] = lr.B.float().t() * float(lr.scale)

    def free(self, slot: int) -> None:
        where, ranks = self.where.pop(slot, None), self.ranks.pop(slot, {})
        if where is None:
            return
        cls, row = where
        cls.slots[row], self.mapping = None, object()
        used = [i for i, s in enumerate(cls.slots) if s is not None]
        if not used:  # its stacks go now, even while a step's cached plans still name the class
            del self.classes[cls.rank]
            for per_group in cls.factors:
                per_group.clear()
            return
        still = set().union(*(self._targets(self.ranks[cls.slots[i]]) for i in used))
        for layer, group in self._targets(ranks):
            if (layer, group) in still:  # a stale row applies nothing, and a reused one starts from zero
                f = cls.factors[layer][group]
                f.a[row] = 0
                for bt in f.bt:
                    bt[row] = 0
            else:  # no adapter of the class targets it any more
                cls.factors[layer].pop(group, None)
        if len(used) <= len(cls.slots) // 4:  # a quarter full: halve, moving the adapters to the first rows
            self._resize(cls, used, len(cls.slots) // 2)

    def _stacks(self, cls: RankClass, layer: int, group: str) -> PaddedFactors:
        """The class's stacks of (layer, group), allocated (zero) the first time an adapter targets it."""
        f = cls.factors[layer].get(group)
        if f is None:
            f = cls.factors[layer][group] = self._allocate(group, cls.rank, len(cls.slots))
        return f

    def _allocate(self, group: str, r: int, rows: int) -> PaddedFactors:
        projs = self._slices(group)
        widths = tuple(self.layout.col[p][2] for p in projs)
        dtype = self.factor_dtype
        a = torch.zeros(rows, len(projs) * r, self.layout.dims[projs[0]][1], dtype=dtype)  # (rows, slices * R, d_in)
        bt = tuple(torch.zeros(rows, r, w, dtype=dtype) for w in widths)  # per slice (rows, R, w_i)
        return PaddedFactors(a, bt, tuple(self.layout.col[p][1] for p in projs), widths)

    def _resize(self, cls: RankClass, keep: list[int], rows: int) -> None:
        """Re-allocate the class's stacks with `rows` rows, old row keep[i] copied to row i."""
        index = torch.tensor(keep, dtype=torch.long)
        for per_group in cls.factors:
            for group, old in per_group.items():
                new = per_group[group] = self._allocate(group, cls.rank, rows)
                for dst, src in zip((new.a, *new.bt), (old.a, *old.bt)):
                    torch.index_select(src, 0, index, out=dst[: len(keep)])
        cls.slots = [cls.slots[k] for k in keep] + [None] * (rows - len(keep))
        for row, slot in enumerate(cls.slots):
            if slot is not None:
                self.where[slot] = (cls, row)

    def rank_of(self, slot: int, layer: int, proj: str) -> int:
        return self.ranks.get(slot, {}).get((layer, proj), 0)

    # ---- the forward ------------------------------------------------------------------------------------------
    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> None:
        for cls, plan in self._plans(seg):
            f = cls.factors[layer].get(group)
            if f is not None:
                lowrank_delta_planned(y, x, plan, f)

    def kernel_call(self, layer: int, group: str, x: torch.Tensor, seg: Segments):
        """apply()'s work as one call of our grid kernel for a caller to run after its projection in the same call
        (kernels.lowrank_padded.kernel_call), when the step's slots are of one rank class, one that targets (layer,
        group), and the kernel serves it; else None."""
        plans = self._plans(seg)
        if len(plans) != 1:
            return None
        cls, plan = plans[0]
        f = cls.factors[layer].get(group)
        return None if f is None else kernel_call(x, plan, f)

    def layer_grids(self, seg: Segments):
        """Every (layer, group)'s deltas as calls of our grid kernel: (the step's groups, per layer {group:
        GridFactors} for the groups some adapter of the step's class targets), when the step's slots are of one rank
        class and the kernel serves it; else None."""
        plans = self._plans(seg)
        if len(plans) != 1:
            return None
        cls, plan = plans[0]
        if not all(grid_takes(plan, f) for per in cls.factors for f in per.values()) or plan.kernel_groups is None:
            return None
        return plan.kernel_groups, [{g: f.grid for g, f in per.items()} for per in cls.factors]

    def _plans(self, seg: Segments) -> tuple[tuple[RankClass, SlotPlan], ...]:
        cached = seg.host_views.get(self)  # (mapping, plans), derived once per Segments and mapping
        if cached is None or cached[0] is not self.mapping:
            cached = seg.host_views[self] = (self.mapping, self.plans(seg))
        return cached[1]

    def plans(self, seg: Segments) -> tuple[tuple[RankClass, SlotPlan], ...]:
        """Per rank class among the step's slots, the SlotPlan of its slots' tokens over its rows, smallest R first."""
        groups: dict[int, list[tuple[int, slice | torch.Tensor]]] = {}
        runs: dict[int, dict[int, tuple[tuple[int, int], ...]]] = {}
        for slot, rows in seg.slot_rows:
            where = self.where.get(slot)
            if where is not None:  # a slot without LowRank factors (Sparse or Scale only) has none to apply
                cls, row = where
                groups.setdefault(cls.rank, []).append((row, rows))
                runs.setdefault(cls.rank, {})[row] = seg.slot_runs[slot]
        device = seg.seg_slot.device
        return tuple((self.classes[r], plan_for_groups(groups[r], runs[r], device)) for r in sorted(groups))
