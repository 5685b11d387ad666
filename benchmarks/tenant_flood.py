"""What one tenant's flood does to another tenant, through HTTP: `multiplex serve` with two tenants' API keys, one
tenant ("flood") sends many long streaming requests at once, and a moment later the other ("calm") sends a few
short ones. Reported: the calm tenant's time to first token and latency, and how the flood's requests were
answered (served, 429 at its per-tenant limit, 503 at the server's).

    python -m benchmarks.tenant_flood                                   # this checkout's server
    python -m benchmarks.tenant_flood --server-dir /path/to/other/checkout --out before.json

`--server-dir`: run the server of another checkout of this repository (with this Python), to compare two codes
on the same machine in turn. Engine-only figures are not what this measures: every request goes over HTTP with the
real tokenizer of the tiny model (or `--model`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.multiplex_peer import _free_port, wait_until_ready

KEYS = {"flood": "bench-flood-key", "calm": "bench-calm-key"}


async def _stream(client: httpx.AsyncClient, tenant: str, max_tokens: int) -> dict:
    """One streaming completion: status, seconds to the first text chunk and to the end."""
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as response:
        if response.status_code != 200:
            await response.aread()
            return {"tenant": tenant, "status": response.status_code, "ttft_s": None, "latency_s": None}
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and '"text"' in line:
                first = time.perf_counter() - t0
    return {"tenant": tenant, "status": 200, "ttft_s": first, "latency_s": time.perf_counter() - t0}


async def _scenario(url: str, args: argparse.Namespace) -> list[dict]:
    limits = httpx.Limits(max_connections=args.flood + args.calm + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await _stream(client, "calm", 2)  # warm-up
        flood = [asyncio.create_task(_stream(client, "flood", args.flood_tokens)) for _ in range(args.flood)]
        await asyncio.sleep(args.delay)
        calm = await asyncio.gather(*(_stream(client, "calm", args.calm_tokens) for _ in range(args.calm)))
        return list(calm) + list(await asyncio.gather(*flood))


def _summary(rows: list[dict]) -> dict:
    calm = [r for r in rows if r["tenant"] == "calm"]
    served = [r for r in calm if r["status"] == 200]

    def median(key: str) -> float | None:
        values = [r[key] for r in served if r[key] is not None]
        return statistics.median(values) if values else None

    return {"calm_statuses": dict(Counter(r["status"] for r in calm)),
            "calm_ttft_s_median": median("ttft_s"), "calm_ttft_s_max": max((r["ttft_s"] or 0 for r in served),
                                                                        default=None),
            "calm_latency_s_median": median("latency_s"),
            "flood_statuses": dict(Counter(r["status"] for r in rows if r["tenant"] == "flood"))}


def run(args: argparse.Namespace) -> dict:
    server_dir = (args.server_dir or Path(__file__).resolve().parents[1]).resolve()
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "server", "serve", "--model", args.model, "--device", "cpu",
                   "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(Path(tmp) / "data"),
                   "--max-num-seqs", str(args.max_num_seqs), "--log-level", "WARNING",
                   "--api-keys", ",".join(f"{key}:{tenant}" for tenant, key in KEYS.items())]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIPLEX_") and k != "REDIS_URL"}
        env["PYTHONPATH"] = str(server_dir)
        with open(Path(tmp) / "server.log", "wb") as log:
            server = subprocess.Popen(command, cwd=server_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_ready(server, url, Path(tmp) / "server.log", 300)
            rows = asyncio.run(_scenario(url, args))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    code = subprocess.run(["git", "-C", str(server_dir), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    return {"server_dir": str(server_dir), "code": code, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            **_summary(rows), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--server-dir", type=Path, default=None, help="a checkout whose server runs (default: this one)")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--flood", type=int, default=64, help="the flooding tenant's concurrent requests")
    ap.add_argument("--flood-tokens", type=int, default=256)
    ap.add_argument("--calm", type=int, default=4, help="the other tenant's requests, sent after --delay")
    ap.add_argument("--calm-tokens", type=int, default=16)
    ap.add_argument("--delay", type=float, default=1.0, help="seconds between the flood and the calm requests")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    report = run(args)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
