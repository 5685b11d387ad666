"""GET /health (liveness plus a summary of the engine's stats) and GET /metrics (Prometheus text format)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api.metrics import render_prometheus

router = APIRouter()

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    # Cheap on purpose: no adapter listing, which may reach the registry; /v1/models does that.
    return JSONResponse({"status": "ok", "model": engine.model_name, "engine": engine.stats()})


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    text = render_prometheus(request.app.state.engine.stats(), request.app.state.api_metrics)
    return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)
