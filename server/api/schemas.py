"""Wire schemas of the HTTP API: the OpenAI completions and chat completions bodies, plus `adapter_id`.

Unknown request fields are ignored (OpenAI clients send some we do not use, such as `user`); known fields are
validated strictly enough that a mistake is a 400 naming the field rather than a silent coercion. OpenAI fields we
do not implement are declared in a NO_OPS table: accepted at the values that change nothing, refused otherwise.
Every number is bounded (integers within int64, as the engine's tensors and torch's seeds hold them; floats within
their range, so never NaN or infinite), and so is every string the server echoes in an error (`model`).

The JSON schemas (served in /openapi.json, server/api/openapi.py) describe what is accepted: where a validator
takes more forms than the declared type (a stop string or a list of them, text parts) or fewer (NO_OPS values, a
non-empty prompt), `WithJsonSchema` or the NO_OPS table says so; validation itself does not depend on them.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, GetJsonSchemaHandler, StrictBool, StrictFloat, StrictInt,
                      ValidationInfo, WithJsonSchema, field_validator, model_validator)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5
# seed: 0..2**63 - 1, as vLLM and OpenAI accept it; other counts: below 2**63 too. Written as `lt=INT64_END`: the
# OpenAPI document carries bounds as floats, and 2**63 is one exactly, while 2**63 - 1 would be rounded up to it.
INT64_END = 2**63
MAX_NAME_CHARS = 1024  # `model`, `adapter_id`: adapter ids have at most 128 characters
ChatRole = Literal["system", "user", "assistant"]

# What the validators below accept, for the OpenAPI document.
_TOKEN_IDS_SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
PROMPT_SCHEMA = {"anyOf": [{"type": "string"}, _TOKEN_IDS_SCHEMA,
                           {"type": "array", "items": {"anyOf": [{"type": "string"}, _TOKEN_IDS_SCHEMA]},
                            "minItems": 1, "maxItems": 1}],
                 "description": "text, or token ids; either may be wrapped in a list of one"}
STOP_SCHEMA = {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS}]}
TEXT_PART_SCHEMA = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    "required": ["type", "text"], "additionalProperties": False}
CONTENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART_SCHEMA, "minItems": 1}]}
EMPTY_VALUES = (None, [], {}, "")  # the only values a chat message's other fields may have


def refuse_unless_no_op(value: Any, no_ops: tuple[Any, ...]) -> Any:
    """`value` if it is one of `no_ops` (of the same type too: True is not 1), else the error (pydantic names the
    field)."""
    if any(type(value) is type(no_op) and value == no_op for no_op in no_ops):
        return value
    accepted = " or ".join(json.dumps(no_op) for no_op in no_ops)
    raise ValueError(f"not supported by this server (only {accepted} is accepted)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: which model, how to sample, when to stop, stream."""

    model_config = ConfigDict(extra="ignore")
    # OpenAI fields this server does not implement -> the values that change nothing (the only ones accepted)
    NO_OPS: ClassVar[dict[str, tuple[Any, ...]]] = {"logit_bias": (None, {})}

    model: str | None = Field(None, max_length=MAX_NAME_CHARS)  # the base model's name, or an adapter id
    adapter_id: str | None = Field(None, max_length=MAX_NAME_CHARS)  # takes precedence over `model`
    temperature: StrictFloat | None = Field(1.0, ge=0.0, le=2.0)  # null = the default; 0 = greedy
    top_p: StrictFloat | None = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1, lt=INT64_END)  # extension; 0 or -1 = off
    stop: Annotated[list[str], WithJsonSchema(STOP_SCHEMA)] = Field(default_factory=list)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = Field(None, ge=0, lt=INT64_END)
    n: StrictInt = Field(1, json_schema_extra={"enum": [1]})
    ignore_eos: StrictBool = False  # extension: keep generating past EOS until max_tokens or a stop string
    presence_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)  # null = 0
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("*")
    @classmethod
    def _only_no_op_values(cls, value: Any, info: ValidationInfo) -> Any:
        no_ops = cls.NO_OPS.get(info.field_name or "")
        return value if no_ops is None else refuse_unless_no_op(value, no_ops)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """NO_OPS fields are documented with the values they accept (their declared type is Any)."""
        json_schema = handler(core_schema)
        properties = handler.resolve_ref_schema(json_schema)["properties"]
        for name, no_ops in cls.NO_OPS.items():
            properties[name] = {"enum": list(no_ops), "default": None,
                                "description": "not implemented: accepted only at values that change nothing"}
        return json_schema

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    """OpenAI's (legacy) completions body."""

    NO_OPS: ClassVar[dict[str, tuple[Any, ...]]] = {**GenerationRequest.NO_OPS, "best_of": (None, 1),
                                                    "suffix": (None, "")}

    prompt: Annotated[str | list[int], WithJsonSchema(PROMPT_SCHEMA)]  # text, or token ids (no special tokens added)
    max_tokens: StrictInt | None = Field(16, ge=1, lt=INT64_END)  # null = the default, 16
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = Field(False, json_schema_extra={"enum": [False]})
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """A string or a list of token ids, each possibly wrapped in a list of one (a batch of one, as OpenAI and
        vLLM take it)."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(type(i) is int for i in value):
            return value
        raise ValueError("must be a string or a non-empty list of token ids (or a list of exactly one of either)")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo=true is not supported")
        return value


class ChatMessage(BaseModel):
    """One message of a chat. `content` is a string or a list of text parts, joined with newlines (as vLLM does)
    before the chat template sees it. Other OpenAI message fields (`name`, `tool_calls`, ...) are refused unless
    null or empty: the assistant message an OpenAI client hands back carries some of them as nulls."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": {"enum": list(EMPTY_VALUES)}})

    role: ChatRole
    content: Annotated[str, WithJsonSchema(CONTENT_SCHEMA)]

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError('must be a string or a non-empty list of {"type": "text", "text": ...} parts')
        for index, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f'part {index} is {kind!r}: only {{"type": "text", "text": ...}} parts are supported')
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(f'part {index} must be exactly {{"type": "text", "text": a string}}')
        return "\n".join(part["text"] for part in value)

    @model_validator(mode="after")
    def _no_other_fields(self) -> ChatMessage:
        for name, value in (self.model_extra or {}).items():
            if value not in EMPTY_VALUES:
                raise ValueError(f"{name} is not supported in a message (only role and content are)")
        return self

    def template_input(self) -> dict[str, str]:
        """What the chat template sees: exactly role and content."""
        return {"role": self.role, "content": self.content}


class ChatCompletionRequest(GenerationRequest):
    """OpenAI's chat completions body; tools, structured output and the rest of NO_OPS are refused when set."""

    NO_OPS: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationRequest.NO_OPS, "tools": (None, []), "tool_choice": (None, "none", "auto"),
        "parallel_tool_calls": (None, True), "functions": (None, []), "function_call": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
        "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, lt=INT64_END)  # null = the rest of the context (vLLM's)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, lt=INT64_END)  # OpenAI's newer name; wins
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        """The engine's `logprobs`: None = none; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionLogprobs(BaseModel):
    """OpenAI completions format: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)  # character offset of each token in the completion text


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """The whole response, or one streamed chunk (then `choices` holds the delta, and is empty in the usage chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes


class ChatLogprobEntry(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]  # the `top_logprobs` most likely tokens at this position, likeliest first


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """The role in the first chunk, text after it, nothing in the last (which has the finish reason)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed chunk; `choices` is empty in the usage chunk (sent when stream_options.include_usage)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "multiplex"
    root: str
    parent: str | None = None  # the base model, for an adapter


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
