"""`Client` and `AsyncClient` against the real server (uvicorn, the tiny model, Redis): every method, streaming,
upload with a progress callback, and errors that carry the server's own message."""
from __future__ import annotations

import asyncio
import io
import json
import socket
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from clients import (AdapterInfo, AsyncClient, AuthError, BadRequestError, Client, Completion, ConflictError,
                     ConnectionFailed, ModelInfo, NotFoundError)
from clients.archive import pack_directory, upload_files

PROMPT = "The quick brown fox"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that keeps every request it sends, to check the headers."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[Client]:
    with Client(server_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server_url: str, admin_token: str) -> Iterator[Client]:
    with Client(server_url, admin_token=admin_token, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def served_adapter(client: Client) -> str:
    adapters = [m.id for m in client.models() if m.is_adapter]
    assert adapters, "the live server (tests/clients/conftest.py) seeds adapters: none is served"
    return adapters[0]


def greedy(client: Client, adapter_id: str | None = None, max_tokens: int = 8, **extra: Any) -> Completion:
    return client.complete(PROMPT, adapter_id=adapter_id, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                           **extra)


class ProgressLog:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, sent: int, total: int) -> None:
        self.calls.append((sent, total))

    def check_complete(self) -> int:
        """The calls grew to the total and stopped there; returns the total."""
        assert self.calls, "the progress callback was never called"
        sent = [s for s, _ in self.calls]
        total = self.calls[-1][1]
        assert sent == sorted(sent) and sent[-1] == total > 0 and {t for _, t in self.calls} == {total}, self.calls
        return total


# --- models, health, completions -------------------------------------------------------------------------------

def test_health_models_metrics(client: Client, served_adapter: str) -> None:
    health = client.health()
    assert health["status"] == "ok"
    models = client.models()
    assert all(isinstance(m, ModelInfo) for m in models)
    base = models[0]
    assert not base.is_adapter and base.id == health["model"]
    assert served_adapter in {m.id for m in models if m.parent == base.id}
    assert "multiplex_" in client.metrics()


def test_complete_base_and_adapter(client: Client, served_adapter: str) -> None:
    base = greedy(client)
    assert isinstance(base, Completion) and base.id and base.created > 0
    assert base.usage is not None and base.usage.completion_tokens == 8
    assert base.usage.total_tokens == base.usage.prompt_tokens + 8 and base.usage.prompt_tokens > 0
    assert base.finish_reason == "length" and isinstance(base.text, str)
    assert greedy(client).text == base.text  # greedy is deterministic
    tuned = greedy(client, served_adapter)
    assert tuned.model == served_adapter and tuned.usage.completion_tokens == 8


def test_complete_sampling_options(client: Client) -> None:
    sampled = [client.complete(PROMPT, max_tokens=6, temperature=0.9, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
               for _ in range(2)]
    assert sampled[0].text == sampled[1].text  # same seed, same text
    penalized = greedy(client, max_tokens=24, frequency_penalty=2.0, presence_penalty=1.0)
    assert penalized.text != greedy(client, max_tokens=24).text  # the penalties reach the server
    with_logprobs = greedy(client, max_tokens=4, logprobs=2)
    logprobs = with_logprobs.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    text = greedy(client, max_tokens=16).text
    stop = next((ch for ch in text[1:] if ch.isascii() and ch.isalnum()), None)
    if stop is not None:  # stop on a character the greedy text is known to contain
        stopped = greedy(client, max_tokens=16, stop=stop)
        assert stopped.finish_reason == "stop" and stop not in stopped.text and text.startswith(stopped.text)


def test_stream_yields_the_completion_in_deltas(client: Client, served_adapter: str) -> None:
    for adapter_id in (None, served_adapter):
        expected = greedy(client, adapter_id, max_tokens=12).text
        with client.stream(PROMPT, adapter_id=adapter_id, max_tokens=12, temperature=0, ignore_eos=True) as stream:
            deltas = list(stream)
        assert "".join(deltas) == expected
        assert len(deltas) >= 2 and all(deltas)
        assert stream.usage is not None and stream.usage.completion_tokens == 12
        assert stream.finish_reason == "length" and stream.id


def test_stream_closed_early_leaves_the_client_usable(client: Client) -> None:
    stream = client.stream(PROMPT, max_tokens=200, temperature=0, ignore_eos=True)
    first = next(stream)
    assert first
    stream.close()
    assert greedy(client, max_tokens=2).usage.completion_tokens == 2


def test_requests_naming_an_adapter_carry_the_routing_header(server_url: str, admin_token: str,
                                                             served_adapter: str) -> None:
    transport = RecordingTransport()
    with Client(server_url, admin_token=admin_token, transport=transport) as c:
        c.complete(PROMPT, adapter_id=served_adapter, max_tokens=2)
        list(c.stream(PROMPT, adapter_id=served_adapter, max_tokens=2))
        c.complete(PROMPT, max_tokens=2)
        with pytest.raises(NotFoundError):
            c.get_adapter("no-such-adapter")
    headers = [r.headers.get("x-adapter-id") for r in transport.requests]
    assert headers == [served_adapter, served_adapter, None, "no-such-adapter"]
    assert transport.requests[3].headers["authorization"] == f"Bearer {admin_token}"
    assert "authorization" not in transport.requests[0].headers  # no API key configured: none sent


# --- errors --------------------------------------------------------------------------------------------------------

def test_errors_carry_the_server_message(client: Client) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.complete(PROMPT, adapter_id="no-such-adapter")
    assert missing.value.status_code == 404 and "no-such-adapter" in missing.value.message
    assert missing.value.error_type and "no-such-adapter" in str(missing.value)
    with pytest.raises(NotFoundError) as missing_stream:
        list(client.stream(PROMPT, adapter_id="no-such-adapter"))
    assert "no-such-adapter" in missing_stream.value.message
    with pytest.raises(BadRequestError) as bad:
        client.complete(PROMPT, max_tokens=0)
    assert bad.value.status_code == 400 and "max_tokens" in bad.value.message


def test_admin_auth_errors_carry_the_server_message(client: Client, server_url: str, admin_token: str) -> None:
    with pytest.raises(AuthError) as no_token:
        client.list_adapters()  # this client has no admin token
    assert no_token.value.status_code == 401 and "token" in no_token.value.message.lower()
    with Client(server_url, admin_token="wrong-token") as wrong:
        with pytest.raises(AuthError) as bad_token:
            wrong.list_adapters()
    assert "invalid" in bad_token.value.message.lower()


def test_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", timeout=5) as dead:
        with pytest.raises(ConnectionFailed) as failed:
            dead.health()
    assert failed.value.status_code is None and failed.value.error_type == "connection_error"


def test_idle_connections_are_dropped_well_before_the_server_closes_them() -> None:
    """A request sent on a pooled connection just as the server closes it for idleness fails (httpx.ReadError: a
    peers benchmark round, sent 5.0 s after the one before, did). The clients drop idle connections in less than
    half the keep-alive `multiplex serve` gives uvicorn (clients speak HTTP only: the test reads both sides)."""
    from clients.client import KEEPALIVE_EXPIRY_S
    from server.cli import KEEP_ALIVE_S

    assert 0 < KEEPALIVE_EXPIRY_S < KEEP_ALIVE_S / 2


# --- admin ---------------------------------------------------------------------------------------------------------

def _trainer_output(adapter: Path, out: Path, *, top: bool) -> Path:
    """A trainer's output directory: checkpoints (an adapter each, optimizer state), logs, and, when `top`, the
    final adapter saved at its top (as PEFT's save_pretrained after a transformers Trainer run)."""
    import shutil

    for step in (500, 1000, 50):
        shutil.copytree(adapter, out / f"checkpoint-{step}")
        (out / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"\x80\x04 never unpickled")
    (out / "training_args.bin").write_bytes(b"\x80\x04")
    (out / "trainer_state.json").write_text("{}")
    if top:
        for path in adapter.iterdir():
            shutil.copy(path, out / path.name)
        (out / "README.md").write_text("# my adapter\n")
    return out


def test_a_trainer_output_directory_uploads_its_adapter_only(admin: Client, make_adapter: Callable[..., Path],
                                                               tmp_path: Path) -> None:
    adapter_id = unique("trained")
    adapter = make_adapter(adapter_id, rank=4, seed=3)
    out = _trainer_output(adapter, tmp_path / "out", top=True)
    assert sorted(p.name for p in upload_files(out)) == sorted([*(p.name for p in adapter.iterdir()), "README.md"])
    with tarfile.open(fileobj=pack_directory(out)) as archive:
        assert sorted(archive.getnames()) == sorted(p.name for p in upload_files(out))
    stored = admin.upload_adapter(str(out), adapter_id=adapter_id)
    assert stored["id"] == adapter_id and stored["version"] == 1
    assert greedy(admin, adapter_id, max_tokens=2).usage.completion_tokens == 2
    admin.delete_adapter(adapter_id)

    only_checkpoints = _trainer_output(adapter, tmp_path / "ckpts", top=False)
    with pytest.raises(ValueError, match=r"only a trainer's checkpoints \(checkpoint-50, checkpoint-500, "
                                         r"checkpoint-1000\); upload one of them, e.g. .*checkpoint-1000"):
        admin.upload_adapter(str(only_checkpoints), adapter_id=adapter_id)
    assert upload_files(only_checkpoints / "checkpoint-500") == [only_checkpoints / "checkpoint-500" / n for n in
                                                                  ("adapter.json", "adapter.safetensors")]


def test_upload_list_get_replace_complete_delete(admin: Client, make_adapter: Callable[..., Path]) -> None:
    adapter_id = unique("uploaded")
    directory = make_adapter(adapter_id, rank=4, seed=1)
    progress = ProgressLog()
    stored = admin.upload_adapter(str(directory), adapter_id=adapter_id, progress=progress)
    total = progress.check_complete()
    with pack_directory(directory) as archive:
        assert total == len(archive.read())  # the callback counts the archive's bytes
    assert stored["id"] == adapter_id and stored["version"] == 1 and stored["manifest"]["method"] == "lora"

    listed = {a.id: a for a in admin.list_adapters()}
    assert adapter_id in listed and isinstance(listed[adapter_id], AdapterInfo)
    info = admin.get_adapter(adapter_id)
    assert (info.id, info.version, info.method, info.public, info.tenant) == (adapter_id, 1, "lora", False, None)
    assert info.size and info.size > 0 and info.sha256

    with pytest.raises(ConflictError) as conflict:
        admin.upload_adapter(str(directory), adapter_id=adapter_id)
    assert conflict.value.status_code == 409 and adapter_id in conflict.value.message
    replaced = admin.upload_adapter(str(make_adapter(adapter_id, rank=8, seed=2)), adapter_id=adapter_id,
                                    replace=True, public=True)
    assert replaced["version"] == 2 and admin.get_adapter(adapter_id).public

    completion = greedy(admin, adapter_id, max_tokens=4)
    assert completion.model == adapter_id and completion.usage.completion_tokens == 4
    assert "".join(admin.stream(PROMPT, adapter_id=adapter_id, max_tokens=4, temperature=0,
                                ignore_eos=True)) == completion.text

    admin.delete_adapter(adapter_id)
    with pytest.raises(NotFoundError):
        admin.get_adapter(adapter_id)
    with pytest.raises(NotFoundError):
        admin.complete(PROMPT, adapter_id=adapter_id)
    with pytest.raises(NotFoundError) as gone:
        admin.delete_adapter(adapter_id)
    assert adapter_id in gone.value.message


def _zip_of(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(directory.iterdir()):
            archive.write(path, path.name)
    return buffer.getvalue()


def _tar_of(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(directory, arcname=directory.name)  # inside one top-level folder
    return buffer.getvalue()


@pytest.mark.parametrize("suffix", [".zip", ".tar"])
def test_upload_an_archive(admin: Client, make_adapter: Callable[..., Path], tmp_path: Path, suffix: str) -> None:
    adapter_id = unique("archived")
    directory = make_adapter(adapter_id, rank=2, seed=3)
    archive = tmp_path / f"adapter{suffix}"
    archive.write_bytes(_zip_of(directory) if suffix == ".zip" else _tar_of(directory))
    progress = ProgressLog()
    stored = admin.upload_adapter(archive, adapter_id=adapter_id, progress=progress)
    assert progress.check_complete() == archive.stat().st_size
    assert stored["id"] == adapter_id
    admin.delete_adapter(adapter_id)


def test_refused_uploads_carry_the_server_message(admin: Client, make_adapter: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    directory = make_adapter(unique("broken"), rank=2)
    manifest = json.loads((directory / "adapter.json").read_text())
    manifest["base"]["fingerprint"] = "sha256:" + "0" * 64  # made for another backbone
    (directory / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(BadRequestError) as refused:
        admin.upload_adapter(str(directory), adapter_id=unique("broken"))
    assert refused.value.status_code == 422 and "fingerprint" in refused.value.message
    with pytest.raises(BadRequestError) as bad_id:
        admin.upload_adapter(str(make_adapter(unique("ok"))), adapter_id="not a valid id!")
    assert bad_id.value.status_code == 400 and "not a valid id!" in bad_id.value.message

    with pytest.raises(FileNotFoundError):
        admin.upload_adapter(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an adapter")
    with pytest.raises(ValueError, match="archive"):
        admin.upload_adapter(tmp_path / "notes.txt")


# --- the async client ----------------------------------------------------------------------------------------------

def test_async_client_every_method(server_url: str, admin_token: str, served_adapter: str,
                                   make_adapter: Callable[..., Path]) -> None:
    adapter_id = unique("async")
    directory = make_adapter(adapter_id, rank=4, seed=4)

    async def scenario() -> None:
        async with AsyncClient(server_url, admin_token=admin_token) as c:
            assert (await c.health())["status"] == "ok"
            assert served_adapter in {m.id for m in await c.models()}
            assert "multiplex_" in await c.metrics()
            whole, other = await asyncio.gather(
                c.complete(PROMPT, adapter_id=served_adapter, max_tokens=8, temperature=0, ignore_eos=True),
                c.complete(PROMPT, max_tokens=8, temperature=0, ignore_eos=True))
            assert whole.usage.completion_tokens == other.usage.completion_tokens == 8
            stream = c.stream(PROMPT, adapter_id=served_adapter, max_tokens=8, temperature=0, ignore_eos=True)
            assert "".join([delta async for delta in stream]) == whole.text
            assert stream.usage.completion_tokens == 8 and stream.finish_reason == "length"

            progress = ProgressLog()
            stored = await c.upload_adapter(str(directory), adapter_id=adapter_id, progress=progress)
            progress.check_complete()
            assert stored["id"] == adapter_id
            assert adapter_id in {a.id for a in await c.list_adapters()}
            assert (await c.get_adapter(adapter_id)).version == 1
            await c.delete_adapter(adapter_id)
            with pytest.raises(NotFoundError) as missing:
                await c.get_adapter(adapter_id)
            assert adapter_id in missing.value.message
            with pytest.raises(NotFoundError):
                async for _ in c.stream(PROMPT, adapter_id="no-such-adapter"):
                    pass
            with pytest.raises(BadRequestError, match="max_tokens"):
                await c.complete(PROMPT, max_tokens=0)

    asyncio.run(scenario())
