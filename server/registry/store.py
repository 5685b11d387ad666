"""The adapter registry: adapters (a format-1 manifest + the adapter.safetensors bytes) in Redis, shared by every
replica, with an event on every change.

Settings (server/config.py): `REDIS_URL` (a shared Redis; unset: server/registry/embedded.py under
`MULTIPLEX_DATA_DIR`), `MULTIPLEX_REDIS_CHUNK_BYTES` (default 8 MiB; a Redis value holds at most 512 MB), and the
client's connection pool: `MULTIPLEX_REDIS_MAX_CONNECTIONS` (default 64 per replica) and
`MULTIPLEX_REDIS_POOL_TIMEOUT_S` (default 5 s). The pool blocks: a command that finds every connection busy waits
for one (up to the timeout) instead of failing, so a burst of requests is served, only later.

Keys (prefix `mpx`):
| key                              | type   | holds                                                                |
| mpx:adapter:{id}                 | hash   | manifest (JSON), version, size, sha256, created, tenant, public, chunks |
| mpx:adapter:{id}:blob:{version}  | list   | the weights of that version, in chunks                                |
| mpx:adapters                     | zset   | id -> time of its last write (the index)                              |
| mpx:versions                     | hash   | id -> last version issued; kept after a delete, so versions never repeat |
| mpx:events                       | pubsub | {"type": "put" or "delete", "id", "version"}                          |

A write is visible only once whole: the blob chunks are written first (with a TTL, so a crashed upload cleans up
after itself), then one MULTI/EXEC stores the manifest, makes the blob permanent, updates the index, gives the
previous version's blob a grace TTL (replicas still reading it can finish) and publishes the event. A reader that
finds a manifest therefore finds its blob, and `get` checks the blob's size and sha256 before returning it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_MAX_CONNECTIONS = 64  # per replica: the event subscription holds one, every command borrows one briefly
DEFAULT_POOL_TIMEOUT_S = 5.0  # how long a command waits for a free connection before failing (-> 503)
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
_MAX_READ_BYTES = 64 << 20  # most bytes one LRANGE reply carries when reading a blob


class RegistryError(Exception):
    """Something the registry cannot do; subclasses say why."""


class AdapterNotFoundError(RegistryError):
    pass


class AdapterExistsError(RegistryError):
    pass


class CorruptAdapterError(RegistryError):
    """What Redis holds for an adapter is not what was written (sha256 or size mismatch, missing chunks)."""


class RegistryUnavailableError(RegistryError):
    """Redis cannot be reached (or did not answer in time); retrying later can succeed."""


def is_redis_outage(exc: BaseException) -> bool:
    """Is `exc` Redis being away (as opposed to a bug or a refusal)?"""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))


@contextlib.contextmanager
def outage_is_unavailable(what: str = "the adapter registry (Redis) is unavailable") -> Iterator[None]:
    """Redis outages inside the block -> RegistryUnavailableError (`what`: the message's start); the registry's own
    errors pass through. Works around `await`s: `with outage_is_unavailable(): await registry.list()`."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as exc:
        if is_redis_outage(exc):
            raise RegistryUnavailableError(f"{what}: {exc}; retry later") from exc
        raise


def is_adapter_id(adapter_id: object) -> bool:
    """Whether `adapter_id` may name an adapter. Reads check it before any key is built from it: an id with a ':'
    would name another key of the registry (`a:blob:1` is adapter a's weights), and what Redis answers for that key
    would tell a caller whether a version of someone else's adapter exists."""
    return isinstance(adapter_id, str) and bool(ID_PATTERN.fullmatch(adapter_id)) and set(adapter_id) != {"."}


def check_adapter_id(adapter_id: str) -> str:
    if not is_adapter_id(adapter_id):
        raise ValueError(f"invalid adapter id {adapter_id!r}: use 1-128 of A-Z a-z 0-9 . _ - (not only dots)")
    return adapter_id


@dataclass(frozen=True)
class AdapterRecord:
    """One stored version of an adapter, without its weights."""

    adapter_id: str
    version: int
    manifest: dict
    size: int  # bytes of the weights blob
    sha256: str  # hex digest of the weights blob
    created: float  # unix time this version was written
    tenant: str | None  # the owner; None: not owned by a tenant
    public: bool
    num_chunks: int

    def to_json(self) -> dict[str, Any]:
        created = datetime.fromtimestamp(self.created, timezone.utc).isoformat(timespec="seconds")
        return {"id": self.adapter_id, "version": self.version, "size": self.size, "sha256": self.sha256,
                "created": created, "tenant": self.tenant, "public": self.public, "manifest": self.manifest}

    def _fields(self) -> dict[str, str]:
        return {"manifest": json.dumps(self.manifest, sort_keys=True), "version": str(self.version),
                "size": str(self.size), "sha256": self.sha256, "created": repr(self.created),
                "tenant": self.tenant or "", "public": "1" if self.public else "0", "chunks": str(self.num_chunks)}

    @classmethod
    def _from_fields(cls, adapter_id: str, raw: dict[bytes, bytes]) -> AdapterRecord:
        f = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            return cls(adapter_id, int(f["version"]), json.loads(f["manifest"]), int(f["size"]), f["sha256"],
                       float(f["created"]), f.get("tenant") or None, f.get("public") == "1", int(f["chunks"]))
        except (KeyError, ValueError) as e:
            raise CorruptAdapterError(f"adapter {adapter_id!r}: malformed registry entry ({e!r})") from None


@dataclass(frozen=True)
class RegistryEvent:
    kind: str  # "put" | "delete"; "resync" (RESYNC, never published): events may have been missed
    adapter_id: str
    version: int

    def to_json(self) -> str:
        return json.dumps({"type": self.kind, "id": self.adapter_id, "version": self.version})

    @classmethod
    def from_json(cls, data: bytes | str) -> RegistryEvent:
        value = json.loads(data)
        return cls(str(value["type"]), str(value["id"]), int(value["version"]))


RESYNC = RegistryEvent("resync", "", 0)


class Registry:
    """Adapters in Redis (see the module docstring for the keys and the write protocol). Async; one per process."""

    def __init__(self, client: aioredis.Redis, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 old_blob_ttl_s: int = 3600, pending_blob_ttl_s: int = 3600, prefix: str = "mpx") -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.client = client
        self.chunk_bytes = chunk_bytes
        self.old_blob_ttl_s = old_blob_ttl_s
        self.pending_blob_ttl_s = pending_blob_ttl_s
        self.prefix = prefix
        self.index_key, self.versions_key = f"{prefix}:adapters", f"{prefix}:versions"
        self.events_channel = f"{prefix}:events"

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S, **kwargs: Any) -> Registry:
        """A client on a blocking pool of `max_connections` (a command waits up to `pool_timeout_s` for a free one).
        A command that loses its connection reconnects and is retried with exponential backoff; few, short retries:
        with Redis away, callers learn it in well under a second (503), while the readiness probe and the event
        follower keep reconnecting on their own schedule."""
        if max_connections < 2:
            raise ValueError(f"max_connections must be >= 2 (the event subscription holds one), got {max_connections}")
        retry = AsyncRetry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries=2)
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout_s, socket_connect_timeout=5,
            socket_timeout=60, health_check_interval=30, retry=retry)
        return cls(aioredis.Redis.from_pool(pool), **kwargs)

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    def meta_key(self, adapter_id: str) -> str:
        return f"{self.prefix}:adapter:{adapter_id}"

    def blob_key(self, adapter_id: str, version: int) -> str:
        return f"{self.prefix}:adapter:{adapter_id}:blob:{version}"

    # ---- write ---------------------------------------------------------------------------------------------------
    async def put(self, adapter_id: str, manifest: dict, blob: bytes, *, tenant: str | None = None,
                  public: bool = False, replace: bool = False) -> AdapterRecord:
        """Store a new version; AdapterExistsError if the id exists and not `replace`. Publishes a `put` event."""
        check_adapter_id(adapter_id)
        if not replace and await self.client.exists(self.meta_key(adapter_id)):
            raise AdapterExistsError(f"adapter {adapter_id!r} already exists (replace it to upload a new version)")
        version = int(await self.client.hincrby(self.versions_key, adapter_id, 1))
        num_chunks = max(1, -(-len(blob) // self.chunk_bytes))
        record = AdapterRecord(adapter_id, version, manifest, len(blob), hashlib.sha256(blob).hexdigest(),
                               time.time(), tenant, public, num_chunks)
        blob_key = self.blob_key(adapter_id, version)
        try:
            await self._write_blob(blob_key, blob)
            await self._commit(record, replace=replace)
        except BaseException:
            try:  # best effort: were this process to die here, the pending TTL would remove the chunks
                await self.client.delete(blob_key)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not remove the chunks of %s after a failed write", blob_key)
            raise
        log.info("adapter %s: stored version %d (%d bytes)", adapter_id, version, len(blob))
        return record

    async def _write_blob(self, key: str, blob: bytes) -> None:
        """The chunks, in order, under a TTL that `_commit` removes (one chunk per command: bounded buffers)."""
        await self.client.delete(key)
        for start in range(0, max(len(blob), 1), self.chunk_bytes):
            await self.client.rpush(key, blob[start:start + self.chunk_bytes])
            if start == 0:
                await self.client.expire(key, self.pending_blob_ttl_s)

    async def _commit(self, record: AdapterRecord, *, replace: bool) -> None:
        """Manifest + index + event in one transaction, retried if another writer touched the id meanwhile."""
        meta, blob_key = self.meta_key(record.adapter_id), self.blob_key(record.adapter_id, record.version)
        event = RegistryEvent("put", record.adapter_id, record.version)
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(meta, blob_key)
                    if await pipe.llen(blob_key) != record.num_chunks:
                        raise RegistryError(f"adapter {record.adapter_id!r}: its chunks vanished before the commit")
                    current = await pipe.hget(meta, "version")
                    if current is not None and not replace:
                        raise AdapterExistsError(f"adapter {record.adapter_id!r} already exists "
                                                 "(replace it to upload a new version)")
                    if current is not None and int(current) >= record.version:
                        raise RegistryError(f"adapter {record.adapter_id!r}: version {int(current)} was written "
                                            f"while version {record.version} was uploading; retry")
                    pipe.multi()
                    pipe.hset(meta, mapping=record._fields())
                    pipe.persist(blob_key)
                    pipe.zadd(self.index_key, {record.adapter_id: record.created})
                    if current is not None:
                        pipe.expire(self.blob_key(record.adapter_id, int(current)), self.old_blob_ttl_s)
                    pipe.publish(self.events_channel, event.to_json())
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    async def delete(self, adapter_id: str) -> int:
        """Remove the manifest, the index entry and the blobs; publish a `delete` event. -> the deleted version."""
        if not is_adapter_id(adapter_id):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        meta = self.meta_key(adapter_id)
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(meta)
                    current = await pipe.hget(meta, "version")
                    if current is None:
                        raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
                    version = int(current)
                    pipe.multi()
                    pipe.delete(meta, self.blob_key(adapter_id, version))
                    pipe.zrem(self.index_key, adapter_id)
                    pipe.publish(self.events_channel, RegistryEvent("delete", adapter_id, version).to_json())
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        # Older versions still in their grace TTL go too; newer ones belong to an upload that started after this.
        prefix = f"{self.meta_key(adapter_id)}:blob:"
        async for key in self.client.scan_iter(match=f"{prefix}*", count=100):
            if key.decode()[len(prefix):].isdigit() and int(key.decode()[len(prefix):]) < version:
                await self.client.delete(key)
        log.info("adapter %s: deleted (version %d)", adapter_id, version)
        return version

    # ---- read ----------------------------------------------------------------------------------------------------
    async def record(self, adapter_id: str) -> AdapterRecord | None:
        if not is_adapter_id(adapter_id):
            return None  # no adapter has such an id (and no key is built from it: see is_adapter_id)
        raw = await self.client.hgetall(self.meta_key(adapter_id))
        return AdapterRecord._from_fields(adapter_id, raw) if raw else None

    async def exists(self, adapter_id: str) -> bool:
        if not is_adapter_id(adapter_id):
            return False
        return bool(await self.client.exists(self.meta_key(adapter_id)))

    async def get(self, adapter_id: str) -> tuple[dict, int, bytes]:
        """-> (manifest, version, weights) of the current version, the weights' size and sha256 checked."""
        for _ in range(3):  # a replace or delete may land between reading the manifest and its blob
            record = await self.record(adapter_id)
            if record is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
            blob = await self.read_blob(record)
            if blob is not None:
                return record.manifest, record.version, blob
        raise CorruptAdapterError(f"adapter {adapter_id!r} version {record.version}: the manifest is stored but its "
                                  "weights are missing")

    async def read_blob(self, record: AdapterRecord) -> bytes | None:
        """The weights of `record`'s version (checked), or None once they are gone (replaced past grace, deleted)."""
        key = self.blob_key(record.adapter_id, record.version)
        per_read = max(1, _MAX_READ_BYTES // self.chunk_bytes)
        chunks: list[bytes] = []
        while len(chunks) < record.num_chunks:
            part = await self.client.lrange(key, len(chunks), len(chunks) + per_read - 1)
            if not part:
                break
            chunks += part
        if not chunks:
            return None
        blob = b"".join(chunks)
        where = f"adapter {record.adapter_id!r} version {record.version}"
        if len(chunks) != record.num_chunks or len(blob) != record.size:
            raise CorruptAdapterError(f"{where}: read {len(chunks)} chunks, {len(blob)} bytes; the manifest says "
                                      f"{record.num_chunks} chunks, {record.size} bytes")
        digest = hashlib.sha256(blob).hexdigest()
        if digest != record.sha256:
            raise CorruptAdapterError(f"{where}: sha256 mismatch (manifest {record.sha256}, read {digest}); "
                                      "the weights in Redis are corrupt")
        return blob

    async def list(self) -> list[AdapterRecord]:
        """Every adapter's current record, by id."""
        ids = sorted(i.decode() for i in await self.client.zrange(self.index_key, 0, -1))
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in ids:
                pipe.hgetall(self.meta_key(adapter_id))
            raws = await pipe.execute()
        return [AdapterRecord._from_fields(i, raw) for i, raw in zip(ids, raws) if raw]

    async def versions(self) -> dict[str, int]:
        """id -> current version of every adapter: what a replica that missed events reconciles its cache with."""
        return {r.adapter_id: r.version for r in await self.list()}

    def subscribe(self) -> Subscription:
        """`async with registry.subscribe() as events: async for event in events: ...` (subscribed on entry)."""
        return Subscription(self.client, self.events_channel)


class Subscription:
    """The registry's events as an async iterator, subscribed once Redis confirms it (so that every event published
    after `start` returns is delivered).

    redis-py reconnects a dropped subscription by itself and subscribes again; events published in between are lost
    (pub/sub keeps no history), so that re-subscription is yielded as RESYNC: drop whatever was derived from
    earlier events. A connection that cannot be re-established raises: reconnect, and treat it the same way."""

    def __init__(self, client: aioredis.Redis, channel: str, *, confirm_timeout_s: float = 10.0) -> None:
        self.client, self.channel, self.confirm_timeout_s = client, channel, confirm_timeout_s
        self._pubsub: Any = None

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._pubsub is not None:
            return
        self._pubsub = self.client.pubsub()
        try:
            await self._pubsub.subscribe(self.channel)
            deadline = time.monotonic() + self.confirm_timeout_s
            while (left := deadline - time.monotonic()) > 0:
                message = await self._pubsub.get_message(timeout=left)
                if message is not None and message.get("type") == "subscribe":
                    return
            raise RedisTimeoutError(f"redis did not confirm the subscription to {self.channel}")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            try:
                await pubsub.aclose()
            except Exception as exc:  # noqa: BLE001 - a broken connection is what is being closed
                log.debug("closing the event subscription: %s", exc)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> RegistryEvent:
        while True:
            event = await self.next(timeout=1.0)
            if event is not None:
                return event

    async def next(self, timeout: float) -> RegistryEvent | None:
        """The next event (or RESYNC), or None if none arrives within `timeout` seconds."""
        await self.start()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = await self._pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message.get("type") == "subscribe":  # subscribed again after a reconnect: events may be lost
                log.warning("registry events: the subscription was re-established; events meanwhile are lost")
                return RESYNC
            if message.get("type") != "message":
                continue
            try:
                return RegistryEvent.from_json(message["data"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed registry event: %r", message["data"])
        return None
