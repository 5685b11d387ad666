"""Hot-swap through the real server and a real (embedded) Redis: upload, serve, replace, delete, tenants."""
import threading

import httpx
import pytest

from tests.helpers import lora_artifact, tar_dir, tiny_config
from tests.live_server import running_server


def _make_adapter(tmp_path, name, seed, rank=4):
    cfg = tiny_config(tmp_path / "tinyck")
    return tar_dir(lora_artifact(tmp_path / name, cfg, {"q_proj": rank, "down_proj": rank}, seed=seed, magnitude=1.0))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("hotswap-data")
    with running_server(model="tiny", data_dir=data, api_keys="key-a:alpha,key-b:beta", admin_token="admin-secret") as s:
        yield s


def _complete(server, key, adapter, **extra):
    body = {"prompt": "hello there", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "adapter_id": adapter, **extra}
    return server.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def _upload(server, archive, adapter_id, **form):
    return server.client.post("/admin/adapters", files={"file": ("a.tar.gz", archive)},
                              data={"adapter_id": adapter_id, **form}, headers={"Authorization": "Bearer admin-secret"})


def test_upload_serve_replace_delete(server, tmp_path):
    assert _upload(server, _make_adapter(tmp_path, "v1", seed=1), "swap", public="true").status_code == 201
    base = _complete(server, "key-a", None).json()["choices"][0]["text"]
    v1 = _complete(server, "key-a", "swap").json()["choices"][0]["text"]
    assert v1 != base  # the adapter is applied
    r = server.client.post("/admin/adapters", files={"file": ("a.tar.gz", _make_adapter(tmp_path, "v2", seed=2))},
                           data={"adapter_id": "swap", "replace": "true"}, headers={"Authorization": "Bearer admin-secret"})
    assert r.status_code == 201 and r.json()["version"] == 2
    v2 = _complete(server, "key-b", "swap").json()["choices"][0]["text"]
    assert v2 not in (v1, base)  # the new version serves new requests at once
    assert server.client.delete("/admin/adapters/swap", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
    gone = _complete(server, "key-a", "swap")
    assert gone.status_code == 404 and gone.json()["error"]["message"]


def test_in_flight_request_finishes_on_its_version(server, tmp_path):
    assert _upload(server, _make_adapter(tmp_path, "f1", seed=3), "inflight", public="true").status_code == 201
    expected = _complete(server, "key-a", "inflight", max_tokens=40).json()["choices"][0]["text"]
    result = {}

    def long_request():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"prompt": "hello there", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                    "adapter_id": "inflight", "stream": True}
            with c.stream("POST", "/v1/completions", json=body, headers={"Authorization": "Bearer key-a"}) as resp:
                text = []
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        import json
                        chunk = json.loads(line[6:])
                        text += [ch["text"] for ch in chunk["choices"]]
                        if len(text) == 2:  # started: now delete the adapter under it
                            started.set()
                result["text"] = "".join(text)

    started = threading.Event()
    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(30)
    assert server.client.delete("/admin/adapters/inflight", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
    t.join(60)
    assert result["text"] == expected  # finished on the version it started with
    assert _complete(server, "key-a", "inflight").status_code == 404


def test_an_adapter_without_an_owner_must_be_said_public_where_tenants_exist(server, tmp_path):
    """With API keys in use, an adapter without an owner would be usable by every tenant: a forgotten `tenant`
    field is refused (400, nothing stored), on POST and on a PUT that creates; public=true says it on purpose."""
    archive = _make_adapter(tmp_path, "o1", seed=7)
    admin = {"Authorization": "Bearer admin-secret"}
    for form in ({}, {"public": "false"}):
        refused = _upload(server, archive, "ownerless", **form)
        assert refused.status_code == 400 and "would have no owner" in refused.json()["error"]["message"]
    put = server.client.put("/admin/adapters/ownerless", files={"file": ("a.tar.gz", archive)}, headers=admin)
    assert put.status_code == 400 and "would have no owner" in put.json()["error"]["message"]
    garbage = server.client.put("/admin/adapters/ownerless", files={"file": ("a.tar.gz", b"not an archive")},
                                headers=admin)
    assert garbage.status_code == 400 and "would have no owner" in garbage.json()["error"]["message"]  # unparsed
    assert server.client.get("/admin/adapters/ownerless", headers=admin).status_code == 404  # nothing stored
    assert _complete(server, "key-b", "ownerless").status_code == 404
    assert _upload(server, archive, "ownerless", public="true").status_code == 201
    assert _complete(server, "key-b", "ownerless").status_code == 200
    replaced = server.client.put("/admin/adapters/ownerless", files={"file": ("a.tar.gz", archive)}, headers=admin)
    assert replaced.status_code == 201 and replaced.json()["public"] is True  # a new version keeps its visibility
    assert server.client.delete("/admin/adapters/ownerless", headers=admin).status_code in (200, 204)


def test_tenant_isolation(server, tmp_path):
    assert _upload(server, _make_adapter(tmp_path, "t1", seed=4), "alpha-only", tenant="alpha").status_code == 201
    assert _complete(server, "key-a", "alpha-only").status_code == 200
    other = _complete(server, "key-b", "alpha-only")
    assert other.status_code == 404  # not 403: ids do not leak across tenants
    models_b = server.client.get("/v1/models", headers={"Authorization": "Bearer key-b"}).json()["data"]
    assert "alpha-only" not in {m["id"] for m in models_b}
    assert _complete(server, "wrong-key", None).status_code == 401
    assert server.client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
