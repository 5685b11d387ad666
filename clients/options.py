"""The connection options every client command takes, each with its environment variable.

| flag            | environment             | default               |
| --url           | MULTIPLEX_URL           | http://127.0.0.1:8000 |
| --api-key       | MULTIPLEX_API_KEY       | none (open server)    |
| --admin-token   | MULTIPLEX_ADMIN_TOKEN   | none                  |
| --timeout       | MULTIPLEX_TIMEOUT       | 60 (seconds)          |
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from clients.client import DEFAULT_TIMEOUT_S, DEFAULT_URL


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--url", default=os.environ.get("MULTIPLEX_URL", DEFAULT_URL),
                       help="server address [env MULTIPLEX_URL; default %(default)s]")
    group.add_argument("--api-key", default=os.environ.get("MULTIPLEX_API_KEY"),
                       help="API key for /v1 routes, when the server has tenants [env MULTIPLEX_API_KEY]")
    group.add_argument("--admin-token", default=os.environ.get("MULTIPLEX_ADMIN_TOKEN"),
                       help="bearer token of the /admin routes [env MULTIPLEX_ADMIN_TOKEN]")
    group.add_argument("--timeout", type=float, default=float(os.environ.get("MULTIPLEX_TIMEOUT", DEFAULT_TIMEOUT_S)),
                       help="seconds to wait for an answer (between chunks, when streaming) "
                            "[env MULTIPLEX_TIMEOUT; default %(default)s]")


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Client(...) / AsyncClient(...) keyword arguments from parsed connection options."""
    return {"base_url": args.url, "api_key": args.api_key, "admin_token": args.admin_token, "timeout": args.timeout}
