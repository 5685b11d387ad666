"""The OpenAPI document (`/openapi.json`, `/docs`): FastAPI's, plus the bodies it cannot see.

The /v1 routes read their JSON bodies themselves (server/api/body.py: cheap refusals before pydantic runs), and the
admin uploads read their multipart forms themselves (server/api/admin.py: bounded before parsing), so FastAPI
finds no body parameter to document. Such a route declares its body with `openapi_extra=json_body(Schema)` (or
`form_body(...)`); how the body is parsed does not change. When the document is built:

    route's requestBody schema (pydantic's, refs written as #/components/schemas/{name}, with its own `$defs`)
        -> `$defs` moved to components/schemas, where OpenAPI keeps shared schemas (a copy: the route keeps its own)
    FastAPI's 422 HTTPValidationError (never sent: server/api/errors.py answers validation errors with 400)
        -> 400 with the ErrorResponse every error has
"""
from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.api.schemas import ErrorResponse

REF_TEMPLATE = "#/components/schemas/{model}"
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route that parses a JSON body of `schema` itself."""
    return _body("application/json", schema.model_json_schema(ref_template=REF_TEMPLATE))


def response_doc(whole: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """`responses` of a generation route: `whole` as JSON, or with `"stream": true` a text/event-stream of `chunk`s
    (each `data:` line one chunk, then `data: [DONE]`). The routes build these bodies and tests validate them
    against the same models (tests/e2e/test_api.py, test_chat.py)."""
    return {200: {"model": whole, "description": f"the whole response ({whole.__name__}); with `stream`, server-sent "
                                                 f"events, each a {chunk.__name__}, then `[DONE]`"}}


def form_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` of a route that parses a multipart form itself; `schema`: a JSON schema of its fields."""
    return _body("multipart/form-data", schema)


def _body(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (served at /openapi.json) the document described in the module's docstring."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend its document


def build_openapi(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                           description=app.description, routes=app.routes)
    components = document.setdefault("components", {}).setdefault("schemas", {})
    error_schema = _hoisted(ErrorResponse.model_json_schema(ref_template=REF_TEMPLATE), components)
    components["ErrorResponse"] = error_schema
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                if "schema" in media:
                    media["schema"] = _hoisted(media["schema"], components)
            _document_errors(operation)
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    return document


def _hoisted(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` without its `$defs`, which go to `components` (the same name twice must be the same
    schema: two models of one name would make one ref mean two things)."""
    schema = copy.deepcopy(schema)
    for name, definition in schema.pop("$defs", {}).items():
        if components.setdefault(name, definition) != definition:
            raise ValueError(f"two different schemas are both named {name!r} in the OpenAPI document")
    return schema


def _document_errors(operation: dict[str, Any]) -> None:
    """An operation that takes input may answer 400 (never FastAPI's 422 validation error)."""
    responses = operation.setdefault("responses", {})
    fastapi_422 = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if fastapi_422.get("$ref", "").endswith("/HTTPValidationError"):
        del responses["422"]
    elif "requestBody" not in operation:
        return
    responses.setdefault("400", {"description": "Invalid request: the message names the field",
                                 "content": {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(
                                     model="ErrorResponse")}}}})
