"""The client subcommands (`multiplex upload | adapters | complete`) run through `clients.cli.main` against the real
server, and registered the way the `multiplex` console script registers them."""
from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Callable

import pytest

from clients import Client
from clients.cli import COMMANDS, HELP, main

PROMPT = "The quick brown fox"


@pytest.fixture()
def run(server_url: str, live_server: object, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """run(*argv) -> (exit code, stdout, stderr). The live server's address and admin token come from the
    environment (MULTIPLEX_URL, MULTIPLEX_ADMIN_TOKEN), as for a user; tests of admin commands also ask for the
    `admin_token` fixture, which skips them when the server's token is unknown."""
    monkeypatch.setenv("MULTIPLEX_URL", server_url)
    token = getattr(live_server, "admin_token", None)
    if token:
        monkeypatch.setenv("MULTIPLEX_ADMIN_TOKEN", token)

    def run_cli(command: str, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([command, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run_cli


def test_upload_list_get_complete_delete(run: Callable[..., tuple[int, str, str]], server_url: str, admin_token: str,
                                         make_adapter: Callable[..., Path]) -> None:
    adapter_id = f"cli-{uuid.uuid4().hex[:8]}"
    code, out, err = run("upload", str(make_adapter(adapter_id)), "--id", adapter_id, "--public")
    assert code == 0, err
    assert "100%" in err and "uploading" in err  # the progress bar, on stderr
    assert f"uploaded {adapter_id} version 1" in out

    code, out, err = run("adapters", "list")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["ID", "VERSION", "METHOD"]
    assert any(row.split()[:3] == [adapter_id, "1", "lora"] for row in rows), out
    code, out, _ = run("adapters", "list", "--json")
    assert adapter_id in {a["id"] for a in json.loads(out)}
    code, out, _ = run("adapters", "get", adapter_id)
    assert code == 0 and json.loads(out)["public"] is True

    with Client(server_url) as client:
        expected = client.complete(PROMPT, adapter_id=adapter_id, max_tokens=6, temperature=0, ignore_eos=True).text
    code, out, err = run("complete", PROMPT, "--adapter", adapter_id, "--max-tokens", "6", "--temperature", "0",
                         "--ignore-eos", "--no-stream")
    assert (code, out) == (0, expected + "\n"), err
    code, out, err = run("complete", PROMPT, "--adapter", adapter_id, "--max-tokens", "6", "--temperature", "0",
                         "--ignore-eos")  # streamed by default
    assert (code, out) == (0, expected + "\n"), err

    code, out, err = run("adapters", "delete", adapter_id)
    assert code == 0 and f"deleted {adapter_id}" in out, err
    code, _, err = run("adapters", "get", adapter_id)
    assert code == 1 and "404" in err and adapter_id in err


def test_complete_base_model(run: Callable[..., tuple[int, str, str]], server_url: str) -> None:
    with Client(server_url) as client:
        expected = client.complete(PROMPT, max_tokens=5, temperature=0, ignore_eos=True).text
    code, out, err = run("complete", PROMPT, "--max-tokens", "5", "--temperature", "0", "--ignore-eos",
                         "--no-stream")
    assert (code, out) == (0, expected + "\n"), err


def test_errors_print_the_server_message(run: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    code, out, err = run("complete", PROMPT, "--adapter", "no-such-adapter")
    assert code == 1 and "404" in err and "no-such-adapter" in err
    code, _, err = run("complete", PROMPT, "--max-tokens", "0", "--no-stream")
    assert code == 1 and "max_tokens" in err
    code, _, err = run("upload", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err


def test_admin_errors_print_the_server_message(run: Callable[..., tuple[int, str, str]], admin_token: str) -> None:
    code, _, err = run("adapters", "delete", "no-such-adapter")
    assert code == 1 and "404" in err and "no-such-adapter" in err
    code, _, err = run("adapters", "list", "--admin-token", "wrong-token")
    assert code == 1 and "401" in err


def test_commands_register_in_another_parser() -> None:
    """What the `multiplex` console script does with COMMANDS; no server needed."""
    parser = argparse.ArgumentParser(prog="multiplex")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run_command) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=HELP[name]))
    args = parser.parse_args(["complete", "hi", "--url", "http://example:1", "--no-stream", "--max-tokens", "3"])
    assert (args.prompt, args.url, args.stream, args.max_tokens) == ("hi", "http://example:1", False, 3)
    args = parser.parse_args(["adapters", "delete", "x", "--admin-token", "t"])
    assert (args.action, args.adapter_id, args.admin_token) == ("delete", "x", "t")
    args = parser.parse_args(["loadgen", "--rate", "2,4", "--num-adapters", "3"])
    assert args.rate == ["2,4"] and args.num_adapters == 3
    assert set(COMMANDS) == set(HELP) == {"upload", "adapters", "complete", "chat", "loadgen"}
