"""One request through the engine, for the routes that generate (/v1/completions, /v1/chat/completions).

Path of a request: the guard (server/api/guard.py) has checked its key and body size; a route parses its body
(server/api/body.py), bounds and tokenizes its prompt off the event loop and makes SamplingParams, then `respond`
runs engine.generate -> RequestOutput deltas -> one JSON response, or `data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`.
What differs between the routes (object names, the shape of a choice, chat's opening role chunk) is a
`ResponseFormat`; everything else (admission, in-flight accounting, disconnects, failures, usage) is here, once.
A request whose client goes away is aborted in the engine: for a stream, the response task is cancelled and the
engine's generator closes; for a plain response, the client is checked between outputs.
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from server.api.engine_port import EnginePort
from server.api.errors import ApiError, error_body, error_mapping
from server.api.metrics import ApiMetrics
from server.api.schemas import GenerationRequest
from server.engine.errors import (
    ADAPTER_OVERFLOW,
    ADAPTER_QUARANTINED,
    AdapterOverflowError,
    AdapterQuarantinedError,
    PromptTooLongError,
)
from server.engine.request import RequestOutput, SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # JSON has no -inf or NaN: see reported_logprob
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# finish reasons that end a stream with an error event (type, message) instead of a last chunk
STREAM_FAILURES = {"error": ("internal_error", "the request failed in the engine"),
                   "abort": ("overloaded", "the request was aborted by the server")}
# RequestOutput.error_type of a request its own adapter failed -> what the API answers (the engine's own message)
ADAPTER_FAILURES = {ADAPTER_QUARANTINED: AdapterQuarantinedError, ADAPTER_OVERFLOW: AdapterOverflowError}
Choice = dict[str, Any]
_UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})  # see sse()


class ResponseFormat(Protocol):
    """How one route shapes the engine's outputs into choices. One instance per request: it may keep state across
    chunks (the completions logprobs' text offsets)."""

    id_prefix: str  # "cmpl-", "chatcmpl-"
    whole_object: str  # the `object` of the whole response
    chunk_object: str  # the `object` of a streamed chunk

    def opening(self) -> list[Choice]:
        """Chunk choices sent before any output (chat: the assistant's role)."""

    def chunk_choices(self, output: RequestOutput) -> list[Choice]:
        """Chunk choices for one engine output: none, its text, and/or the finish reason."""

    def whole_choice(self, text: str, logprobs: list[TokenLogprob], finish_reason: str | None) -> Choice:
        """The one choice of the whole response."""


def resolve_adapter_id(adapter_id: str | None, model: str | None, base_model_name: str) -> str | None:
    """`adapter_id` wins; otherwise a `model` that is not the base model's name is an adapter id."""
    if adapter_id is not None:
        return adapter_id
    if model is not None and model not in ("", base_model_name):
        return model
    return None


def sampling_params(body: GenerationRequest, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The engine's parameters from the shared fields; the route decides max_tokens and logprobs (their fields and
    defaults differ between completions and chat)."""
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop=tuple(body.stop),
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


def reported_logprob(logprob: float) -> float:
    """A logprob as JSON can carry it. Below MIN_LOGPROB (-inf: a token the sampler ruled out) or not a number at
    all (NaN: the model's logits were not finite, e.g. an adapter that overflows the serving dtype) -> MIN_LOGPROB,
    "as unlikely as can be said": the request still completes with the tokens it produced."""
    return logprob if math.isfinite(logprob) and logprob >= MIN_LOGPROB else MIN_LOGPROB


def check_context(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLongError(
            f"the prompt has {num_prompt_tokens} tokens; the context length is {max_model_len} tokens")
    if num_prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"the prompt has {num_prompt_tokens} tokens and max_tokens is {max_tokens}: together "
            f"{num_prompt_tokens + max_tokens} tokens, more than the context length of {max_model_len}; "
            f"reduce the prompt or max_tokens")


@dataclass
class Generation:
    """One request's bookkeeping on the API side; `release` runs exactly once however the request ends."""

    request_id: str
    model: str
    metrics: ApiMetrics
    engine: EnginePort
    created: int = field(default_factory=lambda: int(time.time()))
    start_time: float = field(default_factory=time.monotonic)
    is_finished: bool = False
    is_released: bool = False
    first_token_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        if output.token_ids and self.first_token_time is None:
            self.first_token_time = now
            self.metrics.ttft.observe(now - self.start_time)
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_output_tokens = output.num_output_tokens
        self.is_finished = output.finished
        if output.finished and self.first_token_time is not None and self.num_output_tokens > 1:
            self.metrics.tpot.observe((now - self.first_token_time) / (self.num_output_tokens - 1))

    def release(self, client_gone: bool = False) -> None:
        if self.is_released:
            return
        self.is_released = True
        self.metrics.in_flight.dec()
        if not self.is_finished:
            # The client went away (or the response failed): free the request's blocks and adapter pin now.
            self.engine.abort(self.request_id)
            if client_gone:
                self.metrics.client_disconnects.inc()
                logger.info("client disconnected; aborted %s", self.request_id)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_output_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens}

    def body(self, object_name: str, choices: list[Choice], usage: dict[str, int] | None,
             with_usage: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.request_id, "object": object_name, "created": self.created,
                                "model": self.model, "choices": choices}
        if with_usage:
            body["usage"] = usage
        return body


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event. Strict JSON (allow_nan=False, as Starlette's JSONResponse for whole responses): a
    NaN that gets this far is a ValueError, logged and answered with an error event, never `NaN` on the wire.
    U+0085, U+2028 and U+2029 are escaped: JSON may carry them raw, but `str.splitlines` (so httpx's and requests'
    `iter_lines`, which our own client reads streams with) breaks lines at them, cutting the event in two."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                                                               allow_nan=False)
    if "\x85" in data or "\u2028" in data or "\u2029" in data:
        data = data.translate(_UNICODE_LINE_BREAKS)
    return f"data: {data}\n\n"


async def respond(request: Request, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None,
                  tenant: str | None, fmt: ResponseFormat, *, stream: bool,
                  include_usage: bool) -> JSONResponse | StreamingResponse:
    """Admit the request in the engine, then answer it whole or as a stream of `fmt`'s chunks."""
    state = request.app.state
    engine: EnginePort = state.engine
    state.api_metrics.in_flight.inc()
    generation = Generation(request_id=f"{fmt.id_prefix}{uuid.uuid4().hex}", model=adapter_id or engine.model_name,
                            metrics=state.api_metrics, engine=engine)
    try:
        outputs = engine.generate(generation.request_id, prompt_ids, params, adapter_id, tenant)
        # Wait for the first output before answering, so that the engine's refusals (unknown adapter, too long,
        # overloaded; all raised before the first output) are still HTTP errors rather than errors in a 200 stream.
        first = await outputs.__anext__()
    except BaseException:
        generation.is_finished = True  # the engine never admitted it (or it ended): nothing to abort
        generation.release()
        raise
    generation.observe(first)

    if stream:
        events = _stream(generation, first, outputs, fmt, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(generation.release, client_gone=True))
    return await _whole(generation, first, outputs, fmt, request)


async def _whole(generation: Generation, first: RequestOutput, outputs: AsyncIterator[RequestOutput],
                 fmt: ResponseFormat, request: Request) -> JSONResponse:
    texts = [first.text]
    logprobs = list(first.logprobs or [])
    last = first
    client_gone = False
    try:
        while not last.finished:
            last = await outputs.__anext__()
            generation.observe(last)
            texts.append(last.text)
            logprobs.extend(last.logprobs or [])
            if not last.finished and await request.is_disconnected():
                client_gone = True
                break
    except StopAsyncIteration:
        pass
    finally:
        generation.release(client_gone=client_gone)
    await outputs.aclose()  # unregisters the stream in the engine now rather than when garbage-collected
    if client_gone:
        raise ApiError(499, "client closed the request", "client_closed_request")
    _raise_for_failure(last)
    choice = fmt.whole_choice("".join(texts), logprobs, last.finish_reason)
    return JSONResponse(generation.body(fmt.whole_object, [choice], generation.usage(), with_usage=True))


def _raise_for_failure(output: RequestOutput) -> None:
    if not output.finished:
        logger.error("engine stream for %s ended without a final output", output.request_id)
        raise ApiError(500, "internal server error", "internal_error")
    if output.finish_reason == "error":
        if output.error_type in ADAPTER_FAILURES:  # the request's own adapter failed: the tenant's, not ours
            logger.warning("engine failed request %s: %s", output.request_id, output.error)
            raise ADAPTER_FAILURES[output.error_type](output.error)
        logger.error("engine failed request %s: %s", output.request_id, output.error)
        raise ApiError(500, "internal error in the engine", "internal_error")
    if output.finish_reason == "abort":
        raise ApiError(503, "the request was aborted by the server (shutting down?); retry", "overloaded")


def _stream_failure(output: RequestOutput) -> tuple[str, str]:
    """(type, message) of the error event that ends a failed stream; the engine's own words when they are about
    the request's adapter (every engine message is ours, never an exception's text)."""
    if output.error_type in ADAPTER_FAILURES and output.error:
        return error_mapping(ADAPTER_FAILURES[output.error_type](output.error)).error_type, output.error
    return STREAM_FAILURES[output.finish_reason]


async def _stream(generation: Generation, first: RequestOutput, outputs: AsyncIterator[RequestOutput],
                  fmt: ResponseFormat, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choice: Choice) -> str:
        return sse(generation.body(fmt.chunk_object, [choice], None, with_usage=include_usage))

    output = first
    client_gone = True  # unless the stream ends normally or by our own failure
    try:
        for choice in fmt.opening():
            yield chunk(choice)
        while True:
            if output.finish_reason in STREAM_FAILURES:
                log = logger.warning if output.error_type in ADAPTER_FAILURES else logger.error  # the tenant's own
                log("engine ended %s with %s: %s", output.request_id, output.finish_reason, output.error)
                yield sse(error_body(*_stream_failure(output)))
                break
            for choice in fmt.chunk_choices(output):
                yield chunk(choice)
            if output.finished:
                await outputs.aclose()  # unregisters the stream in the engine now rather than when collected
                if include_usage:
                    yield sse(generation.body(fmt.chunk_object, [], generation.usage(), with_usage=True))
                break
            output = await outputs.__anext__()
            generation.observe(output)
    except StopAsyncIteration:
        client_gone = False
        logger.error("engine stream for %s ended without a final output", generation.request_id)
        yield sse(error_body("internal_error", "internal server error"))
    except Exception:
        client_gone = False
        logger.exception("streaming %s failed", generation.request_id)
        yield sse(error_body("internal_error", "internal server error"))
    finally:
        # Reached with CancelledError when the client disconnects: Starlette cancels the response task.
        generation.release(client_gone=client_gone)
    yield sse("[DONE]")
