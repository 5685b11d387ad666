"""The registry under real serving: PEFT and format-1 uploads answer like their references, two replicas on one
Redis, eviction and reload under load with a pool of two adapters, and a Redis outage mid-run."""
import asyncio
import time

import httpx
import torch

from tests.e2e.serving import ADMIN, ALL, GREEDY, format1_archive, greedy_text, tiny_checkpoint, upload, wait_for_health
from tests.helpers import tar_dir
from tests.live_server import running_server

def _greedy_reference(model, tokenizer, max_tokens=10, **kwargs) -> str:
    ids = torch.tensor([tokenizer.encode(GREEDY["prompt"])])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_uploads_answer_like_their_references(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from tests.helpers import load_hf, merged_hf

    data = tmp_path / "data"
    path, _ = tiny_checkpoint(data)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(3)
    peft_model = get_peft_model(load_hf(path), LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    peft_model.save_pretrained(tmp_path / "peft", safe_serialization=True)
    deltas, fmt1 = format1_archive(tmp_path, data, "fmt1", seed=5)
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret") as server:
        assert upload(server, "from-peft", tar_dir(tmp_path / "peft")).status_code == 201
        assert upload(server, "from-fmt1", fmt1).status_code == 201
        listed = {a["id"] for a in server.client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}
        assert {"from-peft", "from-fmt1"} <= listed
        assert server.client.get("/admin/adapters/from-peft", headers=ADMIN).json()["manifest"]["source_format"] == "peft-lora"
        assert greedy_text(server, "from-peft") == _greedy_reference(peft_model.eval(), tokenizer)
        assert greedy_text(server, "from-fmt1") == _greedy_reference(merged_hf(path, deltas), tokenizer)
        assert greedy_text(server, "from-fmt1") != greedy_text(server, None)


def test_two_replicas_share_one_redis(tmp_path):
    data = tmp_path / "data"
    _, archive = format1_archive(tmp_path, data, "shared", seed=7)
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret") as a, \
            running_server(model="tiny", data_dir=data, admin_token="admin-secret") as b:
        assert upload(a, "shared", archive).status_code == 201
        assert greedy_text(b, "shared") == greedy_text(a, "shared")  # uploaded through one, served by the other
        assert a.client.delete("/admin/adapters/shared", headers=ADMIN).status_code == 200
        deadline = time.monotonic() + 1.0
        while b.client.post("/v1/completions", json={**GREEDY, "adapter_id": "shared"}).status_code != 404:
            assert time.monotonic() < deadline, "replica b still serves a deleted adapter after 1 s"
            time.sleep(0.02)


def test_eviction_and_reload_under_load(tmp_path):
    """A device pool that holds two adapters; 8 adapters round-robin from 32 concurrent clients: all correct."""
    from server.model.adapter_pool import AdapterPool

    data = tmp_path / "data"
    _, cfg = tiny_checkpoint(data)
    made = [format1_archive(tmp_path, data, f"a{i}", seed=20 + i) for i in range(8)]
    one = AdapterPool(cfg, 4, 1 << 22, "cpu", torch.float32).nbytes(made[0][0])
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret") as roomy:
        for i, (_, archive) in enumerate(made):
            assert upload(roomy, f"a{i}", archive).status_code == 201
        expected = {f"a{i}": greedy_text(roomy, f"a{i}") for i in range(8)}
        assert len(set(expected.values())) == 8
        with running_server(model="tiny", data_dir=data, admin_token="admin-secret",
                            adapter_pool_bytes=2 * one + 4096) as small:

            async def clients():
                async with httpx.AsyncClient(base_url=small.url, timeout=120) as c:
                    async def one_client(k):
                        got = []
                        for j in range(4):
                            adapter = f"a{(k + j) % 8}"
                            r = await c.post("/v1/completions", json={**GREEDY, "adapter_id": adapter})
                            got.append((adapter, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))
                        return got
                    return await asyncio.gather(*(one_client(k) for k in range(32)))

            results = [x for per_client in asyncio.run(clients()) for x in per_client]
            assert all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:3]
            assert all(text == expected[a] for a, _, text in results)
            assert len(small.engine.engine.runner.adapter_pool.slots) <= 2  # the pool really held two at a time
            cache = small.engine.engine.scheduler.adapters
            assert cache.stats.evictions >= 6 and cache.stats.loads >= 8  # evicted and reloaded under load


def test_redis_outage(tmp_path):
    from server.registry.embedded import start_embedded_redis

    data = tmp_path / "data"
    _, archive = format1_archive(tmp_path, data, "warm", seed=9)
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret") as server:
        assert upload(server, "warm", archive).status_code == 201
        before = greedy_text(server, "warm")
        assert server.client.get("/health").status_code == 200
        server.service.embedded.close()  # Redis dies
        wait_for_health(server, 503)
        assert "redis" in server.client.get("/health").json()["problems"]
        assert greedy_text(server, "warm") == before  # a cached adapter still answers
        assert greedy_text(server, None)  # and the base model
        r = upload(server, "late", archive)
        assert r.status_code == 503 and r.json()["error"]["message"]
        assert server.client.post("/v1/completions", json={**GREEDY, "adapter_id": "never-seen"}).status_code == 503
        server.service.embedded = start_embedded_redis(data)  # Redis is back, same address, same data
        deadline = time.monotonic() + 10
        while (r := upload(server, "late", archive)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert r.status_code == 201
        assert greedy_text(server, "late") == before  # same weights as "warm"
        wait_for_health(server, 200)  # /health recovers by itself



def test_a_replica_of_another_backbone_refuses_a_foreign_adapter_by_name(tmp_path):
    """Two backbones on one Redis (a misconfiguration, but a shared registry makes it possible): an adapter made for
    one is a 422 naming it on the other, never a 500, and the other's own requests are unaffected."""
    from tests.helpers import make_hf_model

    data = tmp_path / "data"
    _, archive = format1_archive(tmp_path, data, "for-tiny", seed=3)
    other = make_hf_model(tmp_path / "other-backbone", "llama")
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret") as tiny, \
            running_server(model=str(other), data_dir=data, admin_token="admin-secret") as foreign:
        assert upload(tiny, "for-tiny", archive).status_code == 201
        refused = foreign.client.post("/v1/completions", json={**GREEDY, "adapter_id": "for-tiny"})
        assert refused.status_code == 422, refused.text
        assert "'for-tiny'" in refused.json()["error"]["message"] and "backbone" in refused.json()["error"]["message"]
        assert greedy_text(foreign, None) and greedy_text(tiny, "for-tiny")
