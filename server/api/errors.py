"""Every error leaves the server as JSON `{"error": {"type", "message"}}`, never with a stack trace.

- request validation (bad JSON, missing or mistyped fields, out-of-range values) -> 400 naming the field
- the request guard's refusals (server/api/guard.py): no or a wrong key 401, a body over the limit 413
- the domain errors of the engine and the registry (plain exceptions, no HTTP on them) -> `DOMAIN_ERRORS`, the one
  table of their status and type
- `ApiError`: what the API itself detects, with its own status
- Starlette HTTP errors (unknown route, wrong method) -> their status
- anything else -> 500 with a generic message; the traceback goes to the log only
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.errors import (
    AdapterOverflowError,
    AdapterQuarantinedError,
    EngineError,
    EngineOverloadedError,
    InvalidAdapterError,
    PromptTooLongError,
    TenantOverloadedError,
    UnknownAdapterError,
)
from server.registry.store import (
    AdapterExistsError,
    AdapterNotFoundError,
    CorruptAdapterError,
    RegistryError,
    RegistryUnavailableError,
)

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded",
}


class ErrorMapping(NamedTuple):
    status_code: int
    error_type: str
    is_message_shown: bool = True  # False: a generic message, and the traceback goes to the log


# Domain error -> how HTTP answers it. The most specific class wins (looked up along the exception's MRO), so a
# subclass not listed answers as its parent. Every 429 and 503 carries `Retry-After`.
DOMAIN_ERRORS: dict[type[Exception], ErrorMapping] = {
    # the engine (server/engine/errors.py)
    UnknownAdapterError: ErrorMapping(404, "adapter_not_found"),
    PromptTooLongError: ErrorMapping(400, "invalid_request_error"),
    EngineOverloadedError: ErrorMapping(503, "overloaded"),
    TenantOverloadedError: ErrorMapping(429, "rate_limit_error"),  # this tenant's limit, not the server's
    InvalidAdapterError: ErrorMapping(422, "invalid_adapter"),
    AdapterQuarantinedError: ErrorMapping(422, "adapter_quarantined"),  # retrying this version cannot succeed
    AdapterOverflowError: ErrorMapping(422, "adapter_overflow"),  # this input overflows this adapter
    EngineError: ErrorMapping(500, "internal_error", is_message_shown=False),
    # the registry (server/registry/store.py)
    AdapterNotFoundError: ErrorMapping(404, "adapter_not_found"),
    AdapterExistsError: ErrorMapping(409, "conflict_error"),
    CorruptAdapterError: ErrorMapping(500, "registry_error"),  # the message names the adapter and the mismatch
    RegistryUnavailableError: ErrorMapping(503, "unavailable"),  # Redis away: every route, every replica
    RegistryError: ErrorMapping(409, "conflict_error"),  # a concurrent write got there first; retry
}
DOMAIN_ERROR_BASES = (EngineError, RegistryError)


def error_mapping(exc: BaseException) -> ErrorMapping:
    """The status and type `exc` (a domain error) is answered with."""
    for cls in type(exc).__mro__:
        if cls in DOMAIN_ERRORS:
            return DOMAIN_ERRORS[cls]
    raise TypeError(f"{type(exc).__name__} is not a domain error (see DOMAIN_ERRORS)")


class ApiError(Exception):
    """An error the API itself detects, with the status and type it is answered with."""

    def __init__(self, status_code: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status_code, "error")
        self.message = message


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message}}


def error_response(status_code: int, error_type: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error_type, message), status_code=status_code, headers=headers)


MAX_ERRORS_NAMED = 10  # a body with thousands of bad items gets a short answer


def format_validation_errors(errors: list[dict[str, Any]]) -> str:
    """One readable line per problem, e.g. `max_tokens: Input should be greater than or equal to 1`."""
    parts = []
    for error in errors[:MAX_ERRORS_NAMED]:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        kind = error.get("type", "")
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if kind == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            parts.append(f"request body is not valid JSON{': ' + str(detail) if detail else ''}")
        elif not loc and kind == "missing":
            parts.append("request body is missing (expected a JSON object)")
        elif not loc:
            parts.append(f"request body: {message}")
        else:
            parts.append(f"{'.'.join(loc)}: {message}")
    if len(errors) > MAX_ERRORS_NAMED:
        parts.append(f"and {len(errors) - MAX_ERRORS_NAMED} more problems")
    return "; ".join(parts) or "invalid request"


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, _TYPE_BY_STATUS.get(exc.status_code, "error"), str(exc.detail),
                          exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, "invalid_request_error", format_validation_errors(list(exc.errors())))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status_code, exc.error_type, exc.message)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    mapping = error_mapping(exc)
    if mapping.status_code >= 500 and mapping.status_code != 503:
        logger.error("%s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    if not mapping.is_message_shown:
        return error_response(mapping.status_code, mapping.error_type, "internal error in the engine")
    headers = {"Retry-After": "1"} if mapping.status_code in (429, 503) else None
    return error_response(mapping.status_code, mapping.error_type, str(exc) or mapping.error_type, headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return error_response(404, _TYPE_BY_STATUS[404], f"no route for {request.method} {request.url.path}",
                              exc.headers)
    return http_error_response(exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


class CatchAllMiddleware:
    """Answers an unexpected exception with a generic 500 and keeps the connection usable.

    (Starlette's own last-resort handler answers too, but then re-raises, and uvicorn drops the keep-alive
    connection.) Pure ASGI, so streaming responses pass through untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def tracking_send(message: dict) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if response_started:  # too late for a status; the stream itself reports its errors
                raise
            logger.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await error_response(500, "internal_error", "internal server error")(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Exception handlers, plus the catch-all middleware (add it before any middleware that should see its 500s)."""
    app.add_middleware(CatchAllMiddleware)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    for base in DOMAIN_ERROR_BASES:
        app.add_exception_handler(base, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
