"""Per-step token segments: the one piece of batch metadata every adapter kernel shares.

The engine lays out a step's tokens request by request, so each request is one contiguous segment of the
flat batch with one adapter slot. Running example (3 requests, slot -1 = base model):

    tokens:      t0 t1 t2 t3 | t4 | t5 t6
    seg_start:   [0, 4, 5, 7]
    seg_slot:    [3, -1, 0]
    token_slot:  [3, 3, 3, 3, -1, 0, 0]

The grouped-GEMM kernels (kernels/lowrank.py) want the adapter tokens grouped by slot (`sorted_tokens`: token
ids, slot by slot, in order within a slot), then cut into row tiles of at most `tile_size` tokens of one slot,
so that a popular adapter's weights are read once per tile, not once per request. Base-model tokens are in no
tile, so they cost nothing. `tile_size` follows the longest segment (16 for every decode step), and the tile
list is padded with empty tiles (len 0) up to `num_tiles`, a bound that depends only on (num_tokens,
num_segments, tile_size): a launch grid sized by them is the same for every decode step of a batch size, as
CUDA graphs need. In the example (tile_size 16; slots in order of first appearance):

    sorted_tokens: [0, 1, 2, 3, 5, 6, 0]      (entries past the adapter tokens: 0, never read)
    tile_start:    [0, 4, 0]                  (index into sorted_tokens)
    tile_len:      [4, 2, 0]
    tile_slot:     [3, 0, -1]

Built once per step on the host, copied to the device once, shared by every layer and module.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Row-tile sizes the kernels are compiled for; the smallest that holds the longest segment is used.
TILE_SIZES = (16, 32, 64)
SOLO_TOKENS = 8  # CPU gather-bmm path: a slot with more tokens than this gets its own matmuls (SlotPlan)


@dataclass(frozen=True)
class SlotBatch:
    """Adapter tokens grouped by slot and padded: row i of `gather` lists the token rows of slot `slots[i]`,
    padded with row 0 (whatever a padding cell computes is dropped). Flattened, the entries `keep` are real tokens,
    in `rows` order (`keep` is None when every cell is one, e.g. 16 decode tokens over 8 slots, 2 each).
    When the step's slots lie close together, `slots` is their whole range lo..hi-1 (`slot_range`), slots of the
    range that the step does not use getting padding rows only: per-slot stacks are then read through a view of
    rows lo..hi-1 instead of being gathered (copied) for every op."""

    slots: torch.Tensor  # (S,) int64
    gather: torch.Tensor  # (S, n_max) int64
    keep: torch.Tensor | None  # (N,) int64 positions in gather.view(-1) that are real tokens; None: all of them
    rows: torch.Tensor  # (N,) int64 token rows, in the same order
    slot_range: tuple[int, int] | None = None  # (lo, hi) when slots == arange(lo, hi)
    offsets: torch.Tensor | None = None  # (S+1,) int64: slot slots[i]'s tokens are rows[offsets[i] : offsets[i+1]]


@dataclass(frozen=True)
class SlotPlan:
    """How the CPU gather-bmm path covers a step's adapter tokens: `solo` slots get their own matmuls over their
    token rows (a slice when contiguous), the others share one padded grid (`padded`, None when there are none).
    A slot is solo when it has more than SOLO_TOKENS tokens (a prefill: padding every other slot of the grid to its
    length would multiply their work) or when it is the step's only slot (nothing to batch with). Where our CPU grid
    kernel runs it takes every slot, solo or not, in one call (`kernel_groups`: it pads nothing)."""

    solo: tuple[tuple[int, slice | torch.Tensor], ...]
    padded: SlotBatch | None
    solo_runs: tuple[tuple[tuple[int, int], ...], ...]  # per solo slot, its rows as (start, stop) runs, in order

    @cached_property
    def kernel_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every slot of the plan, solo or padded, as the groups of one call of our CPU grid kernel
        (kernels/cpu_matmul.py `lowrank_grid`): slots, offsets and token rows, int64 and contiguous. None when the
        padded grid was built without offsets (by hand). Made once."""
        if self.padded is not None and self.padded.offsets is None:
            return None
        slots, counts, rows = [], [], []
        for slot, r in self.solo:
            r = torch.arange(r.start, r.stop) if isinstance(r, slice) else r.cpu().to(torch.int64)
            slots.append(slot)
            counts.append(r.numel())
            rows.append(r)
        if self.padded is not None:
            slots += self.padded.slots.tolist()
            counts += self.padded.offsets.diff().tolist()
            rows.append(self.padded.rows.cpu())
        offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
        return torch.tensor(slots, dtype=torch.int64), offsets, torch.cat(rows).to(torch.int64).contiguous()


@dataclass(frozen=True)
class Segments:
    seg_start: torch.Tensor  # (S+1,) int32, device
    seg_slot: torch.Tensor  # (S,) int32, device; -1 = no adapter
    token_slot: torch.Tensor  # (T,) int32, device
    num_tokens: int
    max_seg_len: int
    has_adapter: bool  # False when every slot is -1: the adapter ops return at once
    # Row tiles for the grouped-GEMM kernels (see the module docstring); None when built by hand.
    sorted_tokens: torch.Tensor | None = None  # (T,) int32, device; adapter tokens grouped by slot
    tile_start: torch.Tensor | None = None  # (num_tiles,) int32, device; first entry of sorted_tokens
    tile_len: torch.Tensor | None = None  # (num_tiles,) int32, device; 0 = padding
    tile_slot: torch.Tensor | None = None  # (num_tiles,) int32, device
    num_tiles: int = 0  # padded count: an upper bound on the real tiles for this (T, S, tile_size)
    tile_size: int = TILE_SIZES[0]

    @cached_property
    def slot_rows(self) -> list[tuple[int, slice | torch.Tensor]]:
        """(slot, token rows) per distinct adapter slot, for the PyTorch reference paths: a slice when the slot's
        tokens are one contiguous run, else an index tensor. Computed once per step (one host read), then shared
        by every layer and module."""
        out: list[tuple[int, slice | torch.Tensor]] = []
        for s, rs in self.slot_runs.items():
            if len(rs) == 1:
                out.append((s, slice(*rs[0])))
            else:
                rows = torch.cat([torch.arange(a, b) for a, b in rs]).to(self.seg_slot.device)
                out.append((s, rows))
        return out

    @cached_property
    def slot_runs(self) -> dict[int, tuple[tuple[int, int], ...]]:
        """slot -> its token rows as maximal (start, stop) runs, in order (adjacent segments of a slot merged)."""
        starts, slots = self.seg_start.tolist(), self.seg_slot.tolist()
        runs: dict[int, list[tuple[int, int]]] = {}
        for k, s in enumerate(slots):
            if s >= 0 and starts[k + 1] > starts[k]:
                rs = runs.setdefault(s, [])
                if rs and rs[-1][1] == starts[k]:
                    rs[-1] = (rs[-1][0], starts[k + 1])
                else:
                    rs.append((starts[k], starts[k + 1]))
        return {s: tuple(rs) for s, rs in runs.items()}

    @cached_property
    def slot_plan(self) -> SlotPlan | None:
        """The adapter tokens for gather-bmm paths (kernels.lowrank's padded CPU path): solo slots and one padded
        grid for the rest (SlotPlan). None when no token has an adapter."""
        return plan_for_groups(self.slot_rows, self.slot_runs, self.seg_slot.device)

    @cached_property
    def host_views(self) -> dict:
        """Values that callers outside kernels derive from these segments on the host, under keys of their own
        (the CPU LowRank store's slot plans per rank class): computed once per step like slot_plan, and dropped
        with it by forget_host_views."""
        return {}

    def forget_host_views(self) -> None:
        """Drop slot_rows / slot_runs / slot_plan / host_views, read from the device tensors: call after writing new
        values into them."""
        for name in ("slot_rows", "slot_runs", "slot_plan", "host_views"):
            self.__dict__.pop(name, None)

    @property
    def num_segments(self) -> int:
        return int(self.seg_slot.numel())


def plan_for_groups(groups: list[tuple[int, slice | torch.Tensor]], runs: dict[int, tuple[tuple[int, int], ...]],
                    device: torch.device | str) -> SlotPlan | None:
    """The SlotPlan of `groups` (id, token rows), ids in any order, `runs[id]` the rows as (start, stop) runs: the
    ids are what the plan's slots index, Segments' own slots (Segments.slot_plan) or rows of other stacks (a caller
    that keeps each rank class's factors in stacks of their own). None when `groups` is empty."""
    groups = sorted(groups, key=lambda g: g[0])
    if not groups:
        return None
    count = [(r.stop - r.start) if isinstance(r, slice) else r.numel() for _, r in groups]
    is_solo = [n > SOLO_TOKENS or len(groups) == 1 for n in count]
    solo = tuple(g for g, one in zip(groups, is_solo) if one)
    rest = [g for g, one in zip(groups, is_solo) if not one]
    return SlotPlan(solo, _padded_grid(rest, device) if rest else None, tuple(runs[s] for s, _ in solo))


def _padded_grid(groups: list[tuple[int, slice | torch.Tensor]], device: torch.device | str) -> SlotBatch:
    """The tokens of `groups` (slot, rows), by slot, as a padded (slot, token) grid: one batched matmul per op
    whatever the number of adapters."""
    slots = [s for s, _ in groups]
    rows = [torch.arange(r.start, r.stop) if isinstance(r, slice) else r.cpu() for _, r in groups]
    slot_range = None
    if slots[-1] - slots[0] + 1 <= 2 * len(slots):  # close together: read the range, unused slots padded
        slot_range = (slots[0], slots[-1] + 1)
        by_slot = dict(zip(slots, rows))
        slots = list(range(*slot_range))
        rows = [by_slot.get(s, torch.empty(0, dtype=torch.long)) for s in slots]
    width = max(len(r) for r in rows)
    is_real = torch.zeros((len(rows), width), dtype=torch.bool)
    gather = torch.zeros((len(rows), width), dtype=torch.long)  # padding cells read row 0
    for i, r in enumerate(rows):
        gather[i, : len(r)] = r
        is_real[i, : len(r)] = True
    keep = None if bool(is_real.all()) else is_real.view(-1).nonzero().squeeze(1).to(device)
    offsets = torch.tensor([0] + [len(r) for r in rows], dtype=torch.long).cumsum(0)
    return SlotBatch(slots=torch.tensor(slots, dtype=torch.long).to(device), gather=gather.to(device),
                     keep=keep, rows=torch.cat(rows).long().to(device), slot_range=slot_range,
                     offsets=offsets.to(device))


def tile_size_for(max_seg_len: int) -> int:
    """Smallest row tile that holds the longest segment (16 for decode steps), capped at the largest."""
    return next((m for m in TILE_SIZES if max_seg_len <= m), TILE_SIZES[-1])


def max_tiles(num_tokens: int, num_segments: int, tile_size: int) -> int:
    """Upper bound on sum_s ceil(n_s / tile_size) over at most num_segments slots with sum_s n_s <= num_tokens."""
    return min(num_tokens, (num_tokens + num_segments * (tile_size - 1)) // tile_size)


def _group_by_slot(seg_lens: list[int], seg_slots: list[int]) -> dict[int, list[int]]:
    """slot -> its token ids in order, for slots >= 0 (in order of first appearance)."""
    groups: dict[int, list[int]] = {}
    t = 0
    for n, s in zip(seg_lens, seg_slots):
        if s >= 0 and n > 0:
            groups.setdefault(s, []).extend(range(t, t + n))
        t += n
    return groups


def _tiles(groups: dict[int, list[int]], tile_size: int, num_tiles: int) -> tuple[list[int], ...]:
    sorted_tokens, starts, lens, slots = [], [], [], []
    for s, tokens in groups.items():
        for off in range(0, len(tokens), tile_size):
            starts.append(len(sorted_tokens) + off)
            lens.append(min(tile_size, len(tokens) - off))
            slots.append(s)
        sorted_tokens += tokens
    pad = num_tiles - len(starts)
    return sorted_tokens, starts + [0] * pad, lens + [0] * pad, slots + [-1] * pad


def make_segments(seg_lens: list[int], seg_slots: list[int], device: torch.device | str) -> Segments:
    """Segments for a step whose tokens are `seg_lens[i]` tokens of slot `seg_slots[i]`, in order."""
    if len(seg_lens) != len(seg_slots):
        raise ValueError("seg_lens and seg_slots differ in length")
    starts = [0]
    for n in seg_lens:
        starts.append(starts[-1] + n)
    token_slot = [s for n, s in zip(seg_lens, seg_slots) for _ in range(n)]
    num_segments, num_tokens = len(seg_lens), starts[-1]
    max_seg_len = max(seg_lens, default=0)
    groups = _group_by_slot(seg_lens, seg_slots)
    tile_size = tile_size_for(max_seg_len)
    num_tiles = max_tiles(num_tokens, num_segments, tile_size)
    sorted_tokens, tile_start, tile_len, tile_slot = _tiles(groups, tile_size, num_tiles)
    sorted_tokens += [0] * (num_tokens - len(sorted_tokens))
    # One host tensor, one copy to the device; the fields are views into it.
    fields = [starts, seg_slots, token_slot, sorted_tokens, tile_start, tile_len, tile_slot]
    host = torch.tensor([v for f in fields for v in f], dtype=torch.int32)
    dev = host.to(device, non_blocking=True)
    views, at = [], 0
    for f in fields:
        views.append(dev[at : at + len(f)])
        at += len(f)
    seg_start, seg_slot, tok_slot, sorted_tok, t_start, t_len, t_slot = views
    return Segments(
        seg_start=seg_start,
        seg_slot=seg_slot,
        token_slot=tok_slot,
        num_tokens=num_tokens,
        max_seg_len=max_seg_len,
        has_adapter=any(s >= 0 for s in seg_slots),
        sorted_tokens=sorted_tok,
        tile_start=t_start,
        tile_len=t_len,
        tile_slot=t_slot,
        num_tiles=num_tiles,
        tile_size=tile_size,
    )
