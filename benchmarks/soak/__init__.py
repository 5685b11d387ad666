"""Soak: `multiplex serve` (a subprocess on loopback) under closed-loop clients of two tenants, while its adapters
churn through a small device pool, an admin task replaces and deletes them, and its embedded Redis is killed.

    python -m benchmarks.soak --model tiny --duration-s 300 --out out/soak.json
    python -m benchmarks.soak --model tiny --duration-s 20 --num-clients 8 --num-redis-kills 1   # short

Setup: `--num-adapters` random LoRAs (ranks 2..64, each on its own projections), `--num-variants` weight sets each;
the server starts with `--max-adapter-slots` device slots (4: fewer than the adapters, so they are evicted and
reloaded all along), two static API keys (tenants alpha and beta) and an admin token. The last two adapters belong
to alpha and to beta; the others are public. Every adapter is uploaded at variant 0, then each one is asked once
(the warm-up), and the start values are read: RSS of the server process (/proc), free KV blocks and pinned
adapters (/health's engine stats).

Traffic, for `--duration-s`: each client sends greedy (`temperature` 0, `ignore_eos`, `--max-tokens`) completions
of one of a few fixed prompts, one after the other, streamed or not, for a random adapter its tenant may use (or
the base model), and now and then for the other tenant's adapter. Meanwhile one admin task, every
`--churn-interval-s`, either replaces an adapter with its next variant (PUT) or deletes one and uploads it again
`--gone-s` later (DELETE, then POST); and, `--num-redis-kills` times at even intervals and between two admin
operations (so that none is left half-done), kills the embedded redis-server (SIGKILL; the server's supervisor
restarts it) and waits until the server has recovered: /health 200 and an admin read of Redis answering.

Expected answers: every (adapter, variant, prompt) is run alone, before the server starts, by a separate engine in
this process (server/engine on the same checkpoint; the request alone in its batch). Asking the server itself when
idle would use the system under test as its own oracle and would need every variant uploaded first. The engine is
the same code, so this checks that batching, eviction, hot swaps and outages change nothing; backbone and adapter
numerics are checked against `transformers` and PEFT elsewhere (tests/server).

Verdict of one request, sent at t0 and answered at t1 (the adapter is resolved somewhere in between):
    ok               200 and its text is the expected text of a variant its adapter had at some moment of
                     [t0, t1] (the admin's operation windows [sent, answered] bound when a change takes effect)
    gone             404 adapter_not_found while its adapter was (possibly) deleted
    other_tenant     404 adapter_not_found for the other tenant's adapter (always)
    redis_down       503 while Redis was (possibly) down: from the kill until recovery was seen, plus a second
    mismatch         200 with another text
    unexpected       any other answer (status, error type, a stream that ends with an error event, a body or an
                     event that is not the documented JSON)
    lost             no answer: a connection error, a timeout, a stream that ends without [DONE]
The run passes when there is no mismatch, unexpected or lost request, the admin operations all succeeded, every
kill was recovered from, and at the end (idle) free KV blocks and pinned adapters equal their start values and RSS
is at most `--max-rss-growth` above its start.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.soak.config import ABSENT, PROMPTS, REDIS_DOWN_MARGIN_S, TENANTS, Adapter, Outcome, SoakConfig
from benchmarks.soak.oracle import expected_texts, make_adapters
from benchmarks.soak.process import free_port, rss_bytes, sample_rss, serve_command, wait_idle, wait_until_ready
from benchmarks.soak.report import format_summary, summarize, verdict
from benchmarks.soak.traffic import AdminLog, admin_operation, complete, run_admin, run_client

log = logging.getLogger(__name__)


# ---- the run ----------------------------------------------------------------------------------------------------

async def soak(cfg: SoakConfig, work_dir: Path) -> dict[str, Any]:
    from server.model.catalog import resolve_model_path

    data_dir = work_dir / "server-data"
    model_dir = resolve_model_path(cfg.model, data_dir)  # the checkpoint the server will load (written once here)
    t0 = time.monotonic()
    adapters, deltas_of = make_adapters(model_dir, work_dir, cfg)
    texts = expected_texts(model_dir, deltas_of, cfg)
    log.info("%d adapters x %d variants and their expected texts: %.1f s", len(adapters), cfg.num_variants,
             time.monotonic() - t0)
    by_id = {a.adapter_id: a for a in adapters}
    port = free_port()
    command = serve_command(cfg, data_dir, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIPLEX_") and k != "REDIS_URL"}
    log_path = work_dir / "server.log"
    with open(log_path, "wb") as server_log:
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=env)
        try:
            return await _soak_server(cfg, server, f"http://127.0.0.1:{port}", adapters, by_id, texts, log_path,
                                      command)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


async def _soak_server(cfg: SoakConfig, server: subprocess.Popen, base_url: str, adapters: list[Adapter],
                       by_id: dict[str, Adapter], texts: dict, log_path: Path, command: list[str]) -> dict[str, Any]:
    admin = AdminLog(changes={a.adapter_id: [] for a in adapters}, state={a.adapter_id: ABSENT for a in adapters})
    async with httpx.AsyncClient(base_url=base_url, timeout=cfg.request_timeout_s) as client:
        await wait_until_ready(client, server, log_path)
        for adapter in adapters:
            await admin_operation(client, adapter, 0, admin)
        if admin.failures:
            raise RuntimeError(f"the first uploads failed: {admin.failures}")
        # warm-up: every adapter once (fetched, on the device, the pool's padded ranks grown), then idle
        warm = [Outcome(-1, a.tenant or "alpha", a.adapter_id, 0, False, 0.0, 0.0, None) for a in adapters]
        for outcome in warm:
            outcome.status, _, outcome.text, outcome.detail = await complete(
                client, TENANTS[outcome.tenant], outcome.adapter_id, PROMPTS[0], False, cfg.max_tokens)
        if any(o.status != 200 or o.text != texts[o.adapter_id, 0][0] for o in warm):
            raise RuntimeError(f"warm-up answers differ from the expected texts: {[asdict(o) for o in warm]}")
        start_stats = await wait_idle(client)
        start_rss = rss_bytes(server.pid)

        outcomes: list[Outcome] = []
        start = time.monotonic()
        deadline = start + cfg.duration_s
        tenants = list(TENANTS)
        tasks = [run_client(i, tenants[i * len(tenants) // cfg.num_clients], base_url, adapters, cfg, deadline,
                            outcomes) for i in range(cfg.num_clients)]
        rss_samples: list[tuple[float, int]] = []
        await asyncio.gather(run_admin(base_url, server.pid, adapters, cfg, start, deadline, admin),
                             sample_rss(server.pid, start, deadline, rss_samples), *tasks)
        traffic_s = time.monotonic() - start

        end_stats = await wait_idle(client)
        await asyncio.sleep(1.0)  # let the last responses' buffers go
        end_rss = rss_bytes(server.pid)
    outages = [(k["at_s"], (k["recovered_at_s"] or float("inf")) + REDIS_DOWN_MARGIN_S) for k in admin.kills]
    verdicts = [verdict(o, admin, texts, by_id, outages) for o in outcomes]
    return summarize(cfg, command, outcomes, verdicts, admin, start_stats, end_stats, start_rss, end_rss, traffic_s,
                     rss_samples)


def run(cfg: SoakConfig, work_dir: Path | None = None) -> dict[str, Any]:
    """One soak run; -> the summary (`passed` says whether every check held)."""
    if work_dir is not None:
        return asyncio.run(soak(cfg, work_dir))
    with tempfile.TemporaryDirectory(prefix="multiplex-soak-") as tmp:
        return asyncio.run(soak(cfg, Path(tmp)))


def main(argv: list[str] | None = None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.model, help="the server's --model (default tiny)")
    for name in ("duration_s", "num_clients", "num_adapters", "num_variants", "max_adapter_slots", "max_tokens",
                 "churn_interval_s", "gone_s", "num_redis_kills", "request_timeout_s", "max_rss_growth", "seed"):
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                            help=f"default {default}")
    parser.add_argument("--work-dir", type=Path, help="keep the server's data and log here (default: a temporary "
                                                      "directory)")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = SoakConfig(**{name: getattr(args, name) for name in SoakConfig.__dataclass_fields__})
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    summary = run(cfg, args.work_dir)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
