"""Soak: `multiplex serve` (a subprocess on loopback) under closed-loop clients of two tenants, while its adapters
churn through a small device pool, an admin task replaces and deletes them, and its embedded Redis is killed.

    python -m benchmarks.soak --model tiny --duration-s 300 --out out/soak.json
    python -m benchmarks.soak --model tiny --duration-s 20 --num-clients 8 --num-redis-kills 1   # short

Setup: `--num-adapters` random LoRAs (ranks 2..64, each on its own projections), `--num-variants` weight sets each;
the server starts with `--max-adapter-slots` device slots (4: fewer than the adapters, so they are evicted and
reloaded all along), two static API keys (tenants alpha and beta) and an admin token. The last two adapters belong
to alpha and to beta; the others are public. Every adapter is uploaded at variant 0, then each one is asked once
(the warm-up), and the start values are read: RSS of the server process (/proc), free KV blocks and pinned
adapters (/health's engine stats).

Traffic, for `--duration-s`: each client sends greedy (`temperature` 0, `ignore_eos`, `--max-tokens`) completions
of one of a few fixed prompts, one after the other, streamed or not, for a random adapter its tenant may use (or
the base model), and now and then for the other tenant's adapter. Meanwhile one admin task, every
`--churn-interval-s`, either replaces an adapter with its next variant (PUT) or deletes one and uploads it again
`--gone-s` later (DELETE, then POST); and, `--num-redis-kills` times at even intervals and between two admin
operations (so that none is left half-done), kills the embedded redis-server (SIGKILL; the server's supervisor
restarts it) and waits until the server has recovered: /health 200 and an admin read of Redis answering.

Expected answers: every (adapter, variant, prompt) is run alone, before the server starts, by a separate engine in
this process (server/engine on the same checkpoint; the request alone in its batch). Asking the server itself when
idle would use the system under test as its own oracle and would need every variant uploaded first. The engine is
the same code, so this checks that batching, eviction, hot swaps and outages change nothing; backbone and adapter
numerics are checked against `transformers` and PEFT elsewhere (tests/server).

Verdict of one request, sent at t0 and answered at t1 (the adapter is resolved somewhere in between):
    ok               200 and its text is the expected text of a variant its adapter had at some moment of
                     [t0, t1] (the admin's operation windows [sent, answered] bound when a change takes effect)
    gone             404 adapter_not_found while its adapter was (possibly) deleted
    other_tenant     404 adapter_not_found for the other tenant's adapter (always)
    redis_down       503 while Redis was (possibly) down: from the kill until recovery was seen, plus a second
    mismatch         200 with another text
    unexpected       any other answer (status, error type, a stream that ends with an error event, a body or an
                     event that is not the documented JSON)
    lost             no answer: a connection error, a timeout, a stream that ends without [DONE]
The run passes when there is no mismatch, unexpected or lost request, the admin operations all succeeded, every
kill was recovered from, and at the end (idle) free KV blocks and pinned adapters equal their start values and RSS
is at most `--max-rss-growth` above its start.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clients.stream import DONE, aiter_events

log = logging.getLogger(__name__)

TENANTS = {"alpha": "soak-key-alpha", "beta": "soak-key-beta"}
ADMIN_TOKEN = "soak-admin-token"
PROMPTS = ("The soak test", "Adapters churn while", "x", "Redis is killed twice and the server keeps serving")
RANKS = (2, 4, 8, 16, 32, 64)
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
CROSS_TENANT_FRACTION = 0.03  # requests for the other tenant's adapter: 404, always
BASE_FRACTION = 0.08  # requests for the base model
STREAM_FRACTION = 0.5
REDIS_DOWN_MARGIN_S = 1.0  # a 503 this long after recovery was seen still counts as the outage's
STARTUP_TIMEOUT_S = 300
ABSENT = -1  # the state of a deleted adapter (variants are 0..num_variants-1)


@dataclass(frozen=True)
class SoakConfig:
    model: str = "tiny"
    duration_s: float = 300.0
    num_clients: int = 32
    num_adapters: int = 12
    num_variants: int = 3
    max_adapter_slots: int = 4
    max_tokens: int = 16
    churn_interval_s: float = 3.0
    gone_s: float = 1.0
    num_redis_kills: int = 2
    request_timeout_s: float = 120.0
    max_rss_growth: float = 0.25  # of the start RSS, plus RSS_SLACK_BYTES
    seed: int = 0


RSS_SLACK_BYTES = 32 << 20  # allocator noise on a process of ~500 MB: arenas grown by a burst are not all returned
RSS_SAMPLE_S = 10.0


@dataclass
class Adapter:
    adapter_id: str
    rank: int
    targets: tuple[str, ...]
    tenant: str | None  # None: public
    archives: list[bytes] = field(default_factory=list)  # per variant: a .tar.gz of its format-1 directory


@dataclass
class Change:
    """One admin operation on an adapter: its state moved from `old` to `new` at some moment of [sent, done]."""

    sent: float
    done: float
    old: int
    new: int


@dataclass
class Outcome:
    client: int
    tenant: str
    adapter_id: str | None
    prompt: int
    stream: bool
    sent: float
    done: float
    status: int | None  # None: no HTTP answer
    error_type: str | None = None
    text: str | None = None
    detail: str | None = None


# ---- adapters and their expected texts ----------------------------------------------------------------------

def make_adapters(model_dir: Path, work_dir: Path, cfg: SoakConfig) -> tuple[list[Adapter], dict]:
    """The adapters with their variants' archives, and the deltas of each (adapter id, variant)."""
    import torch

    from adapters.artifact import load_adapter, save_artifact
    from adapters.delta import AdapterDeltas, LowRank
    from clients.archive import pack_directory
    from server.model.adapter_layout import Layout
    from server.model.config import ModelConfig

    model_cfg = ModelConfig.from_dir(model_dir)
    dims = Layout.of(model_cfg).dims  # projection -> (d_out, d_in)
    adapters, deltas_of = [], {}
    for i in range(cfg.num_adapters):
        tenant = ("alpha" if i == cfg.num_adapters - 2 else "beta" if i == cfg.num_adapters - 1 else None)
        adapter = Adapter(f"soak-{i:02d}", RANKS[i % len(RANKS)], TARGET_SETS[i % len(TARGET_SETS)], tenant)
        for variant in range(cfg.num_variants):
            gen = torch.Generator().manual_seed(cfg.seed * 100_000 + i * 100 + variant)
            deltas = AdapterDeltas()
            for layer in range(model_cfg.num_layers):
                for proj in adapter.targets:
                    d_out, d_in = dims[proj]
                    a = torch.randn(adapter.rank, d_in, generator=gen) * 0.6 / d_in**0.5  # (r, d_in)
                    b = torch.randn(d_out, adapter.rank, generator=gen) * 0.6  # (d_out, r)
                    deltas.lowrank[f"layers.{layer}.{proj}"] = LowRank(a, b, scale=2.0 / adapter.rank)
            directory = save_artifact(work_dir / "adapters" / f"{adapter.adapter_id}-v{variant}", deltas,
                                      method="lora", spec=model_cfg.spec())
            adapter.archives.append(pack_directory(directory).read())
            deltas_of[adapter.adapter_id, variant] = load_adapter(directory, model_cfg.spec()).deltas
        adapters.append(adapter)
    return adapters, deltas_of


def expected_texts(model_dir: Path, deltas_of: dict, cfg: SoakConfig) -> dict[tuple[str | None, int], list[str]]:
    """(adapter id or None for the base model, variant) -> the greedy text of each prompt, each request run alone
    in a separate engine (the server's engine code, on the same checkpoint, cpu fp32)."""
    import torch

    # One intra-op thread: on this small model torch's parallel index_add_ (the CPU low-rank path) costs 100x more
    # with two threads than with one, and the server is not running yet.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _expected_texts(model_dir, deltas_of, cfg)
    finally:
        torch.set_num_threads(num_threads)


def _expected_texts(model_dir: Path, deltas_of: dict, cfg: SoakConfig) -> dict[tuple[str | None, int], list[str]]:
    from server.engine.builder import EngineOptions, build_llm_engine
    from server.engine.request import AdapterRef, Request, SamplingParams

    engine = build_llm_engine(str(model_dir), EngineOptions(device="cpu", dtype="float32", max_num_seqs=1,
                                                            max_adapter_slots=2, cuda_graphs=False))
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)
    prompt_ids = [engine.tokenizer.encode(prompt, add_special_tokens=True) for prompt in PROMPTS]
    cases = [(None, 0, None)] + [(adapter_id, variant, AdapterRef(adapter_id, variant + 1, deltas))
                                 for (adapter_id, variant), deltas in deltas_of.items()]
    texts = {}
    for adapter_id, variant, ref in cases:
        texts[adapter_id, variant] = []
        for index, ids in enumerate(prompt_ids):
            request_id = f"{adapter_id}-{variant}-{index}"
            engine.add_request(Request(request_id, list(ids), params, adapter=ref))
            pieces = []
            while engine.has_work():
                pieces += [out.text for out in engine.step() if out.request_id == request_id]
            texts[adapter_id, variant].append("".join(pieces))
    return texts


# ---- the server ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(cfg: SoakConfig, data_dir: Path, port: int) -> list[str]:
    keys = ",".join(f"{key}:{tenant}" for tenant, key in TENANTS.items())
    return [sys.executable, "-m", "server", "serve", "--model", cfg.model, "--device", "cpu", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
            "--max-adapter-slots", str(cfg.max_adapter_slots), "--max-num-seqs", str(max(cfg.num_clients, 1)),
            "--api-keys", keys, "--admin-token", ADMIN_TOKEN, "--log-level", "WARNING"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def redis_server_pid(server_pid: int) -> int | None:
    """The embedded redis-server: a child of the server process (its supervisor thread spawns it)."""
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == server_pid and comm.startswith("redis-server"):
            return int(stat_path.parent.name)
    return None


async def wait_until_ready(client: httpx.AsyncClient, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready within {STARTUP_TIMEOUT_S}s: {log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.2)


async def engine_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await client.get("/health")).json()["engine"]


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 60.0) -> dict[str, Any]:
    """The engine's stats once nothing runs or waits (and every stream is closed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await engine_stats(client)
        if not (stats["num_running"] or stats["num_waiting"] or stats["num_streams"]) \
                or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


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
        return await client.put(f"/admin/adapters/{adapter.adapter_id}", files=files, headers=auth(ADMIN_TOKEN))
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


# ---- verdicts ---------------------------------------------------------------------------------------------------

def possible_states(changes: list[Change], sent: float, done: float) -> set[int]:
    """The states an adapter may have had at some moment of [sent, done] (its changes are sequential)."""
    states = {changes[0].new}  # the initial upload, before traffic
    for change in changes[1:]:
        if change.done <= sent:
            states = {change.new}  # settled before the request was sent
        elif change.sent <= done:
            states |= {change.old, change.new}
    return states


def verdict(outcome: Outcome, admin: AdminLog, texts: dict, adapters: dict[str, Adapter],
            outages: list[tuple[float, float]]) -> str:
    if outcome.status is None:
        return "lost"
    redis_down = any(start <= outcome.done and outcome.sent <= end for start, end in outages)
    if outcome.adapter_id is None:
        states = {0}
    elif adapters[outcome.adapter_id].tenant not in (None, outcome.tenant):
        if outcome.status == 404 and outcome.error_type == "adapter_not_found":
            return "other_tenant"
        return "redis_down" if outcome.status == 503 and redis_down else "unexpected"
    else:
        states = possible_states(admin.changes[outcome.adapter_id], outcome.sent, outcome.done)
    if outcome.status == 200 and outcome.error_type is None:
        expected = {texts[outcome.adapter_id, s][outcome.prompt] for s in states if s != ABSENT}
        return "ok" if outcome.text in expected else "mismatch"
    if outcome.status == 404 and outcome.error_type == "adapter_not_found" and ABSENT in states:
        return "gone"
    if outcome.status == 503 and redis_down:
        return "redis_down"
    return "unexpected"


# ---- the run ----------------------------------------------------------------------------------------------------

async def soak(cfg: SoakConfig, work_dir: Path) -> dict[str, Any]:
    from server.model.catalog import resolve_model_path

    data_dir = work_dir / "server-data"
    model_dir = resolve_model_path(cfg.model, data_dir)  # the checkpoint the server will load (written once here)
    t0 = time.monotonic()
    adapters, deltas_of = make_adapters(model_dir, work_dir, cfg)
    texts = expected_texts(model_dir, deltas_of, cfg)
    log.info("%d adapters x %d variants and their expected texts: %.1f s", len(adapters), cfg.num_variants,
             time.monotonic() - t0)
    by_id = {a.adapter_id: a for a in adapters}
    port = free_port()
    command = serve_command(cfg, data_dir, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIPLEX_") and k != "REDIS_URL"}
    log_path = work_dir / "server.log"
    with open(log_path, "wb") as server_log:
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=env)
        try:
            return await _soak_server(cfg, server, f"http://127.0.0.1:{port}", adapters, by_id, texts, log_path,
                                      command)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


async def _soak_server(cfg: SoakConfig, server: subprocess.Popen, base_url: str, adapters: list[Adapter],
                       by_id: dict[str, Adapter], texts: dict, log_path: Path, command: list[str]) -> dict[str, Any]:
    admin = AdminLog(changes={a.adapter_id: [] for a in adapters}, state={a.adapter_id: ABSENT for a in adapters})
    async with httpx.AsyncClient(base_url=base_url, timeout=cfg.request_timeout_s) as client:
        await wait_until_ready(client, server, log_path)
        for adapter in adapters:
            await admin_operation(client, adapter, 0, admin)
        if admin.failures:
            raise RuntimeError(f"the first uploads failed: {admin.failures}")
        # warm-up: every adapter once (fetched, on the device, the pool's padded ranks grown), then idle
        warm = [Outcome(-1, a.tenant or "alpha", a.adapter_id, 0, False, 0.0, 0.0, None) for a in adapters]
        for outcome in warm:
            outcome.status, _, outcome.text, outcome.detail = await complete(
                client, TENANTS[outcome.tenant], outcome.adapter_id, PROMPTS[0], False, cfg.max_tokens)
        if any(o.status != 200 or o.text != texts[o.adapter_id, 0][0] for o in warm):
            raise RuntimeError(f"warm-up answers differ from the expected texts: {[asdict(o) for o in warm]}")
        start_stats = await wait_idle(client)
        start_rss = rss_bytes(server.pid)

        outcomes: list[Outcome] = []
        start = time.monotonic()
        deadline = start + cfg.duration_s
        tenants = list(TENANTS)
        tasks = [run_client(i, tenants[i * len(tenants) // cfg.num_clients], base_url, adapters, cfg, deadline,
                            outcomes) for i in range(cfg.num_clients)]
        rss_samples: list[tuple[float, int]] = []
        await asyncio.gather(run_admin(base_url, server.pid, adapters, cfg, start, deadline, admin),
                             sample_rss(server.pid, start, deadline, rss_samples), *tasks)
        traffic_s = time.monotonic() - start

        end_stats = await wait_idle(client)
        await asyncio.sleep(1.0)  # let the last responses' buffers go
        end_rss = rss_bytes(server.pid)
    outages = [(k["at_s"], (k["recovered_at_s"] or float("inf")) + REDIS_DOWN_MARGIN_S) for k in admin.kills]
    verdicts = [verdict(o, admin, texts, by_id, outages) for o in outcomes]
    return summarize(cfg, command, outcomes, verdicts, admin, start_stats, end_stats, start_rss, end_rss, traffic_s,
                     rss_samples)


async def sample_rss(pid: int, start: float, deadline: float, samples: list[tuple[float, int]]) -> None:
    """RSS every RSS_SAMPLE_S during traffic: a leak grows all along, a working set levels off."""
    while time.monotonic() < deadline:
        samples.append((round(time.monotonic() - start, 1), rss_bytes(pid)))
        await asyncio.sleep(min(RSS_SAMPLE_S, max(deadline - time.monotonic(), 0)))


def summarize(cfg: SoakConfig, command: list[str], outcomes: list[Outcome], verdicts: list[str], admin: AdminLog,
              start_stats: dict, end_stats: dict, start_rss: int, end_rss: int, traffic_s: float,
              rss_samples: list[tuple[float, int]]) -> dict[str, Any]:
    counts = Counter(verdicts)
    bad = [asdict(o) | {"verdict": v} for o, v in zip(outcomes, verdicts) if v in ("mismatch", "unexpected", "lost")]
    max_rss = start_rss * (1 + cfg.max_rss_growth) + RSS_SLACK_BYTES
    checks = {
        "no_mismatch": counts["mismatch"] == 0,
        "no_unexpected": counts["unexpected"] == 0,
        "no_lost": counts["lost"] == 0,
        "admin_operations_succeeded": not admin.failures,
        "redis_recovered": len(admin.kills) == cfg.num_redis_kills and all(k["recovery_s"] is not None
                                                                             for k in admin.kills),
        "kv_blocks_back": end_stats["num_free_kv_blocks"] == start_stats["num_free_kv_blocks"],
        "pinned_back": end_stats["num_pinned_adapters"] == start_stats["num_pinned_adapters"],
        "idle_at_end": not (end_stats["num_running"] or end_stats["num_waiting"] or end_stats["num_streams"]),
        "rss_back": end_rss <= max_rss,
    }
    return {
        "config": asdict(cfg), "command": " ".join(command),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "traffic_s": round(traffic_s, 1), "num_requests": len(outcomes), "by_verdict": dict(sorted(counts.items())),
        "by_status": dict(sorted(Counter(str(o.status) for o in outcomes).items())),
        "num_mismatches": counts["mismatch"], "num_lost": counts["lost"],
        "rss_bytes": {"start": start_rss, "end": end_rss, "limit": int(max_rss),
                      "max_during": max((rss for _, rss in rss_samples), default=start_rss)},
        "rss_samples": rss_samples,  # (seconds into the traffic, bytes)
        "free_kv_blocks": {"start": start_stats["num_free_kv_blocks"], "end": end_stats["num_free_kv_blocks"]},
        "pinned_adapters": {"start": start_stats["num_pinned_adapters"], "end": end_stats["num_pinned_adapters"]},
        "resident_adapters_end": end_stats["num_resident_adapters"],
        "admin_operations": dict(admin.operations), "admin_failures": admin.failures,
        "redis_kills": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in kill.items() if k != "at_s"
                         and k != "recovered_at_s"} for kill in admin.kills],
        "adapter_cache_end": end_stats.get("adapter_cache", {}),
        "checks": checks, "passed": all(checks.values()), "bad_requests": bad[:50],
    }


def format_summary(summary: dict[str, Any]) -> str:
    mb = 1 << 20
    rss, kv, pins = summary["rss_bytes"], summary["free_kv_blocks"], summary["pinned_adapters"]
    lines = [
        f"soak {summary['date']}: {summary['traffic_s']} s of traffic, {summary['config']['num_clients']} clients, "
        f"{summary['config']['num_adapters']} adapters over {summary['config']['max_adapter_slots']} slots",
        f"requests        {summary['num_requests']}  by verdict {summary['by_verdict']}",
        f"by status       {summary['by_status']}",
        f"mismatches      {summary['num_mismatches']}   lost {summary['num_lost']}",
        f"RSS             start {rss['start'] / mb:.1f} MiB, end {rss['end'] / mb:.1f} MiB "
        f"(limit {rss['limit'] / mb:.1f} MiB; at most {rss['max_during'] / mb:.1f} MiB during the traffic)",
        f"free KV blocks  start {kv['start']}, end {kv['end']}",
        f"pinned adapters start {pins['start']}, end {pins['end']}",
        f"admin           {summary['admin_operations']}, failures {len(summary['admin_failures'])}",
    ]
    for i, kill in enumerate(summary["redis_kills"], 1):
        recovery = f"{kill['recovery_s']:.2f} s" if kill["recovery_s"] is not None else "NOT RECOVERED"
        lines.append(f"redis kill {i}    pid {kill['redis_pid']} -> {kill['new_redis_pid']}, recovered in {recovery}"
                     f" (/health saw the outage: {kill['health_saw_outage']})")
    failed = [name for name, ok in summary["checks"].items() if not ok]
    lines.append("PASSED" if summary["passed"] else f"FAILED: {', '.join(failed)}")
    return "\n".join(lines)


def run(cfg: SoakConfig, work_dir: Path | None = None) -> dict[str, Any]:
    """One soak run; -> the summary (`passed` says whether every check held)."""
    if work_dir is not None:
        return asyncio.run(soak(cfg, work_dir))
    with tempfile.TemporaryDirectory(prefix="multiplex-soak-") as tmp:
        return asyncio.run(soak(cfg, Path(tmp)))


def main(argv: list[str] | None = None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.model, help="the server's --model (default tiny)")
    for name in ("duration_s", "num_clients", "num_adapters", "num_variants", "max_adapter_slots", "max_tokens",
                 "churn_interval_s", "gone_s", "num_redis_kills", "request_timeout_s", "max_rss_growth", "seed"):
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                            help=f"default {default}")
    parser.add_argument("--work-dir", type=Path, help="keep the server's data and log here (default: a temporary "
                                                      "directory)")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = SoakConfig(**{name: getattr(args, name) for name in SoakConfig.__dataclass_fields__})
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    summary = run(cfg, args.work_dir)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
