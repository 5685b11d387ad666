"""POST /v1/completions: one request in, the engine's outputs back, whole or as OpenAI SSE chunks.

Path of a request: CompletionRequest (validated body) -> prompt ids + SamplingParams -> engine.generate ->
RequestOutput deltas -> one CompletionResponse, or `data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`.
A request whose client goes away is aborted in the engine: for a stream, the response task is cancelled and the
engine's generator closes; for a plain response, the client is checked between outputs.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from server.api.errors import ApiError, error_body
from server.api.metrics import ApiMetrics
from server.api.schemas import CompletionRequest
from server.api.tenancy import request_tenant
from server.engine.errors import PromptTooLongError
from server.engine.request import RequestOutput, SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

router = APIRouter()

MIN_LOGPROB = -9999.0  # JSON has no -inf; a token the sampler ruled out is reported with this logprob
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# finish reasons that end a stream with an error event (type, message) instead of a last chunk
STREAM_FAILURES = {"error": ("internal_error", "the request failed in the engine"),
                   "abort": ("overloaded", "the request was aborted by the server")}


def resolve_adapter_id(body: CompletionRequest, base_model_name: str) -> str | None:
    """`adapter_id` wins; otherwise a `model` that is not the base model's name is an adapter id."""
    if body.adapter_id is not None:
        return body.adapter_id
    if body.model is not None and body.model not in ("", base_model_name):
        return body.model
    return None


def to_sampling_params(body: CompletionRequest) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=body.max_tokens if body.max_tokens is not None else defaults.max_tokens,
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop=tuple(body.stop),
        logprobs=body.logprobs,
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


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
class LogprobsBuilder:
    """Accumulates OpenAI completions logprobs; text offsets continue across streamed chunks."""

    next_offset: int = 0

    def build(self, logprobs: list[TokenLogprob]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in logprobs:
            # Tokens that decode to the same string (e.g. lone bytes -> U+FFFD) share one key: keep the likeliest.
            top: dict[str, float] = {}
            for token, logprob in [*entry.top, (entry.token, entry.logprob)]:
                top.setdefault(token, max(logprob, MIN_LOGPROB))
            out["tokens"].append(entry.token)
            out["token_logprobs"].append(max(entry.logprob, MIN_LOGPROB))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.next_offset)
            self.next_offset += len(entry.token)
        return out


@dataclass
class Completion:
    """One request's bookkeeping on the API side; `release` runs exactly once however the request ends."""

    request_id: str
    model: str
    metrics: ApiMetrics
    engine: Any
    created: int = field(default_factory=lambda: int(time.time()))
    start_time: float = field(default_factory=time.monotonic)
    is_finished: bool = False
    is_released: bool = False
    has_first_token: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def observe(self, output: RequestOutput) -> None:
        if output.token_ids and not self.has_first_token:
            self.has_first_token = True
            self.metrics.observe_ttft(time.monotonic() - self.start_time)
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_output_tokens = output.num_output_tokens
        self.is_finished = output.finished

    def release(self, client_gone: bool = False) -> None:
        if self.is_released:
            return
        self.is_released = True
        self.metrics.num_in_flight -= 1
        if not self.is_finished:
            # The client went away (or the response failed): free the request's blocks and adapter pin now.
            self.engine.abort(self.request_id)
            if client_gone:
                self.metrics.num_client_disconnects += 1
                logger.info("client disconnected; aborted %s", self.request_id)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_output_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens}

    def response(self, choices: list[dict[str, Any]], usage: dict[str, int] | None, with_usage: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.request_id, "object": "text_completion", "created": self.created,
                                "model": self.model, "choices": choices}
        if with_usage:
            body["usage"] = usage
        return body


def _choice(text: str, logprobs: dict[str, list[Any]] | None, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    state = request.app.state
    engine = state.engine
    tenant = await request_tenant(request)  # 401 before any work when keys are configured
    adapter_id = resolve_adapter_id(body, engine.model_name)
    params = to_sampling_params(body)
    prompt_ids = engine.encode_prompt(body.prompt)
    check_context(len(prompt_ids), params.max_tokens, engine.max_model_len)

    state.api_metrics.num_in_flight += 1
    completion = Completion(request_id=f"cmpl-{uuid.uuid4().hex}", model=adapter_id or engine.model_name,
                            metrics=state.api_metrics, engine=engine)
    try:
        outputs = engine.generate(completion.request_id, prompt_ids, params, adapter_id, tenant)
        # Wait for the first output before answering, so that the engine's refusals (unknown adapter, too long,
        # overloaded; all raised before the first output) are still HTTP errors rather than errors in a 200 stream.
        first = await outputs.__anext__()
    except BaseException:
        completion.is_finished = True  # the engine never admitted it (or it ended): nothing to abort
        completion.release()
        raise
    completion.observe(first)

    if body.stream:
        stream = _stream(completion, first, outputs, body.logprobs is not None, body.include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(completion.release, client_gone=True))
    return await _complete(completion, first, outputs, body.logprobs is not None, request)


async def _complete(completion: Completion, first: RequestOutput, outputs: AsyncIterator[RequestOutput],
                    want_logprobs: bool, request: Request) -> JSONResponse:
    texts = [first.text]
    logprobs = list(first.logprobs or [])
    last = first
    client_gone = False
    try:
        while not last.finished:
            last = await outputs.__anext__()
            completion.observe(last)
            texts.append(last.text)
            logprobs.extend(last.logprobs or [])
            if not last.finished and await request.is_disconnected():
                client_gone = True
                break
    except StopAsyncIteration:
        pass
    finally:
        completion.release(client_gone=client_gone)
    await outputs.aclose()  # unregisters the stream in the engine now rather than when garbage-collected
    if client_gone:
        raise ApiError(499, "client closed the request", "client_closed_request")
    _raise_for_failure(last)
    logprobs_json = LogprobsBuilder().build(logprobs) if want_logprobs else None
    choice = _choice("".join(texts), logprobs_json, last.finish_reason)
    return JSONResponse(completion.response([choice], completion.usage(), with_usage=True))


def _raise_for_failure(output: RequestOutput) -> None:
    if not output.finished:
        logger.error("engine stream for %s ended without a final output", output.request_id)
        raise ApiError(500, "internal server error", "internal_error")
    if output.finish_reason == "error":
        logger.error("engine failed request %s: %s", output.request_id, output.error)
        raise ApiError(500, "internal error in the engine", "internal_error")
    if output.finish_reason == "abort":
        raise ApiError(503, "the request was aborted by the server (shutting down?); retry", "overloaded")


async def _stream(completion: Completion, first: RequestOutput, outputs: AsyncIterator[RequestOutput],
                  want_logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    logprobs_builder = LogprobsBuilder() if want_logprobs else None
    output = first
    client_gone = True  # unless the stream ends normally or by our own failure
    try:
        while True:
            if output.finish_reason in STREAM_FAILURES:
                logger.error("engine ended %s with %s: %s", output.request_id, output.finish_reason, output.error)
                yield _sse(error_body(*STREAM_FAILURES[output.finish_reason]))
                break
            if output.text or output.logprobs or output.finished:
                logprobs = logprobs_builder.build(output.logprobs or []) if logprobs_builder else None
                choice = _choice(output.text, logprobs, output.finish_reason if output.finished else None)
                yield _sse(completion.response([choice], None, with_usage=include_usage))
            if output.finished:
                await outputs.aclose()  # unregisters the stream in the engine now rather than when collected
                if include_usage:
                    yield _sse(completion.response([], completion.usage(), with_usage=True))
                break
            output = await outputs.__anext__()
            completion.observe(output)
    except StopAsyncIteration:
        client_gone = False
        logger.error("engine stream for %s ended without a final output", completion.request_id)
        yield _sse(error_body("internal_error", "internal server error"))
    except Exception:
        client_gone = False
        logger.exception("streaming %s failed", completion.request_id)
        yield _sse(error_body("internal_error", "internal server error"))
    finally:
        # Reached with CancelledError when the client disconnects: Starlette cancels the response task.
        completion.release(client_gone=client_gone)
    yield _sse("[DONE]")
