"""Cold-load cost of an adapter: Redis -> host (fetch + parse) -> device pool, by rank, and the time to first token
of a request whose adapter is cold versus warm, measured in one run.

    python -m benchmarks.coldload                      # ~100M config on this machine's device (cpu here)
    python -m benchmarks.coldload --config tiny --ranks 8 16

Uses an embedded Redis in a temporary directory and the real registry, host tier, device cache and engine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from adapters.artifact import adapter_to_bytes
from adapters.manifest import LoadedAdapter
from benchmarks.engine import CONFIGS, make_checkpoint, random_adapter
from server.engine.async_engine import AsyncEngine
from server.engine.builder import EngineOptions, build_llm_engine
from server.engine.request import SamplingParams
from server.model.config import ModelConfig
from server.registry.adapters import HostTier, RegistryAdapters
from server.registry.embedded import start_embedded_redis
from server.registry.store import Registry


async def _first_token_s(engine: AsyncEngine, adapter_id: str, request_id: str) -> float:
    t0 = time.perf_counter()
    async for _ in engine.generate(request_id, list(range(3, 35)), SamplingParams(max_tokens=1, temperature=0), adapter_id):
        return time.perf_counter() - t0
    raise RuntimeError("no output")


async def run(config: str, ranks: list[int], device: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(config, Path(tmp) / "model")
        cfg = ModelConfig.from_dir(path)
        embedded = start_embedded_redis(Path(tmp) / "data")
        registry = Registry.from_url(embedded.url)
        llm = build_llm_engine(str(path), EngineOptions(device=device, dtype="auto", max_num_seqs=8,
                                                         adapter_pool_bytes=1 << 30, max_adapter_slots=16))
        source = RegistryAdapters(registry, cfg.spec(), HostTier(1 << 32), fits=llm.runner.adapter_pool.fits_empty,
                                  prepare=llm.runner.adapter_pool.prepare)
        engine = AsyncEngine(llm, model_name=config, adapters=source)
        engine.start()
        rows = []
        try:
            await _first_token_s(engine, None, "warmup-base")
            warm_blob = adapter_to_bytes(LoadedAdapter({"format": 1, "name": "w", "method": "lora"}, random_adapter(cfg, 1, 0), "multiplex"))
            await registry.put("warmup", *warm_blob)
            await _first_token_s(engine, "warmup", "warmup-adapter")  # first-use costs (imports, threads) paid here
            for rank in ranks:
                deltas = random_adapter(cfg, rank, seed=rank)
                manifest, blob = adapter_to_bytes(LoadedAdapter({"format": 1, "name": f"r{rank}", "method": "lora"}, deltas, "multiplex"))
                await registry.put(f"r{rank}", manifest, blob)
                t0 = time.perf_counter()
                ref = await source.resolve(f"r{rank}")  # Redis -> host: fetch, sha256, parse
                fetch_s = time.perf_counter() - t0
                source.forget(f"r{rank}")  # so the request below is cold end to end
                loads_before = llm.scheduler.adapters.stats.load_seconds
                cold = await _first_token_s(engine, f"r{rank}", f"cold-{rank}")
                device_s = llm.scheduler.adapters.stats.load_seconds - loads_before
                warm = min([await _first_token_s(engine, f"r{rank}", f"warm-{rank}-{i}") for i in range(3)])
                rows.append(dict(config=config, rank=rank, adapter_mb=len(blob) / 2**20, fetch_parse_ms=fetch_s * 1e3,
                                 device_load_ms=device_s * 1e3, ttft_cold_ms=cold * 1e3, ttft_warm_ms=warm * 1e3,
                                 cold_penalty_ms=(cold - warm) * 1e3, device=str(llm.runner.device)))
                r = rows[-1]
                print(f"{config} rank {rank:3d} ({r['adapter_mb']:6.1f} MB): Redis->host {r['fetch_parse_ms']:7.1f} ms, "
                      f"host->device {r['device_load_ms']:6.1f} ms | TTFT cold {r['ttft_cold_ms']:7.1f} ms, "
                      f"warm {r['ttft_warm_ms']:7.1f} ms (penalty {r['cold_penalty_ms']:7.1f} ms)", flush=True)
                del ref
        finally:
            engine.shutdown()
            await registry.close()
            embedded.close()
        return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="100m", choices=list(CONFIGS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = asyncio.run(run(args.config, args.ranks, args.device))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
