"""End to end through a real uvicorn server: the OpenAI completions API, streaming, adapters, errors, the CLI."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api.schemas import CompletionResponse
from tests.helpers import assert_error, parse_sse
from tests.live_server import LiveServer, running_server

PROMPT = "The quick brown fox"
REPO_ROOT = Path(__file__).resolve().parents[2]


def stream(server: LiveServer, **body: Any) -> list[dict[str, Any]]:
    response = server.client.post("/v1/completions", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(response.text)
    for chunk in chunks:  # every chunk is what the OpenAPI document says (the route's response model)
        CompletionResponse.model_validate(chunk)
    return chunks


def greedy(server: LiveServer, prompt: str = PROMPT, adapter_id: str | None = None, max_tokens: int = 8,
           **extra: Any) -> dict[str, Any]:
    body = server.complete(prompt=prompt, adapter_id=adapter_id, max_tokens=max_tokens, temperature=0, **extra)
    CompletionResponse.model_validate(body)
    return body


# --- models, health, metrics ------------------------------------------------------------------------------------

def test_models_lists_base_and_adapters(live_server: LiveServer) -> None:
    body = live_server.client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = [card["id"] for card in body["data"]]
    assert ids[0] == live_server.model_name
    assert sorted(ids[1:]) == live_server.adapter_ids and len(ids) == 1 + len(live_server.adapter_ids)
    assert all(card["object"] == "model" for card in body["data"])
    assert live_server.client.get(f"/v1/models/{live_server.adapter_ids[0]}").json()["parent"] == live_server.model_name


def test_health_and_metrics(live_server: LiveServer) -> None:
    health = live_server.client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    greedy(live_server, max_tokens=2)
    metrics = live_server.client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    lines = [line for line in metrics.text.splitlines() if line and not line.startswith("#")]
    assert any(line.startswith("multiplex_engine_") for line in lines)
    assert any(line.startswith('multiplex_api_responses_total{status="200"}') for line in lines)
    for line in lines:  # every sample is `name{labels} number`
        name, value = line.rsplit(" ", 1)
        float(value)
        assert name.replace("_", "a").split("{")[0].isalnum(), line
    types = dict(line.split(" ")[2:4] for line in metrics.text.splitlines() if line.startswith("# TYPE "))
    assert types["multiplex_engine_num_generated_tokens_total"] == "counter"  # cumulative stats are counters
    assert types["multiplex_engine_num_free_kv_blocks"] == "gauge"
    assert types["multiplex_api_responses_total"] == "counter"
    assert types["multiplex_api_client_disconnects_total"] == "counter"
    for histogram in ("multiplex_api_time_to_first_token_seconds", "multiplex_api_time_per_output_token_seconds",
                      "multiplex_engine_queue_time_seconds", "multiplex_engine_adapter_load_seconds"):
        assert types[histogram] == "histogram", histogram
    assert any(line.startswith('multiplex_api_time_to_first_token_seconds_bucket{le="+Inf"}') for line in lines)
    count = [line for line in lines if line.startswith("multiplex_engine_queue_time_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1  # the request above waited, and was counted


# --- completions -------------------------------------------------------------------------------------------------

def test_completion_base_and_adapters(live_server: LiveServer) -> None:
    base = greedy(live_server)
    assert base["object"] == "text_completion" and base["id"].startswith("cmpl-")
    assert base["model"] == live_server.model_name
    [choice] = base["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    assert greedy(live_server)["choices"][0]["text"] == choice["text"]  # greedy is deterministic

    adapter_texts = {}
    for adapter_id in live_server.adapter_ids:
        body = greedy(live_server, adapter_id=adapter_id, ignore_eos=True)
        assert body["model"] == adapter_id
        adapter_texts[adapter_id] = body["choices"][0]["text"]
    base_text = greedy(live_server, ignore_eos=True)["choices"][0]["text"]
    # Random LoRA weights (B non-zero) change the greedy continuation of at least some adapters.
    assert any(text != base_text for text in adapter_texts.values()), (base_text, adapter_texts)


def test_model_field_selects_adapter_or_base(live_server: LiveServer) -> None:
    adapter_id = live_server.adapter_ids[-1]
    by_adapter_id = greedy(live_server, adapter_id=adapter_id)
    by_model = live_server.complete(model=adapter_id, prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_model["choices"][0]["text"] == by_adapter_id["choices"][0]["text"]
    assert by_model["model"] == adapter_id

    base = greedy(live_server)
    by_base_name = live_server.complete(model=live_server.model_name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_base_name["choices"][0]["text"] == base["choices"][0]["text"]
    # adapter_id wins over model
    both = live_server.complete(model=live_server.model_name, adapter_id=adapter_id, prompt=PROMPT, max_tokens=8,
                                temperature=0)
    assert both["choices"][0]["text"] == by_adapter_id["choices"][0]["text"]


@pytest.mark.parametrize("adapter_index", [None, 1])
def test_streaming_equals_non_streaming(live_server: LiveServer, adapter_index: int | None) -> None:
    adapter_id = None if adapter_index is None else live_server.adapter_ids[adapter_index]
    whole = greedy(live_server, adapter_id=adapter_id, max_tokens=12)
    chunks = stream(live_server, prompt=PROMPT, adapter_id=adapter_id, max_tokens=12, temperature=0,
                    stream_options={"include_usage": True})
    *deltas, usage_chunk = chunks
    assert all(c["object"] == "text_completion" and c["id"] == deltas[0]["id"] for c in chunks)
    assert all(len(c["choices"]) == 1 and c["usage"] is None for c in deltas)
    assert "".join(c["choices"][0]["text"] for c in deltas) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]

    plain = stream(live_server, prompt=PROMPT, adapter_id=adapter_id, max_tokens=12, temperature=0)
    assert all("usage" not in c for c in plain)  # no usage chunk unless asked for
    assert "".join(c["choices"][0]["text"] for c in plain) == whole["choices"][0]["text"]


def test_stop_string(live_server: LiveServer) -> None:
    text = greedy(live_server, max_tokens=16, ignore_eos=True)["choices"][0]["text"]
    assert len(text) >= 8, text
    stop = text[5:7]
    expected = text[: text.index(stop)]
    for stop_field in (stop, [stop], ["\x00never", stop]):
        body = greedy(live_server, max_tokens=16, ignore_eos=True, stop=stop_field)
        assert body["choices"][0]["text"] == expected
        assert body["choices"][0]["finish_reason"] == "stop"
    chunks = stream(live_server, prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop=stop)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seed_reproducible_at_temperature_one(live_server: LiveServer) -> None:
    adapter_id = live_server.adapter_ids[0]

    def sample(seed: int) -> str:
        body = live_server.complete(prompt=PROMPT, adapter_id=adapter_id, max_tokens=8, temperature=1.0, seed=seed,
                                    ignore_eos=True)
        return body["choices"][0]["text"]

    assert sample(1234) == sample(1234)
    assert len({sample(seed) for seed in range(4)}) > 1  # the seed matters


def test_usage_counts_equal_tokenizer_counts(live_server: LiveServer) -> None:
    prompt = "Usage counts: héllo wörld, 12345!"
    body = greedy(live_server, prompt=prompt, max_tokens=7, ignore_eos=True, logprobs=0)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(live_server.engine.encode_prompt(prompt))
    assert usage["prompt_tokens"] >= len(live_server.engine.tokenizer.encode(prompt, add_special_tokens=False))
    assert usage["completion_tokens"] == 7 == len(body["choices"][0]["logprobs"]["tokens"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("num_logprobs", [0, 3])
def test_logprobs_shape(live_server: LiveServer, num_logprobs: int) -> None:
    body = greedy(live_server, max_tokens=5, ignore_eos=True, logprobs=num_logprobs)
    logprobs = body["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert all(len(logprobs[key]) == 5 for key in logprobs)
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert logprob <= 0 and all(value <= 0 for value in top.values())
        assert token in top
        assert 1 <= len(top) <= num_logprobs + 1  # the sampled token and the top ones; equal strings share a key
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token

    chunks = stream(live_server, prompt=PROMPT, max_tokens=5, temperature=0, ignore_eos=True, logprobs=num_logprobs)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert sum((lp["tokens"] for lp in streamed), []) == logprobs["tokens"]
    assert sum((lp["text_offset"] for lp in streamed), []) == logprobs["text_offset"]


def test_concurrent_requests_over_adapters(live_server: LiveServer) -> None:
    choices = [None, *live_server.adapter_ids]
    jobs = [(f"request {i}: {'abcdefgh'[: 1 + i % 8]}", choices[i % len(choices)], 4 + i % 5) for i in range(20)]
    sequential = [greedy(live_server, prompt, adapter_id, max_tokens)["choices"][0]["text"]
                  for prompt, adapter_id, max_tokens in jobs]

    async def run_all() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=120) as client:
            responses = await asyncio.gather(*[
                client.post("/v1/completions", json={"prompt": prompt, "adapter_id": adapter_id,
                                                     "max_tokens": max_tokens, "temperature": 0})
                for prompt, adapter_id, max_tokens in jobs])
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        return [r.json() for r in responses]

    concurrent = [body["choices"][0]["text"] for body in asyncio.run(run_all())]
    assert concurrent == sequential


def test_openai_client(live_server: LiveServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="x", max_retries=0)
    adapter_id = live_server.adapter_ids[2]

    assert {m.id for m in client.models.list()} == {live_server.model_name, *live_server.adapter_ids}
    for model, adapter in ((live_server.model_name, None), (adapter_id, adapter_id)):
        expected = greedy(live_server, adapter_id=adapter)
        completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        assert completion.choices[0].text == expected["choices"][0]["text"]
        assert completion.usage.total_tokens == expected["usage"]["total_tokens"]
        streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["choices"][0]["text"]
        assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]
    extra = client.completions.create(model=live_server.model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                                      extra_body={"adapter_id": adapter_id, "top_k": 5})
    assert extra.choices[0].text == greedy(live_server, adapter_id=adapter_id, max_tokens=4)["choices"][0]["text"]

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=live_server.model_name, prompt=PROMPT, max_tokens=2, n=2)


# --- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, word", [
    ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "n": 2}, "n"),
    ({"prompt": PROMPT, "echo": True}, "echo"),
    ({"prompt": PROMPT, "logprobs": 6}, "logprobs"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": PROMPT, "stop": 5}, "stop"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": 123}, "prompt"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [1, 2, 100000]}, "vocabulary"),
    ({"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "seed": "abc"}, "seed"),
    ({"prompt": PROMPT, "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": PROMPT, "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": PROMPT, "best_of": 3}, "best_of"),  # OpenAI fields we do not implement: refused, never ignored
    ({"prompt": PROMPT, "logit_bias": {"50": 100}}, "logit_bias"),
    ({"prompt": PROMPT, "suffix": "end"}, "suffix"),
], ids=lambda value: json.dumps(value) if isinstance(value, dict) else value)
def test_bad_parameters_are_400(live_server: LiveServer, body: dict[str, Any], word: str) -> None:
    error = assert_error(live_server.client.post("/v1/completions", json=body), 400, word)
    assert error["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(live_server: LiveServer) -> None:
    body = live_server.complete(prompt=PROMPT, max_tokens=2, user="someone", presence_penalty=0, best_of=1,
                                logit_bias={}, suffix=None)
    assert len(body["choices"]) == 1


def test_frequency_penalty_changes_greedy_text_and_is_deterministic(live_server: LiveServer) -> None:
    plain = live_server.complete(prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
    penalized = [live_server.complete(prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True,
                                      frequency_penalty=2.0, presence_penalty=1.0) for _ in range(2)]
    assert penalized[0]["choices"][0]["text"] == penalized[1]["choices"][0]["text"]
    assert penalized[0]["choices"][0]["text"] != plain["choices"][0]["text"]


def test_unknown_adapter_is_404(live_server: LiveServer) -> None:
    for body in ({"adapter_id": "no-such-adapter"}, {"model": "no-such-adapter"}):
        response = live_server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **body})
        assert_error(response, 404, "no-such-adapter")
    response = live_server.client.post("/v1/completions", json={"prompt": PROMPT, "adapter_id": "nope", "stream": True})
    assert_error(response, 404, "nope")


def test_prompt_longer_than_context_is_400(live_server: LiveServer) -> None:
    max_model_len = live_server.engine.max_model_len
    long_prompt = "z" * (max_model_len * 4)
    assert len(live_server.engine.encode_prompt(long_prompt)) > max_model_len
    error = assert_error(live_server.client.post("/v1/completions", json={"prompt": long_prompt}), 400, "context")
    assert error["type"] == "invalid_request_error"
    # a short prompt whose max_tokens does not fit either
    response = live_server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": max_model_len})
    assert_error(response, 400, "max_tokens")
    response = live_server.client.post("/v1/completions", json={"prompt": long_prompt, "stream": True})
    assert_error(response, 400, "context")


def test_unknown_route_and_method(live_server: LiveServer) -> None:
    assert_error(live_server.client.get("/v1/nothing-here"), 404)
    assert_error(live_server.client.post("/v1/chat/completions", json={}), 400, "messages")
    assert_error(live_server.client.get("/v1/completions"), 405)
    assert_error(live_server.client.get("/v1/models/no-such-model"), 404)
    # a trailing slash is another route: 404, never a redirect to a URL built from the Host header
    slash = live_server.client.post("/v1/completions/", json={"prompt": "a"}, headers={"host": "evil.example"})
    assert_error(slash, 404, "no route")
    assert "location" not in slash.headers
    head = live_server.client.head("/health")  # load balancers' checks
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("content", [b'{"prompt": "abc", ', b"not json", b"", b"[1, 2]", b'"just a string"'])
def test_malformed_json_is_400(live_server: LiveServer, content: bytes) -> None:
    response = live_server.client.post("/v1/completions", content=content,
                                       headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_unexpected_error_is_generic_500(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(prompt: str) -> list[int]:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(live_server.engine, "encode_prompt", broken)
    response = live_server.client.post("/v1/completions", json={"prompt": PROMPT})
    error = assert_error(response, 500)
    assert "secret" not in response.text and error["type"] == "internal_error"


# --- client disconnect -------------------------------------------------------------------------------------------

def _metric(server: LiveServer, name: str) -> float:
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name} not found")


def _engine_has_work(stats: dict[str, Any]) -> bool:
    return any(stats.get(key, 0) for key in ("num_running", "num_waiting", "running", "waiting", "num_requests"))


def test_client_disconnect_mid_stream_aborts(live_server: LiveServer) -> None:
    num_disconnects = _metric(live_server, "multiplex_api_client_disconnects_total")
    prompt_len = len(live_server.engine.encode_prompt(PROMPT))
    max_tokens = live_server.engine.max_model_len - prompt_len  # long enough to still run when the client leaves
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    with live_server.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["choices"][0]["finish_reason"] is None
        assert _engine_has_work(live_server.engine.stats()), live_server.engine.stats()
    # leaving the block closed the connection mid-stream

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = live_server.engine.stats()
        if (not _engine_has_work(stats) and _metric(live_server, "multiplex_api_requests_in_flight") == 0
                and _metric(live_server, "multiplex_api_client_disconnects_total") == num_disconnects + 1):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"request not aborted: {live_server.engine.stats()}\n"
                             f"{live_server.client.get('/metrics').text}")


def test_client_disconnect_while_waiting_for_a_whole_response_aborts(live_server: LiveServer) -> None:
    num_disconnects = _metric(live_server, "multiplex_api_client_disconnects_total")
    max_tokens = live_server.engine.max_model_len - len(live_server.engine.encode_prompt(PROMPT))
    payload = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}).encode()
    host, port = live_server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 10
        while not _engine_has_work(live_server.engine.stats()):
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)
    deadline = time.monotonic() + 20
    while _metric(live_server, "multiplex_api_client_disconnects_total") != num_disconnects + 1:
        assert time.monotonic() < deadline, live_server.client.get("/metrics").text
        time.sleep(0.05)
    while _engine_has_work(live_server.engine.stats()):  # the abort reaches the engine between two of its steps
        assert time.monotonic() < deadline, live_server.engine.stats()
        time.sleep(0.01)


def test_overload_is_503(data_dir: Path) -> None:
    # one running request and no queue: a second request while the first streams is refused
    with running_server(model="tiny", data_dir=data_dir, max_num_seqs=1, max_queue=0) as server:
        max_tokens = server.engine.max_model_len - len(server.engine.encode_prompt(PROMPT))  # seconds of work
        long_body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with server.client.stream("POST", "/v1/completions", json=long_body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # held: dropping the iterator would close the connection
            assert next(lines).startswith("data: ")
            refused = server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            error = assert_error(refused, 503)
            assert error["type"] == "overloaded" and refused.headers.get("retry-after")
        deadline = time.monotonic() + 20
        while _engine_has_work(server.engine.stats()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.complete(prompt=PROMPT, max_tokens=2)["usage"]["completion_tokens"] <= 2


# --- the CLI -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, env, words", [
    (["serve", "--port", "70000"], {}, ["--port", "MULTIPLEX_PORT", "65535"]),
    (["serve"], {"MULTIPLEX_DTYPE": "float8"}, ["--dtype", "MULTIPLEX_DTYPE", "float8"]),
    (["serve", "--adapters", "/no/such/dir"], {}, ["--adapters", "/no/such/dir", "does not exist"]),
    (["serve", "--device", "tpu"], {}, ["--device", "tpu"]),
    (["serve", "--max-num-seqs", "0"], {}, ["--max-num-seqs"]),
    (["serve", "--log-level", "loud"], {}, ["--log-level"]),
])
def test_cli_rejects_bad_settings(argv: list[str], env: dict[str, str], words: list[str],
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_cli_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import build_parser, settings_from_args

    monkeypatch.setenv("MULTIPLEX_PORT", "9001")
    monkeypatch.setenv("MULTIPLEX_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("MULTIPLEX_DEVICE", "cpu")
    settings = settings_from_args(build_parser().parse_args(["serve", "--port", "9002"]))
    assert (settings.port, settings.max_num_seqs, settings.device, settings.dtype) == (9002, 7, "cpu", "float32")
    with pytest.raises(Exception):
        settings.port = 1  # frozen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_subprocess(adapters_dir: Path, data_dir: Path) -> None:
    """`python -m server serve`, configured by flags and MULTIPLEX_* variables, answers and shuts down cleanly."""
    port = _free_port()
    env = {**os.environ, "MULTIPLEX_ADAPTERS": str(adapters_dir), "MULTIPLEX_PORT": str(port),
           "MULTIPLEX_DATA_DIR": str(data_dir),
           "MULTIPLEX_DEVICE": "cpu", "MULTIPLEX_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--model", "tiny", "--max-num-seqs", "4"],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        models = httpx.get(f"{base_url}/v1/models", timeout=10).json()
        assert len(models["data"]) == 1 + len(list(adapters_dir.iterdir()))
        adapter_id = models["data"][1]["id"]
        response = httpx.post(f"{base_url}/v1/completions", timeout=60,
                              json={"prompt": PROMPT, "model": adapter_id, "max_tokens": 3, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] <= 3
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    assert f"http://127.0.0.1:{port}" in output
    token_file = data_dir / "admin-token"  # no MULTIPLEX_ADMIN_TOKEN: generated there, named, never printed
    assert str(token_file) in output and token_file.read_text().strip() not in output
