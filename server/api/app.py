"""The FastAPI application: routes, error handlers, and the engine's lifetime tied to the server's."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI

from server.api import chat, completions, health, models
from server.api.body import RequestLimits
from server.api.engine_port import EnginePort
from server.api.errors import install_error_handlers
from server.api.guard import RequestGuard
from server.api.metrics import ApiMetrics
from server.api.openapi import install_openapi
from server.api.readiness import Readiness
from server.config import Settings

logger = logging.getLogger(__name__)

UPLOAD_FORM_OVERHEAD_BYTES = 1 << 20  # an upload's multipart framing and small fields, beyond the archive itself


class ResponseStatusCounter:
    """Pure ASGI middleware counting responses by status (a BaseHTTPMiddleware would get in the way of streaming
    and of noticing a client's disconnect)."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: EnginePort, settings: Settings, *, tenants: Any = None, routers: Sequence[APIRouter] = (),
               background: Sequence[Callable[[], Awaitable[None]]] = (),
               on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
               readiness: Readiness | None = None) -> FastAPI:
    """`engine`: an EnginePort (the server's AsyncEngine), not yet started: the app starts and stops it.
    `tenants`: resolves /v1 API keys (server/api/auth.py TenantResolver), None = open. `routers`: more routes (the
    admin API); a router with an `admin_auth` (server/api/admin.py's) has its token checked by the request guard,
    from the headers, before any body is read.
    `background`: coroutine functions run as tasks for the app's lifetime (registry seeding, event following).
    `on_shutdown`: awaited after the engine stops. `readiness`: what /health waits for besides the engine (the
    service adds the adapters seeding and Redis); its "engine" check is set here."""
    readiness = readiness or Readiness("engine")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        readiness.set("engine", None)
        logger.info("engine started: model %s", engine.model_name)
        tasks = [asyncio.create_task(start()) for start in background]
        try:
            yield
        finally:
            readiness.set("engine", "shutting down")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            engine.shutdown()
            for stop in on_shutdown:
                await stop()
            logger.info("engine stopped")

    # redirect_slashes off: `/v1/completions/` is a 404 naming the route, not a 307 to a URL built from the Host header
    app = FastAPI(title="multiplex", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.engine = engine
    app.state.settings = settings  # for routes that need a setting of their own (the admin token, ...)
    app.state.api_metrics = ApiMetrics()
    app.state.api_metrics.add_engine(engine.stats, engine.metrics_registry)
    app.state.created = int(time.time())
    app.state.tenants = tenants
    app.state.readiness = readiness
    app.state.limits = RequestLimits.for_context(engine.max_model_len, settings.max_prompt_chars)
    admin_auths = [router.admin_auth for router in routers if getattr(router, "admin_auth", None) is not None]
    # Inside the catch-all (its failures are JSON 500s), outside the routes: nothing is read before it admits.
    app.add_middleware(RequestGuard, tenants=tenants, admin_auth=admin_auths[0] if admin_auths else None,
                       max_request_bytes=settings.max_request_bytes,
                       max_upload_bytes=settings.max_adapter_bytes + UPLOAD_FORM_OVERHEAD_BYTES)
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.add_middleware(ResponseStatusCounter, metrics=app.state.api_metrics)
    install_openapi(app)
    return app
