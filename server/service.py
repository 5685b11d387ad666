"""One serving process assembled from Settings: engine, embedded or shared Redis, registry-backed adapter source,
admin routes, tenants, and the lifespan tasks (seed the registry from --adapters, follow registry events, probe
Redis for /health).

Used by `multiplex serve` and by the end-to-end tests, so both run the same thing.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from server.config import Settings

log = logging.getLogger(__name__)


@dataclass
class Service:
    app: FastAPI
    engine: object
    registry: object
    embedded: object | None  # the embedded Redis we started (None with REDIS_URL)
    admin_token: str

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.close()


def build_service(settings: Settings) -> Service:
    """Build everything (not started: the app's lifespan starts the engine and the registry tasks)."""
    from server.registry.adapters import HostTier, RegistryAdapters
    from server.api.admin import AdminSettings, admin_router
    from server.api.app import create_app
    from server.api.auth import ADMIN_TOKEN_FILE, AdminAuth, TenantResolver
    from server.api.readiness import Readiness, probe_redis
    from server.engine.builder import build_engine_options, build_llm_engine
    from server.model.catalog import model_name as base_model_name
    from server.model.catalog import resolve_model_path
    from server.engine.async_engine import AsyncEngine
    from server.model.config import ModelConfig
    from server.registry.api_keys import ApiKeyStore, parse_api_keys
    from server.registry.embedded import start_embedded_redis
    from server.registry.store import Registry

    opts = build_engine_options(settings)  # the model first: a bad model fails before anything is started
    spec = ModelConfig.from_dir(resolve_model_path(settings.model, opts.data_dir)).spec()
    llm = build_llm_engine(settings.model, opts)
    embedded = None
    url = settings.redis_url
    if url is None:  # our own Redis, supervised: restarted at the same address if it dies
        embedded = start_embedded_redis(settings.data_dir)
        url = embedded.url
    registry = Registry.from_url(url, chunk_bytes=settings.redis_chunk_bytes,
                                 max_connections=settings.redis_max_connections,
                                 pool_timeout_s=settings.redis_pool_timeout_s)
    pool = llm.runner.adapter_pool
    source = RegistryAdapters(registry, spec, HostTier(settings.host_cache_bytes), fits=pool.fits_empty,
                              prepare=pool.prepare,
                              record_ttl_s=settings.adapter_record_ttl_s)
    model_name = base_model_name(settings.model)
    engine = AsyncEngine(llm, model_name=model_name, adapters=source, max_queue=opts.max_queue,
                         max_queue_per_tenant=opts.max_queue_per_tenant)
    tenants = TenantResolver(parse_api_keys(settings.api_keys), ApiKeyStore(registry.client, registry.prefix),
                             mode=settings.api_auth)

    def on_change(kind: str, adapter_id: str, version: int) -> None:
        source.forget(adapter_id)  # this replica acts at once; others on the pub/sub event

    admin = admin_router(
        registry, spec,
        AdminSettings(admin_token=settings.admin_token, max_adapter_bytes=settings.max_adapter_bytes,
                      max_rank=settings.max_rank, base_model_name=model_name, dtype=settings.dtype),
        on_change=on_change, tenants=tenants,
        admin_auth=AdminAuth(settings.admin_token, token_file=settings.data_dir / ADMIN_TOKEN_FILE))
    readiness = Readiness("engine", "adapters", "redis")
    lifespan_tasks = [lambda: _seed(registry, settings.adapters, spec, readiness),
                      source.follow_events, lambda: probe_redis(registry.ping, readiness)]
    app = create_app(engine, settings, tenants=tenants, routers=[admin], background=lifespan_tasks,
                     on_shutdown=[registry.close], readiness=readiness)
    return Service(app, engine, registry, embedded, admin.admin_auth.token)


async def _seed(registry, adapters_dir: Path | None, spec: dict, readiness) -> None:
    """--adapters DIR seeds the registry: each subdirectory is stored unless the same bytes are already there.
    Retried while Redis is unreachable; /health is not ready until every subdirectory was stored or refused."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if adapters_dir is None:
        readiness.set("adapters", None)
        return
    readiness.set("adapters", f"seeding adapters from {adapters_dir}")
    delay = 0.5
    while True:
        try:
            await _seed_once(registry, adapters_dir, spec)
            readiness.set("adapters", None)
            return
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            readiness.set("adapters", f"seeding adapters from {adapters_dir} waits for redis: {exc}"[:300])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _seed_once(registry, adapters_dir: Path, spec: dict) -> None:
    from adapters.artifact import adapter_to_bytes, load_adapter
    from adapters.errors import ArtifactError

    for sub in sorted(p for p in Path(adapters_dir).iterdir() if p.is_dir()):
        try:
            manifest, blob = adapter_to_bytes(await asyncio.to_thread(load_adapter, sub, spec))
        except ArtifactError as exc:
            log.error("not seeding adapter %s: %s", sub.name, exc)
            continue
        record = await registry.record(sub.name)
        if record is not None and record.sha256 == hashlib.sha256(blob).hexdigest():
            continue  # already stored: a restart must not mint a new version
        await registry.put(sub.name, manifest, blob, public=True, replace=True)
        log.info("seeded adapter %s from %s", sub.name, sub)


@contextlib.contextmanager
def running_service(settings: Settings):
    service = build_service(settings)
    try:
        yield service
    finally:
        service.close()
