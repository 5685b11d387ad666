"""Exceptions of the client: one per kind of failure, each carrying the server's own error type and message.

The server answers every error as `{"error": {"type", "message"}}`; `error_from_response` turns that (or anything
else a proxy in between may answer, such as an HTML 502) into the matching exception.

| status              | exception          |
| 400, 413, 415, 422  | BadRequestError    |
| 401, 403            | AuthError          |
| 404                 | NotFoundError      |
| 409                 | ConflictError      |
| 429, 503            | OverloadedError    |
| other               | MultiplexError     |
| no answer           | ConnectionFailed   |
"""
from __future__ import annotations

import json
from typing import Any, Mapping


class MultiplexError(Exception):
    """An error answer of the server. `status_code` is None when no HTTP answer came back (a stream error event)."""

    def __init__(self, status_code: int | None, error_type: str, message: str) -> None:
        super().__init__(f"{status_code or 'error'} {error_type}: {message}")
        self.status_code = status_code
        self.error_type = error_type
        self.message = message


class BadRequestError(MultiplexError):
    """The request or the uploaded adapter was refused as invalid (400, 413, 415, 422)."""


class AuthError(MultiplexError):
    """Missing or wrong API key or admin token (401), or not allowed (403)."""


class NotFoundError(MultiplexError):
    """No such adapter, model or route (404)."""


class ConflictError(MultiplexError):
    """The adapter id exists already; upload with replace=True to store a new version (409)."""


class OverloadedError(MultiplexError):
    """The server is busy or a dependency is away (429, 503); retry after `retry_after` seconds."""

    def __init__(self, status_code: int | None, error_type: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(status_code, error_type, message)
        self.retry_after = retry_after


class ConnectionFailed(MultiplexError):
    """No answer: the server could not be reached, or it did not answer in time."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(None, error_type, message)


_CLASS_BY_STATUS: dict[int, type[MultiplexError]] = {
    400: BadRequestError, 413: BadRequestError, 415: BadRequestError, 422: BadRequestError,
    401: AuthError, 403: AuthError, 404: NotFoundError, 409: ConflictError,
    429: OverloadedError, 503: OverloadedError,
}
_CLASS_BY_TYPE: dict[str, type[MultiplexError]] = {"overloaded": OverloadedError, "rate_limit_error": OverloadedError}


def error_from_body(status_code: int | None, body: Any, headers: Mapping[str, str] | None = None) -> MultiplexError:
    """The exception for an error answer whose body is already decoded (`{"error": {...}}` or anything else)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error_type, message = str(error.get("type") or "error"), str(error.get("message") or "")
    else:
        error_type, message = "http_error", (str(body)[:500] if body else "")
    cls = _CLASS_BY_STATUS.get(status_code or 0) or _CLASS_BY_TYPE.get(error_type, MultiplexError)
    if cls is OverloadedError:
        return OverloadedError(status_code, error_type, message, _retry_after(headers))
    return cls(status_code, error_type, message or f"HTTP {status_code}")


def error_from_response(status_code: int, content: bytes, headers: Mapping[str, str]) -> MultiplexError:
    try:
        body: Any = json.loads(content)
    except ValueError:
        body = content.decode("utf-8", errors="replace").strip()
    return error_from_body(status_code, body, headers)


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    try:
        return float(headers["retry-after"]) if headers and "retry-after" in headers else None
    except ValueError:
        return None
