"""Who may call which routes: the admin token of the /admin routes, and the API key -> tenant of the /v1 routes
(the keys themselves, `MULTIPLEX_API_KEYS` and those created at run time, are kept by server/registry/api_keys.py;
which adapters a tenant may then use, by server/registry/visibility.py).

Environment (the server's settings, server/config.py, carry the same names):
- `MULTIPLEX_ADMIN_TOKEN`: the bearer token of the /admin routes. Unset: `AdminAuth` reads it from its token file
  (`<data_dir>/admin-token` for the server), creating the file (mode 0600) with a random token the first time, so
  the admin API is never open and a restart keeps the token. The log names the file, never the token.
- `MULTIPLEX_API_AUTH` (`TenantResolver.mode`): who may call /v1 without a key.
  - `auto` (default): everyone, as long as no API key has ever existed (local development). The first key, static
    or created at run time, records `mpx:apikeys:required` in Redis, and from then on every replica, now and after
    a restart, answers 401 to a request without a known key, even once every key is revoked: /v1 never opens
    because a count reached zero.
  - `required`: a key always, even before any exists (then nobody can call /v1 until a key is created).
  - `open`: an explicit choice: a request without a key (or with a key the server does not know, as the OpenAI
    clients send a placeholder) is served as the anonymous tenant None; a known key still selects its tenant.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from fastapi import Request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from server.config import API_AUTH_MODES
from server.registry.api_keys import ApiKeyStore, hash_api_key
from server.registry.store import RegistryUnavailableError

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin-token"  # in the data directory


def bearer_token(authorization: str | None) -> str | None:
    """'Bearer <token>' -> token (scheme case-insensitive); anything else -> None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


class AdminAuth:
    """The admin bearer token; an instance is a FastAPI dependency (`Depends(admin_auth)`).

    `token` None: the one in `token_file`, created with a random token if absent (a restart keeps it); without
    a file, a random token for this process only. The log says where the token is, never what it is."""

    def __init__(self, token: str | None, *, token_file: Path | None = None) -> None:
        self.is_generated = not token
        if token:
            self.token = token
        elif token_file is not None:
            self.token = read_or_create_token(Path(token_file))
            log.warning("MULTIPLEX_ADMIN_TOKEN is not set; the admin token is in %s (readable by this user only)",
                        token_file)
        else:
            self.token = secrets.token_urlsafe(32)
            log.warning("MULTIPLEX_ADMIN_TOKEN is not set; this process generated a random admin token (not shown: "
                        "set MULTIPLEX_ADMIN_TOKEN to choose one)")

    def check(self, authorization: str | None) -> None:
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("admin routes need 'Authorization: Bearer <admin token>' (MULTIPLEX_ADMIN_TOKEN)")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise unauthorized("invalid admin token")

    async def __call__(self, request: Request) -> None:
        self.check(request.headers.get("authorization"))


def read_or_create_token(path: Path) -> str:
    """The token in `path`; a new random one written there (mode 0600, atomically) when the file is absent."""
    try:
        return _read_token(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        os.link(staging, path)  # atomic, and refuses to replace: a server started at the same moment wins
    except FileExistsError:
        token = _read_token(path)
    finally:
        staging.unlink(missing_ok=True)
    return token


def _read_token(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as file:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:  # readable by others: make it ours alone again
            os.fchmod(fd, 0o600)
            log.warning("%s was readable by other users; its mode is now 0600", path)
        token = file.read().strip()
    if not token:
        raise ValueError(f"{path} is empty: delete it to have a new admin token generated, or set "
                         "MULTIPLEX_ADMIN_TOKEN")
    return token


class TenantResolver:
    """Authorization header -> tenant for the /v1 routes, and whether a key is required at all (`mode`, see the
    module's docstring).

    Keys from Redis are cached for `cache_ttl_s` (a revoked key works at most that long on other replicas), and a
    cached answer outlives a Redis outage, so that tenants keep being served while Redis is away. Once keys are
    required they stay required for the life of the process (and, through Redis, of the registry)."""

    def __init__(self, static_keys: Mapping[str, str], store: ApiKeyStore | None, *, mode: str = "auto",
                 cache_ttl_s: float = 10.0) -> None:
        if mode not in API_AUTH_MODES:
            raise ValueError(f"unknown API auth mode {mode!r}; use one of {', '.join(API_AUTH_MODES)}")
        self.static = {hash_api_key(k): t for k, t in static_keys.items()}  # by digest: no key-dependent timing
        self.store = store
        self.mode = mode
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[str | None, float]] = {}  # key id -> (tenant or None, when it was read)
        self._is_required = mode == "required" or (mode == "auto" and bool(self.static))
        self._required_read_at: float | None = None  # when Redis last said no key has existed (mode auto)
        self._is_static_remembered = not self.static  # static keys recorded in Redis (for later restarts)
        self._remember_tried_at = -cache_ttl_s  # retried at most once per TTL while Redis is away
        if mode == "open":
            log.warning("MULTIPLEX_API_AUTH=open: /v1 serves requests without an API key (as no tenant)")

    async def resolve_tenant(self, authorization: str | None) -> str | None:
        """The tenant of the request's key; None for an anonymous caller where /v1 is open. 401 when a key is
        required and this request's is missing or unknown; 503 when only Redis could tell and it is away."""
        token = bearer_token(authorization)
        if not await self._keys_required():
            if token is None or self.mode != "open":
                return None  # mode auto and no key has ever existed: there is no key to look up
            return await self._tenant_of(hash_api_key(token))  # open: a known key still selects its tenant
        if token is None:
            raise unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
        tenant = await self._tenant_of(hash_api_key(token))
        if tenant is None:
            raise unauthorized("invalid API key")
        return tenant

    async def tenants_in_use(self) -> bool:
        """Whether /v1 requests are told apart by tenant: API keys are required (a key exists or existed, or
        MULTIPLEX_API_AUTH=required); an open server (MULTIPLEX_API_AUTH=open) answers False."""
        return self.mode != "open" and await self._keys_required()

    def invalidate(self, key_id: str | None = None) -> None:
        """This replica created (key_id None) or revoked a key: re-read from Redis now, not after the TTL."""
        if key_id is not None:
            self._cache.pop(key_id, None)
        self._required_read_at = None

    async def _tenant_of(self, key_id: str) -> str | None:
        return self.static.get(key_id) or await self._stored_tenant(key_id)

    async def _keys_required(self) -> bool:
        now = time.monotonic()
        if not self._is_static_remembered and self.store is not None \
                and now - self._remember_tried_at > self.cache_ttl_s:
            self._remember_tried_at = now
            try:  # best effort: a restart without the static keys stays closed
                await self.store.remember_keys_required()
                self._is_static_remembered = True
            except (RedisConnectionError, RedisTimeoutError):
                pass
        if self._is_required or self.mode == "open" or self.store is None:
            return self._is_required
        if self._required_read_at is None or now - self._required_read_at > self.cache_ttl_s:
            try:
                self._is_required = await self.store.keys_required()
            except (RedisConnectionError, RedisTimeoutError):
                if self._required_read_at is None:  # never known: refuse rather than open the server
                    raise _registry_unavailable() from None
                return False  # known a moment ago that no key had ever existed
            self._required_read_at = now
        return self._is_required

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


def _registry_unavailable() -> RegistryUnavailableError:
    return RegistryUnavailableError("cannot check the API key: the registry (Redis) is unavailable; retry later")
