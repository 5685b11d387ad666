"""Memory, not time: the bytes the CPU adapter pool's LowRank store holds, and what the pool charges an adapter,
for `--count` adapters of rank `--rank` and then one of rank `--high-rank` beside them (random LoRAs on all seven
projections, in a pool of `--slots` slots). The store's tensors are walked and summed, so the script measures any
checkout's store: run it with that checkout first on PYTHONPATH to compare two.

    python -m benchmarks.padded_store [--model smollm2] [--data-dir .multiplex] [--count 8] [--rank 16]
                                      [--high-rank 128] [--slots 16]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.engine import random_adapter
from server.model.adapter_pool import AdapterPool
from server.model.catalog import resolve_model_path
from server.model.config import ModelConfig


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` through lists, tuples, dicts and attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    fields = getattr(obj, "__dataclass_fields__", None) or getattr(obj, "__dict__", {})
    return sum(tensor_bytes(getattr(obj, name), seen) for name in fields)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a name the server knows or a checkpoint directory")
    ap.add_argument("--data-dir", type=Path, default=None, help="where a named model is converted (default: temp)")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--high-rank", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig.from_dir(resolve_model_path(args.model, args.data_dir or Path(tmp)))
    pool = AdapterPool(cfg, args.slots, 1 << 30, "cpu", torch.float32)  # the arena: reserved, its pages untouched
    low = [random_adapter(cfg, args.rank, seed=i) for i in range(args.count)]
    high = random_adapter(cfg, args.high_rank, seed=args.count)
    for slot, deltas in enumerate(low):
        pool.load(slot, deltas)
    row = {"store_mb_low": tensor_bytes(pool.lowrank) / 1e6}
    pool.load(args.count, high)
    row |= {"store_mb_with_high": tensor_bytes(pool.lowrank) / 1e6, "charge_mb_low": pool.nbytes(low[0]) / 1e6,
            "charge_mb_high": pool.nbytes(high) / 1e6}
    print(f"{args.model}, {args.slots} slots: {args.count} adapters of rank {args.rank}: the LowRank store holds "
          f"{row['store_mb_low']:.1f} MB; with one of rank {args.high_rank} beside them "
          f"{row['store_mb_with_high']:.1f} MB; the pool charges {row['charge_mb_low']:.1f} MB for one of rank "
          f"{args.rank}, {row['charge_mb_high']:.1f} MB for the rank-{args.high_rank} one")
    return row


if __name__ == "__main__":
    main()
