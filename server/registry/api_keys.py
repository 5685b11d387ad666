"""The API keys that bind /v1 requests to tenants, as Redis holds them; who may call /v1 with them is decided by
server/api/auth.py (`TenantResolver`).

- `MULTIPLEX_API_KEYS`: `key1:tenantA,key2:tenantB` (`parse_api_keys`). Keys can also be created at run time
  (`POST /admin/api-keys`); those live in Redis: `mpx:apikey:{sha256(key)}` -> tenant, and `mpx:apikeys` (hash:
  sha256 -> JSON with the tenant, the key's first characters and its creation time) to list and revoke them. Only
  digests are stored.
- `mpx:apikeys:required`: recorded by the first key, static or created at run time, and never unset by the server,
  so that every replica, now and after a restart, knows a key has existed, even once every key is revoked.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_PREFIX_CHARS = 12  # how much of a key is kept to recognise it by ("mpx_" + 8 random characters)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"invalid tenant {tenant!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return tenant


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
        self.required_key = f"{prefix}:apikeys:required"  # set once any key has existed; never unset by the server

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
            pipe.set(self.required_key, 1)
            await pipe.execute()
        return api_key

    async def keys_required(self) -> bool:
        """Has any API key existed? (Keys made before the marker existed count, and set it.)"""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(self.required_key)
            pipe.hlen(self.index_key)
            marked, num_keys = await pipe.execute()
        if num_keys and not marked:
            await self.remember_keys_required()
        return bool(marked or num_keys)

    async def remember_keys_required(self) -> None:
        await self.client.set(self.required_key, 1)

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
