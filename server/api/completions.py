"""POST /v1/completions: a prompt (text, or token ids) in, its continuation back, whole or as OpenAI SSE chunks.

The route validates, bounds and tokenizes (off the event loop); server/api/generation.py runs the request. This
file keeps what is particular to completions: the prompt forms and the `text_completion` shape of a choice, with
its parallel-list logprobs.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.body import RequestLimits, check_prompt_chars, parse_body
from server.api.engine_port import EnginePort
from server.api.errors import ApiError
from server.api.generation import Choice, check_context, reported_logprob, resolve_adapter_id, respond, sampling_params
from server.api.openapi import json_body, response_doc
from server.api.schemas import CompletionRequest, CompletionResponse
from server.api.tenancy import request_tenant
from server.engine.errors import PromptTooLongError
from server.engine.request import RequestOutput, SamplingParams, TokenLogprob

router = APIRouter()

MAX_IDS_NAMED = 10  # an error names at most this many bad token ids


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
                top.setdefault(token, reported_logprob(logprob))
            out["tokens"].append(entry.token)
            out["token_logprobs"].append(reported_logprob(entry.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.next_offset)
            self.next_offset += len(entry.token)
        return out


@dataclass
class CompletionFormat:
    """The `text_completion` shape: each chunk is a choice with its piece of text (ResponseFormat)."""

    want_logprobs: bool
    logprobs_builder: LogprobsBuilder = field(default_factory=LogprobsBuilder)
    id_prefix: ClassVar[str] = "cmpl-"
    whole_object: ClassVar[str] = "text_completion"
    chunk_object: ClassVar[str] = "text_completion"

    def opening(self) -> list[Choice]:
        return []

    def chunk_choices(self, output: RequestOutput) -> list[Choice]:
        if not (output.text or output.logprobs or output.finished):
            return []
        return [self.whole_choice(output.text, output.logprobs or [],
                                  output.finish_reason if output.finished else None)]

    def whole_choice(self, text: str, logprobs: list[TokenLogprob], finish_reason: str | None) -> Choice:
        logprobs_json = self.logprobs_builder.build(logprobs) if self.want_logprobs else None
        return {"text": text, "index": 0, "logprobs": logprobs_json, "finish_reason": finish_reason}


async def prompt_token_ids(prompt: str | list[int], engine: EnginePort, limits: RequestLimits) -> list[int]:
    """Text is bounded in characters, then tokenized with the tokenizer's special tokens in a worker thread; ids
    are taken as they are (the caller chose them), once checked against the context and the vocabulary: an id past
    it would index outside the embedding table."""
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), limits, "prompt", "the prompt")
        return await asyncio.to_thread(engine.encode_prompt, prompt)
    if len(prompt) >= limits.max_model_len:
        raise PromptTooLongError(f"the prompt has {len(prompt)} tokens; the context length is "
                                 f"{limits.max_model_len} tokens")
    vocab_size = len(engine.tokenizer)
    bad_ids = sorted({i for i in prompt if not 0 <= i < vocab_size})
    if bad_ids:
        named = ", ".join(map(str, bad_ids[:MAX_IDS_NAMED])) + (", ..." if len(bad_ids) > MAX_IDS_NAMED else "")
        raise ApiError(400, f"prompt: token ids out of the vocabulary (0..{vocab_size - 1}): {named}")
    return prompt


@router.post("/v1/completions", response_model=None, responses=response_doc(CompletionResponse, CompletionResponse),
             openapi_extra=json_body(CompletionRequest))
async def create_completion(request: Request) -> JSONResponse | StreamingResponse:
    state = request.app.state
    engine: EnginePort = state.engine
    tenant = await request_tenant(request)  # checked by the guard before the body was read
    body = await parse_body(request, CompletionRequest, state.limits)
    adapter_id = resolve_adapter_id(body.adapter_id, body.model, engine.model_name)
    max_tokens = body.max_tokens if body.max_tokens is not None else SamplingParams().max_tokens
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs)
    prompt_ids = await prompt_token_ids(body.prompt, engine, state.limits)
    check_context(len(prompt_ids), params.max_tokens, engine.max_model_len)
    fmt = CompletionFormat(want_logprobs=body.logprobs is not None)
    return await respond(request, prompt_ids, params, adapter_id, tenant, fmt, stream=body.stream,
                         include_usage=body.include_usage)
