"""GET /health (readiness plus a summary of the engine's stats) and GET /metrics (Prometheus text format).

/health answers 200 only when every readiness check passes (server/api/readiness.py: the engine running, the
--adapters directory seeded, Redis answering); otherwise 503 with `status` "unavailable" and `problems` naming each
check that fails, so that a load balancer or `docker compose` sends no traffic to a replica that would 404 or 503."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api.engine_port import EnginePort
from server.api.metrics import CONTENT_TYPE

router = APIRouter()



@router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' checks (no body sent)
async def health(request: Request) -> JSONResponse:
    engine: EnginePort = request.app.state.engine
    # Cheap on purpose: it reads checks kept up to date by their owners and never waits on Redis itself.
    problems = request.app.state.readiness.problems()
    body = {"status": "unavailable" if problems else "ok", "model": engine.model_name, "engine": engine.stats()}
    if problems:
        body["problems"] = problems
    return JSONResponse(body, status_code=503 if problems else 200)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.app.state.api_metrics.render(), media_type=CONTENT_TYPE)
