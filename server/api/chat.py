"""POST /v1/chat/completions: OpenAI chat messages in, the assistant's answer back, whole or as SSE chunks.

The messages are rendered with the checkpoint's own chat template, as `transformers` does it
(`tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`), then tokenized without
adding special tokens: the template already carries them (vLLM's convention; adding them again would give two BOS).
The messages are bounded in characters first, and rendered and tokenized in a worker thread (off the event loop).
server/api/generation.py runs the request; this file keeps the prompt rendering and the `chat.completion` shapes:

    whole:  {"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content"}, ...}], "usage"}
    stream: {"delta": {"role": "assistant", "content": ""}}, {"delta": {"content": piece}} ...,
            {"delta": {}, "finish_reason"}, [usage chunk with "choices": []], [DONE]
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.body import check_prompt_chars, parse_body
from server.api.engine_port import EnginePort
from server.api.errors import ApiError
from server.api.generation import Choice, check_context, reported_logprob, resolve_adapter_id, respond, sampling_params
from server.api.openapi import json_body, response_doc
from server.api.schemas import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from server.api.tenancy import request_tenant
from server.engine.request import RequestOutput, TokenLogprob

router = APIRouter()


def encode_chat(tokenizer: Any, model_name: str, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a chat, as the checkpoint's chat template renders it. 400 when it has none, or when the
    template itself refuses the messages (many raise on roles that do not alternate)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model {model_name} has no chat template, so it cannot serve /v1/chat/completions; "
                            f"use /v1/completions with a prompt")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as exc:
        raise ApiError(400, f"messages: the chat template of {model_name} refused them: {exc}") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def _token_logprob(token: str, logprob: float) -> dict[str, Any]:
    # The engine reports a token as decoded text (a lone byte of a multi-byte character decodes to U+FFFD), so its
    # bytes are that text's UTF-8, as vLLM reports them.
    return {"token": token, "logprob": reported_logprob(logprob), "bytes": list(token.encode("utf-8"))}


@dataclass
class ChatFormat:
    """The `chat.completion` shapes (ResponseFormat). `num_top_logprobs` None = no logprobs."""

    num_top_logprobs: int | None
    id_prefix: ClassVar[str] = "chatcmpl-"
    whole_object: ClassVar[str] = "chat.completion"
    chunk_object: ClassVar[str] = "chat.completion.chunk"

    def logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.num_top_logprobs is None:
            return None
        return {"content": [{**_token_logprob(entry.token, entry.logprob),
                             "top_logprobs": [_token_logprob(token, logprob)
                                              for token, logprob in entry.top[:self.num_top_logprobs]]}
                            for entry in entries]}

    def opening(self) -> list[Choice]:
        return [_chunk_choice({"role": "assistant", "content": ""}, None, None)]

    def chunk_choices(self, output: RequestOutput) -> list[Choice]:
        choices = []
        if output.text or output.logprobs:
            choices.append(_chunk_choice({"content": output.text}, self.logprobs(output.logprobs or []), None))
        if output.finished:  # the finish reason comes alone, with an empty delta, as OpenAI sends it
            choices.append(_chunk_choice({}, None, output.finish_reason))
        return choices

    def whole_choice(self, text: str, logprobs: list[TokenLogprob], finish_reason: str | None) -> Choice:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": self.logprobs(logprobs),
                "finish_reason": finish_reason}


def _chunk_choice(delta: dict[str, str], logprobs: dict[str, Any] | None, finish_reason: str | None) -> Choice:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


@router.post("/v1/chat/completions", response_model=None, responses=response_doc(ChatCompletionResponse, ChatCompletionChunk),
             openapi_extra=json_body(ChatCompletionRequest))
async def create_chat_completion(request: Request) -> JSONResponse | StreamingResponse:
    state = request.app.state
    engine: EnginePort = state.engine
    tenant = await request_tenant(request)  # checked by the guard before the body was read
    body = await parse_body(request, ChatCompletionRequest, state.limits)
    adapter_id = resolve_adapter_id(body.adapter_id, body.model, engine.model_name)
    messages = [m.template_input() for m in body.messages]
    num_chars = sum(len(m["role"]) + len(m["content"]) for m in messages)
    check_prompt_chars(num_chars, state.limits, "messages", "the messages' roles and contents together")
    prompt_ids = await asyncio.to_thread(encode_chat, engine.tokenizer, engine.model_name, messages)
    # No max_tokens: as much as the context leaves (vLLM's default; OpenAI's chat has no small default either).
    max_tokens = body.requested_max_tokens or max(engine.max_model_len - len(prompt_ids), 1)
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.num_top_logprobs)
    check_context(len(prompt_ids), params.max_tokens, engine.max_model_len)
    return await respond(request, prompt_ids, params, adapter_id, tenant, ChatFormat(body.num_top_logprobs),
                         stream=body.stream, include_usage=body.include_usage)
