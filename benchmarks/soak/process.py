"""The server under test as a subprocess: its command, readiness, engine stats, RSS and its embedded redis-server."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.soak.config import ADMIN_TOKEN, RSS_SAMPLE_S, STARTUP_TIMEOUT_S, TENANTS, SoakConfig


# ---- the server ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(cfg: SoakConfig, data_dir: Path, port: int) -> list[str]:
    keys = ",".join(f"{key}:{tenant}" for tenant, key in TENANTS.items())
    return [sys.executable, "-m", "server", "serve", "--model", cfg.model, "--device", "cpu", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
            "--max-adapter-slots", str(cfg.max_adapter_slots), "--max-num-seqs", str(max(cfg.num_clients, 1)),
            "--api-keys", keys, "--admin-token", ADMIN_TOKEN, "--log-level", "WARNING"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def redis_server_pid(server_pid: int) -> int | None:
    """The embedded redis-server: a child of the server process (its supervisor thread spawns it)."""
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == server_pid and comm.startswith("redis-server"):
            return int(stat_path.parent.name)
    return None


async def wait_until_ready(client: httpx.AsyncClient, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready within {STARTUP_TIMEOUT_S}s: {log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.2)


async def engine_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await client.get("/health")).json()["engine"]


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 60.0) -> dict[str, Any]:
    """The engine's stats once nothing runs or waits (and every stream is closed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await engine_stats(client)
        if not (stats["num_running"] or stats["num_waiting"] or stats["num_streams"]) \
                or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


async def sample_rss(pid: int, start: float, deadline: float, samples: list[tuple[float, int]]) -> None:
    """RSS every RSS_SAMPLE_S during traffic: a leak grows all along, a working set levels off."""
    while time.monotonic() < deadline:
        samples.append((round(time.monotonic() - start, 1), rss_bytes(pid)))
        await asyncio.sleep(min(RSS_SAMPLE_S, max(deadline - time.monotonic(), 0)))
