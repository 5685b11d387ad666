"""Real uvicorn servers on free ports (the `live_server` fixture of tests/conftest.py), serving the tiny model and a directory of LoRA adapters of different ranks.

Each server runs in a background thread of the test process (`uvicorn.Server(config).run()`), so that tests speak
real HTTP to it and can still read the engine's stats directly. `test_cli_serve_subprocess` starts
`python -m server serve` as a process too.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import httpx

# One LoRA adapter per entry: its rank and the projections it targets (ranks and targets differ on purpose).
ADAPTER_SPECS = {
    "lora-r2": (2, ("q_proj", "v_proj")),
    "lora-r4": (4, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "lora-r8": (8, ("gate_proj", "up_proj", "down_proj")),
    "lora-r16": (16, ("q_proj", "v_proj", "down_proj")),
}
STARTUP_TIMEOUT_S = 120


@dataclass
class LiveServer:
    base_url: str
    engine: Any  # the AsyncEngine inside the server, for its tokenizer and stats
    model_name: str
    adapter_ids: list[str]
    client: httpx.Client
    admin_token: str
    registry: Any
    service: Any  # server.service.Service: its embedded Redis, for tests that stop it

    @property
    def url(self) -> str:
        return self.base_url

    def complete(self, **body: Any) -> dict[str, Any]:
        """POST /v1/completions expecting success; returns the JSON body."""
        response = self.client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()


@contextlib.contextmanager
def running_server(**settings_overrides: Any) -> Iterator[LiveServer]:
    """Build the engine the settings describe, serve it on a free port, stop it on exit."""
    import uvicorn

    from server.config import load_settings
    from server.service import build_service

    settings = load_settings(**{"device": "cpu", "dtype": "float32", "port": 0, "log_level": "WARNING",
                                **settings_overrides})
    service = build_service(settings)
    engine = service.engine
    config = uvicorn.Config(service.app, host=settings.host, port=settings.port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during startup (see the log above)"
        assert time.monotonic() < deadline, f"uvicorn did not start within {STARTUP_TIMEOUT_S}s"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://{settings.host}:{port}"
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            adapter_ids = sorted(p.name for p in settings.adapters.iterdir()) if settings.adapters else []
            _wait_until_ready(client)
            yield LiveServer(base_url=base_url, engine=engine, model_name=engine.model_name,
                             adapter_ids=adapter_ids, client=client, admin_token=service.admin_token,
                             registry=service.registry, service=service)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        service.close()


def _wait_until_ready(client: httpx.Client) -> None:
    """/health answers 200 once the engine runs, --adapters is seeded and Redis answers (server/api/readiness.py)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (response := client.get("/health")).status_code != 200:
        assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, f"server not ready: {response.text}"
        time.sleep(0.05)
