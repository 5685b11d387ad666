"""A streamed completion or chat: server-sent events (the subset those streams use), the state they build up, and
the iterators over text deltas that the clients' `stream` and `chat_stream` methods return.

An event is a block of lines ended by a blank line; `data:` lines (the space after the colon is optional) are
joined with newlines; lines starting with `:` are comments (keep-alives); other fields (`event:`, `id:`, `retry:`)
are ignored. Both streams send `data: {chunk json}` events and end with `data: [DONE]`; a completions chunk
carries its text in `choices[0].text`, a chat chunk in `choices[0].delta.content`.

This is the one SSE decoder of the repository: the clients, the benchmarks (benchmarks/soak/) and the client tests
read the server's streams through `SSEDecoder` or `iter_events`/`aiter_events` over httpx's (a)iter_lines.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterable, Generator, Iterable

from clients.errors import MultiplexError, error_from_body
from clients.wire import Usage

DONE = "[DONE]"


class SSEDecoder:
    """Feed lines (without their line ending); `feed` returns an event's data when a blank line completes one."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The pending event's data, if any (also called at the end of the stream for a missing blank line)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def iter_events(lines: Iterable[str]) -> Generator[str, None, None]:
    """Each event's data, from a stream's lines (httpx's `iter_lines`); the last one also without its blank line."""
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    tail = decoder.flush()
    if tail is not None:
        yield tail


async def aiter_events(lines: AsyncIterable[str]) -> AsyncGenerator[str, None]:
    """`iter_events` over async lines (httpx's `aiter_lines`); close it (contextlib.aclosing) when leaving early."""
    decoder = SSEDecoder()
    async for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    tail = decoder.flush()
    if tail is not None:
        yield tail


@dataclass
class StreamState:
    """What a completion stream has told so far; complete once `is_done`."""

    id: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    num_chunks: int = 0
    is_done: bool = False

    def on_event(self, data: str) -> str | None:
        """One event's data -> the text delta it carries (None for none). Raises the server's error event."""
        if data == DONE:
            self.is_done = True
            return None
        try:
            chunk: Any = json.loads(data)
        except ValueError:  # most often the connection cut inside an event: its first part is all that came
            raise MultiplexError(None, "incomplete_stream",
                                 f"the stream broke inside an event after {self.num_chunks} chunk(s): "
                                 f"{data[:80]!r} is not JSON") from None
        if not isinstance(chunk, dict):
            raise MultiplexError(None, "invalid_stream", f"unexpected stream event: {data[:200]}")
        if "error" in chunk:  # the server failed after the 200 was sent
            raise error_from_body(None, chunk)
        try:
            return self._on_chunk(chunk)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise MultiplexError(None, "invalid_stream", f"unexpected stream event ({type(exc).__name__}): "
                                                         f"{data[:200]}") from None

    def _on_chunk(self, chunk: dict) -> str | None:
        self.num_chunks += 1
        self.id = chunk.get("id", self.id)
        self.model = chunk.get("model", self.model)
        if chunk.get("usage"):
            self.usage = Usage.from_json(chunk["usage"])
        choices = chunk.get("choices") or []
        if not choices:
            return None
        if choices[0].get("finish_reason"):
            self.finish_reason = choices[0]["finish_reason"]
        if "delta" in choices[0]:  # a chat chunk: the role first, then content pieces
            return (choices[0]["delta"] or {}).get("content") or None
        return choices[0].get("text") or None


class TextStream:
    """The text deltas of one streamed completion (an Iterator[str]); the request is sent on the first `next`.

    After the last delta, `usage`, `finish_reason` and `id` describe the completion. Close it (or use `with`) to
    stop early; the server then aborts the request.
    """

    def __init__(self, deltas: Generator[str, None, None], state: StreamState) -> None:
        self._deltas = deltas
        self.state = state

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def usage(self) -> Usage | None:
        return self.state.usage

    @property
    def finish_reason(self) -> str | None:
        return self.state.finish_reason

    @property
    def id(self) -> str | None:
        return self.state.id


class AsyncTextStream:
    """`TextStream` for `async for`; close it with `aclose` (or `async with`)."""

    def __init__(self, deltas: AsyncGenerator[str, None], state: StreamState) -> None:
        self._deltas = deltas
        self.state = state

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        await self._deltas.aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    usage = TextStream.usage
    finish_reason = TextStream.finish_reason
    id = TextStream.id
