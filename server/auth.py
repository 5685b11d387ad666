"""Who may do what: the admin token of the /admin routes, the API keys that bind /v1 requests to tenants, and which
adapters a tenant may use.

Environment (the server's settings should carry the same names):
- `MULTIPLEX_ADMIN_TOKEN`: the bearer token of the /admin routes. Unset: `AdminAuth` generates one at start and
  logs it once (WARNING), so the admin API is never open.
- `MULTIPLEX_API_KEYS`: `key1:tenantA,key2:tenantB`. Keys can also be created at run time (`POST /admin/api-keys`);
  those live in Redis: `mpx:apikey:{sha256(key)}` -> tenant, and `mpx:apikeys` (hash: sha256 -> JSON with the
  tenant, the key's first characters and its creation time) to list and revoke them. Only digests are stored.

With no key configured anywhere, /v1 is open (local development) and every request has tenant None. With any key,
a /v1 request without a known key is 401.

Visibility (`visible`): an adapter uploaded for a tenant is usable only with that tenant's key; public adapters,
adapters without an owner and the base model are usable by all. Callers answer an invisible adapter with 404, as
if it did not exist, so that ids do not leak between tenants.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from server.registry import AdapterRecord

log = logging.getLogger(__name__)

TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_PREFIX_CHARS = 12  # how much of a key is kept to recognise it by ("mpx_" + 8 random characters)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"invalid tenant {tenant!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return tenant


def bearer_token(authorization: str | None) -> str | None:
    """'Bearer <token>' -> token (scheme case-insensitive); anything else -> None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def parse_api_keys(text: str | None) -> dict[str, str]:
    """MULTIPLEX_API_KEYS ('key1:tenantA,key2:tenantB') -> {key: tenant}; ValueError names the bad entry by index
    (never echoing a key)."""
    keys: dict[str, str] = {}
    for i, entry in enumerate(e.strip() for e in (text or "").split(",")):
        if not entry:
            continue
        key, sep, tenant = entry.rpartition(":")
        if not sep or not key or not TENANT_PATTERN.fullmatch(tenant):
            raise ValueError(f"MULTIPLEX_API_KEYS entry {i + 1}: expected key:tenant, the tenant made of "
                             "A-Z a-z 0-9 . _ -")
        keys[key] = tenant
    return keys


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


def visible(entry: AdapterRecord | Mapping[str, Any], tenant: str | None) -> bool:
    """May `tenant` (None: no key, open mode) use this adapter? `entry`: a registry record or its JSON form."""
    if isinstance(entry, AdapterRecord):
        owner, public = entry.tenant, entry.public
    else:
        owner, public = entry.get("tenant"), bool(entry.get("public"))
    return public or owner is None or owner == tenant


class AdminAuth:
    """The admin bearer token; an instance is a FastAPI dependency (`Depends(admin_auth)`)."""

    def __init__(self, token: str | None) -> None:
        self.is_generated = not token
        self.token = token or secrets.token_urlsafe(32)
        if self.is_generated:
            log.warning("MULTIPLEX_ADMIN_TOKEN is not set; the admin token of this run is: %s", self.token)

    def check(self, authorization: str | None) -> None:
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("admin routes need 'Authorization: Bearer <admin token>' (MULTIPLEX_ADMIN_TOKEN)")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise unauthorized("invalid admin token")

    async def __call__(self, request: Request) -> None:
        self.check(request.headers.get("authorization"))


@dataclass(frozen=True)
class ApiKey:
    key_id: str  # sha256 of the key: what Redis stores
    key_prefix: str
    tenant: str
    created: float
    key: str | None = None  # the key itself: only in the answer that creates it

    def to_json(self) -> dict[str, Any]:
        out = {"key_id": self.key_id, "key_prefix": self.key_prefix, "tenant": self.tenant, "created": self.created}
        return out | ({"key": self.key} if self.key else {})


class ApiKeyStore:
    """API keys in Redis, by digest."""

    def __init__(self, client: aioredis.Redis, prefix: str = "mpx") -> None:
        self.client, self.prefix, self.index_key = client, prefix, f"{prefix}:apikeys"

    def key_of(self, key_id: str) -> str:
        return f"{self.prefix}:apikey:{key_id}"

    async def create(self, tenant: str) -> ApiKey:
        return await self.add("mpx_" + secrets.token_urlsafe(32), tenant)

    async def add(self, key: str, tenant: str) -> ApiKey:
        check_tenant(tenant)
        api_key = ApiKey(hash_api_key(key), key[:KEY_PREFIX_CHARS], tenant, time.time(), key)
        info = json.dumps({"tenant": tenant, "key_prefix": api_key.key_prefix, "created": api_key.created})
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.key_of(api_key.key_id), tenant)
            pipe.hset(self.index_key, api_key.key_id, info)
            await pipe.execute()
        return api_key

    async def tenant_of(self, key_id: str) -> str | None:
        tenant = await self.client.get(self.key_of(key_id))
        return tenant.decode() if tenant is not None else None

    async def count(self) -> int:
        return int(await self.client.hlen(self.index_key))

    async def list(self) -> list[ApiKey]:
        raw = await self.client.hgetall(self.index_key)
        keys = [ApiKey(k.decode(), **json.loads(v)) for k, v in raw.items()]
        return sorted(keys, key=lambda k: k.created)

    async def delete(self, ref: str) -> ApiKey:
        """Revoke by key id (sha256), a unique prefix of it (>= 8 characters), or the key prefix shown at creation.
        KeyError: no such key; ValueError: `ref` matches several."""
        found = [k for k in await self.list()
                 if k.key_id == ref or (len(ref) >= 8 and k.key_id.startswith(ref)) or k.key_prefix == ref]
        if not found:
            raise KeyError(ref)
        if len(found) > 1:
            raise ValueError(f"{ref!r} matches {len(found)} API keys; give more of the key id")
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.key_of(found[0].key_id))
            pipe.hdel(self.index_key, found[0].key_id)
            await pipe.execute()
        return found[0]


class TenantResolver:
    """Authorization header -> tenant for the /v1 routes.

    Keys from Redis are cached for `cache_ttl_s` (a revoked key works at most that long on other replicas), and a
    cached answer outlives a Redis outage, so that tenants keep being served while Redis is away."""

    def __init__(self, static_keys: Mapping[str, str], store: ApiKeyStore | None, *, cache_ttl_s: float = 10.0) -> None:
        self.static = {hash_api_key(k): t for k, t in static_keys.items()}  # by digest: no key-dependent timing
        self.store = store
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[str | None, float]] = {}  # key id -> (tenant or None, when it was read)
        self._num_stored: tuple[int, float] | None = None

    async def resolve_tenant(self, authorization: str | None) -> str | None:
        """The tenant of the request's key; None when no key is configured anywhere (open). 401 when keys are
        configured and this request's is missing or unknown; 503 when only Redis could tell and it is away."""
        if not self.static and not await self._any_stored_keys():
            return None
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
        key_id = hash_api_key(token)
        tenant = self.static.get(key_id) or await self._stored_tenant(key_id)
        if tenant is None:
            raise unauthorized("invalid API key")
        return tenant

    def invalidate(self, key_id: str | None = None) -> None:
        """This replica created (key_id None) or revoked a key: re-read from Redis now, not after the TTL."""
        if key_id is not None:
            self._cache.pop(key_id, None)
        self._num_stored = None

    async def _any_stored_keys(self) -> bool:
        if self.store is None:
            return False
        now = time.monotonic()
        if self._num_stored is None or now - self._num_stored[1] > self.cache_ttl_s:
            try:
                self._num_stored = (await self.store.count(), now)
            except (RedisConnectionError, RedisTimeoutError):
                if self._num_stored is None:  # never known: refuse rather than open the server
                    raise _registry_unavailable() from None
        return self._num_stored[0] > 0

    async def _stored_tenant(self, key_id: str) -> str | None:
        if self.store is None:
            return None
        cached, now = self._cache.get(key_id), time.monotonic()
        if cached is not None and now - cached[1] <= self.cache_ttl_s:
            return cached[0]
        try:
            tenant = await self.store.tenant_of(key_id)
        except (RedisConnectionError, RedisTimeoutError):
            if cached is not None and cached[0] is not None:
                return cached[0]
            raise _registry_unavailable() from None
        if len(self._cache) > 100_000:  # bounded: unknown keys are cached too
            self._cache.clear()
        self._cache[key_id] = (tenant, now)
        return tenant


def _registry_unavailable() -> HTTPException:
    return HTTPException(503, detail="cannot check the API key: the registry (Redis) is unavailable",
                         headers={"Retry-After": "1"})
