"""Cheap refusals first: who the caller is and how big the body may be, decided from the headers alone.

`RequestGuard` is a pure ASGI middleware (a BaseHTTPMiddleware would buffer streams and hide disconnects). Before
a route runs, and so before any of the body is read:

    /v1/*     the API key -> its tenant (server/api/auth.py TenantResolver), kept in scope[TENANT_SCOPE_KEY];
              401 for a missing or unknown key when keys are required
    /admin/*  the admin token (server/api/auth.py AdminAuth); 401 without it
    any body  Content-Length over the limit -> 413 at once; a body without one (chunked) is counted as the route
              reads it, and the read that passes the limit raises BodyTooLargeError (413)

Limits: `max_request_bytes` for every body (the /v1 JSON bodies), except the admin adapter upload
(POST /admin/adapters, PUT /admin/adapters/{id}), which may carry `max_upload_bytes` once the token is checked.
"""
from __future__ import annotations

import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from server.api.auth import AdminAuth, TenantResolver
from server.api.errors import http_error_response

logger = logging.getLogger(__name__)

TENANT_SCOPE_KEY = "multiplex.tenant"  # scope key of the /v1 caller's tenant (None: anonymous, open mode)


class BodyTooLargeError(HTTPException):
    def __init__(self, max_bytes: int, setting: str) -> None:
        super().__init__(413, detail=f"request body over the server's limit of {max_bytes} bytes ({setting})")


class RequestGuard:
    """Authenticates and bounds a request from its headers (see the module's docstring); pure ASGI."""

    def __init__(self, app: Any, *, tenants: TenantResolver | None, admin_auth: AdminAuth | None,
                 max_request_bytes: int, max_upload_bytes: int) -> None:
        """`tenants` None: /v1 is open (no keys at all); `admin_auth` None: no /admin routes to guard."""
        self.app = app
        self.tenants = tenants
        self.admin_auth = admin_auth
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            max_bytes, setting = await self._admit(scope, headers)
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise BodyTooLargeError(max_bytes, setting)
        except HTTPException as exc:
            await http_error_response(exc)(scope, receive, send)
            return
        await self.app(scope, _counting(receive, max_bytes, setting), send)

    async def _admit(self, scope: dict, headers: Headers) -> tuple[int, str]:
        """Authenticate by the path's prefix; -> the body limit for this request and the setting that sets it."""
        path = scope["path"]
        if path == "/v1" or path.startswith("/v1/"):
            tenants = self.tenants
            scope[TENANT_SCOPE_KEY] = None if tenants is None else await tenants.resolve_tenant(
                headers.get("authorization"))
        elif self.admin_auth is not None and (path == "/admin" or path.startswith("/admin/")):
            self.admin_auth.check(headers.get("authorization"))
            if _is_upload(scope["method"], path):
                return self.max_upload_bytes, "MULTIPLEX_MAX_ADAPTER_BYTES"
        return self.max_request_bytes, "MULTIPLEX_MAX_REQUEST_BYTES"


def _is_upload(method: str, path: str) -> bool:
    return (method == "POST" and path == "/admin/adapters") or (method == "PUT" and path.startswith("/admin/adapters/"))


def _counting(receive: Any, max_bytes: int, setting: str) -> Any:
    """`receive` that raises BodyTooLargeError once more than `max_bytes` of body have arrived (a chunked body, or
    one longer than its Content-Length said; the route's exception handler answers 413)."""
    num_bytes = 0

    async def counting_receive() -> dict:
        nonlocal num_bytes
        message = await receive()
        if message["type"] == "http.request":
            num_bytes += len(message.get("body", b""))
            if num_bytes > max_bytes:
                raise BodyTooLargeError(max_bytes, setting)
        return message

    return counting_receive
