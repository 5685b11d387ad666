"""End to end through a real uvicorn server: /v1/chat/completions (rendering with the checkpoint's chat template,
agreement with /v1/completions, streaming, logprobs, adapters, errors, the official `openai` client), and
/v1/completions with a prompt of token ids.

The chat server serves a copy of the tiny checkpoint whose tokenizer_config.json carries a ChatML template that
starts with the BOS token, so a prompt tokenized with special tokens added again would show as a double BOS.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from server.api.schemas import ChatCompletionChunk, ChatCompletionResponse
from tests.helpers import assert_error, make_chat_checkpoint, parse_sse
from tests.live_server import LiveServer, running_server

CHAT_MAX_MODEL_LEN = 256  # small, so that a chat without max_tokens (the rest of the context) stays quick
USER = [{"role": "user", "content": "Hello there"}]
CHATS = {
    "user": USER,
    "system": [{"role": "system", "content": "You are terse."}, *USER],
    "history": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello. What now?"}, {"role": "user", "content": "A joke, please"}],
    "parts": [{"role": "user", "content": [{"type": "text", "text": "First part."},
                                           {"type": "text", "text": "Second part."}]}],
}


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    from server.model.tiny import ensure_tiny_checkpoint

    tiny_dir = ensure_tiny_checkpoint(data_dir / "models" / "tiny")
    return make_chat_checkpoint(tiny_dir, tmp_path_factory.mktemp("chat-model") / "tiny-chat")


@pytest.fixture(scope="session")
def chat_server(chat_model_dir: Path, adapters_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # A data dir of its own: its own embedded Redis, whose life is this fixture's.
    with running_server(model=str(chat_model_dir), adapters=adapters_dir, data_dir=tmp_path_factory.mktemp("chat-data"),
                        max_num_seqs=8, max_model_len=CHAT_MAX_MODEL_LEN) as server:
        yield server


@pytest.fixture(scope="session")
def reference_tokenizer(chat_model_dir: Path) -> Any:
    """Loaded by transformers on its own, not taken from the server."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_model_dir), local_files_only=True)


@pytest.fixture()
def prompt_ids_seen(chat_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The prompt ids the API hands the engine, one list per request."""
    seen: list[list[int]] = []
    generate = chat_server.engine.generate

    def recording_generate(request_id: str, prompt_ids: list[int], *args: Any, **kwargs: Any) -> Any:
        seen.append(list(prompt_ids))
        return generate(request_id, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(chat_server.engine, "generate", recording_generate)
    return seen


def expected_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """transformers' rendering, then tokens without special tokens added again; text parts joined with newlines."""
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "\n".join(part["text"] for part in m["content"])} for m in messages]
    text = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def chat(server: LiveServer, messages: list[dict[str, Any]] = USER, **body: Any) -> dict[str, Any]:
    response = server.client.post("/v1/chat/completions", json={"messages": messages, **body})
    assert response.status_code == 200, response.text
    ChatCompletionResponse.model_validate(response.json())
    return response.json()


def greedy_chat(server: LiveServer, messages: list[dict[str, Any]] = USER, max_tokens: int = 10,
                **body: Any) -> dict[str, Any]:
    return chat(server, messages, max_tokens=max_tokens, temperature=0, ignore_eos=True, **body)


def chat_stream(server: LiveServer, messages: list[dict[str, Any]] = USER, **body: Any) -> list[dict[str, Any]]:
    response = server.client.post("/v1/chat/completions", json={"messages": messages, "stream": True, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(response.text)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    return chunks


def content(body: dict[str, Any]) -> str:
    return body["choices"][0]["message"]["content"]


# --- the prompt ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CHATS)
def test_prompt_ids_are_the_chat_template_rendering(chat_server: LiveServer, reference_tokenizer: Any,
                                                    prompt_ids_seen: list[list[int]], name: str) -> None:
    expected = expected_prompt_ids(reference_tokenizer, CHATS[name])
    body = greedy_chat(chat_server, CHATS[name], max_tokens=2)
    assert prompt_ids_seen == [expected]
    assert body["usage"]["prompt_tokens"] == len(expected)
    bos = reference_tokenizer.bos_token_id
    assert expected[0] == bos and expected[1] != bos  # the template's BOS, once


@pytest.mark.parametrize("name", ["system", "history"])
def test_greedy_chat_equals_completion_of_the_rendered_ids(chat_server: LiveServer, reference_tokenizer: Any,
                                                           name: str) -> None:
    prompt_ids = expected_prompt_ids(reference_tokenizer, CHATS[name])
    answer = greedy_chat(chat_server, CHATS[name], max_tokens=12)
    completion = chat_server.complete(prompt=prompt_ids, max_tokens=12, temperature=0, ignore_eos=True)
    assert content(answer) and content(answer) == completion["choices"][0]["text"]
    assert answer["choices"][0]["finish_reason"] == completion["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == completion["usage"]
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["model"] == chat_server.model_name
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["choices"][0]["logprobs"] is None


def test_max_completion_tokens_wins_and_no_limit_is_the_rest_of_the_context(chat_server: LiveServer) -> None:
    body = chat(chat_server, max_tokens=9, max_completion_tokens=3, temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 3
    body = chat(chat_server, temperature=0, ignore_eos=True)
    assert body["usage"]["total_tokens"] == CHAT_MAX_MODEL_LEN
    assert body["choices"][0]["finish_reason"] == "length"


def test_stop_and_seed(chat_server: LiveServer) -> None:
    text = content(greedy_chat(chat_server, max_tokens=16))
    stop = next(text[i:i + 2] for i in range(4, len(text) - 1) if text[i:i + 2].strip())
    stopped = greedy_chat(chat_server, max_tokens=16, stop=[stop])
    assert content(stopped) == text[:text.index(stop)] and stopped["choices"][0]["finish_reason"] == "stop"

    def sample(seed: int) -> str:
        return content(chat(chat_server, max_tokens=8, temperature=1.0, seed=seed, ignore_eos=True))

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


# --- streaming ----------------------------------------------------------------------------------------------------

def test_stream_chunk_order_and_text(chat_server: LiveServer) -> None:
    whole = greedy_chat(chat_server, CHATS["history"], max_tokens=12)
    chunks = chat_stream(chat_server, CHATS["history"], max_tokens=12, temperature=0, ignore_eos=True,
                         stream_options={"include_usage": True})
    role, *pieces, finish, usage = chunks
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == role["id"] for c in chunks)
    assert role["id"].startswith("chatcmpl-") and role["model"] == chat_server.model_name
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert pieces and all(set(c["choices"][0]["delta"]) == {"content"} for c in pieces)
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in [role, *pieces])
    assert "".join(c["choices"][0]["delta"]["content"] for c in pieces) == content(whole)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]

    plain = chat_stream(chat_server, CHATS["history"], max_tokens=12, temperature=0, ignore_eos=True)
    assert all("usage" not in c for c in plain)  # no usage chunk unless asked for
    assert plain[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in plain) == content(whole)


# --- logprobs -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_logprobs", [None, 0, 3])
def test_logprobs_shape(chat_server: LiveServer, reference_tokenizer: Any, top_logprobs: int | None) -> None:
    fields = {"logprobs": True} if top_logprobs is None else {"logprobs": True, "top_logprobs": top_logprobs}
    body = greedy_chat(chat_server, max_tokens=5, **fields)
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"] == 5
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert len(entry["top_logprobs"]) == (top_logprobs or 0)
        for top in entry["top_logprobs"]:
            assert set(top) == {"token", "logprob", "bytes"} and top["bytes"] == list(top["token"].encode("utf-8"))
        if entry["top_logprobs"]:  # greedy takes the likeliest token
            assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=1e-5)
            assert [t["logprob"] for t in entry["top_logprobs"]] == sorted(
                (t["logprob"] for t in entry["top_logprobs"]), reverse=True)

    # the same tokens and logprobs as the completions API on the same prompt ids
    completion = chat_server.complete(prompt=expected_prompt_ids(reference_tokenizer, USER), max_tokens=5,
                                      temperature=0, ignore_eos=True, logprobs=top_logprobs or 0)
    logprobs = completion["choices"][0]["logprobs"]
    assert [e["token"] for e in entries] == logprobs["tokens"]
    assert [e["logprob"] for e in entries] == pytest.approx(logprobs["token_logprobs"], abs=1e-5)

    chunks = chat_stream(chat_server, max_tokens=5, temperature=0, ignore_eos=True, **fields)
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]


# --- adapters -----------------------------------------------------------------------------------------------------

def test_adapter_by_model_and_by_adapter_id(chat_server: LiveServer, reference_tokenizer: Any) -> None:
    prompt_ids = expected_prompt_ids(reference_tokenizer, CHATS["system"])
    base = content(greedy_chat(chat_server, CHATS["system"]))
    texts = {}
    for adapter_id in chat_server.adapter_ids:
        by_model = greedy_chat(chat_server, CHATS["system"], model=adapter_id)
        by_adapter_id = greedy_chat(chat_server, CHATS["system"], adapter_id=adapter_id)
        completion = chat_server.complete(prompt=prompt_ids, adapter_id=adapter_id, max_tokens=10, temperature=0,
                                          ignore_eos=True)
        assert content(by_model) == content(by_adapter_id) == completion["choices"][0]["text"]
        assert by_model["model"] == by_adapter_id["model"] == adapter_id
        texts[adapter_id] = content(by_model)
    # Random LoRA weights (B non-zero) change the greedy answer of at least some adapters.
    assert any(text != base for text in texts.values()), (base, texts)
    by_base_name = greedy_chat(chat_server, CHATS["system"], model=chat_server.model_name)
    assert content(by_base_name) == base


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, word", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "developer", "content": "x"}]}, "role"),
    ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "user", "content": None}]}, "content"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": []}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]}, "content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "name"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER, "logit_bias": {"5": 10}}, "logit_bias"),
    ({"messages": USER, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": USER, "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": USER, "reasoning_effort": "high"}, "reasoning_effort"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "logprobs": 3}, "logprobs"),
    ({"messages": USER, "temperature": 3.0}, "temperature"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "stream": "yes"}, "stream"),
], ids=lambda value: json.dumps(value)[:60] if isinstance(value, dict) else value)
def test_bad_requests_are_400(chat_server: LiveServer, body: dict[str, Any], word: str) -> None:
    error = assert_error(chat_server.client.post("/v1/chat/completions", json=body), 400, word)
    assert error["type"] == "invalid_request_error"


def test_no_op_values_and_unknown_fields_are_accepted(chat_server: LiveServer) -> None:
    history = [*USER, {"role": "assistant", "content": "Hi", "refusal": None, "tool_calls": None, "audio": None},
               {"role": "user", "content": "Again"}]
    body = chat(chat_server, history, max_tokens=2, n=1, tools=[], tool_choice="none", parallel_tool_calls=True,
                response_format={"type": "text"}, logit_bias={}, modalities=["text"], user="someone", store=False)
    assert body["usage"]["completion_tokens"] <= 2


def test_model_without_chat_template_is_400(live_server: LiveServer) -> None:
    for stream in (False, True):
        response = live_server.client.post("/v1/chat/completions", json={"messages": USER, "stream": stream})
        error = assert_error(response, 400, "chat template", live_server.model_name)
        assert error["type"] == "invalid_request_error"


def test_unknown_adapter_is_404(chat_server: LiveServer) -> None:
    for body in ({"adapter_id": "no-such-adapter"}, {"model": "no-such-adapter"}, {"model": "no-such-adapter",
                                                                                     "stream": True}):
        response = chat_server.client.post("/v1/chat/completions", json={"messages": USER, **body})
        assert_error(response, 404, "no-such-adapter")


def test_chat_longer_than_context_is_400(chat_server: LiveServer) -> None:
    long_chat = [{"role": "user", "content": "z" * (CHAT_MAX_MODEL_LEN * 2)}]
    for stream in (False, True):
        response = chat_server.client.post("/v1/chat/completions", json={"messages": long_chat, "stream": stream})
        assert_error(response, 400, "context")
    response = chat_server.client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1000})
    assert_error(response, 400, "max_tokens")


# --- /v1/completions with token ids -------------------------------------------------------------------------------

def test_completion_prompt_of_token_ids(live_server: LiveServer) -> None:
    text = "Token ids in"
    ids = live_server.engine.encode_prompt(text)
    expected = live_server.complete(prompt=text, max_tokens=6, temperature=0, ignore_eos=True)
    for prompt in (ids, [ids]):
        body = live_server.complete(prompt=prompt, max_tokens=6, temperature=0, ignore_eos=True)
        assert body["choices"][0]["text"] == expected["choices"][0]["text"]
        assert body["usage"] == expected["usage"]
    chunks = parse_sse(live_server.client.post("/v1/completions", json={
        "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["choices"][0]["text"]


@pytest.mark.parametrize("prompt, words", [
    ([1, 2, 100000], ["prompt", "vocabulary", "100000"]),
    ([[5, -1, 7, 999999]], ["prompt", "-1", "999999"]),
    ([], ["prompt"]),
    ([[]], ["prompt"]),
    ([[1, 2], [3]], ["prompt"]),
    ([1, "a"], ["prompt"]),
    ([1, 2.0], ["prompt"]),
    ([True, 2], ["prompt"]),
], ids=str)
def test_bad_token_id_prompts_are_400(live_server: LiveServer, prompt: Any, words: list[str]) -> None:
    response = live_server.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    error = assert_error(response, 400, *words)
    assert error["type"] == "invalid_request_error"


# --- the official openai client -----------------------------------------------------------------------------------

def test_openai_client(chat_server: LiveServer, reference_tokenizer: Any) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{chat_server.base_url}/v1", api_key="x", max_retries=0)
    adapter_id = chat_server.adapter_ids[1]
    messages = CHATS["history"]
    for model, adapter in ((chat_server.model_name, None), (adapter_id, adapter_id)):
        expected = greedy_chat(chat_server, messages, max_tokens=8, adapter_id=adapter)
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                extra_body={"ignore_eos": True})
        assert answer.choices[0].message.content == content(expected)
        assert answer.choices[0].message.role == "assistant" and answer.model == model
        assert answer.usage.total_tokens == expected["usage"]["total_tokens"]
        streamed = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=8,
                                                  temperature=0, stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        chunks = list(streamed)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content(expected)
        assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]

    with_logprobs = client.chat.completions.create(model=adapter_id, messages=messages, max_tokens=3, temperature=0,
                                                   logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [len(e.top_logprobs) for e in with_logprobs.choices[0].logprobs.content] == [2, 2, 2]

    prompt_ids = expected_prompt_ids(reference_tokenizer, messages)
    completion = client.completions.create(model=adapter_id, prompt=prompt_ids, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].text == content(greedy_chat(chat_server, messages, max_tokens=8,
                                                             adapter_id=adapter_id))

    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=chat_server.model_name, messages=messages, max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=messages, max_tokens=2)
