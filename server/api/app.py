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
from server.api.errors import install_error_handlers
from server.api.metrics import ApiMetrics
from server.api.readiness import Readiness
from server.config import Settings

logger = logging.getLogger(__name__)


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
                self.metrics.responses_by_status[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: Any, settings: Settings, *, tenants: Any = None, routers: Sequence[APIRouter] = (),
               background: Sequence[Callable[[], Awaitable[None]]] = (),
               on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
               readiness: Readiness | None = None) -> FastAPI:
    """`engine` is a server.engine.async_engine.AsyncEngine, not yet started: the app starts and stops it.
    `tenants`: resolves /v1 API keys (server/auth.py), None = open. `routers`: more routes (the admin API).
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

    app = FastAPI(title="multiplex", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings  # for routes that need a setting of their own (the admin token, ...)
    app.state.api_metrics = ApiMetrics()
    app.state.created = int(time.time())
    app.state.tenants = tenants
    app.state.readiness = readiness
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.add_middleware(ResponseStatusCounter, metrics=app.state.api_metrics)
    return app
