"""Which adapters sit in device slots: loaded on first use, pinned while requests use them, evicted LRU.

The source maps adapter_id -> AdapterDeltas (a directory today, the Redis registry later). Loads happen on the
engine thread between steps; an adapter that cannot fit while others are pinned makes its request wait.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters.delta import AdapterDeltas
from server.model.adapter_pool import AdapterPool, AdapterPoolFull

log = logging.getLogger(__name__)


@dataclass
class Resident:
    slot: int
    pins: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class AdapterCache:
    def __init__(self, pool: AdapterPool, source: Callable[[str], AdapterDeltas]) -> None:
        self.pool, self.source = pool, source
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # LRU order: oldest first
        self.stats = CacheStats()

    def acquire(self, adapter_id: str) -> int | None:
        """Pin the adapter and return its slot, loading it first if needed; None when it cannot fit yet."""
        entry = self.resident.get(adapter_id)
        if entry is None:
            self.stats.misses += 1
            entry = self._load(adapter_id)
            if entry is None:
                return None
        else:
            self.stats.hits += 1
        entry.pins += 1
        self.resident.move_to_end(adapter_id)
        return entry.slot

    def release(self, adapter_id: str) -> None:
        self.resident[adapter_id].pins -= 1

    def needs_whole_prefill(self, adapter_id: str) -> bool:
        return self.pool.slots[self.resident[adapter_id].slot].has_para

    def _load(self, adapter_id: str) -> Resident | None:
        deltas = self.source(adapter_id)
        t0 = time.perf_counter()
        while True:
            free = self.pool.free_slots()
            if free:
                try:
                    self.pool.load(free[0], deltas)
                    break
                except AdapterPoolFull:
                    pass
            if not self._evict_one():
                return None
        self.stats.load_seconds += time.perf_counter() - t0
        entry = Resident(free[0])
        self.resident[adapter_id] = entry
        log.info("adapter %s loaded into slot %d", adapter_id, entry.slot)
        return entry

    def _evict_one(self) -> bool:
        for adapter_id, entry in self.resident.items():
            if entry.pins == 0:
                self.pool.free(entry.slot)
                del self.resident[adapter_id]
                self.stats.evictions += 1
                log.info("adapter %s evicted from slot %d", adapter_id, entry.slot)
                return True
        return False
