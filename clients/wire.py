"""The client's own wire schemas: what it sends to and reads from the multiplex HTTP API.

The clients package speaks HTTP only, so it keeps these instead of importing the server's pydantic models. Parsers
are tolerant: unknown fields are kept in `raw`, missing optional ones default, so a newer server does not break an
older client.

| method | route                     | request                      | answer                        |
| POST   | /v1/completions           | `completion_body(...)`        | `Completion` (or SSE chunks)  |
| POST   | /v1/chat/completions      | `chat_body(...)`              | `ChatCompletion` (or chunks)  |
| GET    | /v1/models                |                              | list of `ModelInfo`           |
| GET    | /health                   |                              | dict                          |
| POST   | /admin/adapters           | multipart: file + form fields | dict (the stored adapter)     |
| GET    | /admin/adapters[/{id}]    |                              | `AdapterInfo` (or a list)     |
| DELETE | /admin/adapters/{id}      |                              | dict                          |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

ADAPTER_HEADER = "X-Adapter-Id"  # the load balancer hashes on it, so an adapter's requests go where it is resident


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Usage:
        prompt, completion = int(body.get("prompt_tokens", 0)), int(body.get("completion_tokens", 0))
        return cls(prompt, completion, int(body.get("total_tokens", prompt + completion)))


@dataclass(frozen=True)
class Logprobs:
    """OpenAI completions logprobs: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Logprobs:
        return cls(list(body.get("tokens") or []), list(body.get("token_logprobs") or []),
                   list(body.get("top_logprobs") or []), list(body.get("text_offset") or []))


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None  # "stop" | "length" | None while streaming
    logprobs: Logprobs | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Choice:
        logprobs = body.get("logprobs")
        return cls(int(body.get("index", 0)), str(body.get("text", "")), body.get("finish_reason"),
                   Logprobs.from_json(logprobs) if logprobs else None)


@dataclass(frozen=True)
class Completion:
    id: str
    created: int
    model: str  # the adapter id, or the base model's name
    choices: list[Choice]
    usage: Usage | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Completion:
        usage = body.get("usage")
        return cls(str(body.get("id", "")), int(body.get("created", 0)), str(body.get("model", "")),
                   [Choice.from_json(c) for c in body.get("choices") or []],
                   Usage.from_json(usage) if usage else None, body)


@dataclass(frozen=True)
class ChatCompletion:
    """The answer of POST /v1/chat/completions: the assistant's message (one choice)."""

    id: str
    created: int
    model: str  # the adapter id, or the base model's name
    text: str  # the assistant message's content
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[dict[str, Any]] | None  # OpenAI's choices[0].logprobs.content: {token, logprob, bytes, top_logprobs}
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def message(self) -> dict[str, str]:
        """The assistant's message, ready to append to the chat's history."""
        return {"role": "assistant", "content": self.text}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ChatCompletion:
        choice = (body.get("choices") or [{}])[0]
        usage, logprobs = body.get("usage"), choice.get("logprobs")
        return cls(str(body.get("id", "")), int(body.get("created", 0)), str(body.get("model", "")),
                   str((choice.get("message") or {}).get("content") or ""), choice.get("finish_reason"),
                   Usage.from_json(usage) if usage else None,
                   list(logprobs.get("content") or []) if logprobs else None, body)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    parent: str | None  # the base model, for an adapter; None for the base model itself
    created: int
    owned_by: str

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelInfo:
        return cls(str(body["id"]), body.get("parent"), int(body.get("created", 0)), str(body.get("owned_by", "")))


@dataclass(frozen=True)
class AdapterInfo:
    """One stored adapter, as the admin API describes it (without its weights)."""

    id: str
    version: int | None
    size: int | None  # bytes of the weights
    sha256: str | None
    created: str | None
    tenant: str | None
    public: bool
    manifest: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def method(self) -> str | None:
        return self.manifest.get("method")

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> AdapterInfo:
        version, size = body.get("version"), body.get("size")
        created = body.get("created")
        return cls(str(body.get("id") or body.get("adapter_id") or ""),
                   int(version) if version is not None else None, int(size) if size is not None else None,
                   body.get("sha256"), str(created) if created is not None else None, body.get("tenant"),
                   bool(body.get("public", False)), dict(body.get("manifest") or {}), body)


def list_items(body: Any, key: str) -> list[dict[str, Any]]:
    """A list answer in any of the shapes a list route may take: `[...]`, `{"data": [...]}`, `{key: [...]}`."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        for name in ("data", key):
            if isinstance(body.get(name), list):
                return body[name]
    raise ValueError(f"unexpected list answer: {str(body)[:200]}")


def _sampling_fields(*, adapter_id: str | None, max_tokens: int | None, temperature: float, top_p: float,
                     top_k: int, stop: str | list[str] | None, seed: int | None, ignore_eos: bool, stream: bool,
                     presence_penalty: float, frequency_penalty: float) -> dict[str, Any]:
    """The fields completions and chat share. Floats are sent as floats: the server's fields are strict."""
    body: dict[str, Any] = {"temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k),
                            "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = int(max_tokens)
    if adapter_id is not None:
        body["adapter_id"] = adapter_id
    if stop is not None:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if seed is not None:
        body["seed"] = int(seed)
    if ignore_eos:
        body["ignore_eos"] = True
    if presence_penalty:
        body["presence_penalty"] = float(presence_penalty)
    if frequency_penalty:
        body["frequency_penalty"] = float(frequency_penalty)
    if stream:
        body["stream_options"] = {"include_usage": True}  # the last chunk then carries the token counts
    return body


def completion_body(prompt: str | list[int], *, adapter_id: str | None, max_tokens: int, temperature: float,
                    top_p: float, top_k: int, stop: str | list[str] | None, seed: int | None, logprobs: int | None,
                    ignore_eos: bool, stream: bool, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, model: str | None = None) -> dict[str, Any]:
    """The JSON body of POST /v1/completions; `prompt` is text or token ids. `model` is OpenAI's field: the base
    model's name or an adapter id (the way other OpenAI servers, vLLM's among them, select a LoRA); `adapter_id`,
    when both are given, wins on this server."""
    body = {**({"model": model} if model is not None else {}), "prompt": prompt, **_sampling_fields(
        adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop,
        seed=seed, ignore_eos=ignore_eos, stream=stream, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty)}
    if logprobs is not None:
        body["logprobs"] = int(logprobs)
    return body


def chat_messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A chat's messages; a plain string is one user message."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(message) for message in messages]


def chat_body(messages: str | Sequence[Mapping[str, Any]], *, adapter_id: str | None, max_tokens: int | None,
              temperature: float, top_p: float, top_k: int, stop: str | list[str] | None, seed: int | None,
              top_logprobs: int | None, ignore_eos: bool, stream: bool, presence_penalty: float = 0.0,
              frequency_penalty: float = 0.0) -> dict[str, Any]:
    """The JSON body of POST /v1/chat/completions. `max_tokens` None = the server's default (the rest of the
    context); `top_logprobs` None = no logprobs, else logprobs with that many alternatives per token."""
    body = {"messages": chat_messages(messages), **_sampling_fields(
        adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop,
        seed=seed, ignore_eos=ignore_eos, stream=stream, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty)}
    if top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=int(top_logprobs))
    return body


def request_headers(token: str | None, adapter_id: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if adapter_id is not None:
        headers[ADAPTER_HEADER] = adapter_id
    return headers
