"""A /v1 JSON body -> its wire schema (server/api/schemas.py), without holding the event loop; and the bounds that
keep a request's CPU cost proportional to what the server can serve.

The guard (server/api/guard.py) has bounded the body's bytes. What is left costs CPU under the GIL: `json.loads`
and pydantic hold it for as long as they run (~50 ns a JSON value; a 16 MiB body of small integers is 8M values,
~0.5 s), so a worker thread alone would not keep /health answering. Hence, in order:

    bytes -> count `,` `[` `{` (a bound on the number of JSON values; 413 beyond what any servable request needs)
          -> text (strict: encoded surrogates refused) -> json.loads (an escaped lone surrogate refused)
          -> model_validate (in a worker thread when the body is big) -> 400 naming the field
    prompt / messages -> their length in characters (400 beyond `max_prompt_chars`) -> tokenized in a thread
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from adapters.files import lone_surrogate
from server.api.errors import ApiError, format_validation_errors

PROMPT_CHARS_PER_TOKEN = 16  # default max_prompt_chars per token of context: ~4 is typical, 16 leaves room
INLINE_PARSE_BYTES = 64 << 10  # smaller bodies are parsed on the event loop: a thread hop would cost more
Schema = TypeVar("Schema", bound=BaseModel)
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a pair, or a lone one


@dataclass(frozen=True)
class RequestLimits:
    """What one /v1 request may ask of the CPU before the engine sees it."""

    max_prompt_chars: int  # characters of a text prompt, or of a chat's roles and contents together
    max_model_len: int  # tokens of context: also the most token ids a prompt may have

    @classmethod
    def for_context(cls, max_model_len: int, max_prompt_chars: int | None = None) -> RequestLimits:
        """`max_prompt_chars` None: PROMPT_CHARS_PER_TOKEN per token of the context."""
        return cls(max_prompt_chars or PROMPT_CHARS_PER_TOKEN * max_model_len, max_model_len)

    @property
    def max_json_values(self) -> int:
        """The most `,` `[` `{` a servable body can hold: those inside the prompt's text (at most one a character)
        plus a few per token id, message or text part (at most one of those a character or a token), plus the
        other fields."""
        return 4 * (self.max_prompt_chars + self.max_model_len) + 1024


async def parse_body(request: Request, schema: type[Schema], limits: RequestLimits) -> Schema:
    """The request's body as `schema`; ApiError 400 (invalid, naming the field) or 413 (too many JSON values)."""
    try:
        raw = await request.body()  # bounded by the guard
    except ClientDisconnect:
        raise ApiError(499, "client closed the request", "client_closed_request") from None
    if len(raw) <= INLINE_PARSE_BYTES:
        return _parse(raw, schema, limits.max_json_values)
    return await asyncio.to_thread(_parse, raw, schema, limits.max_json_values)


def _parse(raw: bytes, schema: type[Schema], max_json_values: int) -> Schema:
    if not raw.strip():
        raise ApiError(400, "request body is missing (expected a JSON object)")
    if len(raw) > max_json_values:  # a shorter body cannot hold more
        num_values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
        if num_values > max_json_values:
            raise ApiError(413, f"request body holds about {num_values} JSON values, more than any request to this "
                                f"server needs ({max_json_values}, from MULTIPLEX_MAX_PROMPT_CHARS and the context)")
    try:
        # Decoded strictly here: json.loads(bytes) would let UTF-8-encoded surrogates through ('surrogatepass').
        text = raw.decode(json.detect_encoding(raw))
        data = json.loads(text)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if _ESCAPED_SURROGATE.search(text):  # rare (emoji escaped as pairs): walk the strings only then
        _refuse_lone_surrogates(data)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, format_validation_errors(exc.errors(include_url=False, include_input=False))) from None


def _refuse_lone_surrogates(data: Any) -> None:
    """400 when a string holds a lone surrogate (`"\\ud800"` is valid JSON but not text: the tokenizer, the chat
    template and any UTF-8 answer echoing it would fail on it)."""
    if lone_surrogate(data) is not None:
        raise ApiError(400, "request body is not valid JSON text: a string holds a lone UTF-16 surrogate "
                            "(an unpaired \\ud800-\\udfff escape)")


def check_prompt_chars(num_chars: int, limits: RequestLimits, field: str, what: str) -> None:
    """400 naming `field` when the prompt is longer than the limit: refused before the tokenizer sees it."""
    if num_chars > limits.max_prompt_chars:
        raise ApiError(400, f"{field}: {what} has {num_chars} characters; this server accepts at most "
                            f"{limits.max_prompt_chars} (MULTIPLEX_MAX_PROMPT_CHARS) for its context of "
                            f"{limits.max_model_len} tokens")
