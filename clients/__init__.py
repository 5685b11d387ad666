"""Clients of a multiplex server, speaking its HTTP API only: `Client`, `AsyncClient`, their typed answers and
exceptions (clients.client), the CLI subcommands (clients.cli) and the load generator (clients.loadgen)."""
from clients.client import AsyncClient, Client
from clients.stream import AsyncTextStream, TextStream
from clients.errors import (AuthError, BadRequestError, ConflictError, ConnectionFailed, MultiplexError,
                            NotFoundError, OverloadedError)
from clients.wire import AdapterInfo, Choice, Completion, Logprobs, ModelInfo, Usage

__all__ = ["AdapterInfo", "AsyncClient", "AsyncTextStream", "AuthError", "BadRequestError", "Choice", "Client",
           "Completion", "ConflictError", "ConnectionFailed", "Logprobs", "ModelInfo", "MultiplexError",
           "NotFoundError", "OverloadedError", "TextStream", "Usage"]
