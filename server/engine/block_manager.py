"""Paged KV cache bookkeeping: fixed-size blocks handed out from a free list. Plain Python, no tensors.

A sequence's `block_ids` lists its blocks by position (entry i holds positions [i * block_size, (i+1) * block_size)).
With sliding-window attention on every layer, blocks that left the window are given back while the sequence runs
(`drop_before`); their entries become FREED, and nothing reads them again.
"""
from __future__ import annotations

FREED = -1  # a block_ids entry whose block left the sliding window and went back to the free list


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Whether a sequence holding `block_ids` can grow to `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(block_ids) <= len(self._free)

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Append blocks to `block_ids` (in place) until they hold `num_tokens` tokens."""
        missing = self.blocks_needed(num_tokens) - len(block_ids)
        if missing > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {missing}, {len(self._free)} free")
        for _ in range(missing):
            block_ids.append(self._free.pop())

    def drop_before(self, block_ids: list[int], position: int) -> int:
        """Give back the blocks whose positions all lie before `position` (in place) -> how many."""
        dropped = 0
        for i in range(min(position // self.block_size, len(block_ids))):
            if block_ids[i] != FREED:
                self._free.append(block_ids[i])
                block_ids[i] = FREED
                dropped += 1
        return dropped

    def release(self, block_ids: list[int]) -> None:
        self._free.extend(b for b in reversed(block_ids) if b != FREED)
        block_ids.clear()
