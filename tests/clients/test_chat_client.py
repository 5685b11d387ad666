"""`Client.chat` / `chat_stream`, their `AsyncClient` twins, and `multiplex chat` (one-shot, and interactive with
stdin piped) against a real server whose model has a chat template (tests/e2e/test_chat.py's checkpoint)."""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from clients import AsyncClient, BadRequestError, Client, NotFoundError
from clients.cli import COMMANDS, HELP, main
from clients.wire import ChatCompletion
from tests.helpers import make_chat_checkpoint
from tests.live_server import LiveServer, running_server

REPO_ROOT = Path(__file__).resolve().parents[2]
HISTORY = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me more"}]
GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory, data_dir: Path,
                adapters_dir: Path) -> Iterator[LiveServer]:
    from server.model.tiny import ensure_tiny_checkpoint

    model_dir = make_chat_checkpoint(ensure_tiny_checkpoint(data_dir / "models" / "tiny"),
                                     tmp_path_factory.mktemp("chat-model") / "tiny-chat")
    with running_server(model=str(model_dir), adapters=adapters_dir, data_dir=tmp_path_factory.mktemp("chat-data"),
                        max_num_seqs=8, max_model_len=1024) as server:
        yield server


@pytest.fixture(scope="module")
def client(chat_server: LiveServer) -> Iterator[Client]:
    with Client(chat_server.url, timeout=60) as c:
        yield c


def raw_chat(server: LiveServer, messages: list[dict[str, str]], **body: Any) -> dict[str, Any]:
    response = server.client.post("/v1/chat/completions", json={"messages": messages, **body})
    assert response.status_code == 200, response.text
    return response.json()


# --- the Python clients -------------------------------------------------------------------------------------------

def test_chat_equals_the_http_answer(client: Client, chat_server: LiveServer) -> None:
    expected = raw_chat(chat_server, HISTORY, **GREEDY)
    answer = client.chat(HISTORY, **GREEDY)
    assert isinstance(answer, ChatCompletion)
    assert answer.text == expected["choices"][0]["message"]["content"]
    assert answer.message == {"role": "assistant", "content": answer.text}
    assert (answer.finish_reason, answer.usage.total_tokens) == ("length", expected["usage"]["total_tokens"])
    assert answer.model == chat_server.model_name and answer.id.startswith("chatcmpl-") and answer.logprobs is None
    # a string is one user message
    assert client.chat("Hi", **GREEDY).text == raw_chat(chat_server, [{"role": "user", "content": "Hi"}],
                                                        **GREEDY)["choices"][0]["message"]["content"]


def test_chat_stream_deltas_join_to_the_answer(client: Client, chat_server: LiveServer) -> None:
    adapter_id = chat_server.adapter_ids[0]
    for adapter in (None, adapter_id):
        expected = client.chat(HISTORY, adapter_id=adapter, **GREEDY)
        with client.chat_stream(HISTORY, adapter_id=adapter, **GREEDY) as stream:
            deltas = list(stream)
        assert "".join(deltas) == expected.text and all(deltas)
        assert stream.finish_reason == "length" and stream.usage == expected.usage
        assert stream.id.startswith("chatcmpl-")


def test_chat_with_adapter_and_logprobs(client: Client, chat_server: LiveServer) -> None:
    adapter_id = chat_server.adapter_ids[2]
    answer = client.chat(HISTORY, adapter_id=adapter_id, top_logprobs=2, **GREEDY)
    assert answer.model == adapter_id
    assert answer.text == raw_chat(chat_server, HISTORY, model=adapter_id, **GREEDY)["choices"][0]["message"]["content"]
    assert len(answer.logprobs) == 8 and all(len(entry["top_logprobs"]) == 2 for entry in answer.logprobs)


def test_complete_with_token_ids(client: Client, chat_server: LiveServer) -> None:
    ids = chat_server.engine.encode_prompt("Token ids")
    assert client.complete(ids, **GREEDY).text == client.complete("Token ids", **GREEDY).text


def test_errors_carry_the_server_message(client: Client, live_server: LiveServer) -> None:
    with pytest.raises(NotFoundError, match="no-such-adapter"):
        client.chat(HISTORY, adapter_id="no-such-adapter")
    with pytest.raises(NotFoundError, match="no-such-adapter"):
        list(client.chat_stream(HISTORY, adapter_id="no-such-adapter"))
    with pytest.raises(BadRequestError, match="role"):
        client.chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.chat(HISTORY, max_tokens=100_000)
    with Client(live_server.url) as plain:  # the plain tiny model has no chat template
        with pytest.raises(BadRequestError, match="chat template") as refused:
            plain.chat("Hi")
        assert refused.value.status_code == 400 and refused.value.error_type == "invalid_request_error"
        with pytest.raises(BadRequestError, match="chat template"):
            list(plain.chat_stream("Hi"))


def test_async_client_chat(chat_server: LiveServer, client: Client) -> None:
    adapter_id = chat_server.adapter_ids[1]
    expected = client.chat(HISTORY, adapter_id=adapter_id, **GREEDY)

    async def run() -> tuple[ChatCompletion, list[str], Any]:
        async with AsyncClient(chat_server.url, timeout=60) as c:
            answer = await c.chat(HISTORY, adapter_id=adapter_id, **GREEDY)
            async with c.chat_stream(HISTORY, adapter_id=adapter_id, **GREEDY) as stream:
                deltas = [delta async for delta in stream]
            with pytest.raises(NotFoundError, match="no-such-adapter"):
                await c.chat(HISTORY, adapter_id="no-such-adapter")
            with pytest.raises(BadRequestError, match="content"):
                async for _ in c.chat_stream([{"role": "user", "content": [{"type": "image_url"}]}]):
                    pass
            return answer, deltas, stream

    answer, deltas, stream = asyncio.run(run())
    assert answer.text == expected.text == "".join(deltas)
    assert stream.usage == expected.usage and stream.finish_reason == "length"


# --- the CLI ------------------------------------------------------------------------------------------------------

@pytest.fixture()
def run(chat_server: LiveServer, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """run(*argv, stdin=None) -> (exit code, stdout, stderr) of `multiplex chat ...` run in this process."""
    monkeypatch.setenv("MULTIPLEX_URL", chat_server.url)

    def run_cli(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = main(["chat", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run_cli


def expected_answers(client: Client, questions: list[str], system: str | None = None,
                     adapter_id: str | None = None, max_tokens: int = 6) -> list[str]:
    """The answers of a chat that keeps its history, as the CLI should hold it."""
    history = [{"role": "system", "content": system}] if system else []
    answers = []
    for question in questions:
        history.append({"role": "user", "content": question})
        answers.append(client.chat(history, adapter_id=adapter_id, max_tokens=max_tokens, temperature=0).text)
        history.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_cli_one_shot(run: Callable[..., tuple[int, str, str]], client: Client, chat_server: LiveServer) -> None:
    [expected] = expected_answers(client, ["What is a LoRA?"])
    assert expected
    code, out, err = run("What is a LoRA?", "--max-tokens", "6", "--temperature", "0")
    assert (code, out) == (0, expected + "\n"), err

    adapter_id = chat_server.adapter_ids[3]
    [expected] = expected_answers(client, ["Hi"], system="Be brief.", adapter_id=adapter_id)
    code, out, err = run("Hi", "--system", "Be brief.", "--adapter", adapter_id, "--max-tokens", "6",
                         "--temperature", "0")
    assert (code, out) == (0, expected + "\n"), err


def test_cli_interactive_keeps_the_history(run: Callable[..., tuple[int, str, str]], client: Client) -> None:
    questions = ["first question", "second question", "third"]
    answers = expected_answers(client, questions, system="Be brief.")
    assert all(answers), answers  # something to compare
    # blank lines are skipped; the end of input ends the chat
    code, out, err = run("--system", "Be brief.", "--max-tokens", "6", "--temperature", "0",
                         stdin="first question\n\n  second question \nthird")
    assert (code, out) == (0, "".join(answer + "\n" for answer in answers)), err
    assert "> " not in out + err  # no prompt when stdin is not a terminal


def test_cli_interactive_subprocess(chat_server: LiveServer, client: Client) -> None:
    """`python -m server chat` (what the `multiplex` console script runs) with stdin piped; /exit ends the chat."""
    answers = expected_answers(client, ["one", "two"])
    assert all(answers), answers
    env = {**os.environ, "MULTIPLEX_URL": chat_server.url, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-m", "server", "chat", "--max-tokens", "6", "--temperature", "0"],
                            input=b"one\ntwo\n/exit\nnever asked\n", capture_output=True, env=env, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("utf-8") == "".join(answer + "\n" for answer in answers)


def test_cli_errors_print_the_server_message(run: Callable[..., tuple[int, str, str]],
                                             live_server: LiveServer) -> None:
    code, _, err = run("Hi", "--adapter", "no-such-adapter")
    assert code == 1 and "404" in err and "no-such-adapter" in err
    code, _, err = run("Hi", "--url", live_server.url)
    assert code == 1 and "400" in err and "chat template" in err and "Traceback" not in err


def test_chat_command_registers() -> None:
    """What the `multiplex` console script does with COMMANDS; no server needed."""
    parser = argparse.ArgumentParser(prog="multiplex")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=HELP[name]))
    args = parser.parse_args(["chat", "--adapter", "a", "--system", "s", "--max-tokens", "5", "--temperature", "0.5",
                              "--url", "http://example:1", "--api-key", "k"])
    assert (args.question, args.adapter_id, args.system, args.max_tokens, args.temperature, args.url,
            args.api_key) == (None, "a", "s", 5, 0.5, "http://example:1", "k")
    assert parser.parse_args(["chat", "one question"]).question == "one question"
