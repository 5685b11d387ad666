"""The API's view of the engine (server/api/engine_port.py): AsyncEngine satisfies EnginePort, member by member,
with the same call signatures."""
import inspect
from types import SimpleNamespace

import pytest

from server.api.engine_port import EnginePort, Tokenizer
from server.engine.async_engine import AsyncEngine
from server.model.tiny import byte_level_tokenizer


def _async_engine() -> AsyncEngine:
    llm = SimpleNamespace(tokenizer=byte_level_tokenizer(), max_model_len=64, metrics_registry=None)
    return AsyncEngine(llm, model_name="tiny", adapters=None)  # type: ignore[arg-type] - only what __init__ reads


def test_async_engine_is_an_engine_port():
    engine = _async_engine()
    assert isinstance(engine, EnginePort)
    assert isinstance(engine.tokenizer, Tokenizer)


def _methods(cls: type) -> list[str]:
    return [name for name, member in vars(cls).items()
            if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property))]


@pytest.mark.parametrize("name", _methods(EnginePort))
def test_async_engine_matches_the_port_signatures(name):
    port, impl = inspect.getattr_static(EnginePort, name), inspect.getattr_static(AsyncEngine, name)
    if isinstance(port, property):
        assert isinstance(impl, property)
        return
    assert list(inspect.signature(impl).parameters) == list(inspect.signature(port).parameters)
    is_async_gen = inspect.isasyncgenfunction(impl)  # an async generator is called like a plain function
    assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(port) or is_async_gen
