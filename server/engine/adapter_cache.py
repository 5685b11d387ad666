"""Which adapters sit in device slots: loaded on first use, pinned while requests use them, evicted LRU.

Keys are `adapter_id@version`: a replaced adapter's new version gets its own slot while requests that started on
the old one finish on it; the old version is evicted like any unpinned adapter. The host-side deltas travel
with the request (AdapterRef), fetched on the API side without blocking the engine; here they are copied to
the device between steps. An adapter that cannot fit while others are pinned makes its request wait.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from server.engine.metrics import EngineMetrics
from server.engine.request import AdapterRef
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
    loads: int = 0
    load_seconds: float = 0.0


class AdapterCache:
    def __init__(self, pool: AdapterPool, metrics: EngineMetrics | None = None) -> None:
        self.pool = pool
        self.metrics = metrics or EngineMetrics()
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # LRU order: oldest first
        self.stats = CacheStats()

    def acquire(self, ref: AdapterRef) -> int | None:
        """Pin the adapter and return its slot, loading it first if needed; None when it cannot fit yet."""
        entry = self.resident.get(ref.key)
        if entry is None:
            self.stats.misses += 1
            entry = self._load(ref)
            if entry is None:
                return None
        else:
            self.stats.hits += 1
        entry.pins += 1
        self.resident.move_to_end(ref.key)
        return entry.slot

    def release(self, ref: AdapterRef) -> None:
        self.resident[ref.key].pins -= 1

    @property
    def num_pinned(self) -> int:
        """Resident adapters that requests in flight hold (0 once every request has finished)."""
        return sum(entry.pins > 0 for entry in self.resident.values())

    def has_para(self, ref: AdapterRef) -> bool:
        return self.pool.slots[self.resident[ref.key].slot].has_para

    def discard(self, ref: AdapterRef) -> None:
        """Free the adapter's slot now rather than when it is the least recently used (a quarantined adapter:
        nobody will use it again). Its requests must have released it."""
        entry = self.resident.get(ref.key)
        if entry is None:
            return
        if entry.pins:  # not expected; left to LRU eviction rather than failing the step
            log.error("adapter %s cannot be discarded: %d requests still pin it", ref.key, entry.pins)
            return
        self.pool.free(entry.slot)
        del self.resident[ref.key]
        log.info("adapter %s discarded from slot %d", ref.key, entry.slot)

    def _load(self, ref: AdapterRef) -> Resident | None:
        t0 = time.perf_counter()
        while True:
            free = self.pool.free_slots()
            if free:
                try:
                    self.pool.load(free[0], ref.deltas, ref.prepared)
                    break
                except AdapterPoolFull:
                    pass
            if not self._evict_one():
                return None
        self.stats.loads += 1
        seconds = time.perf_counter() - t0
        self.stats.load_seconds += seconds
        self.metrics.adapter_load_time.observe(seconds)
        entry = Resident(free[0])
        self.resident[ref.key] = entry
        log.info("adapter %s loaded into slot %d", ref.key, entry.slot)
        return entry

    def _evict_one(self) -> bool:
        for key, entry in self.resident.items():
            if entry.pins == 0:
                self.pool.free(entry.slot)
                del self.resident[key]
                self.stats.evictions += 1
                log.info("adapter %s evicted from slot %d", key, entry.slot)
                return True
        return False
