"""Where the API finds adapters: resolve an id (for a tenant) to an AdapterRef with host-side deltas.

Two sources behind one interface: a fixed set loaded at start (`--adapters DIR` without Redis, and tests) and
the Redis registry (store.py). Resolution happens on the event loop before a request reaches the
engine, so a cold fetch never stalls the batch. Per replica, two caches sit in front of Redis:
- `RecordCache`: id -> the adapter's record (version, owner, manifest), so that a request costs no Redis round
  trip; kept only while the registry's events reach this replica (see its docstring for why it is never stale
  for longer than an event's delivery);
- `HostTier`: adapter@version -> fetched deltas (LRU, bytes budget); concurrent requests for the same cold
  adapter share one fetch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from adapters.artifact import adapter_from_bytes
from adapters.delta import AdapterDeltas
from adapters.errors import ArtifactError
from adapters.spec import fingerprint
from server.engine.errors import InvalidAdapterError, UnknownAdapterError
from server.engine.request import AdapterRef
from server.registry.store import (AdapterRecord, RegistryUnavailableError, is_adapter_id, is_redis_outage,
                                   outage_is_unavailable)
from server.registry.visibility import visible

log = logging.getLogger(__name__)

DEFAULT_RECORD_TTL_S = 10.0  # the longest a cached record lives: the bound on staleness if events stop unnoticed
RESUBSCRIBE_DELAY_S = (0.5, 10.0)  # the first and the longest wait before subscribing to events again


class StaticAdapters:
    """A fixed set of adapters, all public, version 1."""

    def __init__(self, adapters: dict[str, AdapterDeltas]) -> None:
        self.adapters = adapters

    async def list(self, tenant: str | None = None) -> list[str]:
        return sorted(self.adapters)

    async def resolve(self, adapter_id: str, tenant: str | None = None) -> AdapterRef:
        if adapter_id not in self.adapters:
            raise UnknownAdapterError(f"adapter {adapter_id!r} does not exist")
        return AdapterRef(adapter_id, 1, self.adapters[adapter_id])


class HostTier:
    """LRU of fetched adapters ((deltas, prepared image) keyed by adapter@version), bounded in bytes; one fetch per
    key at a time."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, AdapterDeltas] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self.hits = self.misses = 0

    async def get(self, key: str, fetch) -> tuple[AdapterDeltas, object]:
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        if key in self._inflight:
            return await asyncio.shield(self._inflight[key])
        self.misses += 1
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            deltas = await fetch()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(deltas)
        self._entries[key] = deltas
        self._shrink()
        return deltas

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def drop(self, adapter_id: str) -> None:
        for key in [k for k in self._entries if k.rsplit("@", 1)[0] == adapter_id]:
            del self._entries[key]

    def _shrink(self) -> None:
        total = sum(_nbytes(e) for e in self._entries.values())
        while total > self.budget_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            total -= _nbytes(old)


class RecordCache:
    """adapter id -> its current registry record (None: no such adapter), for one replica. Correct because:
    - it serves only while this replica is subscribed to the registry's events (`connected` .. `lost`); an event
      (or this replica's own change) invalidates its id, and every (re)subscription starts from empty, since
      events published while unsubscribed are lost;
    - a record read from Redis is stored only if nothing was invalidated since the read started, so a read that
      raced a change cannot put back the old record after the change's event was handled;
    - an entry lives at most `ttl_s`, the bound on staleness should the subscription die without anyone noticing.
    It is keyed by id alone: the caller checks the tenant's access on the record at every request."""

    def __init__(self, ttl_s: float = DEFAULT_RECORD_TTL_S, max_entries: int = 100_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self.is_live = False
        self._entries: dict[str, tuple[object | None, float]] = {}  # id -> (record or None, read start)
        self.generation = 0  # bumped by every invalidation: reads that started before it are not stored
        self.hits = self.misses = 0

    def get(self, adapter_id: str) -> tuple[bool, object | None]:
        """-> (found, record): found False means "read it from Redis"."""
        entry = self._entries.get(adapter_id) if self.is_live else None
        if entry is None or time.monotonic() - entry[1] > self.ttl_s:
            self.misses += 1
            return False, None
        self.hits += 1
        return True, entry[0]

    def store(self, adapter_id: str, record: object | None, generation: int, read_start: float) -> None:
        """Keep what a read that started at `read_start`, at `generation`, returned (unless outdated since)."""
        if not self.is_live or generation != self.generation:
            return
        if adapter_id not in self._entries and len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest stored
        self._entries[adapter_id] = (record, read_start)

    def invalidate(self, adapter_id: str) -> None:
        self.generation += 1
        self._entries.pop(adapter_id, None)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()

    def connected(self) -> None:
        """Subscribed to the events (confirmed by Redis): serve from now on, starting empty."""
        self.clear()
        self.is_live = True

    def lost(self) -> None:
        """Not subscribed (any more): nothing cached can be trusted; every request reads Redis."""
        self.is_live = False
        self.clear()

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._entries), "is_live": self.is_live}


class RegistryAdapters:
    """Adapters from the Redis registry. A request resolves its adapter's record from the RecordCache (one Redis
    read per adapter while the events subscription holds, concurrent misses sharing it) and its weights from the
    host tier (fetched once per version, parsed off the event loop). A replica sees its own replacements and
    deletes at once (`forget`, from the admin routes) and other replicas' within the event's delivery
    (`follow_events`, a lifespan task). While Redis is away, adapters already in the host tier are still served
    at the version last read."""

    def __init__(self, registry, spec: dict, host: HostTier, fits=lambda deltas: True, prepare=None, *,
                 record_ttl_s: float = DEFAULT_RECORD_TTL_S) -> None:
        """`fits(deltas)`: whether the device pool can ever hold it; `prepare(deltas)`: the pool's host-side image
        of it, made in the fetch thread so that the engine thread only copies it to the device."""
        self.registry, self.spec, self.host, self.fits, self.prepare = registry, spec, host, fits, prepare
        self.fingerprint = fingerprint(spec)
        self.records = RecordCache(record_ttl_s)
        self.known: dict[str, object] = {}  # adapter id -> the last record read: serves while Redis is away
        self._reads: dict[tuple[str, int], asyncio.Task] = {}  # (id, cache generation) -> the read in progress
        self.num_subscriptions = 0  # to the registry's events, since start

    async def list(self, tenant: str | None = None) -> list[str]:
        """The adapters `tenant` may use on this backbone: a registry shared with replicas of another backbone holds
        theirs too, which this replica cannot serve."""
        return sorted(r.adapter_id for r in await self._call(self.registry.list())
                      if visible(r, tenant) and self._for_this_backbone(r))

    async def resolve(self, adapter_id: str, tenant: str | None = None) -> AdapterRef:
        if not is_adapter_id(adapter_id):  # refused before the record cache or Redis sees it
            raise UnknownAdapterError(f"adapter {adapter_id!r} does not exist")
        try:
            record = await self._record(adapter_id)
        except RegistryUnavailableError:
            record = self.known.get(adapter_id)  # registry away: the version this replica last saw, if cached
            if record is None or f"{adapter_id}@{record.version}" not in self.host:
                raise
            log.warning("registry unavailable: serving adapter %s from the host cache", adapter_id)
        if record is None or not visible(record, tenant):  # checked per request, on whichever record
            raise UnknownAdapterError(f"adapter {adapter_id!r} does not exist")
        if not self._for_this_backbone(record):  # refused from the record, before its weights are fetched
            theirs = str(record.manifest["base"]["fingerprint"])[:80]
            raise InvalidAdapterError(f"adapter {adapter_id!r} version {record.version} was made for another "
                                      f"backbone ({theirs}); this server's is {self.fingerprint}")
        key = f"{adapter_id}@{record.version}"

        async def fetch() -> tuple[AdapterDeltas, object]:
            blob = await self._call(self.registry.read_blob(record))
            if blob is None:  # deleted or replaced between the two reads
                raise UnknownAdapterError(f"adapter {adapter_id!r} does not exist")
            return await asyncio.to_thread(self._parse, record, blob)

        deltas, prepared = await self.host.get(key, fetch)
        if not self.fits(deltas):
            raise InvalidAdapterError(f"adapter {adapter_id!r} is larger than the device adapter pool")
        return AdapterRef(adapter_id, record.version, deltas, prepared)

    async def _record(self, adapter_id: str):
        """The current record (None: no such adapter), from the cache or one read shared by concurrent misses."""
        found, record = self.records.get(adapter_id)
        if found:
            return record
        key = (adapter_id, self.records.generation)
        read = self._reads.get(key)
        if read is None:  # its own task: a caller that goes away does not cancel the others' read
            read = self._reads[key] = asyncio.ensure_future(self._read_record(adapter_id, key[1]))

            def done(task: asyncio.Task) -> None:
                self._reads.pop(key, None)
                if not task.cancelled():
                    task.exception()  # retrieved: every waiter re-raises it, and none may be left

            read.add_done_callback(done)
        return await asyncio.shield(read)

    async def _read_record(self, adapter_id: str, generation: int):
        start = time.monotonic()
        record = await self._call(self.registry.record(adapter_id))
        self.records.store(adapter_id, record, generation, start)
        if record is None:
            self.known.pop(adapter_id, None)
        else:
            self.known[adapter_id] = record
        return record

    def _parse(self, record: AdapterRecord, blob: bytes) -> tuple[AdapterDeltas, object]:
        """The stored adapter as deltas; InvalidAdapterError (422) when this replica's backbone cannot serve it
        (a registry shared with replicas of another backbone, or a record written before today's checks)."""
        try:
            deltas = adapter_from_bytes(record.manifest, blob, self.spec).deltas
        except ArtifactError as exc:
            raise InvalidAdapterError(f"adapter {record.adapter_id!r} version {record.version} cannot be served by "
                                      f"this server's backbone: {exc}") from None
        return deltas, (self.prepare(deltas) if self.prepare else None)

    def _for_this_backbone(self, record: AdapterRecord) -> bool:
        """False when the record's manifest names another backbone's fingerprint (one naming none may still fit:
        `_parse` checks its shapes)."""
        base = record.manifest.get("base")
        return not isinstance(base, dict) or base.get("fingerprint") in (None, self.fingerprint)

    def forget(self, adapter_id: str) -> None:
        """The adapter was replaced or deleted: the next request reads its record again."""
        self.records.invalidate(adapter_id)
        self.host.drop(adapter_id)
        self.known.pop(adapter_id, None)

    async def follow_events(self) -> None:
        """Lifespan task: forget adapters replaced or deleted on any replica, as their events arrive. The record
        cache serves only while subscribed; a lost subscription is retried with exponential backoff."""
        first_delay, max_delay = RESUBSCRIBE_DELAY_S
        delay = first_delay
        while True:
            num_before = self.num_subscriptions
            try:
                await self._follow_subscription()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never let the follower die: Redis away, or a bug
                if self.num_subscriptions > num_before:  # it had subscribed: a new outage starts the backoff over
                    delay = first_delay
                if is_redis_outage(exc):
                    log.warning("registry events: subscription lost (%s); reading adapter records from Redis per "
                                "request; subscribing again in %.1fs", exc, delay)
                else:
                    log.exception("registry events: the follower failed; subscribing again in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)

    async def _follow_subscription(self) -> None:
        """Subscribe, then apply events until the subscription fails (it raises); the cache serves only meanwhile."""
        async with self.registry.subscribe() as events:
            self.records.connected()
            self.num_subscriptions += 1
            if self.num_subscriptions > 1:
                log.info("registry events: subscribed again; adapter records are cached again")
            try:
                async for event in events:
                    if event.adapter_id:
                        self.forget(event.adapter_id)
                    else:  # RESYNC: re-subscribed under us, events may have been missed
                        self.records.clear()
            finally:
                self.records.lost()

    def stats(self) -> dict:
        return {"records": self.records.stats(), "num_event_subscriptions": self.num_subscriptions}

    @staticmethod
    async def _call(awaitable):
        """Registry outages are RegistryUnavailableError (retry later), never a bare Redis exception."""
        with outage_is_unavailable():
            return await awaitable


def _nbytes(entry: tuple[AdapterDeltas, object]) -> int:
    deltas, prepared = entry
    image = getattr(prepared, "image", None)
    return deltas.nbytes() + (image.numel() * image.element_size() if image is not None else 0)
