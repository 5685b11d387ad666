"""schemathesis against the server's own OpenAPI document (/openapi.json, server/api/openapi.py), over real HTTP:
every /v1 and /admin operation, with bodies generated from the documented schemas, valid ones and invalid ones.

What must hold for every request: no 5xx, and the answer is valid JSON (strict: no NaN or Infinity) -- an error
is exactly `{"error": {"type", "message"}}` -- or, for a stream, valid server-sent events: `data: {json}` events
ending with `data: [DONE]`. /health and /metrics are not fuzzed (/metrics is Prometheus text).

The server: the tiny model with a chat template added (the embedded tiny checkpoint has none, so chat requests
would stop at the 400 that says so), a short context (a chat without max_tokens generates the rest of it), one
seeded adapter, a static API key for /v1 (static keys cannot be revoked through /admin/api-keys, which is fuzzed
too) and an admin token. Half the generated /v1 bodies that name an adapter name the seeded one: random ids only
reach the 404 path.

`MULTIPLEX_FUZZ_EXAMPLES` (default 100 per operation and generation mode, positive and negative, the same examples
every run) sets the number of examples for a longer local run, with new random examples each time (and
`MULTIPLEX_FUZZ_REPORT=FILE` writes the statuses seen there).
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.helpers import make_chat_checkpoint
from tests.live_server import LiveServer, running_server

NUM_EXAMPLES = int(os.environ.get("MULTIPLEX_FUZZ_EXAMPLES", "100"))
IS_DEFAULT_RUN = "MULTIPLEX_FUZZ_EXAMPLES" not in os.environ  # the same examples every run; a longer run explores
API_KEY = "fuzz-api-key"
ADMIN_TOKEN = "fuzz-admin-token"
SEEDED_ADAPTER = "lora-r4"
# A template that accepts any roles in any order (the point is the server's path, not the template's rules).
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
STATUSES: Counter[tuple[str, int]] = Counter()  # (operation, status) over the run, for the coverage test below
ERRORS: Counter[tuple[str, int, str]] = Counter()  # (operation, status, the error message's start), for the report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, adapters_dir: Path) -> Iterator[LiveServer]:
    from server.model.tiny import ensure_tiny_checkpoint

    root = tmp_path_factory.mktemp("fuzz")
    tiny_dir = ensure_tiny_checkpoint(data_dir / "models" / "tiny")
    model_dir = make_chat_checkpoint(tiny_dir, root / "tiny-chat", CHAT_TEMPLATE)
    shutil.copytree(adapters_dir / SEEDED_ADAPTER, root / "adapters" / SEEDED_ADAPTER)
    with running_server(model=str(model_dir), adapters=root / "adapters", data_dir=root / "data",
                        admin_token=ADMIN_TOKEN, api_keys=f"{API_KEY}:fuzz", max_model_len=96,
                        max_num_seqs=8) as server:
        assert server.engine.tokenizer.chat_template == CHAT_TEMPLATE
        yield server


# Every /v1 and /admin operation; test_every_operation_is_fuzzed keeps this list equal to the document's.
OPERATIONS = [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/admin/adapters"), ("GET", "/admin/adapters"), ("PUT", "/admin/adapters/{adapter_id}"),
    ("GET", "/admin/adapters/{adapter_id}"), ("DELETE", "/admin/adapters/{adapter_id}"),
    ("GET", "/admin/api-keys"), ("POST", "/admin/api-keys"), ("DELETE", "/admin/api-keys/{key_ref}"),
]
# Nothing of these can be made invalid: no input, or only a path parameter that may be any string.
WITHOUT_INVALID_INPUT = {("GET", "/v1/models"), ("GET", "/admin/api-keys"), ("GET", "/v1/models/{model_id}"),
                         ("GET", "/admin/adapters/{adapter_id}"), ("DELETE", "/admin/adapters/{adapter_id}"),
                         ("DELETE", "/admin/api-keys/{key_ref}")}
CASES = [(method, path, mode) for method, path in OPERATIONS for mode in schemathesis.GenerationMode
         if mode is schemathesis.GenerationMode.POSITIVE or (method, path) not in WITHOUT_INVALID_INPUT]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> Any:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    schema.config.update(base_url=fuzz_server.url, request_timeout=60)
    # schemathesis stops reading a stream after 20 events by default; ours end (at most max_model_len tokens)
    schema.config.max_stream_events = 10_000
    return schema


def test_the_document_is_valid_openapi(api_schema: Any) -> None:
    api_schema.validate()  # against the OpenAPI 3.1 meta-schema
    components = api_schema.raw_schema["components"]["schemas"]
    assert {"ChatMessage", "StreamOptions", "ErrorResponse"} <= set(components)
    assert "$defs" not in json.dumps(api_schema.raw_schema)  # every pydantic $defs moved to components
    assert "HTTPValidationError" not in components  # validation errors are 400 ErrorResponses here


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    documented = {(method.upper(), path) for path, item in api_schema.raw_schema["paths"].items()
                  for method in item if path.startswith(("/v1/", "/admin/"))}
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_no_server_error_and_valid_json(api_schema: Any, method: str, path: str, mode: Any) -> None:
    @settings(max_examples=NUM_EXAMPLES, deadline=None, derandomize=IS_DEFAULT_RUN, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        check_case(case)

    check()


def check_case(case: Any) -> None:
    _aim_at_seeded_adapter(case)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN if case.path.startswith('/admin') else API_KEY}"}
    response = case.call(headers=headers)
    STATUSES[f"{case.method.upper()} {case.path}", response.status_code] += 1
    assert response.status_code < 500, _describe(case, response)
    content_type = response.headers.get("content-type", [""])[0]
    if content_type.startswith("text/event-stream"):
        assert not response.stream_cut_short, f"the stream stalled: {_describe(case, response)}"
        check_sse(response.text, case)
    else:
        assert content_type.startswith("application/json"), _describe(case, response)
        body = strict_json(response.text, case, response)
        if response.status_code >= 400:
            assert isinstance(body, dict) and set(body) == {"error"}, _describe(case, response)
            error = body["error"]
            assert set(error) == {"type", "message"} and all(isinstance(v, str) and v for v in error.values()), \
                _describe(case, response)
            ERRORS[f"{case.method.upper()} {case.path}", response.status_code, error["message"][:50]] += 1


def test_generated_bodies_reached_the_engine(fuzz_server: LiveServer) -> None:
    """The documented bodies are real: some generated requests of each /v1 POST were served (200), not only
    refused. (Runs after the fuzz test above, in file order.)"""
    if not STATUSES:
        pytest.skip("the fuzz test did not run")
    if os.environ.get("MULTIPLEX_FUZZ_REPORT"):  # a file to write the statuses seen to, for a longer local run
        Path(os.environ["MULTIPLEX_FUZZ_REPORT"]).write_text(
            "".join(f"{operation} {status}: {count}\n" for (operation, status), count in sorted(STATUSES.items()))
            + "".join(f"  {operation} {status} {message!r}: {count}\n"
                      for (operation, status, message), count in sorted(ERRORS.items())))
    for operation in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert STATUSES[operation, 200] > 0, sorted(STATUSES.items())
    # the server is still whole: ready, and every request finished
    health = fuzz_server.client.get("/health").json()
    assert health["status"] == "ok", health
    assert health["engine"]["num_running"] == 0 and health["engine"]["num_waiting"] == 0, health


def _aim_at_seeded_adapter(case: Any) -> None:
    body = case.body
    if case.path.startswith("/v1/") and isinstance(body, dict):
        for field in ("adapter_id", "model"):
            value = body.get(field)
            if isinstance(value, str) and zlib.crc32(value.encode("utf-8", "replace")) % 2:
                body[field] = SEEDED_ADAPTER


def strict_json(text: str, case: Any, response: Any) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a JSON answer: {_describe(case, response)}")

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError as exc:
        raise AssertionError(f"invalid JSON ({exc}): {_describe(case, response)}") from None


def check_sse(text: str, case: Any) -> None:
    """`data: {json}\\n\\n` events, the last one `data: [DONE]`; an error event is the error JSON."""
    assert text.endswith("\n\n"), f"{case.path}: stream does not end with a blank line: {text[-300:]!r}"
    events = text[:-2].split("\n\n")
    assert events[-1] == "data: [DONE]", f"{case.path}: stream does not end with [DONE]: {text[-300:]!r}"
    for event in events[:-1]:
        assert event.startswith("data: "), f"{case.path}: not an SSE data event: {event[:300]!r}"
        try:
            payload = json.loads(event[len("data: "):], parse_constant=lambda c: 1 / 0)
        except (ValueError, ZeroDivisionError) as exc:
            raise AssertionError(f"{case.path}: invalid JSON in a stream event ({exc}): {event[:300]!r}") from None
        assert isinstance(payload, dict) and ("error" in payload or "choices" in payload), event[:300]


def _describe(case: Any, response: Any) -> str:
    body = case.body if not isinstance(case.body, (bytes, bytearray)) else f"<{len(case.body)} bytes>"
    return (f"{case.method.upper()} {case.formatted_path} query={case.query} body={str(body)[:600]!r} -> "
            f"{response.status_code} {response.headers.get('content-type')} {response.text[:600]!r}")


@pytest.mark.parametrize("raw", [
    b'{"prompt": "\\ud800", "max_tokens": 2}',  # was a 500: the tokenizer raised on it
    b'{"prompt": ["x\\udfff"], "max_tokens": 2}',
    b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}',  # the surrogate UTF-8-encoded (json.loads lets it through)
    b'{"prompt": "hi", "max_tokens": 2, "stop": ["\\ud800"]}',
    b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}], "max_tokens": 2}',
], ids=["prompt", "prompt-list", "utf8-encoded", "stop", "chat", "chat-part"])
def test_lone_surrogates_are_refused(fuzz_server: LiveServer, raw: bytes) -> None:
    """Not generated by schemathesis (it writes valid UTF-8): a lone surrogate escape is valid JSON but not text."""
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    response = fuzz_server.client.post(path, content=raw, headers={"Authorization": f"Bearer {API_KEY}",
                                                                   "content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["error"]["message"] or "not valid JSON" in response.json()["error"]["message"]


def test_surrogate_pairs_are_text(fuzz_server: LiveServer) -> None:
    """An emoji escaped as a surrogate pair (json.dumps' default) is one character, served as usual."""
    raw = json.dumps({"prompt": "a \U0001F600", "max_tokens": 2}).encode()
    assert b"\\ud83d\\ude00" in raw
    response = fuzz_server.client.post("/v1/completions", content=raw, headers={
        "Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_stream_events_survive_unicode_line_splitting() -> None:
    """Found by the soak (benchmarks/soak/): the tiny model generated U+0085 once, JSON carried it raw, and
    httpx's `aiter_lines` (str.splitlines rules, as our own client reads streams) cut the event in two."""
    from server.api.generation import sse

    text = "a\x85b\u2028c\u2029d\r\n\x1c"
    event = sse({"choices": [{"text": text}]})
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):])["choices"][0]["text"] == text
