"""The admin API: upload (check, validate, normalise, store), list, get and delete adapters; create, list and revoke
API keys. Every route needs `Authorization: Bearer <admin token>`.

Path of an upload: multipart body (read within the size limit) -> `server.api.upload.parse_upload` (archive -> validated
LoadedAdapter, in a worker thread) -> `adapters.artifact.adapter_to_bytes` (format-1 manifest + weights) ->
`Registry.put` (blob, then manifest + index + event in one transaction) -> `on_change("put", id, version)` -> 201
with the stored record. Nothing reaches Redis before the adapter is fully validated.

Environment (`AdminSettings.from_env`; the server's settings should carry the same names):
- `MULTIPLEX_MAX_ADAPTER_BYTES` (default 512 MiB): the most bytes an upload, and the archive's unpacked total, may have
- `MULTIPLEX_MAX_RANK` (default 128): the highest rank accepted, for every part that has one (LowRank, PARA)
- `MULTIPLEX_DTYPE` (default auto: bfloat16 with CUDA, else float32): the serving dtype; uploaded values must stay
  finite once cast to it
- `MULTIPLEX_ADMIN_TOKEN`: see `server.api.auth`
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from adapters.artifact import adapter_to_bytes
from adapters.validate import serving_dtype
from server.api.auth import AdminAuth, TenantResolver
from server.api.errors import ApiError
from server.api.openapi import form_body
from server.api.upload import UploadError, parse_upload
from server.registry.api_keys import TENANT_PATTERN, ApiKeyStore, check_tenant
from server.registry.store import (
    ID_PATTERN,
    AdapterExistsError,
    AdapterNotFoundError,
    Registry,
    check_adapter_id,
    outage_is_unavailable,
)

DEFAULT_MAX_ADAPTER_BYTES = 512 << 20
DEFAULT_MAX_RANK = 128
FORM_FIELDS = ("file", "adapter_id", "tenant", "public", "replace")
_FORM_OVERHEAD_BYTES = 1 << 20  # multipart boundaries and the small fields, beyond the archive itself
_ERROR_TYPES = {413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_adapter"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

OnChange = Callable[[str, str, int], Any]  # (event "put" | "delete", adapter id, version); may be async

# The bodies these routes read themselves, for the OpenAPI document (server/api/openapi.py).
_FLAG_SCHEMA = {"type": "string", "enum": [*_TRUE, *_FALSE]}
_TENANT_SCHEMA = {"type": "string", "pattern": f"^{TENANT_PATTERN.pattern}$"}
UPLOAD_FORM_SCHEMA = {
    "type": "object", "required": ["file"], "additionalProperties": False,
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "a .tar, .tar.gz or .zip of an artifact-format-1 or PEFT LoRA/IA3 directory"},
        "adapter_id": {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$",
                       "description": "default: the manifest's name (POST); the path's id (PUT)"},
        "tenant": {**_TENANT_SCHEMA, "description": "the owner: only its API keys may use the adapter"},
        "public": {**_FLAG_SCHEMA, "description": "usable by every tenant"},
        "replace": {**_FLAG_SCHEMA, "description": "POST: store a new version of an existing id"},
    },
}
API_KEY_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["tenant"], "properties": {"tenant": _TENANT_SCHEMA}}}}}}


@dataclass(frozen=True)
class AdminSettings:
    admin_token: str | None = None  # None: generated at start (server.api.auth.AdminAuth)
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    max_unpacked_bytes: int | None = None  # None: max_adapter_bytes
    max_rank: int = DEFAULT_MAX_RANK
    base_model_name: str | None = None  # refused as an adapter id
    dtype: str | None = None  # the serving dtype (float32, bfloat16, float16); None or "auto": as the server's auto

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, base_model_name: str | None = None) -> AdminSettings:
        env = os.environ if environ is None else environ
        return cls(admin_token=env.get("MULTIPLEX_ADMIN_TOKEN") or None,
                   max_adapter_bytes=_positive_int(env, "MULTIPLEX_MAX_ADAPTER_BYTES", DEFAULT_MAX_ADAPTER_BYTES),
                   max_rank=_positive_int(env, "MULTIPLEX_MAX_RANK", DEFAULT_MAX_RANK),
                   base_model_name=base_model_name, dtype=env.get("MULTIPLEX_DTYPE") or None)


def _serving_dtype(name: str | None) -> torch.dtype:
    """The dtype uploads are checked in: the configured one, else what the server's "auto" picks."""
    if name is None or name.strip().lower() == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return serving_dtype(name.strip())


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name) or str(default)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


def admin_router(registry: Registry, spec: dict, settings: Any, on_change: OnChange | None = None, *,
                 admin_auth: AdminAuth | None = None, api_keys: ApiKeyStore | None = None,
                 tenants: TenantResolver | None = None) -> APIRouter:
    """The /admin routes over `registry`, validating uploads against the backbone `spec`.

    `settings`: an AdminSettings or any object with its field names (missing ones take AdminSettings' defaults).
    `on_change(kind, adapter_id, version)`: called (awaited if async) after each stored put or delete, so that
    this replica can act before the pub/sub event arrives. `admin_auth`: built from `settings.admin_token` when
    not given; the router keeps it as `router.admin_auth` (its `.token` is the generated one when none was
    configured). `api_keys`: defaults to a store on the registry's Redis. `tenants`: the /v1 resolver, told when
    this replica creates or revokes a key."""
    limits = AdminSettings(**{f: getattr(settings, f) for f in AdminSettings.__dataclass_fields__
                              if getattr(settings, f, None) is not None})
    auth = admin_auth or AdminAuth(limits.admin_token)
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(auth)])
    router.admin_auth = auth  # type: ignore[attr-defined]
    _adapter_routes(router, registry, _Uploads(registry, spec, limits, on_change, tenants), on_change,
                    limits.max_adapter_bytes + _FORM_OVERHEAD_BYTES)
    _api_key_routes(router, api_keys or ApiKeyStore(registry.client, registry.prefix), tenants)
    return router


def _adapter_routes(router: APIRouter, registry: Registry, uploads: _Uploads, on_change: OnChange | None,
                    max_body_bytes: int) -> None:
    @router.post("/adapters", status_code=201, openapi_extra=form_body(UPLOAD_FORM_SCHEMA))
    async def upload_adapter(request: Request) -> dict:
        async with _upload_form(request, max_body_bytes) as form:
            replace = _replace_flag(form, request)
            return await uploads.store(form, form.get("adapter_id") or None, replace=replace)

    @router.put("/adapters/{adapter_id}", status_code=201, openapi_extra=form_body(UPLOAD_FORM_SCHEMA))
    async def replace_adapter(adapter_id: str, request: Request) -> dict:
        async with _upload_form(request, max_body_bytes) as form:
            if form.get("adapter_id") not in (None, "", adapter_id):
                raise ApiError(400, f"adapter_id {form['adapter_id']!r} in the form differs from {adapter_id!r} "
                                    "in the path")
            return await uploads.store(form, adapter_id, replace=True)

    @router.get("/adapters")
    async def list_adapters(tenant: str | None = None) -> dict:
        with _registry_errors():
            records = await registry.list()
        return {"adapters": [r.to_json() for r in records if tenant is None or r.tenant == tenant]}

    @router.get("/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str) -> dict:
        with _registry_errors():
            record = await registry.record(adapter_id)
        if record is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        return record.to_json()

    @router.delete("/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str) -> dict:
        with _registry_errors():
            version = await registry.delete(adapter_id)
        await _notify(on_change, "delete", adapter_id, version)
        return {"id": adapter_id, "version": version, "deleted": True}


def _api_key_routes(router: APIRouter, keys: ApiKeyStore, tenants: TenantResolver | None) -> None:
    @router.post("/api-keys", status_code=201, openapi_extra=API_KEY_BODY)
    async def create_api_key(request: Request) -> dict:
        body = await _json_object(request)
        with _registry_errors():
            created = await keys.create(body.get("tenant"))
        if tenants is not None:
            tenants.invalidate()  # the first key closes /v1 at once
        return created.to_json()

    @router.get("/api-keys")
    async def list_api_keys() -> dict:
        with _registry_errors():
            return {"api_keys": [k.to_json() for k in await keys.list()]}

    @router.delete("/api-keys/{key_ref}")
    async def delete_api_key(key_ref: str) -> dict:
        with _registry_errors():
            try:
                revoked = await keys.delete(key_ref)
            except KeyError:
                raise ApiError(404, f"no API key matches {key_ref!r} (give its key id or key prefix)") from None
        if tenants is not None:
            tenants.invalidate(revoked.key_id)
        return revoked.to_json() | {"deleted": True}


class _Uploads:
    """The upload path shared by POST and PUT."""

    def __init__(self, registry: Registry, spec: dict, limits: AdminSettings, on_change: OnChange | None,
                 tenants: TenantResolver | None = None) -> None:
        self.registry, self.spec, self.limits, self.on_change = registry, spec, limits, on_change
        self.tenants = tenants
        self.dtype = _serving_dtype(limits.dtype)

    async def store(self, form: dict[str, Any], adapter_id: str | None, *, replace: bool) -> dict:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "multipart field 'file' is missing or not a file (the adapter archive: .tar, .tar.gz "
                                "or .zip)")
        tenant, public = form.get("tenant"), _flag(form, "public")
        if isinstance(tenant, str) and not tenant.strip():  # never read as "no owner": that would publish it
            raise ApiError(400, "form field 'tenant' is empty; omit it to keep (or not set) the owner")
        with _registry_errors():
            if tenant is not None:
                check_tenant(tenant)
            if adapter_id is not None:
                self._check_id(adapter_id)
                if not replace and await self.registry.exists(adapter_id):  # before the costly part
                    raise AdapterExistsError(f"adapter {adapter_id!r} already exists (replace=true or PUT to "
                                             "upload a new version)")
            if tenant is None and not public and (not replace or (  # a new adapter: owner settled before parsing
                    adapter_id is not None and not await self.registry.exists(adapter_id))):
                await self._check_owner(adapter_id, tenant, public)
            loaded = await asyncio.to_thread(self._parse, upload.filename, await upload.read())
            adapter_id = adapter_id or self._check_id(str(loaded.manifest.get("name") or ""), from_manifest=True)
            manifest, blob = await asyncio.to_thread(adapter_to_bytes, loaded)
            previous = await self.registry.record(adapter_id) if replace else None
            if previous is not None:  # a new version keeps its owner and visibility unless the form says otherwise
                tenant = tenant if tenant is not None else previous.tenant
                public = public if form.get("public") is not None else previous.public
            elif replace:
                await self._check_owner(adapter_id, tenant, public)
            record = await self.registry.put(adapter_id, manifest, blob, tenant=tenant, public=public,
                                             replace=replace)
        await _notify(self.on_change, "put", adapter_id, record.version)
        return record.to_json()

    async def _check_owner(self, adapter_id: str | None, tenant: str | None, public: bool) -> None:
        """A new adapter without an owner is usable by every tenant: where tenants exist (API keys in use), that
        must be said (public=true), not be what a forgotten `tenant` field does."""
        if tenant is None and not public and self.tenants is not None and await self.tenants.tenants_in_use():
            name = f"adapter {adapter_id!r}" if adapter_id else "the adapter"
            raise ApiError(400, f"{name} would have no owner, and an adapter without one is usable by every tenant: "
                                "name its owner (form field 'tenant') or make it public (form field 'public=true')")

    def _parse(self, filename: str | None, data: bytes) -> Any:
        max_unpacked = self.limits.max_unpacked_bytes or self.limits.max_adapter_bytes
        try:
            return parse_upload(filename, data, self.spec, max_bytes=self.limits.max_adapter_bytes,
                                max_unpacked_bytes=max_unpacked, max_rank=self.limits.max_rank, dtype=self.dtype)
        except UploadError as e:
            raise ApiError(e.status_code, e.message, _ERROR_TYPES.get(e.status_code)) from None

    def _check_id(self, adapter_id: str, *, from_manifest: bool = False) -> str:
        try:
            check_adapter_id(adapter_id)
        except ValueError as e:
            hint = " (taken from the manifest's name; pass the form field adapter_id)" if from_manifest else ""
            raise ApiError(400, f"{e}{hint}") from None
        if adapter_id == self.limits.base_model_name:
            raise ApiError(400, f"adapter id {adapter_id!r} is the base model's name; choose another")
        return adapter_id


@contextlib.contextmanager
def _registry_errors() -> Iterator[None]:
    """Redis outages -> RegistryUnavailableError; a refused id, tenant or key reference (ValueError) -> 400. The
    registry's own errors pass through to the table in server/api/errors.py."""
    try:
        with outage_is_unavailable():
            yield
    except ValueError as e:
        raise ApiError(400, str(e)) from None


@contextlib.asynccontextmanager
async def _upload_form(request: Request, max_body_bytes: int) -> AsyncIterator[dict[str, Any]]:
    """The multipart form, its body read within `max_body_bytes` (413 beyond, before parsing or spooling it)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "expected a multipart/form-data body with the adapter archive in the field 'file'",
                       "unsupported_media_type")
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"request body over the server's limit of {max_body_bytes} bytes "
                              "(MULTIPLEX_MAX_ADAPTER_BYTES)")
    if length.isdigit() and int(length) > max_body_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise too_large

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=len(FORM_FIELDS))
    try:
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        if unknown:
            raise ApiError(400, f"unknown form fields {unknown}; expected {', '.join(FORM_FIELDS)}")
        repeated = sorted({k for k in form.keys() if len(form.getlist(k)) > 1})
        if repeated:  # which one counts would be a guess (and a proxy may have checked the other)
            raise ApiError(400, f"form fields given more than once: {repeated}")
        yield dict(form.items())
    finally:
        await form.close()  # the spooled upload


def _replace_flag(form: Mapping[str, Any], request: Request) -> bool:
    """`replace` from the form or the query string; 400 when both say it and disagree."""
    in_form, in_query = _flag(form, "replace"), _flag(request.query_params, "replace")
    if "replace" in form and "replace" in request.query_params and in_form != in_query:
        raise ApiError(400, f"replace is {str(in_form).lower()} in the form and {str(in_query).lower()} in the query "
                            "string; give it once")
    return in_form or in_query


def _flag(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name)
    if value is None:
        return False
    text = str(value).strip().lower()
    if text not in _TRUE + _FALSE:
        raise ApiError(400, f"{name}: expected true or false, got {value!r}")
    return text in _TRUE


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        raise ApiError(400, "request body is not valid JSON (expected {\"tenant\": ...})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object (expected {\"tenant\": ...})")
    return body


async def _notify(on_change: OnChange | None, kind: str, adapter_id: str, version: int) -> None:
    if on_change is not None:
        result = on_change(kind, adapter_id, version)
        if inspect.isawaitable(result):
            await result
