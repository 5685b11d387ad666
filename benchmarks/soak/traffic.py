"""The soak's load: closed-loop clients of two tenants, and the admin task that churns adapters and kills Redis."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.soak.config import (ABSENT, ADMIN_TOKEN, BASE_FRACTION, CROSS_TENANT_FRACTION, PROMPTS,
                                    STREAM_FRACTION, TENANTS, Adapter, Change, Outcome, SoakConfig)
from benchmarks.soak.process import redis_server_pid
from clients.stream import DONE, aiter_events


# ---- traffic --------------------------------------------------------------------------------------------------

def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def complete(client: httpx.AsyncClient, key: str, adapter_id: str | None, prompt: str, stream: bool,
                   max_tokens: int) -> tuple[int | None, str | None, str | None, str | None]:
    """(status, error type, text, detail); status None: no answer (lost); error type "invalid_response": an answer
    that is not what the API documents (a body or a stream event that is not the expected JSON)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "adapter_id": adapter_id, "stream": stream}
    headers = auth(key) | ({"X-Adapter-Id": adapter_id} if adapter_id else {})
    response = None
    try:
        if not stream:
            response = await client.post("/v1/completions", json=body, headers=headers)
            data = response.json()
            if response.status_code == 200:
                return 200, None, data["choices"][0]["text"], None
            return response.status_code, data["error"]["type"], None, data["error"]["message"][:300]
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                data = json.loads(await response.aread())
                return response.status_code, data["error"]["type"], None, data["error"]["message"][:300]
            pieces, is_done = [], False
            async with contextlib.aclosing(aiter_events(response.aiter_lines())) as events:  # clients.stream's SSE
                async for data in events:
                    if data == DONE:
                        is_done = True
                        break
                    event = json.loads(data)
                    if "error" in event:  # a stream that failed after it started: a 200 with an error event
                        return 200, event["error"]["type"], None, event["error"]["message"][:300]
                    pieces += [choice["text"] for choice in event["choices"]]
            if not is_done:
                return None, None, None, "the stream ended without [DONE]"
            return 200, None, "".join(pieces), None
    except httpx.HTTPError as exc:
        return None, None, None, f"{type(exc).__name__}: {exc}"[:300]
    except (ValueError, KeyError, TypeError) as exc:
        return getattr(response, "status_code", None), "invalid_response", None, f"{type(exc).__name__}: {exc}"[:300]


async def run_client(index: int, tenant: str, base_url: str, adapters: list[Adapter], cfg: SoakConfig,
                     deadline: float, outcomes: list[Outcome]) -> None:
    rng = random.Random(cfg.seed * 1000 + index)
    key = TENANTS[tenant]
    mine = [a.adapter_id for a in adapters if a.tenant in (None, tenant)]
    theirs = [a.adapter_id for a in adapters if a.tenant not in (None, tenant)]
    async with httpx.AsyncClient(base_url=base_url, timeout=cfg.request_timeout_s) as client:
        while time.monotonic() < deadline:
            roll = rng.random()
            adapter_id = (rng.choice(theirs) if roll < CROSS_TENANT_FRACTION and theirs else
                          None if roll < CROSS_TENANT_FRACTION + BASE_FRACTION else rng.choice(mine))
            prompt, stream = rng.randrange(len(PROMPTS)), rng.random() < STREAM_FRACTION
            sent = time.monotonic()
            status, error_type, text, detail = await complete(client, key, adapter_id, PROMPTS[prompt], stream,
                                                              cfg.max_tokens)
            outcomes.append(Outcome(index, tenant, adapter_id, prompt, stream, sent, time.monotonic(), status,
                                    error_type, text, detail))
            if status == 503:
                await asyncio.sleep(0.2)  # as a client told Retry-After would


# ---- the admin task: churn and Redis kills ----------------------------------------------------------------------

@dataclass
class AdminLog:
    changes: dict[str, list[Change]]
    state: dict[str, int]  # adapter id -> its current variant, or ABSENT
    operations: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)


async def upload(client: httpx.AsyncClient, adapter: Adapter, variant: int, *, replace: bool) -> httpx.Response:
    form = {"adapter_id": adapter.adapter_id, **({"tenant": adapter.tenant} if adapter.tenant else {"public": "true"})}
    files = {"file": (f"{adapter.adapter_id}.tar.gz", adapter.archives[variant])}
    if replace:
        return await client.put(f"/admin/adapters/{adapter.adapter_id}", files=files, data=form,
                                headers=auth(ADMIN_TOKEN))  # the owner again: a PUT may create the adapter
    return await client.post("/admin/adapters", files=files, data=form, headers=auth(ADMIN_TOKEN))


async def admin_operation(client: httpx.AsyncClient, adapter: Adapter, new: int, admin: AdminLog) -> None:
    """One change of `adapter` to `new` (a variant, or ABSENT), logged with its window."""
    old, sent = admin.state[adapter.adapter_id], time.monotonic()
    if new == ABSENT:
        kind, response = "delete", await client.delete(f"/admin/adapters/{adapter.adapter_id}",
                                                       headers=auth(ADMIN_TOKEN))
    else:
        kind = "replace" if old != ABSENT else "upload"
        response = await upload(client, adapter, new, replace=old != ABSENT)
    done = time.monotonic()
    admin.operations[kind] += 1
    if response.status_code not in (200, 201):
        admin.failures.append(f"{kind} {adapter.adapter_id}: {response.status_code} {response.text[:200]}")
        done = float("inf")  # whether it took effect is unknown: both states stay possible
    admin.changes[adapter.adapter_id].append(Change(sent, done, old, new))
    admin.state[adapter.adapter_id] = new


async def kill_redis(client: httpx.AsyncClient, server_pid: int, admin: AdminLog) -> None:
    """SIGKILL the embedded redis-server; wait until the server has recovered by itself."""
    pid = redis_server_pid(server_pid)
    if pid is None:
        admin.failures.append("no redis-server child of the server to kill")
        return
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    saw_unhealthy, recovered = False, None
    while time.monotonic() - killed < 120:
        health = await client.get("/health")
        saw_unhealthy = saw_unhealthy or health.status_code == 503
        if health.status_code == 200 and redis_server_pid(server_pid) not in (None, pid):
            if (await client.get("/admin/adapters", headers=auth(ADMIN_TOKEN))).status_code == 200:
                recovered = time.monotonic()
                break
        await asyncio.sleep(0.05)
    admin.kills.append({"redis_pid": pid, "new_redis_pid": redis_server_pid(server_pid), "at_s": killed,
                        "recovered_at_s": recovered, "recovery_s": None if recovered is None else recovered - killed,
                        "health_saw_outage": saw_unhealthy})
    if recovered is None:
        admin.failures.append(f"no recovery within 120 s of killing redis-server {pid}")


async def run_admin(base_url: str, server_pid: int, adapters: list[Adapter], cfg: SoakConfig, start: float,
                    deadline: float, admin: AdminLog) -> None:
    rng = random.Random(cfg.seed + 7)
    kill_times = [start + cfg.duration_s * (k + 1) / (cfg.num_redis_kills + 1) for k in range(cfg.num_redis_kills)]
    async with httpx.AsyncClient(base_url=base_url, timeout=cfg.request_timeout_s) as client:
        num_operations = 0
        while time.monotonic() + cfg.churn_interval_s < deadline:
            await asyncio.sleep(cfg.churn_interval_s)
            if kill_times and time.monotonic() >= kill_times[0]:
                kill_times.pop(0)
                await kill_redis(client, server_pid, admin)
                continue
            adapter = rng.choice(adapters)
            if num_operations % 2 == 0:  # replace with the next variant
                await admin_operation(client, adapter, (admin.state[adapter.adapter_id] + 1) % cfg.num_variants,
                                      admin)
            else:  # delete, then upload again (the next variant) a moment later
                previous = admin.state[adapter.adapter_id]
                await admin_operation(client, adapter, ABSENT, admin)
                await asyncio.sleep(cfg.gone_s)
                await admin_operation(client, adapter, (previous + 1) % cfg.num_variants, admin)
            num_operations += 1
