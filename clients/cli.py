"""Client subcommands of the `multiplex` command: upload, adapters, complete, chat, loadgen.

    multiplex upload out/my-lora --id my-lora            # directory or .tar/.tar.gz/.zip; progress bar on stderr
    multiplex adapters list | get ID | delete ID
    multiplex complete "Once upon a time" --adapter my-lora --max-tokens 64   # streams to the terminal
    multiplex chat --adapter my-lora --system "Be brief."    # interactive: a line per turn, /exit or EOF ends it
    multiplex chat "What is a LoRA?"                          # one question, one answer
    multiplex loadgen --rate 2,4,8 --num-adapters 8 --out results.json        # see clients/loadgen.py

The same subcommands run without the server's install: `pip install ./clients` (clients/pyproject.toml: httpx and
tqdm only) installs this package and its `multiplex-client` command (`multiplex-client upload ...`); in a checkout,
`python -m clients upload ...` runs them too. Nothing here imports torch or any of the server's packages
(tests/clients/test_client_distribution.py runs them with those made unimportable).

`COMMANDS` maps each name to (add_arguments(parser), run(args) -> exit code) and `HELP` to its one-line help, for
the `multiplex` console script to register; `main(argv)` runs them on their own (`multiplex-client`, `python -m
clients`). Exit codes: 0 success, 1 the server refused or failed (its message on stderr), 2 a local problem (bad path).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Iterator, TextIO

from tqdm import tqdm

from clients import loadgen
from clients.client import Client
from clients.errors import MultiplexError
from clients.options import add_connection_arguments, client_kwargs

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


class UploadProgress:
    """`progress(bytes_sent, total)` for `Client.upload_adapter`: a tqdm bar on `out` (stderr by default), in bytes.

    The bar opens at the first call (when the total is known); use it with `with` so that it closes on a failure too.
    """

    def __init__(self, label: str, out: TextIO | None = None) -> None:
        self.label, self.out = label, out
        self.bar: tqdm | None = None
        self.is_done = False

    def __call__(self, sent: int, total: int) -> None:
        if self.is_done:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.label, unit="B", unit_scale=True, unit_divisor=1024,
                            file=self.out or sys.stderr, dynamic_ncols=True)
        self.bar.update(max(0, sent - self.bar.n))  # never backwards: a seek restarts the reader's count
        if sent >= total:
            self.close()

    def close(self) -> None:
        self.is_done = True
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> UploadProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def human_bytes(num_bytes: float) -> str:
    if num_bytes < 1024:
        return f"{num_bytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        num_bytes /= 1024
        if num_bytes < 1024 or unit == "GiB":
            break
    return f"{num_bytes:.1f} {unit}"


def _fail(command: str, exc: Exception) -> int:
    if isinstance(exc, MultiplexError):
        status = f"{exc.status_code} " if exc.status_code else ""
        print(f"multiplex {command}: {status}{exc.error_type}: {exc.message}", file=sys.stderr)
        return 1
    print(f"multiplex {command}: {exc}", file=sys.stderr)
    return 2


def _print_json(body: Any) -> None:
    print(json.dumps(body, indent=2, sort_keys=True, default=str))


# -- upload ----------------------------------------------------------------------------------------------------------

def add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="adapter directory (format 1 or PEFT LoRA/IA3) or a .tar, .tar.gz or .zip of one")
    parser.add_argument("--id", dest="adapter_id", help="adapter id (default: the server takes it from the manifest)")
    parser.add_argument("--tenant", help="owner tenant: only its API keys may use the adapter")
    parser.add_argument("--public", action="store_true", help="usable by every tenant")
    parser.add_argument("--replace", action="store_true", help="store a new version if the id exists")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the server's description of the stored adapter")
    add_connection_arguments(parser)


def run_upload(args: argparse.Namespace) -> int:
    try:
        with Client(**client_kwargs(args)) as client, UploadProgress("uploading") as bar:
            stored = client.upload_adapter(args.path, adapter_id=args.adapter_id, tenant=args.tenant,
                                           public=args.public, replace=args.replace,
                                           progress=None if args.quiet else bar)
    except (MultiplexError, OSError, ValueError) as exc:
        return _fail("upload", exc)
    if args.json:
        _print_json(stored)
    else:
        size = f" ({human_bytes(stored['size'])})" if isinstance(stored.get("size"), int) else ""
        print(f"uploaded {stored.get('id', args.adapter_id)} version {stored.get('version', '?')}{size}")
    return 0


# -- adapters --------------------------------------------------------------------------------------------------------

def add_adapters_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list stored adapters")
    listing.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    add_connection_arguments(listing)
    for name, help_text in (("get", "show one adapter"), ("delete", "delete an adapter")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("adapter_id", metavar="ID")
        add_connection_arguments(action)


def run_adapters(args: argparse.Namespace) -> int:
    try:
        with Client(**client_kwargs(args)) as client:
            if args.action == "list":
                adapters = client.list_adapters()
                if args.json:
                    _print_json([a.raw for a in adapters])
                else:
                    _print_adapter_table(adapters)
            elif args.action == "get":
                _print_json(client.get_adapter(args.adapter_id).raw)
            else:
                answer = client.delete_adapter(args.adapter_id)
                print(f"deleted {args.adapter_id}" + (f": {json.dumps(answer, sort_keys=True)}" if answer else ""))
    except MultiplexError as exc:
        return _fail(f"adapters {args.action}", exc)
    return 0


def _print_adapter_table(adapters: list) -> None:
    rows = [("ID", "VERSION", "METHOD", "SIZE", "TENANT", "PUBLIC", "CREATED")]
    rows += [(a.id, str(a.version or "-"), a.method or "-", human_bytes(a.size or 0), a.tenant or "-",
              "yes" if a.public else "no", a.created or "-") for a in adapters]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# -- complete --------------------------------------------------------------------------------------------------------

def add_complete_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--adapter", dest="adapter_id", help="adapter id (default: the base model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate max_tokens even past end-of-sequence")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, OpenAI's (default 0)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, OpenAI's (default 0)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print tokens as they come (default) or the whole completion at the end")
    add_connection_arguments(parser)


def run_complete(args: argparse.Namespace) -> int:
    params = dict(adapter_id=args.adapter_id, max_tokens=args.max_tokens, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, stop=args.stop, seed=args.seed, ignore_eos=args.ignore_eos,
                  presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    try:
        with Client(**client_kwargs(args)) as client:
            if not args.stream:
                print(client.complete(args.prompt, **params).text)
                return 0
            with client.stream(args.prompt, **params) as deltas:
                for delta in deltas:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            sys.stdout.write("\n")
    except MultiplexError as exc:
        sys.stdout.flush()
        return _fail("complete", exc)
    return 0


# -- chat ------------------------------------------------------------------------------------------------------------

def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="?",
                        help="ask this, print the answer and exit (default: an interactive chat reading a turn per "
                             "line of stdin until /exit or end of input)")
    parser.add_argument("--adapter", dest="adapter_id", help="adapter id (default: the base model)")
    parser.add_argument("--system", help="system message that opens the chat")
    parser.add_argument("--max-tokens", type=int, help="per answer (default: as many as the context leaves)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default %(default)s)")
    add_connection_arguments(parser)


def run_chat(args: argparse.Namespace) -> int:
    history = [{"role": "system", "content": args.system}] if args.system else []
    questions = [args.question] if args.question is not None else _user_turns(sys.stdin)
    try:
        with Client(**client_kwargs(args)) as client:
            for question in questions:
                _chat_turn(client, history, question, args)
    except MultiplexError as exc:
        sys.stdout.flush()
        return _fail("chat", exc)
    return 0


def _user_turns(stdin: TextIO) -> Iterator[str]:
    """One turn per non-empty line, until `/exit` or the end of input; a prompt on stderr only at a terminal (so
    that piped output holds the answers alone)."""
    is_terminal = stdin.isatty()
    while True:
        if is_terminal:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip():
            yield line.strip()


def _chat_turn(client: Client, history: list[dict[str, str]], question: str, args: argparse.Namespace) -> None:
    """Ask `question` after `history`, stream the answer to stdout, and keep both turns in `history`."""
    history.append({"role": "user", "content": question})
    pieces = []
    with client.chat_stream(history, adapter_id=args.adapter_id, max_tokens=args.max_tokens,
                            temperature=args.temperature) as deltas:
        for delta in deltas:
            pieces.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    history.append({"role": "assistant", "content": "".join(pieces)})


COMMANDS: dict[str, tuple[AddArguments, Run]] = {
    "upload": (add_upload_arguments, run_upload),
    "adapters": (add_adapters_arguments, run_adapters),
    "complete": (add_complete_arguments, run_complete),
    "chat": (add_chat_arguments, run_chat),
    "loadgen": (loadgen.add_arguments, loadgen.run),
}
HELP: dict[str, str] = {
    "upload": "upload an adapter directory or archive to a server",
    "adapters": "list, show or delete the adapters stored on a server",
    "complete": "complete a prompt (streams to the terminal)",
    "chat": "chat with a model (or an adapter) on the terminal, or ask one question",
    "loadgen": "open-loop load generator: throughput, TTFT, TPOT and latency percentiles",
}


def build_parser(prog: str = "multiplex") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Client of a multiplex server.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, run) in COMMANDS.items():
        command = commands.add_parser(name, help=HELP[name], description=HELP[name])
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    args = build_parser("multiplex-client" if name.startswith("multiplex-client") else "multiplex").parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (MultiplexError, OSError, ValueError) as exc:  # what a command did not catch itself: said, not a traceback
        return _fail(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
