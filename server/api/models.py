"""GET /v1/models: the base model and every adapter, each usable as a completion request's `model`."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.engine_port import EnginePort
from server.api.errors import ApiError
from server.api.schemas import ModelCard, ModelList
from server.api.tenancy import request_tenant

router = APIRouter()


async def _cards(request: Request) -> list[ModelCard]:
    engine: EnginePort = request.app.state.engine
    created = request.app.state.created
    base = ModelCard(id=engine.model_name, created=created, root=engine.model_name)
    adapters = [ModelCard(id=adapter_id, created=created, root=engine.model_name, parent=engine.model_name)
                for adapter_id in sorted(await engine.list_adapters(await request_tenant(request)))]
    return [base, *adapters]


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=await _cards(request))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in await _cards(request):
        if card.id == model_id:
            return card
    raise ApiError(404, f"model {model_id!r} not found", "model_not_found")
