"""Wire schemas of the HTTP API: the OpenAI completions request and response bodies, plus `adapter_id`.

Unknown request fields are ignored (OpenAI clients send some we do not use); known fields are validated strictly
enough that a mistake is a 400 naming the field rather than a silent coercion.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationInfo, field_validator

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None  # the base model's name, or an adapter id
    adapter_id: str | None = None  # takes precedence over `model`
    max_tokens: StrictInt | None = Field(16, ge=1)  # null = the default, 16
    temperature: StrictFloat | None = Field(1.0, ge=0.0, le=2.0)  # null = the default; 0 = greedy
    top_p: StrictFloat | None = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1)  # extension; 0 or -1 = off
    stop: list[str] = Field(default_factory=list)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    n: StrictInt = 1
    echo: StrictBool = False
    ignore_eos: StrictBool = False  # extension: keep generating past EOS until max_tokens or a stop string
    presence_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)  # null = 0
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    # OpenAI fields this server does not implement: accepted at their no-op values, refused otherwise (never ignored)
    best_of: StrictInt | None = None
    logit_bias: dict[str, Any] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if not isinstance(value, str):
            raise ValueError("must be a string (or a list of exactly one string)")
        return value

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

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo=true is not supported")
        return value

    @field_validator("best_of", "logit_bias", "suffix")
    @classmethod
    def _only_no_op_values(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, 1, {}, ""):  # unset, or the value that changes nothing (best_of 1, empty bias/suffix)
            only = " (only 1)" if info.field_name == "best_of" else ""
            raise ValueError(f"{info.field_name} is not supported{only}")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


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
