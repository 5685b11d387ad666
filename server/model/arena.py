"""First-fit allocator of element ranges in one flat device tensor (the adapter arena).

Every adapter's factors sit in one contiguous range, sized to its exact ranks: no padding to a maximum rank.
Freed ranges coalesce with their neighbours, so an arena that fits an adapter once fits it again after evictions
of the same total size (up to fragmentation, which `largest_free` reports).
"""
from __future__ import annotations


class ArenaAllocator:
    def __init__(self, capacity: int, align: int = 64) -> None:
        self.capacity = capacity
        self.align = align  # elements; keeps every factor 128-byte aligned for bf16 vector loads
        self._free: list[tuple[int, int]] = [(0, capacity)]  # sorted (start, size)
        self._used: dict[int, int] = {}  # start -> size

    def _round(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def allocate(self, num_elements: int) -> int | None:
        """Start offset of a new range, or None when no free range is large enough."""
        size = self._round(max(num_elements, 1))
        for i, (start, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    self._free.pop(i)
                else:
                    self._free[i] = (start + size, free - size)
                self._used[start] = size
                return start
        return None

    def free(self, start: int) -> None:
        size = self._used.pop(start)
        self._free.append((start, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    def size_of(self, num_elements: int) -> int:
        return self._round(max(num_elements, 1))

    @property
    def num_free(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)
