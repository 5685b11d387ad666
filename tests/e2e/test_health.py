"""/health means ready: 503 naming what is missing until the engine runs, --adapters is seeded and Redis answers."""
from __future__ import annotations

import socket
import threading
import time

import httpx

from tests.live_server import running_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_is_503_until_adapters_are_seeded(adapters_dir, data_dir, monkeypatch):
    import adapters.artifact

    release = threading.Event()
    real_load = adapters.artifact.load_adapter

    def stalled_load(*args, **kwargs):
        release.wait(60)  # seeding stalls until the test has seen what /health says meanwhile
        return real_load(*args, **kwargs)

    monkeypatch.setattr(adapters.artifact, "load_adapter", stalled_load)
    port = _free_port()
    result: dict = {}

    def serve() -> None:  # running_server itself waits for /health 200, so it runs beside the probe
        with running_server(model="tiny", adapters=adapters_dir, data_dir=data_dir, port=port) as server:
            result["models"] = {m["id"] for m in server.client.get("/v1/models").json()["data"]}
            result["health"] = server.client.get("/health")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and thread.is_alive(), "server never answered /health"
            try:
                first = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.02)
    finally:
        release.set()
        thread.join(180)
    assert first.status_code == 503, first.text
    assert first.json()["status"] == "unavailable"
    assert "adapters" in first.json()["problems"], first.json()
    # once /health says ready, every seeded adapter is served
    assert result["health"].status_code == 200 and result["health"].json()["status"] == "ok"
    assert "problems" not in result["health"].json()
    assert {p.name for p in adapters_dir.iterdir()} <= result["models"]
