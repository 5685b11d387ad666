"""Fixtures of the client tests: the real server of tests/e2e (uvicorn + the tiny model), its URL and admin token,
and small format-1 adapter directories made for the tiny backbone.

`live_server` comes from tests/conftest.py (one server for the whole session).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.live_server import LiveServer


@pytest.fixture(scope="session")
def server_url(live_server: LiveServer) -> str:
    return live_server.url


@pytest.fixture(scope="session")
def admin_token(live_server: LiveServer) -> str:
    """The live server's admin token; a server without one is a broken fixture, so this fails rather than skips
    (a skip would hide every admin test)."""
    assert live_server.admin_token, "live_server has no admin token: tests/live_server.py must start it with one"
    return live_server.admin_token


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from server.model.config import ModelConfig
    from server.model.tiny import ensure_tiny_checkpoint

    return ModelConfig.from_dir(ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))).spec()


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_spec: dict) -> Callable[..., Path]:
    """make_adapter(name, rank=4, seed=0) -> a format-1 directory: random LoRA deltas on every q_proj and v_proj."""
    import torch

    from adapters.artifact import save_artifact
    from adapters.spec import module_shapes
    from adapters.delta import AdapterDeltas, LowRank

    def make(name: str, rank: int = 4, seed: int = 0) -> Path:
        generator = torch.Generator().manual_seed(seed)
        lowrank = {}
        for module, (d_out, d_in) in module_shapes(tiny_spec).items():
            if module.endswith(("q_proj", "v_proj")):
                lowrank[module] = LowRank(A=torch.randn(rank, d_in, generator=generator) * 0.1,  # (r, d_in)
                                          B=torch.randn(d_out, rank, generator=generator) * 0.1,  # (d_out, r)
                                          scale=2.0)
        directory = tmp_path_factory.mktemp("adapter") / name
        return save_artifact(directory, AdapterDeltas(lowrank=lowrank), method="lora", spec=tiny_spec, name=name)

    return make
