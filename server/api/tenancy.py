"""The tenant of a /v1 request, from its API key (server/auth.py); None when the server has no keys (open)."""
from __future__ import annotations

from fastapi import Request


async def request_tenant(request: Request) -> str | None:
    tenants = getattr(request.app.state, "tenants", None)
    if tenants is None:
        return None
    return await tenants.resolve_tenant(request.headers.get("authorization"))
