"""Hostile requests against a real server (uvicorn, embedded Redis, two tenants with API keys): issue 12's rows
about the request path and auth. Each is refused cheaply, before the work it would cost, and none can stall
/health. Every test of the table failed on the server before the request guard (server/api/guard.py).

| row                                             | test                                                         |
| 128 MB body without an API key: parsed for 10 s | test_big_body_is_refused_before_it_is_read                   |
| 20-million-character prompt with a valid key    | test_long_prompts_are_refused_before_tokenizing,             |
|                                                 | test_tokenization_runs_off_the_event_loop                    |
| revoking the last runtime key opened /v1        | test_revoking_the_last_key_keeps_v1_closed,                  |
|                                                 | test_api_auth_modes                                          |
| seed = 10**30 was a 500                         | test_numbers_out_of_range_are_400                            |
| the generated admin token in the log            | test_generated_admin_token_is_in_a_file_not_in_the_log       |
| NaN in JSON, 500 on logprobs                    | test_an_adapter_whose_logits_are_not_finite_fails_its_request_and_json_is_strict |
| /health stalled by any of them                  | test_health_answers_quickly_during_hostile_requests          |

test_keys_and_tenants_through_the_guard checks that the tenants' semantics did not change (it passed before too).
"""
from __future__ import annotations

import json
import logging
import math
import select
import socket
import stat
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.helpers import assert_error, parse_sse
from tests.live_server import LiveServer, running_server

KEYS = {"acme": "key-of-acme", "globex": "key-of-globex"}
ADMIN_TOKEN = "admin-secret"
OVERFLOW_ADAPTER = "overflow"  # IA3 vectors of 6e4: within every upload limit, they overflow float16 at run time
MIN_LOGPROB = -9999.0  # server/api/generation.py's floor, spelled out so that this file imports on any version
PROMPT = "The quick brown fox"
FAST_S = 2.0  # a refusal "at once": generous for a loaded CI machine, far below the seconds the work would take


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def overflow_adapters(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """An --adapters directory with one IA3 adapter of vectors 6e4 on every layer: within every upload limit (its
    values are finite in float16, its size below 1e6), it computes in float32 and overflows a float16 model on any
    prompt (the activations scaled by 6e4 a layer): logits that are not finite."""
    from adapters.artifact import save_artifact
    from server.model.config import ModelConfig
    from server.model.tiny import ensure_tiny_checkpoint
    from tests.helpers import random_ia3

    cfg = ModelConfig.from_dir(ensure_tiny_checkpoint(data_dir / "models" / "tiny"))
    deltas = random_ia3(cfg, seed=0)
    for key in deltas.scale:
        deltas.scale[key] = torch.full_like(deltas.scale[key], 6e4)
    directory = tmp_path_factory.mktemp("overflow-adapters")
    save_artifact(directory / OVERFLOW_ADAPTER, deltas, method="ia3", spec=cfg.spec())
    return directory


@pytest.fixture(scope="module")
def server(overflow_adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Two tenants with static keys, a known admin token; a data directory (and embedded Redis) of its own."""
    keys = ",".join(f"{key}:{tenant}" for tenant, key in KEYS.items())
    with running_server(model="tiny", adapters=overflow_adapters, data_dir=tmp_path_factory.mktemp("hostile-data"),
                        api_keys=keys, admin_token=ADMIN_TOKEN, max_num_seqs=4) as live:
        yield live


# --- raw HTTP: what a hostile client does that httpx will not --------------------------------------------------

def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


def raw_exchange(server: LiveServer, head: bytes, body: Iterable[bytes] = (),
                 timeout_s: float = 10.0) -> tuple[int | None, dict[str, Any] | None, int, float]:
    """Send `head`, then the pieces of `body` until the server answers; -> (status or None when it did not answer
    within `timeout_s`, the JSON body, how many body bytes were sent, seconds from the first byte to the answer)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    num_sent = 0
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(timeout_s)
        start = time.monotonic()
        sock.sendall(head)
        for piece in body:
            if select.select([sock], [], [], 0)[0]:  # the server has answered (or closed): stop sending
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                break
            num_sent += len(piece)
        raw = b""
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            ready = select.select([sock], [], [], max(deadline - time.monotonic(), 0))[0]
            if not ready:
                break
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
            if _response_complete(raw):
                break
        seconds = time.monotonic() - start
    if not raw.startswith(b"HTTP/1.1 "):
        return None, None, num_sent, seconds
    head_text, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head_text.split(b" ", 2)[1])
    try:
        return status, json.loads(payload), num_sent, seconds
    except ValueError:
        return status, None, num_sent, seconds


def _response_complete(raw: bytes) -> bool:
    head, sep, payload = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(payload) >= int(value)
    return False


def chunked(pieces: Iterable[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)


def assert_refused(status: int | None, body: dict[str, Any] | None, expected: int, *words: str) -> None:
    assert status == expected, (status, body)
    assert body is not None and set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    for word in words:
        assert word in body["error"]["message"], body


def strict_json(text: str) -> Any:
    """JSON as the RFC has it: NaN, Infinity and -Infinity are not JSON."""
    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} is not JSON: {text[:300]}")

    return json.loads(text, parse_constant=refuse)


# --- the rows --------------------------------------------------------------------------------------------------

def test_big_body_is_refused_before_it_is_read(server: LiveServer) -> None:
    """128 MB announced (none of it sent): no key -> 401 at once; a key -> 413 at once, as for the admin upload;
    a chunked body (no Content-Length) is counted as it streams and cut off at the limit."""
    big = {"Content-Type": "application/json", "Content-Length": str(128 << 20)}
    for path, headers, expected in [
        ("/v1/completions", big, 401),
        ("/v1/chat/completions", {**big, "Authorization": "Bearer not-a-key"}, 401),
        ("/v1/completions", {**big, **auth("acme")}, 413),
        ("/admin/adapters", {**big, "Content-Type": "multipart/form-data; boundary=x"}, 401),
        ("/admin/adapters", {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(1 << 30),
                             "Authorization": f"Bearer {ADMIN_TOKEN}"}, 413),  # over max_adapter_bytes
        ("/admin/api-keys", {**big, "Authorization": f"Bearer {ADMIN_TOKEN}"}, 413),
    ]:
        status, body, _, seconds = raw_exchange(server, request_head("POST", path, headers), timeout_s=5)
        assert_refused(status, body, expected)
        assert seconds < FAST_S, (path, seconds)

    # chunked, with a key: the server answers 413 once it has counted past 16 MiB, without waiting for the rest
    piece = b"a" * (1 << 20)
    pieces = chunked([b'{"prompt": "', *[piece] * 48])  # 48 MiB offered, never finished
    head = request_head("POST", "/v1/completions", {"Content-Type": "application/json",
                                                     "Transfer-Encoding": "chunked", **auth("globex")})
    status, body, num_sent, _ = raw_exchange(server, head, pieces, timeout_s=30)
    assert_refused(status, body, 413, "limit")
    print(f"\nchunked body: 413 after {num_sent / (1 << 20):.0f} MiB sent (limit 16 MiB)")
    assert num_sent < 40 << 20, num_sent  # it stopped reading long before the end (socket buffers take some)
    assert server.client.get("/health").status_code == 200


def test_long_prompts_are_refused_before_tokenizing(server: LiveServer) -> None:
    """20M characters do not fit the 16 MiB body limit (413); a megabyte does, and is refused by its length in
    characters (400 naming the field), before the tokenizer sees it."""
    start = time.monotonic()
    response = server.client.post("/v1/completions", json={"prompt": "z" * 20_000_000}, headers=auth("acme"))
    assert_error(response, 413, "limit")
    assert time.monotonic() - start < FAST_S * 2  # sending 20 MB through the loopback included

    million = "z" * 1_000_000
    assert_error(server.client.post("/v1/completions", json={"prompt": million}, headers=auth("acme")), 400,
                 "prompt", "characters")
    chat = {"messages": [{"role": "user", "content": million}]}
    assert_error(server.client.post("/v1/chat/completions", json=chat, headers=auth("acme")), 400,
                 "messages", "characters")
    many = {"messages": [{"role": "user", "content": ""}] * 20_000}  # no content, but 80,000 characters of roles
    assert_error(server.client.post("/v1/chat/completions", json=many, headers=auth("acme")), 400, "messages")
    ids = {"prompt": [1] * (server.engine.max_model_len * 4)}  # token ids: bounded by the context, not the vocab
    assert_error(server.client.post("/v1/completions", json=ids, headers=auth("acme")), 400, "context")
    # a prompt within the limit still reaches the tokenizer, and the context check
    just_within = "z" * (server.engine.max_model_len * 4)
    assert_error(server.client.post("/v1/completions", json={"prompt": just_within}, headers=auth("acme")), 400,
                 "context")


def test_tokenization_runs_off_the_event_loop(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.api.chat as chat_module

    threads: list[str] = []
    encode_prompt, encode_chat = server.engine.encode_prompt, chat_module.encode_chat

    def recording_encode_prompt(prompt: str) -> list[int]:
        threads.append(threading.current_thread().name)
        return encode_prompt(prompt)

    def recording_encode_chat(*args: Any) -> list[int]:
        threads.append(threading.current_thread().name)
        return encode_chat(*args)

    monkeypatch.setattr(server.engine, "encode_prompt", recording_encode_prompt)
    monkeypatch.setattr(chat_module, "encode_chat", recording_encode_chat)
    response = server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers=auth("acme"))
    assert response.status_code == 200, response.text
    chat = server.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}]},
                              headers=auth("acme"))
    assert_error(chat, 400, "chat template")  # the tiny checkpoint has none: refused by the renderer
    assert len(threads) == 2 and "uvicorn" not in threads, threads  # running_server's event loop thread


def test_revoking_the_last_key_keeps_v1_closed(tmp_path: Path) -> None:
    """No static keys: /v1 is open until the first key is created; revoking every key keeps it closed, here, on
    another replica and after a restart (the registry's Redis remembers); only MULTIPLEX_API_AUTH=open opens it."""
    import asyncio

    from server.api.auth import TenantResolver
    from server.registry.api_keys import ApiKeyStore
    from server.registry.store import Registry

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with running_server(model="tiny", data_dir=tmp_path / "data", admin_token=ADMIN_TOKEN) as live:
        client = live.client
        assert client.get("/v1/models").status_code == 200  # no key has ever existed: open (local development)
        created = client.post("/admin/api-keys", json={"tenant": "acme"}, headers=admin)
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        assert_error(client.get("/v1/models"), 401, "API key")
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200

        assert client.delete(f"/admin/api-keys/{created.json()['key_id']}", headers=admin).status_code == 200
        assert client.get("/admin/api-keys", headers=admin).json() == {"api_keys": []}
        assert_error(client.get("/v1/models"), 401, "API key")  # not open again
        assert_error(client.post("/v1/completions", json={"prompt": PROMPT}), 401, "API key")
        assert_error(client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}), 401, "invalid API key")

        async def replicas() -> list[Any]:
            registry = Registry.from_url(live.service.embedded.url)
            store = ApiKeyStore(registry.client, registry.prefix)
            out = []
            for mode in ("auto", "open"):
                try:
                    out.append(await TenantResolver({}, store, mode=mode).resolve_tenant(None))
                except Exception as e:  # noqa: BLE001 - the HTTP error is the result
                    out.append(getattr(e, "status_code", repr(e)))
            await registry.close()
            return out

        # another replica (or this one restarted) agrees; an operator's explicit open mode is the only way back
        assert asyncio.run(replicas()) == [401, None]


def test_api_auth_modes(tmp_path: Path) -> None:
    """MULTIPLEX_API_AUTH through the resolver, on a real Redis: static keys are remembered too (a restart without
    them stays closed), `required` needs a key before any exists, `open` serves anonymous callers on purpose."""
    import asyncio

    from server.api.auth import TenantResolver
    from server.config import ConfigError, load_settings
    from server.registry.api_keys import ApiKeyStore
    from server.registry.embedded import start_embedded_redis
    from server.registry.store import Registry

    async def statuses(store: ApiKeyStore, static: dict[str, str], mode: str, headers: list[str | None]) -> list:
        resolver, out = TenantResolver(static, store, mode=mode), []
        for header in headers:
            try:
                out.append(await resolver.resolve_tenant(header))
            except Exception as e:  # noqa: BLE001 - the HTTP error is the result
                out.append(getattr(e, "status_code", repr(e)))
        return out

    async def scenario(url: str) -> None:
        registry = Registry.from_url(url)
        store = ApiKeyStore(registry.client, registry.prefix)
        anonymous, known, unknown = None, "Bearer static-key", "Bearer placeholder"
        assert await statuses(store, {}, "auto", [anonymous, unknown]) == [None, None]  # no key has ever existed
        assert await statuses(store, {}, "required", [anonymous, unknown]) == [401, 401]
        assert await statuses(store, {"static-key": "acme"}, "auto", [anonymous, known]) == [401, "acme"]
        assert await statuses(store, {}, "auto", [anonymous, known]) == [401, 401]  # restarted without them
        assert await statuses(store, {"static-key": "acme"}, "open", [anonymous, known, unknown]) == \
            [None, "acme", None]
        await registry.close()

    with start_embedded_redis(tmp_path / "redis") as embedded:
        asyncio.run(scenario(embedded.url))
    with pytest.raises(ValueError, match="open"):
        TenantResolver({}, None, mode="opne")
    with pytest.raises(ConfigError, match="MULTIPLEX_API_AUTH"):
        load_settings(api_auth="sometimes", device="cpu")


def test_numbers_out_of_range_are_400(server: LiveServer) -> None:
    cases = [
        ("/v1/completions", {"seed": 10**30}, "seed"),
        ("/v1/completions", {"seed": 2**63}, "seed"),
        ("/v1/completions", {"seed": -1}, "seed"),
        ("/v1/completions", {"top_k": 10**30}, "top_k"),
        ("/v1/completions", {"top_k": 2**63}, "top_k"),
        ("/v1/completions", {"max_tokens": 10**30}, "max_tokens"),
        ("/v1/completions", {"logprobs": 10**30}, "logprobs"),
        ("/v1/completions", {"prompt": [10**30]}, "prompt"),
        ("/v1/completions", {"temperature": 1e308 * 10}, "temperature"),
        ("/v1/completions", {"model": "m" * 100_000}, "model"),
        ("/v1/chat/completions", {"seed": 10**30}, "seed"),
        ("/v1/chat/completions", {"top_logprobs": 10**30, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {"max_completion_tokens": 10**30}, "max_completion_tokens"),
    ]
    for path, fields, word in cases:
        body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
        content = json.dumps({**body, "max_tokens": 2, **fields})  # 1e309 is written as Infinity by json.dumps
        response = server.client.post(path, content=content, headers={**auth("acme"), "Content-Type":
                                                                       "application/json"})
        error = assert_error(response, 400, word)
        assert error["type"] == "invalid_request_error", (fields, error)
    ok = server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "seed": 2**63 - 1,
                                                     "top_k": 2**63 - 1}, headers=auth("acme"))
    assert ok.status_code == 200, ok.text  # the largest accepted values are served


def test_generated_admin_token_is_in_a_file_not_in_the_log(tmp_path: Path) -> None:
    from server.api.auth import AdminAuth

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    data_dir = tmp_path / "data"
    try:
        with running_server(model="tiny", data_dir=data_dir) as live:
            token_file = data_dir / "admin-token"
            assert token_file.is_file()
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # readable by the server's user only
            assert token_file.read_text().strip() == live.admin_token
            listed = live.client.get("/admin/adapters", headers={"Authorization": f"Bearer {live.admin_token}"})
            assert listed.status_code == 200, listed.text
    finally:
        root.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert not any(live.admin_token in message for message in messages), messages
    assert any(str(token_file) in message for message in messages), messages  # the log names the file
    # a restart reuses the file's token; a configured token wins and leaves the file alone
    assert AdminAuth(None, token_file=token_file).token == live.admin_token
    assert AdminAuth("chosen", token_file=tmp_path / "unused").token == "chosen"
    assert not (tmp_path / "unused").exists()


@pytest.fixture
def fp16_server(overflow_adapters: Path, tmp_path: Path) -> Iterator[LiveServer]:
    """The tiny model in float16, with the same keys and adapters."""
    keys = ",".join(f"{key}:{tenant}" for tenant, key in KEYS.items())
    with running_server(model="tiny", adapters=overflow_adapters, data_dir=tmp_path / "data", api_keys=keys,
                        admin_token=ADMIN_TOKEN, max_num_seqs=4, dtype="float16") as live:
        yield live


def test_an_adapter_whose_logits_are_not_finite_fails_its_request_and_json_is_strict(fp16_server: LiveServer) -> None:
    """On a float16 model the overflowing adapter's logits are not finite: its request is answered with an error
    naming the adapter (streamed: an error event; whole: 422), never tokens drawn from NaN, while the base model
    answers; the adapter is not quarantined; every body is JSON (no NaN literal).
    Logprobs the engine could still report as -inf or NaN (a token the sampler ruled out; a base model's own
    overflow) are floored to MIN_LOGPROB on the wire, and the encoders refuse NaN, so a regression fails loudly."""
    from fastapi.responses import JSONResponse

    from server.api.generation import reported_logprob, sse

    body = {"prompt": PROMPT, "adapter_id": OVERFLOW_ADAPTER, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "logprobs": 2}
    streamed = fp16_server.client.post("/v1/completions", json={**body, "stream": True}, headers=auth("acme"))
    assert streamed.status_code == 200
    for block in streamed.text.split("\n\n")[:-1]:
        payload = block.removeprefix("data: ")
        if payload != "[DONE]":
            strict_json(payload)
    events = parse_sse(streamed.text)
    errors = [event["error"] for event in events if "error" in event]
    assert len(errors) == 1 and errors[0]["type"] == "adapter_overflow", events
    assert f"adapter {OVERFLOW_ADAPTER!r} version 1 gave logits that are not finite" in errors[0]["message"]
    assert not any(e["choices"][0]["text"] for e in events if "choices" in e)  # no token drawn from NaN

    whole = fp16_server.client.post("/v1/completions", json=body, headers=auth("acme"))
    assert whole.status_code == 422 and strict_json(whole.text)["error"]["type"] == "adapter_overflow"
    assert "not finite" in whole.json()["error"]["message"]
    ok = fp16_server.client.post("/v1/completions", json={**body, "adapter_id": None}, headers=auth("acme"))
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["token_logprobs"]) == 4

    assert [reported_logprob(v) for v in (math.nan, -math.inf, math.inf, -1e5, -0.5)] == [MIN_LOGPROB] * 4 + [-0.5]
    for encode in (lambda value: sse({"logprob": value}), lambda value: JSONResponse({"logprob": value})):
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError):
                encode(value)


def test_keys_and_tenants_through_the_guard(server: LiveServer, tmp_path: Path) -> None:
    """The tenants' semantics, unchanged: no key or an unknown key 401, another tenant's adapter 404."""
    from adapters.artifact import save_artifact
    from server.model.config import ModelConfig
    from server.model.tiny import ensure_tiny_checkpoint
    from tests.helpers import random_lowrank, tar_dir

    cfg = ModelConfig.from_dir(ensure_tiny_checkpoint(tmp_path / "tiny"))
    archive = tar_dir(save_artifact(tmp_path / "private", random_lowrank(cfg, {"q_proj": 2}, seed=3), method="lora",
                                    spec=cfg.spec()))
    uploaded = server.client.post("/admin/adapters", files={"file": ("a.tar.gz", archive)},
                                  data={"adapter_id": "acme-only", "tenant": "acme"},
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert uploaded.status_code == 201, uploaded.text
    body = {"prompt": PROMPT, "adapter_id": "acme-only", "max_tokens": 2}
    for headers, words in (({}, ["API key"]), ({"Authorization": "Bearer wrong"}, ["invalid API key"]),
                           ({"Authorization": f"Basic {KEYS['acme']}"}, ["Bearer"])):
        response = server.client.post("/v1/completions", json=body, headers=headers)
        assert_error(response, 401, *words)
        assert response.headers["www-authenticate"] == "Bearer"
    assert server.client.post("/v1/completions", json=body, headers=auth("acme")).status_code == 200
    assert_error(server.client.post("/v1/completions", json=body, headers=auth("globex")), 404, "acme-only")
    models = {m["id"] for m in server.client.get("/v1/models", headers=auth("globex")).json()["data"]}
    assert "acme-only" not in models and OVERFLOW_ADAPTER in models
    assert_error(server.client.get("/admin/adapters"), 401, "admin token")
    assert_error(server.client.get("/admin/adapters", headers=auth("acme")), 401, "invalid admin token")


def test_health_answers_quickly_during_hostile_requests(server: LiveServer) -> None:
    """/health polled from another thread while a big body without a key, prompts too long for the body limit
    or for the character limit, a body of millions of JSON values and a prompt at the limit are sent."""
    big_unauthenticated = json.dumps({"prompt": "a" * (32 << 20)}).encode()
    too_long = json.dumps({"prompt": "z" * 20_000_000}).encode()
    million = json.dumps({"prompt": "z" * 1_000_000}).encode()
    within_body_limit = json.dumps({"prompt": "z" * 15_000_000}).encode()  # parsed, then refused by its length
    million_chat = json.dumps({"messages": [{"role": "user", "content": "z" * 1_000_000}]}).encode()
    many_values = json.dumps({"prompt": [1] * 7_000_000}, separators=(",", ":")).encode()  # ~14 MiB of ints
    at_the_limit = json.dumps({"prompt": "z" * (server.engine.max_model_len * 16)}).encode()
    json_headers = {"Content-Type": "application/json"}

    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            while not stop.is_set():
                start = time.perf_counter()
                response = client.get("/health")
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    failures.append(response.text)
                time.sleep(0.01)

    statuses: list[tuple[int | None, int]] = []  # (what came back, what should have)
    poller = threading.Thread(target=poll, name="health-poller")
    poller.start()
    try:
        time.sleep(0.3)
        head = request_head("POST", "/v1/completions", {**json_headers,
                                                         "Content-Length": str(len(big_unauthenticated))})
        pieces = (big_unauthenticated[i:i + (1 << 20)] for i in range(0, len(big_unauthenticated), 1 << 20))
        statuses.append((raw_exchange(server, head, pieces, timeout_s=60)[0], 401))
        with httpx.Client(base_url=server.base_url, timeout=120, headers=auth("acme")) as client:
            for path, content, expected in [("/v1/completions", too_long, 413), ("/v1/completions", million, 400),
                                            ("/v1/completions", within_body_limit, 400),
                                            ("/v1/chat/completions", million_chat, 400),
                                            ("/v1/completions", many_values, 413),
                                            ("/v1/completions", at_the_limit, 400)]:
                statuses.append((client.post(path, content=content, headers=json_headers).status_code, expected))
        time.sleep(0.3)
    finally:
        stop.set()
        poller.join(timeout=60)
    assert not failures, failures[:3]
    assert len(latencies) > 10
    worst = max(latencies)
    print(f"\n/health during hostile requests: {len(latencies)} answers, median "
          f"{statistics.median(latencies) * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert worst < 0.5, f"/health took {worst * 1000:.0f} ms"
    assert [got for got, _ in statuses] == [expected for _, expected in statuses]
