"""The FastAPI application: routes, error handlers, and the engine's lifetime tied to the server's."""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI

from server.api import completions, health, models
from server.api.errors import install_error_handlers
from server.api.metrics import ApiMetrics
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


def create_app(engine: Any, settings: Settings) -> FastAPI:
    """`engine` is a server.engine.async_engine.AsyncEngine, not yet started: the app starts and stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("engine started: model %s", engine.model_name)
        try:
            yield
        finally:
            engine.shutdown()
            logger.info("engine stopped")

    app = FastAPI(title="multiplex", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings  # for routes that need a setting of their own (the admin token, ...)
    app.state.api_metrics = ApiMetrics()
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.add_middleware(ResponseStatusCounter, metrics=app.state.api_metrics)
    return app
