"""Limits that hold under concurrency, through the real server and a real (embedded) Redis: the queue limit counts
requests whose adapters are still being fetched, and a burst of requests on fresh adapters fits the Redis
connection pool (it waits for a connection instead of failing)."""
from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx

from tests.live_server import running_server

ADMIN = {"Authorization": "Bearer admin-secret"}


def _adapter_bytes(data_dir, seed: int) -> tuple[dict, bytes]:
    """(manifest, blob) of a random LoRA for the tiny model: what the registry stores for an upload."""
    from adapters.artifact import adapter_to_bytes, load_adapter
    from tests.helpers import lora_artifact, tiny_config

    cfg = tiny_config(data_dir / "models" / "tiny")
    directory = lora_artifact(data_dir / "artifacts" / f"seed{seed}", cfg, {"q_proj": 4, "down_proj": 4}, seed=seed,
                              magnitude=0.6)
    return adapter_to_bytes(load_adapter(directory, cfg.spec()))


def _store(url: str, adapters: dict[str, tuple[dict, bytes]]) -> None:
    """Put adapters straight into the registry (what an upload ends with), without the cost of N uploads."""
    from server.registry.store import Registry

    async def put_all():
        registry = Registry.from_url(url)
        try:
            for adapter_id, (manifest, blob) in adapters.items():
                await registry.put(adapter_id, manifest, blob, public=True)
        finally:
            await registry.close()

    asyncio.run(put_all())


def _wait_idle(server, timeout_s: float = 30.0) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.engine.stats()
        if stats["num_streams"] == 0 and stats.get("num_resolving", 0) == 0 and not stats["num_running"] \
                and not stats["num_waiting"]:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_queue_limit_counts_requests_whose_adapter_is_being_fetched(tmp_path):
    """--max-num-seqs 1 --max-queue 1 and 60 concurrent requests on a cold adapter: exactly 2 admitted, 58 refused
    with 503, every request answered, and no slot leaked (a slow fetch keeps all 60 inside the fetch window)."""
    data = tmp_path / "data"
    adapter = _adapter_bytes(data, seed=1)
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret", max_num_seqs=1,
                        max_queue=1) as server:
        _store(server.service.embedded.url, {"cold": adapter})
        registry, read_blob = server.registry, server.registry.read_blob

        async def slow_read_blob(record):  # the cold fetch takes a second: every request arrives meanwhile
            await asyncio.sleep(1.0)
            return await read_blob(record)

        registry.read_blob = slow_read_blob
        body = {"prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "adapter_id": "cold"}

        async def burst():
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(60)))

        try:
            responses = asyncio.run(burst())
        finally:
            registry.read_blob = read_blob
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: 2, 503: 58}, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.json()["error"]["type"] == "overloaded" and r.headers.get("retry-after")
            else:
                assert r.json()["usage"]["completion_tokens"] == 8
        _wait_idle(server)
        # Refusals on every path free their slot: unknown adapters, then two at once are still both admitted.
        for _ in range(5):
            assert server.client.post("/v1/completions", json={**body, "adapter_id": "missing"}).status_code == 404

        async def two():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(2)))

        assert [r.status_code for r in asyncio.run(two())] == [200, 200]
        _wait_idle(server)


def test_192_concurrent_streams_on_fresh_adapters(tmp_path):
    """192 concurrent streams, each on an adapter this replica has never read, with Redis healthy: all 200 and
    complete (the Redis pool waits for a connection instead of answering 503 'Too many connections')."""
    data = tmp_path / "data"
    manifest, blob = _adapter_bytes(data, seed=2)
    num = 192
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret") as server:
        _store(server.service.embedded.url, {f"fresh-{i}": (manifest, blob) for i in range(num)})

        async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int, bool]:
            body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
                    "adapter_id": f"fresh-{i}"}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            num_text = sum(1 for line in lines if line.startswith("data: {") and "choices" in json.loads(line[6:]))
            return response.status_code, num_text, bool(lines) and lines[-1] == "data: [DONE]"

        async def burst():
            limits = httpx.Limits(max_connections=num + 8)
            async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
                return await asyncio.gather(*(one(client, i) for i in range(num)))

        results = asyncio.run(burst())
        failed = [(i, r) for i, r in enumerate(results) if r[0] != 200 or not r[2]]
        assert not failed, f"{len(failed)} of {num} failed, e.g. {failed[:3]}"
        assert all(num_text >= 1 for _, num_text, _ in results)
        _wait_idle(server)


def test_one_tenants_flood_cannot_take_every_place(tmp_path):
    """--max-queue-per-tenant 3: of 6 concurrent requests of one tenant, 3 are held and 3 refused with 429 (its
    limit, not the server's), while another tenant's requests, sent at the same time, are all served."""
    data = tmp_path / "data"
    adapter = _adapter_bytes(data, seed=3)
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret", max_num_seqs=1, max_queue=8,
                        max_queue_per_tenant=3, api_keys="key-acme:acme,key-globex:globex") as server:
        _store(server.service.embedded.url, {"cold": adapter})
        registry, read_blob = server.registry, server.registry.read_blob

        async def slow_read_blob(record):  # every request arrives while the first fetch is under way
            await asyncio.sleep(1.0)
            return await read_blob(record)

        registry.read_blob = slow_read_blob
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "adapter_id": "cold"}

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                def send(key):
                    return client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                return await asyncio.gather(*[send("key-acme") for _ in range(6)], send("key-globex"),
                                            send("key-globex"))

        try:
            responses = asyncio.run(burst())
        finally:
            registry.read_blob = read_blob
        acme, globex = responses[:6], responses[6:]
        assert Counter(r.status_code for r in acme) == {200: 3, 429: 3}
        assert [r.status_code for r in globex] == [200, 200]
        refused = next(r for r in acme if r.status_code == 429).json()["error"]
        assert refused["type"] == "rate_limit_error" and "this tenant has 3 requests in flight" in refused["message"]
        assert all(r.headers.get("retry-after") for r in acme if r.status_code == 429)
        assert _wait_idle(server)["num_streams"] == 0
