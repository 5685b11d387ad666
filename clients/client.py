"""Python clients of the multiplex HTTP API: `Client` (blocking, httpx.Client) and `AsyncClient` (httpx.AsyncClient).

    from clients import Client
    with Client("http://127.0.0.1:8000", admin_token="...") as mpx:
        mpx.upload_adapter("out/my-lora", adapter_id="my-lora", progress=lambda sent, total: ...)
        print(mpx.complete("Hello", adapter_id="my-lora", max_tokens=32).text)
        for delta in mpx.stream("Hello", adapter_id="my-lora"):
            print(delta, end="", flush=True)
        answer = mpx.chat([{"role": "user", "content": "Hi"}], adapter_id="my-lora", max_tokens=64)
        print(answer.text)  # and answer.message is ready to append to the history
        for delta in mpx.chat_stream("Hi again"):  # a string is one user message
            print(delta, end="", flush=True)

Both clients have the same methods (the async ones are coroutines; `stream` and `chat_stream` async iterators).
Every request that names an adapter carries it in the `X-Adapter-Id` header too, for a load balancer that routes by
adapter. Completions, chat and models send the API key; admin routes send the admin token. Errors raise `clients.errors`
exceptions carrying the server's error type and message.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncGenerator, Callable, Generator, Iterator, Mapping, Sequence
from urllib.parse import quote

import httpx

from clients.archive import Progress, ProgressReader, open_upload
from clients.errors import ConnectionFailed, MultiplexError, error_from_response
from clients.stream import AsyncTextStream, StreamState, TextStream, aiter_events, iter_events
from clients.wire import (AdapterInfo, ChatCompletion, Completion, ModelInfo, chat_body, completion_body, list_items,
                          request_headers)

DEFAULT_URL = "http://127.0.0.1:8000"
COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
Messages = str | Sequence[Mapping[str, Any]]  # a chat: {"role", "content"} dicts, or one user message as a string
DEFAULT_TIMEOUT_S = 60.0
# An idle pooled connection is dropped after this long, before a server closes it (uvicorn's and vLLM's keep-alive: 5 s):
# a request sent on a connection the server is closing fails (httpx.ReadError) instead of being answered.
KEEPALIVE_EXPIRY_S = 2.0
_CONTENT_TYPES = {".zip": "application/zip", ".tar": "application/x-tar"}  # anything else: gzip


def _adapter_path(adapter_id: str) -> str:
    return f"/admin/adapters/{quote(adapter_id, safe='')}"


def _decode(response: httpx.Response) -> Any:
    """The JSON body of a successful answer ({} for an empty one); raises the server's error otherwise."""
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.content, response.headers)
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError:  # a proxy's HTML page, a truncated body
        raise MultiplexError(response.status_code, "invalid_response",
                             f"the server's answer is not JSON: {response.text[:80]!r}") from None


def _shaped(parse: Callable[[Any], Any], body: Any) -> Any:
    """parse(body), a MultiplexError when the answer is JSON of another shape than the API's."""
    try:
        return parse(body)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise MultiplexError(None, "invalid_response", f"the server's answer has an unexpected shape "
                                                       f"({type(exc).__name__}: {str(exc)[:80]})") from None


@contextlib.contextmanager
def _transport_errors(base_url: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ConnectionFailed("timeout", f"{base_url} did not answer in time ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise ConnectionFailed("connection_error", f"cannot reach {base_url}: {exc}") from exc
    except httpx.InvalidURL as exc:
        raise ConnectionFailed("invalid_url", f"{base_url}: {exc}") from None
    except UnicodeEncodeError as exc:  # HTTP headers are ASCII: an API key or adapter id that is not
        raise MultiplexError(None, "invalid_request", f"a header value is not ASCII ({exc.object[:40]!r})") from None


def _upload_fields(name: str, adapter_id: str | None, tenant: str | None, public: bool,
                   replace: bool) -> tuple[dict[str, str], dict[str, str], str]:
    """(form fields, query parameters, content type of the file) of POST /admin/adapters."""
    form = {"public": "true" if public else "false", "replace": "true" if replace else "false"}
    if adapter_id is not None:
        form["adapter_id"] = adapter_id
    if tenant is not None:
        form["tenant"] = tenant
    params = {"replace": "true"} if replace else {}  # the route also takes ?replace=true
    suffix = name[name.rfind("."):].lower() if "." in name else ""
    return form, params, _CONTENT_TYPES.get(suffix, "application/gzip")


class _ClientBase:
    """What both clients share: where the server is, the credentials, and the headers of each kind of request."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, admin_token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_token = admin_token
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))

    def _api_headers(self, adapter_id: str | None = None) -> dict[str, str]:
        return request_headers(self.api_key, adapter_id)

    def _admin_headers(self, adapter_id: str | None = None) -> dict[str, str]:
        return request_headers(self.admin_token, adapter_id)


def _incomplete(state: StreamState) -> MultiplexError:
    return MultiplexError(None, "incomplete_stream", f"the stream ended after {state.num_chunks} chunk(s) "
                                                     "without its final [DONE] event")


class Client(_ClientBase):
    """Blocking client; one connection pool, so reuse one Client (or use it as a context manager)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, admin_token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key=api_key, admin_token=admin_token, timeout=timeout)
        with _transport_errors(self.base_url):  # a malformed URL is refused here, as a MultiplexError
            self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout, transport=transport,
                                      limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        with _transport_errors(self.base_url):
            return _decode(self._http.request(method, path, **kwargs))

    # -- completions ----------------------------------------------------------------------------------------------

    def complete(self, prompt: str | list[int], *, adapter_id: str | None = None, max_tokens: int = 16,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: str | list[str] | None = None,
                 seed: int | None = None, logprobs: int | None = None, ignore_eos: bool = False,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, model: str | None = None) -> Completion:
        """One completion of a text prompt or of token ids; `adapter_id` None is the base model; temperature 0 is
        greedy. `model` sends OpenAI's `model` field (an adapter id or the base model's name) instead of, or beside,
        `adapter_id`: how other OpenAI-compatible servers are told which LoRA to use."""
        body = completion_body(prompt, adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, stop=stop, seed=seed, logprobs=logprobs,
                               ignore_eos=ignore_eos, stream=False, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty, model=model)
        return _shaped(Completion.from_json, self._request("POST", COMPLETIONS_PATH, json=body,
                                                  headers=self._api_headers(adapter_id)))

    def stream(self, prompt: str, *, adapter_id: str | None = None, max_tokens: int = 16, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, stop: str | list[str] | None = None, seed: int | None = None,
               ignore_eos: bool = False, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, model: str | None = None) -> TextStream:
        """The completion's text as it is generated: an iterator of deltas (see TextStream); `model` as in
        `complete`."""
        body = completion_body(prompt, adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, stop=stop, seed=seed, logprobs=None,
                               ignore_eos=ignore_eos, stream=True, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty, model=model)
        state = StreamState()
        return TextStream(self._stream_deltas(COMPLETIONS_PATH, body, self._api_headers(adapter_id), state), state)

    def _stream_deltas(self, path: str, body: dict[str, Any], headers: dict[str, str],
                       state: StreamState) -> Generator[str, None, None]:
        with _transport_errors(self.base_url), \
                self._http.stream("POST", path, json=body, headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                _decode(response)
            for data in iter_events(response.iter_lines()):
                text = state.on_event(data)
                if text:
                    yield text
                if state.is_done:
                    return
        if not state.is_done:
            raise _incomplete(state)

    # -- chat -----------------------------------------------------------------------------------------------------

    def chat(self, messages: Messages, *, adapter_id: str | None = None, max_tokens: int | None = None,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: str | list[str] | None = None,
             seed: int | None = None, top_logprobs: int | None = None, ignore_eos: bool = False,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> ChatCompletion:
        """The assistant's answer to `messages`, rendered with the model's chat template on the server.
        `max_tokens` None = as many as the context leaves; `top_logprobs` None = no logprobs."""
        body = chat_body(messages, adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, stop=stop, seed=seed, top_logprobs=top_logprobs,
                         ignore_eos=ignore_eos, stream=False, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty)
        return _shaped(ChatCompletion.from_json, self._request("POST", CHAT_PATH, json=body,
                                                      headers=self._api_headers(adapter_id)))

    def chat_stream(self, messages: Messages, *, adapter_id: str | None = None, max_tokens: int | None = None,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    stop: str | list[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> TextStream:
        """The assistant's answer as it is generated: an iterator of text deltas (see TextStream)."""
        body = chat_body(messages, adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, stop=stop, seed=seed, top_logprobs=None, ignore_eos=ignore_eos,
                         stream=True, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        state = StreamState()
        return TextStream(self._stream_deltas(CHAT_PATH, body, self._api_headers(adapter_id), state), state)

    # -- models and health ----------------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """The base model first, then every adapter this API key may use."""
        body = self._request("GET", "/v1/models", headers=self._api_headers())
        return _shaped(lambda b: [ModelInfo.from_json(m) for m in list_items(b, "models")], body)

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def metrics(self) -> str:
        """The Prometheus text of GET /metrics."""
        with _transport_errors(self.base_url):
            response = self._http.get("/metrics")
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return response.text

    # -- admin ----------------------------------------------------------------------------------------------------

    def upload_adapter(self, path: str | os.PathLike, *, adapter_id: str | None = None, tenant: str | None = None,
                       public: bool = False, replace: bool = False, progress: Progress | None = None) -> dict[str, Any]:
        """Upload an adapter directory (packed to .tar.gz here) or archive; `progress(bytes_sent, total)` is called
        as the archive is sent. Returns the server's description of the stored adapter."""
        name, file = open_upload(path)
        form, params, content_type = _upload_fields(name, adapter_id, tenant, public, replace)
        with file:
            reader = ProgressReader(file, progress)
            return self._request("POST", "/admin/adapters", data=form, params=params,
                                 files={"file": (name, reader, content_type)}, headers=self._admin_headers(adapter_id))

    def list_adapters(self) -> list[AdapterInfo]:
        body = self._request("GET", "/admin/adapters", headers=self._admin_headers())
        return _shaped(lambda b: [AdapterInfo.from_json(a) for a in list_items(b, "adapters")], body)

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        body = self._request("GET", _adapter_path(adapter_id), headers=self._admin_headers(adapter_id))
        return _shaped(AdapterInfo.from_json, body)

    def delete_adapter(self, adapter_id: str) -> dict[str, Any]:
        return self._request("DELETE", _adapter_path(adapter_id), headers=self._admin_headers(adapter_id))


class AsyncClient(_ClientBase):
    """The asyncio twin of `Client`: the same methods as coroutines; `stream` returns an AsyncTextStream."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, admin_token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 1000) -> None:
        super().__init__(base_url, api_key=api_key, admin_token=admin_token, timeout=timeout)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                              keepalive_expiry=KEEPALIVE_EXPIRY_S)
        with _transport_errors(self.base_url):
            self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, transport=transport,
                                           limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        with _transport_errors(self.base_url):
            return _decode(await self._http.request(method, path, **kwargs))

    async def complete(self, prompt: str | list[int], *, adapter_id: str | None = None, max_tokens: int = 16,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       stop: str | list[str] | None = None, seed: int | None = None, logprobs: int | None = None,
                       ignore_eos: bool = False, presence_penalty: float = 0.0,
                       frequency_penalty: float = 0.0, model: str | None = None) -> Completion:
        body = completion_body(prompt, adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, stop=stop, seed=seed, logprobs=logprobs,
                               ignore_eos=ignore_eos, stream=False, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty, model=model)
        return _shaped(Completion.from_json, await self._request("POST", COMPLETIONS_PATH, json=body,
                                                        headers=self._api_headers(adapter_id)))

    def stream(self, prompt: str, *, adapter_id: str | None = None, max_tokens: int = 16, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, stop: str | list[str] | None = None, seed: int | None = None,
               ignore_eos: bool = False, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, model: str | None = None) -> AsyncTextStream:
        body = completion_body(prompt, adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, stop=stop, seed=seed, logprobs=None,
                               ignore_eos=ignore_eos, stream=True, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty, model=model)
        state = StreamState()
        return AsyncTextStream(self._stream_deltas(COMPLETIONS_PATH, body, self._api_headers(adapter_id), state),
                               state)

    async def chat(self, messages: Messages, *, adapter_id: str | None = None, max_tokens: int | None = None,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   stop: str | list[str] | None = None, seed: int | None = None, top_logprobs: int | None = None,
                   ignore_eos: bool = False, presence_penalty: float = 0.0,
                   frequency_penalty: float = 0.0) -> ChatCompletion:
        body = chat_body(messages, adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, stop=stop, seed=seed, top_logprobs=top_logprobs,
                         ignore_eos=ignore_eos, stream=False, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty)
        return _shaped(ChatCompletion.from_json, await self._request("POST", CHAT_PATH, json=body,
                                                            headers=self._api_headers(adapter_id)))

    def chat_stream(self, messages: Messages, *, adapter_id: str | None = None, max_tokens: int | None = None,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    stop: str | list[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> AsyncTextStream:
        body = chat_body(messages, adapter_id=adapter_id, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, stop=stop, seed=seed, top_logprobs=None, ignore_eos=ignore_eos,
                         stream=True, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        state = StreamState()
        return AsyncTextStream(self._stream_deltas(CHAT_PATH, body, self._api_headers(adapter_id), state), state)

    async def _stream_deltas(self, path: str, body: dict[str, Any], headers: dict[str, str],
                             state: StreamState) -> AsyncGenerator[str, None]:
        with _transport_errors(self.base_url):
            async with self._http.stream("POST", path, json=body, headers=headers) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _decode(response)
                async with contextlib.aclosing(aiter_events(response.aiter_lines())) as events:
                    async for data in events:
                        text = state.on_event(data)
                        if text:
                            yield text
                        if state.is_done:
                            return
        if not state.is_done:
            raise _incomplete(state)

    async def models(self) -> list[ModelInfo]:
        body = await self._request("GET", "/v1/models", headers=self._api_headers())
        return _shaped(lambda b: [ModelInfo.from_json(m) for m in list_items(b, "models")], body)

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/health")

    async def metrics(self) -> str:
        with _transport_errors(self.base_url):
            response = await self._http.get("/metrics")
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return response.text

    async def upload_adapter(self, path: str | os.PathLike, *, adapter_id: str | None = None, tenant: str | None = None,
                             public: bool = False, replace: bool = False,
                             progress: Progress | None = None) -> dict[str, Any]:
        name, file = open_upload(path)  # packing a directory blocks; adapters are small next to a request's work
        form, params, content_type = _upload_fields(name, adapter_id, tenant, public, replace)
        with file:
            reader = ProgressReader(file, progress)
            return await self._request("POST", "/admin/adapters", data=form, params=params,
                                       files={"file": (name, reader, content_type)},
                                       headers=self._admin_headers(adapter_id))

    async def list_adapters(self) -> list[AdapterInfo]:
        body = await self._request("GET", "/admin/adapters", headers=self._admin_headers())
        return _shaped(lambda b: [AdapterInfo.from_json(a) for a in list_items(b, "adapters")], body)

    async def get_adapter(self, adapter_id: str) -> AdapterInfo:
        body = await self._request("GET", _adapter_path(adapter_id), headers=self._admin_headers(adapter_id))
        return _shaped(AdapterInfo.from_json, body)

    async def delete_adapter(self, adapter_id: str) -> dict[str, Any]:
        return await self._request("DELETE", _adapter_path(adapter_id), headers=self._admin_headers(adapter_id))

