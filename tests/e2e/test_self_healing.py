"""Self-healing through the real server: the embedded Redis killed with SIGKILL is restarted by its supervisor (same
socket, same data), /health says 503 meanwhile and 200 again by itself, adapters this replica holds keep being
served, and uploads work again without restarting the server."""
from __future__ import annotations

import os
import signal
import time

import redis

from tests.e2e.serving import ADMIN, GREEDY, format1_archive, greedy_text, upload, wait_for_health
from tests.live_server import running_server


def _redis_pid(socket_path: str) -> int:
    with redis.Redis(unix_socket_path=socket_path, socket_timeout=5) as client:
        return int(client.info("server")["process_id"])


def test_killed_embedded_redis_is_restarted(tmp_path):
    data = tmp_path / "data"
    _, archive = format1_archive(tmp_path, data, "warm", seed=9)
    with running_server(model="tiny", data_dir=data, admin_token="admin-secret") as server:
        assert upload(server, "warm", archive).status_code == 201
        before = greedy_text(server, "warm")
        embedded = server.service.embedded
        socket_path = embedded.url.removeprefix("unix://")
        old_pid = _redis_pid(socket_path)
        embedded.restart_delay_s = 3.0  # long enough for /health to see the outage (the default is shorter)
        os.kill(old_pid, signal.SIGKILL)
        wait_for_health(server, 503)
        assert "redis" in server.client.get("/health").json()["problems"]
        assert greedy_text(server, "warm") == before  # held by this replica: still served while Redis is away
        assert server.client.post("/v1/completions", json={**GREEDY, "adapter_id": "never-seen"}).status_code == 503
        wait_for_health(server, 200, timeout_s=30)  # the supervisor restarted Redis; the probe saw it
        assert _redis_pid(socket_path) != old_pid and embedded.url == f"unix://{socket_path}"
        deadline = time.monotonic() + 10
        while (r := upload(server, "late", archive)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert r.status_code == 201, r.text
        assert greedy_text(server, "late") == before  # same weights as "warm"
        listed = {a["id"] for a in server.client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}
        assert listed == {"warm", "late"}  # what was stored before the kill is still there
