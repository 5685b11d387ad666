"""Rows of the PARA vector buffer (server/model/scale_store.py), handed to running PARA requests like KV blocks:
the scheduler takes one when it admits the request (its prefill writes the row's vectors, every later step reads
them) and gives it back when the request finishes, fails or is preempted (a preempted request is prefilled again
from its prompt, into whatever row it gets then)."""
from __future__ import annotations


class ParaRows:
    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._free = list(range(num_rows - 1, -1, -1))  # pop() hands out the lowest row first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int | None:
        """A free row, or None when every row is held (the request waits, as for KV blocks)."""
        return self._free.pop() if self._free else None

    def give_back(self, row: int) -> None:
        self._free.append(row)
