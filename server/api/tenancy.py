"""The tenant of a /v1 request: resolved from its API key by the request guard (server/api/guard.py) before the
route runs; None for an anonymous caller where /v1 is open (server/api/auth.py)."""
from __future__ import annotations

from fastapi import Request

from server.api.guard import TENANT_SCOPE_KEY


async def request_tenant(request: Request) -> str | None:
    if TENANT_SCOPE_KEY in request.scope:
        return request.scope[TENANT_SCOPE_KEY]
    # A route mounted without the guard: resolve here, so that it is never open by accident.
    tenants = getattr(request.app.state, "tenants", None)
    if tenants is None:
        return None
    return await tenants.resolve_tenant(request.headers.get("authorization"))
