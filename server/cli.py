"""The `multiplex` command (also `python -m server`).

Each subcommand is one entry of SUBCOMMANDS: name -> (help, add_arguments(parser), run(args) -> exit code).
To add one (`train`, `upload`, ...), write those two functions in the module that owns the feature and add a line.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import sys
from typing import Callable

from server.config import ENV_PREFIX, ConfigError, Settings, load_settings
from server.engine.errors import EngineError

logger = logging.getLogger(__name__)

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

GRACEFUL_SHUTDOWN_S = 10
KEEP_ALIVE_S = 5  # how long an idle HTTP connection stays open (uvicorn's and vLLM's default); clients keep theirs shorter


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, help text from the field; absent flags stay absent so the environment applies."""
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f"{field.description} [env {ENV_PREFIX}{name.upper()}; default {field.default}]",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return load_settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_logging(settings.log_level)

    import uvicorn  # deferred: `multiplex --help` should not pay for the web stack

    from server.api.auth import ADMIN_TOKEN_FILE
    from server.service import running_service

    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully; as an exception (not the default
    # action, which kills the process at once) it lets `running_service` close the embedded Redis on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)

    logger.info("loading model %s (device %s, dtype %s)", settings.model, settings.device, settings.dtype)
    with running_service(settings) as service:
        registry = settings.redis_url or f"embedded redis in {settings.data_dir}"
        # Where the admin token is, never the token itself (logs and terminals are read by others).
        admin_token = f"{ENV_PREFIX}ADMIN_TOKEN" if settings.admin_token else settings.data_dir / ADMIN_TOKEN_FILE
        print(f"multiplex: serving {service.engine.model_name} on http://{settings.host}:{settings.port} "
              f"(adapter registry: {registry}; admin token: {admin_token}; /v1 API keys: {settings.api_auth})",
              flush=True)
        # On shutdown, streams still open after the grace period are cancelled, which aborts them in the engine.
        uvicorn.run(service.app, host=settings.host, port=settings.port, log_config=None,
                    log_level=settings.log_level.lower(), timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                    timeout_keep_alive=KEEP_ALIVE_S)
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="the trainer's flags (see `multiplex train --help-trainer`); --model smollm2 (default), "
                             "tiny or a .gguf file name the embedded models or a GGUF to convert")


def run_train(args: argparse.Namespace) -> int:
    """`multiplex train ...` = `python -m adapters.train ...`, with `--model` naming an embedded model (smollm2, tiny)
    or a .gguf file resolved to its checkpoint directory (server/model/catalog.py); smollm2 when not given."""
    from adapters.train import main as train_main
    from server.model.catalog import DEFAULT_MODEL, resolve_model_path

    argv = list(args.train_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if argv[:1] == ["--help-trainer"]:
        argv = ["--help"]
    if "--help" not in argv and "-h" not in argv:
        data_dir = os.environ.get(f"{ENV_PREFIX}DATA_DIR", ".multiplex")
        model, where = _model_argument(argv)
        resolved = str(resolve_model_path(model or DEFAULT_MODEL, data_dir))
        if where is None:
            argv = ["--model", resolved, *argv]
        else:
            argv[where] = resolved
    return train_main(argv, prog="multiplex train")


def _model_argument(argv: list[str]) -> tuple[str | None, int | None]:
    """The value of --model in `argv` and the index to write its resolved path to (None, None when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1], i + 1
        if arg.startswith("--model="):
            argv[i : i + 1] = ["--model", arg.split("=", 1)[1]]
            return argv[i + 1], i + 1
    return None, None


def _client_subcommands() -> dict[str, tuple[str, AddArguments, Run]]:
    from clients.cli import COMMANDS, HELP

    return {name: (HELP[name], add, run) for name, (add, run) in COMMANDS.items()}


SUBCOMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "serve": ("serve completions over HTTP", add_settings_arguments, run_serve),
    "train": ("train an adapter offline (LoRA, PiSSA, SORSA, SpecAdapt, ALoRA, SIFT, PARA, IA3)",
              add_train_arguments, run_train),
    **_client_subcommands(),  # upload, adapters, complete, loadgen: HTTP clients of a running server
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiplex", description="Serve one backbone with many adapters.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def kernels_name_clash() -> str | None:
    """Why this environment cannot run us, when Hugging Face's `kernels` package is installed: its import name is
    our kernels/ package's, so transformers (which imports it where installed) gets ours and fails on its first
    model import with an ImportError that does not say why. None when it is not installed."""
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return (f"Hugging Face's `kernels` package ({version}) is installed in this environment; its import name is that "
            f"of multiplex's own `kernels` package, and transformers would import ours in its place and fail. "
            f"Uninstall it (`pip uninstall kernels`) and keep transformers below 5.25, which requires it (README, "
            f"Next steps)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer parses its own flags (argparse cannot pass '--x' through a subparser)
        argv = ["train", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    clash = kernels_name_clash() if args.command in ("serve", "train") else None
    if clash is not None:
        print(f"multiplex {args.command}: {clash}", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"multiplex {args.command}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, ValueError, EngineError) as exc:
        # A bad model or adapter found while loading; the traceback is for debugging only.
        logger.debug("startup failed", exc_info=True)
        print(f"multiplex {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
