"""The per-replica cache of adapter records (server/registry/adapters.py) against a real Redis: two replicas
(RegistryAdapters, each following the registry's events) on one Redis. A replica reads a record once, not once per
request; a replace or delete is seen at once by the replica that made it and within the event's delivery by the
other; visibility is checked on every request from the cached record; a subscription that drops clears the cache,
and a bounded TTL covers a drop nobody noticed."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis

from adapters.artifact import adapter_to_bytes, load_adapter, save_artifact
from server.registry.adapters import HostTier, RegistryAdapters
from server.registry.embedded import start_embedded_redis
from server.engine.errors import UnknownAdapterError
from server.registry.store import Registry
from tests.archives import SPEC, lora_deltas


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with start_embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def url(redis_url):
    redis.Redis.from_url(redis_url).flushall()
    return redis_url


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[dict, bytes]:
    directory = save_artifact(tmp_path_factory.mktemp("art") / "a", lora_deltas(seed=1), method="lora", spec=SPEC)
    return adapter_to_bytes(load_adapter(directory, SPEC))


class Replica:
    """One replica's adapter source on its own Redis client, following events; counts its record reads."""

    def __init__(self, url: str, **kwargs) -> None:
        self.registry = Registry.from_url(url)
        self.source = RegistryAdapters(self.registry, SPEC, HostTier(1 << 30), **kwargs)
        self.num_reads = 0
        read = self.registry.record

        async def counting_read(adapter_id):
            self.num_reads += 1
            return await read(adapter_id)

        self.registry.record = counting_read
        self.task: asyncio.Task | None = None

    async def start(self) -> Replica:
        self.task = asyncio.create_task(self.source.follow_events())
        await _until(lambda: self.source.records.is_live, "the replica never subscribed to events")
        return self

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.registry.close()

    async def version(self, adapter_id: str, tenant: str | None = None) -> int | None:
        """The version this replica serves `tenant`, None when it answers 'does not exist'."""
        try:
            return (await self.source.resolve(adapter_id, tenant)).version
        except UnknownAdapterError:
            return None


async def _until(condition, message: str, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (await condition() if asyncio.iscoroutinefunction(condition) else condition()):
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.01)


async def _eventually(replica: Replica, adapter_id: str, tenant: str | None, expected, timeout_s: float = 2.0):
    async def seen():
        return await replica.version(adapter_id, tenant) == expected

    await _until(seen, f"{adapter_id!r} for {tenant!r}: not {expected} within {timeout_s}s", timeout_s)


@contextlib.asynccontextmanager
async def replicas(url: str, n: int = 2, **kwargs):
    started = [await Replica(url, **kwargs).start() for _ in range(n)]
    try:
        yield started
    finally:
        for replica in started:
            await replica.close()


def test_one_read_per_adapter_not_per_request(url, adapter):
    async def scenario():
        async with replicas(url, 1) as (a,):
            await a.registry.put("x", *adapter, public=True)
            results = await asyncio.gather(*(a.version("x") for _ in range(20)))  # concurrent: one read
            assert results == [1] * 20 and a.num_reads == 1
            for _ in range(10):
                assert await a.version("x") == 1
            assert await a.version("nope") is None and await a.version("nope") is None
            assert a.num_reads == 2  # "does not exist" is cached too (a put event invalidates it)

    asyncio.run(scenario())


def test_an_id_naming_another_registry_key_is_unknown_without_a_read(url, adapter):
    """`x:blob:1` would be adapter x's weights key: refused as unknown before Redis (or the cache) sees it, the same
    answer whether x has that version or not (a 500 for one and a 404 for the other told tenants what exists)."""
    async def scenario():
        async with replicas(url, 1) as (a,):
            await a.registry.put("x", *adapter, tenant="alpha")
            for bad in ("x:blob:1", "x:blob:2", "nope:blob:1", "x:", "x*", "x" * 129):
                assert await a.version(bad, "beta") is None and await a.version(bad, "alpha") is None
            assert a.num_reads == 0 and await a.version("x", "alpha") == 1

    asyncio.run(scenario())


def test_replace_and_delete_seen_at_once_here_and_via_events_there(url, adapter):
    async def scenario():
        async with replicas(url, 2, record_ttl_s=3600) as (a, b):  # a TTL that cannot be what refreshes them
            await a.registry.put("x", *adapter, tenant="alpha")
            assert await a.version("x", "alpha") == 1 and await b.version("x", "alpha") == 1
            assert await b.version("x", "beta") is None  # visibility is checked on the cached record
            reads = b.num_reads
            # Replaced through a, now owned by beta: a knows at once (the admin route's on_change), b by the event.
            await a.registry.put("x", *adapter, tenant="beta", replace=True)
            a.source.forget("x")
            assert await a.version("x", "beta") == 2 and await a.version("x", "alpha") is None
            await _eventually(b, "x", "beta", 2)
            assert await b.version("x", "alpha") is None  # never v1 to alpha after the event, nor v2 to alpha
            assert b.num_reads > reads
            await a.registry.delete("x")
            a.source.forget("x")
            assert await a.version("x", "beta") is None
            await _eventually(b, "x", "beta", None)
            # An id first asked for while missing, then uploaded elsewhere: the cached "missing" goes with the event.
            assert await b.version("late") is None
            await a.registry.put("late", *adapter, public=True)
            await _eventually(b, "late", None, 1)

    asyncio.run(scenario())


def _change_without_event(url: str, adapter_id: str, tenant: str) -> None:
    """Rewrite an adapter's owner in Redis with no event: what a replica sees when it misses one."""
    redis.Redis.from_url(url).hset(f"mpx:adapter:{adapter_id}", mapping={"tenant": tenant, "public": "0"})


def test_subscription_drop_clears_the_cache(url, adapter):
    async def scenario():
        async with replicas(url, 1, record_ttl_s=3600) as (b,):
            await b.registry.put("x", *adapter, public=True)
            assert await b.version("x", "alpha") == 1
            _change_without_event(url, "x", "gamma")
            assert await b.version("x", "alpha") == 1  # cached: no event said otherwise
            redis.Redis.from_url(url).client_kill_filter(_type="pubsub")  # the subscription drops
            await _eventually(b, "x", "alpha", None)  # events may have been lost: the cache was cleared
            await _until(lambda: b.source.records.is_live, "the subscription did not come back")
            assert await b.version("x", "gamma") == 1

    asyncio.run(scenario())


def test_ttl_bounds_a_silent_miss(url, adapter):
    async def scenario():
        async with replicas(url, 1, record_ttl_s=0.3) as (b,):
            await b.registry.put("x", *adapter, public=True)
            assert await b.version("x", "alpha") == 1
            _change_without_event(url, "x", "gamma")
            await _eventually(b, "x", "alpha", None, timeout_s=2.0)

    asyncio.run(scenario())


def test_without_events_every_request_reads_redis(url, adapter):
    """No follower (or one that is not subscribed yet): nothing is cached, so nothing can be stale."""
    async def scenario():
        replica = Replica(url)
        try:
            await replica.registry.put("x", *adapter, public=True)
            for _ in range(3):
                assert await replica.version("x") == 1
            assert replica.num_reads == 3
        finally:
            await replica.close()

    asyncio.run(scenario())


def test_another_backbones_adapter_is_not_listed_and_refused_without_fetching_its_weights(url, adapter, tmp_path):
    """One Redis shared by replicas of two backbones (same module shapes, another vocabulary: another
    fingerprint). Each lists only the adapters made for its own backbone; asked for the other's, it refuses it by
    name from the record (422), its weights never read."""
    from server.engine.errors import InvalidAdapterError

    other_spec = SPEC | {"vocab_size": 256}
    directory = save_artifact(tmp_path / "b", lora_deltas(seed=2), method="lora", spec=other_spec)
    theirs = adapter_to_bytes(load_adapter(directory, other_spec))

    async def scenario():
        async with replicas(url, 1) as (ours,):
            other = Replica(url)
            other.source = RegistryAdapters(other.registry, other_spec, HostTier(1 << 30))
            try:
                await ours.registry.put("ours", *adapter, public=True)
                await other.registry.put("theirs", *theirs, public=True)
                assert await ours.source.list() == ["ours"]
                assert await other.source.list() == ["theirs"]
                blob_reads = []
                read_blob = ours.registry.read_blob
                ours.registry.read_blob = lambda record: blob_reads.append(record.adapter_id) or read_blob(record)
                with pytest.raises(InvalidAdapterError, match="'theirs' version 1 was made for another backbone"):
                    await ours.source.resolve("theirs")
                assert blob_reads == []
                assert (await ours.source.resolve("ours")).version == 1 and blob_reads == ["ours"]
                assert (await other.source.resolve("theirs")).version == 1
            finally:
                await other.close()

    asyncio.run(scenario())
