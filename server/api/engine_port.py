"""What the API uses of the engine, and nothing more: the routes and the app are typed against `EnginePort`, and
server/engine/async_engine.py's `AsyncEngine` satisfies it structurally (tests/server/test_engine_port.py checks
it), so that the API never reaches into the engine's insides and a fake engine is easy to write."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from server.engine.request import RequestOutput, SamplingParams


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer calls the API makes itself (chat templates go through `apply_chat_template` when present)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def __len__(self) -> int: ...  # the vocabulary size: prompt ids are checked against it


@runtime_checkable
class EnginePort(Protocol):
    model_name: str  # the base model's name (an adapter id may not take it)
    max_model_len: int  # tokens of context: prompt + completion
    tokenizer: Tokenizer

    def start(self) -> None:
        """Start the engine loop (the app's lifespan calls it)."""

    def shutdown(self) -> None:
        """Stop it; requests still running end."""

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt text -> ids (blocking: call it off the event loop)."""

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None,
                 tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs, the last one `finished`. Raises the engine's domain errors (unknown adapter,
        prompt too long, overloaded, quarantined) or the registry's (unavailable) before yielding anything."""

    def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds (its stream ends with finish_reason "abort")."""

    async def list_adapters(self, tenant: str | None = None) -> list[str]:
        """Ids of the adapters `tenant` may use."""

    def stats(self) -> dict[str, Any]:
        """A JSON-able summary for /health and /metrics."""

    @property
    def metrics_registry(self) -> Any:
        """The engine's Prometheus collectors (a prometheus_client CollectorRegistry), exported by /metrics."""
