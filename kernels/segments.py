"""Per-step token segments: the one piece of batch metadata every adapter kernel shares.

The engine lays out a step's tokens request by request, so each request is one contiguous segment of the
flat batch with one adapter slot. Running example (3 requests, slot -1 = base model):

    tokens:      t0 t1 t2 t3 | t4 | t5 t6
    seg_start:   [0, 4, 5, 7]
    seg_slot:    [3, -1, 0]
    token_slot:  [3, 3, 3, 3, -1, 0, 0]

The grouped-GEMM kernels (kernels/lowrank.py) also want the adapter tokens cut into row tiles of at most
`tile_size` tokens, each tile inside one segment. Base-model segments get no tile, so they cost nothing.
With tile_size 16 the example gives two real tiles; the list is padded with empty tiles (len 0) up to
`num_tiles`, a bound that depends only on (num_tokens, num_segments, tile_size), so a launch grid sized by it
is the same for every step of the same shape (CUDA graphs):

    tile_start:  [0, 5, 0, ...]
    tile_len:    [4, 2, 0, ...]
    tile_slot:   [3, 0, -1, ...]

Built once per step on the host, copied to the device once, shared by every layer and module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Row-tile sizes the kernels are compiled for; the smallest that holds the longest segment is used.
TILE_SIZES = (16, 32, 64)


@dataclass(frozen=True)
class Segments:
    seg_start: torch.Tensor  # (S+1,) int32, device
    seg_slot: torch.Tensor  # (S,) int32, device; -1 = no adapter
    token_slot: torch.Tensor  # (T,) int32, device
    num_tokens: int
    max_seg_len: int
    has_adapter: bool  # False when every slot is -1: the adapter ops return at once
    # Row tiles for the grouped-GEMM kernels (see the module docstring); None when built by hand.
    tile_start: torch.Tensor | None = None  # (num_tiles,) int32, device; first token of the tile
    tile_len: torch.Tensor | None = None  # (num_tiles,) int32, device; 0 = padding
    tile_slot: torch.Tensor | None = None  # (num_tiles,) int32, device
    num_tiles: int = 0  # padded count: an upper bound on the real tiles for this (T, S, tile_size)
    tile_size: int = TILE_SIZES[0]

    @property
    def num_segments(self) -> int:
        return int(self.seg_slot.numel())


def tile_size_for(max_seg_len: int) -> int:
    """Smallest row tile that holds the longest segment (decode steps get 16), capped at the largest."""
    return next((m for m in TILE_SIZES if max_seg_len <= m), TILE_SIZES[-1])


def max_tiles(num_tokens: int, num_segments: int, tile_size: int) -> int:
    """Upper bound on sum_k ceil(len_k / tile_size) over segments with sum_k len_k = num_tokens."""
    return min(num_tokens, (num_tokens + num_segments * (tile_size - 1)) // tile_size)


def _tiles(seg_lens: list[int], seg_slots: list[int], tile_size: int, num_tiles: int) -> tuple[list[int], list[int], list[int]]:
    starts, lens, slots = [], [], []
    t = 0
    for n, s in zip(seg_lens, seg_slots):
        if s >= 0:
            for off in range(0, n, tile_size):
                starts.append(t + off)
                lens.append(min(tile_size, n - off))
                slots.append(s)
        t += n
    pad = num_tiles - len(starts)
    return starts + [0] * pad, lens + [0] * pad, slots + [-1] * pad


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
    tile_size = tile_size_for(max_seg_len)
    num_tiles = max_tiles(num_tokens, num_segments, tile_size)
    tile_start, tile_len, tile_slot = _tiles(seg_lens, seg_slots, tile_size, num_tiles)
    # One host tensor, one copy to the device; the fields are views into it.
    host = torch.tensor(starts + seg_slots + token_slot + tile_start + tile_len + tile_slot, dtype=torch.int32)
    dev = host.to(device, non_blocking=True)
    bounds = [0, num_segments + 1, num_segments, num_tokens, num_tiles, num_tiles, num_tiles]
    for i in range(1, len(bounds)):
        bounds[i] += bounds[i - 1]
    seg_start, seg_slot, tok_slot, t_start, t_len, t_slot = (dev[a:b] for a, b in zip(bounds, bounds[1:]))
    return Segments(
        seg_start=seg_start,
        seg_slot=seg_slot,
        token_slot=tok_slot,
        num_tokens=num_tokens,
        max_seg_len=max_seg_len,
        has_adapter=any(s >= 0 for s in seg_slots),
        tile_start=t_start,
        tile_len=t_len,
        tile_slot=t_slot,
        num_tiles=num_tiles,
        tile_size=tile_size,
    )
