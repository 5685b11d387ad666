"""Weights from a local Hugging Face checkpoint directory (config.json + *.safetensors, sharded or not)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise ValueError(f"{path}: only pickle weights (.bin/.pt) found; multiplex loads safetensors only")
        raise ValueError(f"{path}: no *.safetensors weights found")
    return files


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, on the CPU, names as saved (e.g. model.layers.0.self_attn.q_proj.weight)."""
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(Path(path)):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    log.info("loaded %d tensors from %s", len(out), path)
    return out
