"""A request's life inside the engine: parameters in, state while scheduled, outputs streamed back."""
from __future__ import annotations

import enum
from typing import Any
import time
from dataclasses import dataclass, field

from adapters.delta import AdapterDeltas
from server.engine.uniforms import Uniforms


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # number of top alternatives per token (0..5); None = no logprobs
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence of a token already generated

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise ValueError("logprobs must be between 0 and 5")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be between -2 and 2")

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True, eq=False)
class AdapterRef:
    """A request's adapter, resolved once on the API side: the version it started with and its host-side deltas,
    so a replace or delete during the request never changes what it is served with."""

    adapter_id: str
    version: int
    deltas: AdapterDeltas
    prepared: Any = None  # the device pool's host-side image of the deltas, made off the engine thread (optional)

    @property
    def key(self) -> str:
        return f"{self.adapter_id}@{self.version}"


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted (its KV blocks freed; it recomputes from scratch)
    WAITING_ADAPTER = "waiting_adapter"  # queued until its adapter is on the device
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the top alternatives (token text, logprob)


@dataclass
class RequestOutput:
    """What the engine hands back after a step, per request that produced something."""

    request_id: str
    text: str  # new text since the last output (stop strings already cut)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None  # with finish_reason "error": a message meant for the caller
    error_type: str | None = None  # why it failed: "internal_error" or errors.ADAPTER_QUARANTINED


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None = None
    tenant: str | None = None  # who sent it (None: no tenant, e.g. /v1 open): the scheduler admits tenants fairly
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # when its first step was scheduled (queue time = this - arrival)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    slot: int = -1  # adapter slot on the device while running; -1 = base model
    whole_prefill: bool = False  # PARA adapters: the prompt is prefilled in one step
    para_row: int = -1  # PARA adapters: its row of the PARA vector buffer while running (the scheduler's)
    generator: Uniforms | None = None  # its sampler's draws (None when greedy)
    finish_reason: str | None = None
    # detokenisation state (server/engine/detokenizer.py)
    text: str = ""  # with stop strings: the output's text so far (cut at one)
    num_text_sent: int = 0  # characters of it already released
    prefix_offset: int = 0  # output_ids[prefix_offset:read_offset]: the decoded tokens kept as context
    read_offset: int = 0  # output_ids[read_offset:]: tokens whose text is not in `text` yet
    utf8: Any = None  # ByteTableDecoder: the incremental UTF-8 decoder holding an incomplete character's bytes
    num_preemptions: int = 0
    ended_by_eos: bool = False  # its last generated token was EOS: not in output_ids, counted in the usage (as vLLM)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (a decode step reads one token of a long sequence)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    def token_at(self, position: int) -> int:
        """all_ids[position] without building all_ids (a decode step's input token)."""
        n = len(self.prompt_ids)
        return self.output_ids[position - n] if position >= n else self.prompt_ids[position]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
