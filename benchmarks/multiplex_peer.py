"""Ours, as a user runs it: `python -m server serve` (the `multiplex serve` command) in a subprocess seeded with the
workload's PEFT directories (`--adapters`); a round sends every request at once over real HTTP
(`POST /v1/completions` with token-id prompts, temperature 0, `ignore_eos`) and is timed until the last answer."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx

from benchmarks.workload import Workload
from clients.client import KEEPALIVE_EXPIRY_S

STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 1800


class MultiplexPeer:
    def __init__(self, workload: Workload, work_dir: Path, cpu_threads: int | None = None, lora_dtype: str = "auto"):
        """`cpu_threads`: the server's --cpu-threads (None: its default); `lora_dtype`: its --lora-dtype."""
        self.workload = workload
        port = _free_port()
        command = [sys.executable, "-m", "server", "serve", "--model", workload.model_dir,
                   "--adapters", workload.adapters_root, "--device", "cpu", "--dtype", workload.dtype,
                   "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(work_dir / "multiplex-data"),
                   "--max-num-seqs", str(workload.num_requests), "--log-level", "WARNING"]
        if cpu_threads:
            command += ["--cpu-threads", str(cpu_threads)]
        if lora_dtype != "auto":
            command += ["--lora-dtype", lora_dtype]
        self.system = (f"multiplex {version('multiplex')} (HTTP, {workload.num_requests} concurrent requests"
                       f"{'' if lora_dtype == 'auto' else ', adapters in ' + lora_dtype})")
        self.command = " ".join(command)
        # A clean environment: no MULTIPLEX_* or REDIS_URL of the caller (API keys, a shared Redis) changes the run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIPLEX_") and k != "REDIS_URL"}
        self.log_path = work_dir / "multiplex.log"
        with open(self.log_path, "wb") as server_log:
            self.server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=env)
        self.base_url = f"http://127.0.0.1:{port}"
        self.loop = asyncio.new_event_loop()  # one loop and one client: connections stay open between rounds
        # idle connections dropped before the server's keep-alive closes them (a round sent on one it was closing failed)
        limits = httpx.Limits(max_connections=workload.num_requests, max_keepalive_connections=workload.num_requests,
                              keepalive_expiry=KEEPALIVE_EXPIRY_S)
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=REQUEST_TIMEOUT_S, limits=limits)
        try:
            self._wait_until_ready()
        except BaseException:
            self.close()
            raise

    def round(self, mixed: bool) -> float:
        """Seconds from sending every request to the last answer."""
        adapter_ids = self.workload.adapter_ids if mixed else [None] * self.workload.num_requests
        try:
            return self.loop.run_until_complete(self._round(adapter_ids))
        except Exception as exc:  # what the server said goes with it: its log is in a temporary directory
            code = self.server.poll()
            state = "running" if code is None else f"exited with {code}"
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{type(exc).__name__}: {exc} (the server: {state}); its log ends:\n{tail}") from exc

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()
        # SIGINT, as Ctrl-C: uvicorn stops, then `multiplex serve` closes its service (and its embedded Redis).
        self.server.send_signal(signal.SIGINT)
        try:
            self.server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    async def _round(self, adapter_ids: list[str | None]) -> float:
        w = self.workload
        bodies = [{"prompt": prompt, "max_tokens": w.max_tokens, "temperature": 0, "ignore_eos": True,
                   **({"adapter_id": a} if a else {})} for prompt, a in zip(w.prompts, adapter_ids)]
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(self.client.post("/v1/completions", json=body) for body in bodies))
        seconds = time.perf_counter() - t0
        for response in responses:
            if response.status_code != 200:
                raise RuntimeError(f"multiplex answered {response.status_code}: {response.text[:500]}")
            generated = response.json()["usage"]["completion_tokens"]
            if generated != w.max_tokens:
                raise RuntimeError(f"multiplex generated {generated} tokens, not {w.max_tokens}")
        return seconds

    def _wait_until_ready(self) -> None:
        wait_until_ready(self.server, self.base_url, self.log_path, STARTUP_TIMEOUT_S)


def wait_until_ready(server: subprocess.Popen, base_url: str, log_path: Path, timeout_s: float) -> None:
    """/health answers 200 once the model is loaded, the adapters are seeded and Redis answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"multiplex serve exited with {server.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"multiplex serve not ready after {timeout_s}s:\n{log_path.read_text(errors='replace')[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
