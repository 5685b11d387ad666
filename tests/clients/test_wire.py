"""The client's pieces that need no server: SSE decoding, stream state, error mapping, archive packing with progress,
and tolerant parsing of the wire schemas."""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from clients.archive import ProgressReader, open_upload, pack_directory
from clients.errors import (AuthError, BadRequestError, ConflictError, MultiplexError, NotFoundError,
                            OverloadedError, error_from_body, error_from_response)
from clients.stream import DONE, SSEDecoder, StreamState, aiter_events, iter_events
from clients.wire import AdapterInfo, Completion, completion_body, list_items, request_headers


def decode(lines: list[str]) -> list[str]:
    events = list(iter_events(lines))

    async def lines_async():
        for line in lines:
            yield line

    async def collect() -> list[str]:
        return [data async for data in aiter_events(lines_async())]

    assert asyncio.run(collect()) == events  # the async twin decodes the same
    return events


def test_sse_decoding() -> None:
    assert decode(["data: {\"a\": 1}", "", "data: [DONE]", ""]) == ['{"a": 1}', DONE]
    assert decode([": keep-alive", "", "event: x", "id: 3", "data:no-space", ""]) == ["no-space"]
    assert decode(["data: one\r\n", "data: two\r\n", "\r\n"]) == ["one\ntwo"]  # CRLF, multi-line data
    assert decode(["data: last"]) == ["last"]  # the stream ended without its blank line
    assert decode(["", ": only a comment", "", "data: x", "", ""]) == ["x"]  # no empty events


def test_sse_decoder_feed_and_flush() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("data: a") is None and decoder.feed("data: b") is None
    assert decoder.feed("") == "a\nb" and decoder.flush() is None


def test_stream_state() -> None:
    state = StreamState()
    chunk = {"id": "cmpl-1", "model": "m", "choices": [{"text": "he", "index": 0, "finish_reason": None}]}
    assert state.on_event(json.dumps(chunk)) == "he"
    chunk["choices"][0].update(text="", finish_reason="length")
    assert state.on_event(json.dumps(chunk)) is None and state.finish_reason == "length"
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert state.on_event(json.dumps({"id": "cmpl-1", "choices": [], "usage": usage})) is None
    assert state.usage.completion_tokens == 2 and not state.is_done
    assert state.on_event(DONE) is None and state.is_done and state.num_chunks == 3 and state.id == "cmpl-1"
    with pytest.raises(OverloadedError, match="aborted by the server"):
        StreamState().on_event(json.dumps({"error": {"type": "overloaded", "message": "aborted by the server"}}))
    with pytest.raises(MultiplexError) as failed:
        StreamState().on_event(json.dumps({"error": {"type": "internal_error", "message": "boom"}}))
    assert failed.value.status_code is None and failed.value.message == "boom"
    state = StreamState()
    state.on_event(json.dumps(chunk))
    with pytest.raises(MultiplexError, match="broke inside an event after 1 chunk") as cut:  # the connection cut
        state.on_event('{"choi')
    assert cut.value.error_type == "incomplete_stream"
    with pytest.raises(MultiplexError, match="unexpected stream event"):
        StreamState().on_event("[1]")


@pytest.mark.parametrize("status, cls", [(400, BadRequestError), (413, BadRequestError), (415, BadRequestError),
                                         (422, BadRequestError), (401, AuthError), (403, AuthError),
                                         (404, NotFoundError), (409, ConflictError), (429, OverloadedError),
                                         (503, OverloadedError), (500, MultiplexError)])
def test_errors_by_status(status: int, cls: type) -> None:
    body = json.dumps({"error": {"type": "some_type", "message": "what went wrong"}}).encode()
    error = error_from_response(status, body, {"retry-after": "2"})
    assert type(error) is cls and (error.status_code, error.error_type) == (status, "some_type")
    assert error.message == "what went wrong" and "what went wrong" in str(error)
    if cls is OverloadedError:
        assert error.retry_after == 2.0


def test_errors_that_are_not_the_server_json() -> None:
    error = error_from_response(502, b"<html>Bad Gateway</html>", {})
    assert type(error) is MultiplexError and error.error_type == "http_error" and "Bad Gateway" in error.message
    assert isinstance(error_from_body(None, {"error": {"type": "overloaded", "message": "x"}}), OverloadedError)


def test_pack_directory_puts_regular_files_at_the_root(tmp_path: Path) -> None:
    (tmp_path / "adapter.json").write_text("{}")
    (tmp_path / "adapter.safetensors").write_bytes(b"\0" * 1000)
    os.symlink(tmp_path / "adapter.json", tmp_path / "link.json")
    with pack_directory(tmp_path) as archive, tarfile.open(fileobj=archive, mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"adapter.json", "adapter.safetensors"}
    assert all(m.isfile() and m.uid == 0 for m in members.values())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no files"):
        pack_directory(empty)


def test_open_upload_names(tmp_path: Path) -> None:
    directory = tmp_path / "my-lora"
    directory.mkdir()
    (directory / "adapter.json").write_text("{}")
    name, file = open_upload(directory)
    file.close()
    assert name == "my-lora.tar.gz"
    archive = tmp_path / "x.TGZ"
    archive.write_bytes(b"...")
    name, file = open_upload(archive)
    file.close()
    assert name == "x.TGZ"


def test_progress_reader_counts_bytes_read() -> None:
    calls: list[tuple[int, int]] = []
    reader = ProgressReader(io.BytesIO(b"x" * 250), lambda sent, total: calls.append((sent, total)))
    assert reader.total == 250
    while reader.read(100):
        pass
    assert calls == [(100, 250), (200, 250), (250, 250)]
    reader.seek(0)
    reader.read(10)
    assert calls[-1] == (10, 250)


def test_wire_parsing_is_tolerant() -> None:
    completion = Completion.from_json({"id": "c", "created": 1, "model": "m", "extra": True,
                                       "choices": [{"text": "hi", "finish_reason": "stop"}]})
    assert (completion.text, completion.finish_reason, completion.usage) == ("hi", "stop", None)
    info = AdapterInfo.from_json({"adapter_id": "a", "manifest": {"method": "lora"}, "new_field": 1})
    assert (info.id, info.method, info.version, info.public) == ("a", "lora", None, False)
    assert list_items([1], "adapters") == list_items({"data": [1]}, "x") == list_items({"adapters": [1]}, "adapters")
    with pytest.raises(ValueError):
        list_items({"nothing": 1}, "adapters")


def test_request_body_and_headers() -> None:
    body = completion_body("p", adapter_id="a", max_tokens=4, temperature=0, top_p=1, top_k=0, stop="x", seed=1,
                           logprobs=None, ignore_eos=False, stream=True)
    assert body["temperature"] == 0.0 and isinstance(body["temperature"], float)  # the server's fields are strict
    assert body["stop"] == ["x"] and body["stream_options"] == {"include_usage": True} and "logprobs" not in body
    assert request_headers("k", "a") == {"Authorization": "Bearer k", "X-Adapter-Id": "a"}
    assert request_headers(None, None) == {}
    assert "model" not in body
    by_model = completion_body("p", adapter_id=None, max_tokens=4, temperature=0, top_p=1, top_k=0, stop=None,
                               seed=None, logprobs=None, ignore_eos=True, stream=True, model="a")
    assert by_model["model"] == "a" and "adapter_id" not in by_model  # OpenAI's field, as vLLM selects a LoRA


def test_clients_import_nothing_of_the_other_packages() -> None:
    """clients speaks HTTP only: importing all of it loads neither server, adapters, kernels nor torch."""
    code = ("import sys, clients, clients.cli, clients.loadgen, clients.workload; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'server', 'adapters', 'kernels', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
