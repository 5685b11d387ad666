"""Where the API finds adapters: resolve an id (for a tenant) to an AdapterRef with host-side deltas.

Two sources behind one interface: a fixed set loaded at start (`--adapters DIR` without Redis, and tests) and
the Redis registry (server/registry.py). Resolution happens on the event loop before a request reaches the
engine, so a cold fetch never stalls the batch; fetched deltas are kept in a host tier (LRU, bytes budget),
and concurrent requests for the same cold adapter share one fetch.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from adapters.delta import AdapterDeltas
from server.engine.errors import EngineOverloadedError, InvalidAdapterError, UnknownAdapterError
from server.engine.request import AdapterRef

log = logging.getLogger(__name__)


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


class RegistryAdapters:
    """Adapters from the Redis registry: every request reads the adapter's current record (one round trip), so
    every replica sees uploads, replacements and deletes at once; the weights of a version are fetched once
    into the host tier and parsed off the event loop."""

    def __init__(self, registry, spec: dict, host: HostTier, fits=lambda deltas: True, prepare=None) -> None:
        """`fits(deltas)`: whether the device pool can ever hold it; `prepare(deltas)`: the pool's host-side image
        of it, made in the fetch thread so that the engine thread only copies it to the device."""
        self.registry, self.spec, self.host, self.fits, self.prepare = registry, spec, host, fits, prepare
        self.known: dict[str, object] = {}  # adapter id -> the last record read: serves while Redis is away

    async def list(self, tenant: str | None = None) -> list[str]:
        from server.auth import visible

        return sorted(r.adapter_id for r in await self._call(self.registry.list()) if visible(r, tenant))

    async def resolve(self, adapter_id: str, tenant: str | None = None) -> AdapterRef:
        from server.auth import visible

        try:
            record = await self._call(self.registry.record(adapter_id))
        except EngineOverloadedError:
            record = self.known.get(adapter_id)  # registry away: the version this replica last saw, if cached
            if record is None or f"{adapter_id}@{record.version}" not in self.host:
                raise
            log.warning("registry unavailable: serving adapter %s from the host cache", adapter_id)
        else:
            if record is None:
                self.known.pop(adapter_id, None)
            else:
                self.known[adapter_id] = record
        if record is None or not visible(record, tenant):
            raise UnknownAdapterError(f"adapter {adapter_id!r} does not exist")
        key = f"{adapter_id}@{record.version}"

        async def fetch() -> tuple[AdapterDeltas, object]:
            blob = await self._call(self.registry.read_blob(record))
            if blob is None:  # deleted or replaced between the two reads
                raise UnknownAdapterError(f"adapter {adapter_id!r} does not exist")
            return await asyncio.to_thread(self._parse, record.manifest, blob)

        deltas, prepared = await self.host.get(key, fetch)
        if not self.fits(deltas):
            raise InvalidAdapterError(f"adapter {adapter_id!r} is larger than the device adapter pool")
        return AdapterRef(adapter_id, record.version, deltas, prepared)

    def _parse(self, manifest: dict, blob: bytes) -> tuple[AdapterDeltas, object]:
        from adapters.artifact import adapter_from_bytes

        deltas = adapter_from_bytes(manifest, blob, self.spec).deltas
        return deltas, (self.prepare(deltas) if self.prepare else None)

    def forget(self, adapter_id: str) -> None:
        self.host.drop(adapter_id)
        self.known.pop(adapter_id, None)

    @staticmethod
    async def _call(awaitable):
        """Registry outages answer 503 (retry later), never 500."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise EngineOverloadedError(f"adapter registry unavailable: {exc}") from exc


def _nbytes(entry: tuple[AdapterDeltas, object]) -> int:
    deltas, prepared = entry
    image = getattr(prepared, "image", None)
    return deltas.nbytes() + (image.numel() * image.element_size() if image is not None else 0)
